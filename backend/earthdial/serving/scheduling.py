"""The server's waiting room: a bounded queue served round-robin between clients, and cancellation.

Requests wait in one FIFO per client: its identity from the transport (the connection's routing id, or
its CURVE key), never a name the request gives itself. The worker takes
the head of each client's FIFO in turn, so one client's burst of 50 puts at most one of its requests
ahead of another client's, not 50. Each queued or running request carries a threading.Event that a
`cancel` request, or its client going away, sets; the worker (and any long job through `is_cancelled`)
checks it between stages and batches.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.limits import MIB


@dataclass(eq=False)
class Pending:
    """A request that was accepted for the worker."""

    ident: bytes  # routing id of the connection it came on: where its reply goes
    client: str  # fairness and cancel key: the transport's identity of its client
    header: dict[str, Any]
    arrays: list[Any]
    cancel: threading.Event = field(default_factory=threading.Event)
    nbytes: int = 0  # what it holds in memory (header and arrays), counted against the queue's bytes
    received: float = field(default_factory=time.monotonic)
    started: float | None = None  # when the worker took it
    stage: str = "queued"  # what it is doing, for `status`
    request: Any = None  # requests.Request: what admission checked of the header, for the op that runs it

    @property
    def request_id(self) -> Any:
        return self.header.get("id")


# Jobs by id(header) while queued or running, so that service code holding only a request's header can
# ask whether it was cancelled. The `is` check below makes a reused id() harmless.
_jobs: dict[int, Pending] = {}


def is_cancelled(header: dict[str, Any]) -> bool:
    """Whether the server was asked to drop the request with this header (False for requests that are
    not server jobs, e.g. the in-process CLI's)."""
    job = _jobs.get(id(header))
    return job is not None and job.header is header and job.cancel.is_set()


def cancel_check(header: dict[str, Any]) -> Callable[[], bool]:
    """`is_cancelled` bound to one request: pass it as a long job's `cancelled` callable."""
    return lambda: is_cancelled(header)


class FairQueue:
    def __init__(self, maxsize: int, per_client: int, max_bytes: int | None = None) -> None:
        self.maxsize = maxsize
        self.max_bytes = max_bytes  # queued and running requests' bytes together; None: no bound
        self._bytes = 0
        self.per_client = max(1, min(per_client, maxsize))
        self._cond = threading.Condition()
        self._waiting: dict[str, deque[Pending]] = {}
        self._turns: deque[str] = deque()  # clients with waiting requests, next to be served first
        self._size = 0
        self._running: list[Pending] = []
        self._closed = False

    def put(self, job: Pending) -> None:
        """Queue a job, or raise `busy` when the queue, or this client's share of it, is full."""
        with self._cond:
            if self._size >= self.maxsize:
                raise EarthDialError(
                    ErrorCode.BUSY, f"the server queue is full ({self.maxsize} waiting); retry later"
                )
            if self.max_bytes is not None and self._bytes + job.nbytes > self.max_bytes:
                raise EarthDialError(
                    ErrorCode.BUSY,
                    f"the server holds {self._bytes / MIB:.0f} MiB of requests already and this one has "
                    f"{job.nbytes / MIB:.1f} MiB; its limit is {self.max_bytes // MIB} MiB (`earthdial serve "
                    "--max-queue-mb` raises it); retry when some are answered",
                )
            waiting = self._waiting.get(job.client)
            if waiting is not None and len(waiting) >= self.per_client:
                raise EarthDialError(
                    ErrorCode.BUSY,
                    f"this client has {self.per_client} requests waiting already (the most one client "
                    "may queue); retry when some are answered",
                )
            if waiting is None:
                waiting = self._waiting[job.client] = deque()
                self._turns.append(job.client)
            waiting.append(job)
            self._size += 1
            self._bytes += job.nbytes
            _jobs[id(job.header)] = job
            self._cond.notify()

    def take(
        self, n: int, wait: bool = True, admit: Callable[[Pending], bool] | None = None
    ) -> list[Pending] | None:
        """Take up to n jobs round-robin between clients and mark them running; with `wait`, block until
        work is waiting (else the list may be empty). A job `admit` refuses stays at the head of its
        client's queue and keeps that client's place in the turns. None once the queue is closed."""
        with self._cond:
            while wait and self._size == 0 and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            batch: list[Pending] = []
            passed: list[str] = []
            while len(batch) < n and self._turns:
                client = self._turns.popleft()
                waiting = self._waiting[client]
                if admit is not None and not admit(waiting[0]):
                    passed.append(client)
                    continue
                batch.append(waiting.popleft())
                if waiting:
                    self._turns.append(client)
                else:
                    del self._waiting[client]
            self._turns.extendleft(reversed(passed))
            self._size -= len(batch)
            now = time.monotonic()
            for job in batch:
                job.started, job.stage = now, "starting"
            self._running.extend(batch)
            return batch

    def done(self, batch: list[Pending]) -> None:
        with self._cond:
            for job in batch:
                self._running.remove(job)
                self._bytes -= job.nbytes
                _jobs.pop(id(job.header), None)

    def _unqueue(self, job: Pending) -> None:
        waiting = self._waiting[job.client]
        waiting.remove(job)
        if not waiting:
            del self._waiting[job.client]
            self._turns.remove(job.client)
        self._size -= 1
        self._bytes -= job.nbytes
        _jobs.pop(id(job.header), None)

    def cancel(self, target: str, ident: bytes, client: str) -> tuple[str, Pending | None]:
        """Cancel the request `target` of this connection or client (its transport identity: a request
        of another client is "unknown" to it): ("queued", job) when it was taken
        off the queue (the caller replies for it), ("running", job) when it is flagged to stop at its
        next batch boundary, ("unknown", None) otherwise."""
        with self._cond:
            for waiting in self._waiting.values():
                for job in waiting:
                    if job.request_id == target and (job.ident == ident or job.client == client):
                        self._unqueue(job)
                        job.cancel.set()
                        return "queued", job
            for job in self._running:
                if job.request_id == target and (job.ident == ident or job.client == client):
                    job.cancel.set()
                    return "running", job
        return "unknown", None

    def drop_connection(self, ident: bytes) -> list[Pending]:
        """A connection went away: take its queued jobs off (returned) and flag its running ones."""
        with self._cond:
            gone = [job for waiting in self._waiting.values() for job in waiting if job.ident == ident]
            for job in gone:
                self._unqueue(job)
                job.cancel.set()
            for job in self._running:
                if job.ident == ident:
                    job.cancel.set()
            return gone

    def cancel_running(self) -> None:
        """Flag every running job to stop (the server is shutting down)."""
        with self._cond:
            for job in self._running:
                job.cancel.set()

    def has_connection(self, ident: bytes) -> bool:
        """Whether a request of this connection is queued or running."""
        with self._cond:
            return any(job.ident == ident for job in self._running) or any(
                job.ident == ident for waiting in self._waiting.values() for job in waiting
            )

    def jobs(self) -> list[dict[str, Any]]:
        """The running jobs, as `status` tells them: id, op, stage, seconds since arrival and start."""
        now = time.monotonic()
        with self._cond:
            return [
                {
                    "id": job.request_id,
                    "op": job.header.get("op"),
                    "client": job.client[:13],
                    "stage": job.stage,
                    "age_s": round(now - job.received, 3),
                    "running_s": round(now - job.started, 3) if job.started is not None else None,
                    "cancel_requested": job.cancel.is_set(),
                }
                for job in self._running
            ]

    def counts(self) -> dict[str, Any]:
        """Queue length, running jobs, and both per client (names shortened: they are not for sharing)."""
        with self._cond:
            per: dict[str, list[int]] = {}
            for client, waiting in self._waiting.items():
                per.setdefault(client, [0, 0])[0] = len(waiting)
            for job in self._running:
                per.setdefault(job.client, [0, 0])[1] += 1
            return {
                "queue": self._size,
                "queue_bytes": self._bytes,
                "running": len(self._running),
                "clients": [{"client": c[:13], "queued": q, "running": r} for c, (q, r) in per.items()],
            }

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
