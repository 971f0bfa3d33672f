"""One request to the backend, run off the UI thread as a QgsTask.

`run` (a worker thread) reads by-value pixels, opens its own ZeroMQ socket, waits for the reply while
polling `isCanceled`, reads the preview of what was sent and stores the reply or the error; it never
touches widgets. `finished` runs on the main thread and hands the task to the callback given at
construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from qgis.core import QgsTask

from ..contract.client import Client
from ..contract.wire import EarthDialError, ErrorCode
from ..core.errors import BACKEND_SLOW, BAD_ENDPOINT, UNREACHABLE, UNREADABLE_FILE
from ..core.request import Request
from ..core.sources import SourcePlan, planning_source

PROBE_TIMEOUT_S = 1.5  # after a timeout: does the backend answer at all?
PING_TIMEOUT_S = 3.0  # before a request: a backend that is not there is an error now, not after the timeout
UNPINGED_OPS = ("status", "ping", "plan")  # short requests with short timeouts of their own


def resolve_sources(
    header: dict[str, Any], plans: list[SourcePlan], cancelled: Callable[[], bool] | None = None
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The header with its `source` (one plan) or `sources` (a pair or sequence) and the array frames."""
    header, arrays = dict(header), []
    sources = []
    for plan in plans:
        source, frames = plan.resolve(header.get("op") != "georef", cancelled)
        sources.append(source)
        arrays.extend(frames)
    if len(sources) == 1:
        header["source"] = sources[0]
    elif sources:
        header["sources"] = sources
    return header, arrays


def request_with_fallback(
    client: Client,
    header: dict[str, Any],
    plans: list[SourcePlan],
    cancelled: Callable[[], bool] | None = None,
) -> tuple[dict[str, Any], list[np.ndarray], bool]:
    """Send a request; when the backend cannot read a referenced file, send those layers' pixels instead.
    Returns the reply header, the arrays sent, and whether the fallback was used. A `plan` request
    carries a coarse sample of by-value pixels instead of the whole window."""
    full, arrays = _sources(header, plans, cancelled)
    try:
        return client.request(full, arrays, cancelled=cancelled).header, arrays, False
    except EarthDialError as exc:
        if exc.code not in UNREADABLE_FILE or not any(p.fallback is not None for p in plans):
            raise
    plans = [p.fallback if p.fallback is not None else p for p in plans]
    full, arrays = _sources(header, plans, cancelled)
    return client.request(full, arrays, cancelled=cancelled).header, arrays, True


def _sources(
    header: dict[str, Any], plans: list[SourcePlan], cancelled: Callable[[], bool] | None
) -> tuple[dict[str, Any], list[np.ndarray]]:
    if header.get("op") != "plan":
        return resolve_sources(header, plans, cancelled)
    header, arrays, sources = dict(header), [], []
    for plan in plans:
        source, frames = planning_source(plan, cancelled)
        sources.append(source)
        arrays.extend(frames)
    header["source" if len(sources) == 1 else "sources"] = sources[0] if len(sources) == 1 else sources
    return header, arrays


def ping_first(client: Client, endpoint: str, cancelled: Callable[[], bool] | None = None) -> None:
    """A short ping before a request, so that an endpoint where nothing runs fails within seconds (the
    request's own timeout may be minutes: it bounds the model's work)."""
    try:
        client.request({"op": "ping"}, timeout_s=PING_TIMEOUT_S, cancelled=cancelled)
    except EarthDialError as exc:
        if exc.code != ErrorCode.TIMEOUT:
            raise
        raise EarthDialError(UNREACHABLE, f"nothing answered a ping within {PING_TIMEOUT_S:g} s") from None


class RequestTask(QgsTask):
    def __init__(
        self,
        description: str,
        endpoint: str,
        header: dict[str, Any],
        plan: SourcePlan | list[SourcePlan] | None,
        timeout_s: float,
        on_done: Callable[[RequestTask], None],
        preview_bands: list[int] | None = None,
    ) -> None:
        super().__init__(description, QgsTask.Flag.CanCancel)
        self.endpoint = endpoint
        self.header = dict(header)
        self.plans: list[SourcePlan] = (
            [] if plan is None else list(plan) if isinstance(plan, (list, tuple)) else [plan]
        )
        self.timeout_s = float(timeout_s)
        self._on_done = on_done
        self.preview_bands = list(preview_bands or [])
        self.reply: dict[str, Any] | None = None
        self.error: EarthDialError | None = None
        self.preview: np.ndarray | None = None  # what the model saw (first image), for the preview
        self.preview_nodata: float | None = None
        self.sent_by_value = False  # a file the backend could not read was sent as pixels instead
        self.request: Request | None = None  # the panel's request, for a task made by `of`

    @classmethod
    def of(
        cls,
        description: str,
        request: Request,
        on_done: Callable[[RequestTask], None],
        preview_bands: list[int] | None = None,
        plan_only: bool = False,
        timeout_s: float | None = None,
    ) -> RequestTask:
        """The task that sends ``request`` (made on the main thread: its layers' plans clone their
        providers here); with ``plan_only``, the `plan` request asking what it would send."""
        header = request.plan_header() if plan_only else request.header()
        plans = request.plans()
        task = cls(
            description,
            request.endpoint,
            header,
            plans,
            request.timeout_s if timeout_s is None else timeout_s,
            on_done,
            preview_bands,
        )
        task.request = request
        return task

    @property
    def op(self) -> str:
        return str(self.header.get("op", ""))

    @property
    def plan(self) -> SourcePlan | None:
        return self.plans[0] if self.plans else None

    def run(self) -> bool:
        try:
            with Client(self.endpoint, timeout_s=self.timeout_s) as client:
                if self.op not in UNPINGED_OPS:
                    ping_first(client, self.endpoint, self.isCanceled)
                self.setProgress(5)
                reply, arrays, self.sent_by_value = request_with_fallback(
                    client, self.header, self.plans, self.isCanceled
                )
                self.reply = reply
            self.setProgress(90)
            self._read_preview(arrays)
            self.setProgress(100)
            return True
        except EarthDialError as exc:
            self.error = self._explain_timeout(exc) if exc.code == ErrorCode.TIMEOUT else exc
        except ImportError as exc:  # pyzmq is missing from QGIS's Python
            self.error = EarthDialError(
                ErrorCode.MISSING_DEPENDENCY, f"QGIS's Python lacks a module EarthDial needs: {exc}"
            )
        except Exception as exc:  # anything else must not escape into QGIS's task manager
            self.error = _other_error(exc, self.endpoint)
        return False

    def _read_preview(self, arrays: list[np.ndarray]) -> None:
        """The first image as sent: the array itself (by value), else the reply's window read here."""
        from ..core import preview  # QtGui-free parts only on this thread

        if self.reply is None or self.op in ("status", "plan") or not self.plans:
            return
        plan = self.plans[0]
        sent_first = plan.by_value or self.sent_by_value
        if sent_first and arrays and self.op == "ask" and arrays[0].ndim == 3:
            chosen = plan if plan.by_value else plan.fallback
            indexes = _band_indexes(chosen.bands if chosen else None, self.preview_bands)
            self.preview = preview.shrink(arrays[0][indexes] if indexes else arrays[0])
            self.preview_nodata = chosen.nodata if chosen else None
            return
        provider_plan = plan if plan.by_value else plan.fallback
        if provider_plan is None or provider_plan.provider is None:
            return
        chip = self.reply.get("chip") or {}
        self.preview = preview.read_window(
            provider_plan.provider, chip, self.preview_bands or list(chip.get("bands") or []), self.isCanceled
        )
        self.preview_nodata = provider_plan.nodata

    def finished(self, result: bool) -> None:
        # Let go of the provider clones here, on the main thread, rather than whenever Python collects
        # this task (possibly after QGIS has shut down, which crashes).
        for plan in self.plans:
            plan.release()
        self.plans = []
        if not result and self.error is None:  # cancelled before it started
            self.error = EarthDialError(ErrorCode.CANCELLED, "request cancelled by the user")
        self._on_done(self)

    def _explain_timeout(self, exc: EarthDialError) -> EarthDialError:
        """A timeout means either nothing listens at the endpoint or the backend is slow; a quick
        `status` tells which, so that the message can say the right thing."""
        if self.op in UNPINGED_OPS or self.isCanceled():
            return exc
        try:
            with Client(self.endpoint, timeout_s=PROBE_TIMEOUT_S) as client:
                status = client.status()  # answered by the server's I/O loop, even while it computes
        except Exception:
            return exc
        return EarthDialError(
            BACKEND_SLOW,
            f"no reply within {self.timeout_s:g} s ({status.get('queue', 0)} request(s) queued, "
            f"{status.get('running', 0)} running); raise the timeout or try again later",
        )


def _band_indexes(sent: list[int] | None, wanted: list[int]) -> list[int]:
    """Positions in the sent array of the bands the preview should show (the displayed ones)."""
    if not sent or not wanted or not all(b in sent for b in wanted):
        return []
    return [sent.index(b) for b in wanted]


def _other_error(exc: Exception, endpoint: str) -> EarthDialError:
    if type(exc).__module__.startswith("zmq"):  # e.g. connecting to "localhost:5557" (no scheme)
        return EarthDialError(BAD_ENDPOINT, f"cannot connect to {endpoint!r}: {exc}")
    return EarthDialError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
