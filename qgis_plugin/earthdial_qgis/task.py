"""One request to the backend, run off the UI thread as a QgsTask.

`run` (a worker thread) reads by-value pixels, opens its own ZeroMQ socket, waits for the reply while
polling `isCanceled`, and stores the reply or the error; it never touches widgets. `finished` runs on
the main thread and hands the task to the callback given at construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qgis.core import QgsTask

from .errors import BACKEND_SLOW, BAD_ENDPOINT, CANCELLED, MISSING_DEPENDENCY
from .protocol import Client, EarthDialError, ErrorCode
from .sources import SourcePlan

PROBE_TIMEOUT_S = 1.5  # after a timeout: does the backend answer at all?
# Replies meaning "the backend cannot read this file": it runs on another machine or in a container, or
# may not read that directory. QGIS can, so the pixels are sent instead.
UNREADABLE_FILE = {ErrorCode.FILE_NOT_FOUND, getattr(ErrorCode, "FORBIDDEN_PATH", "forbidden_path")}


class RequestTask(QgsTask):
    def __init__(
        self,
        description: str,
        endpoint: str,
        header: dict[str, Any],
        plan: SourcePlan | None,
        timeout_s: float,
        on_done: Callable[[RequestTask], None],
    ) -> None:
        super().__init__(description, QgsTask.CanCancel)
        self.endpoint = endpoint
        self.header = dict(header)
        self.plan = plan
        self.timeout_s = float(timeout_s)
        self._on_done = on_done
        self.reply: dict[str, Any] | None = None
        self.error: EarthDialError | None = None
        self.sent_by_value = False  # a file the backend could not read was sent as pixels instead

    @property
    def op(self) -> str:
        return str(self.header.get("op", ""))

    def run(self) -> bool:
        try:
            with Client(self.endpoint, timeout_s=self.timeout_s) as client:
                try:
                    self.reply = self._request(client, self.plan)
                except EarthDialError as exc:
                    fallback = self.plan.fallback if self.plan is not None else None
                    if exc.code not in UNREADABLE_FILE or fallback is None:
                        raise
                    self.reply = self._request(client, fallback)
                    self.sent_by_value = True
            return True
        except EarthDialError as exc:
            self.error = self._explain_timeout(exc) if exc.code == ErrorCode.TIMEOUT else exc
        except ImportError as exc:  # pyzmq is missing from QGIS's Python
            self.error = EarthDialError(
                MISSING_DEPENDENCY, f"QGIS's Python lacks a module EarthDial needs: {exc}"
            )
        except Exception as exc:  # anything else must not escape into QGIS's task manager
            self.error = _other_error(exc, self.endpoint)
        return False

    def _request(self, client: Client, plan: SourcePlan | None) -> dict[str, Any]:
        header, arrays = dict(self.header), []
        if plan is not None:
            header["source"], arrays = plan.resolve(self.op == "ask", self.isCanceled)
        self.setProgress(10)
        return client.request(header, arrays, cancelled=self.isCanceled).header

    def finished(self, result: bool) -> None:
        # Let go of the provider clones here, on the main thread, rather than whenever Python collects
        # this task (possibly after QGIS has shut down, which crashes).
        if self.plan is not None:
            self.plan.release()
        self.plan = None
        if not result and self.error is None:  # cancelled before it started
            self.error = EarthDialError(CANCELLED, "request cancelled by the user")
        self._on_done(self)

    def _explain_timeout(self, exc: EarthDialError) -> EarthDialError:
        """A timeout means either nothing listens at the endpoint or the backend is slow; a quick
        `status` tells which, so that the message can say the right thing."""
        if self.op == "status" or self.isCanceled():
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


def _other_error(exc: Exception, endpoint: str) -> EarthDialError:
    if type(exc).__module__.startswith("zmq"):  # e.g. connecting to "localhost:5557" (no scheme)
        return EarthDialError(BAD_ENDPOINT, f"cannot connect to {endpoint!r}: {exc}")
    return EarthDialError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
