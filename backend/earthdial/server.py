"""The ZeroMQ server: one ROUTER socket, one model, a bounded queue and a worker thread.

The I/O loop owns the ROUTER socket (ZeroMQ sockets are not thread-safe): it decodes requests, answers
`status` and malformed messages at once, queues work, and forwards the worker's replies, which come
back over an inproc socket. Every failure of one request becomes a typed error reply to that request.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import traceback
from ipaddress import ip_address
from typing import Any
from urllib.parse import urlparse

import zmq

from . import service
from .protocol import (
    MAX_MESSAGE_BYTES,
    EarthDialError,
    ErrorCode,
    decode,
    encode,
    error_reply,
    ok_reply,
)

log = logging.getLogger("earthdial.server")
_WORKER_ADDR = "inproc://earthdial-replies"


def is_loopback(endpoint: str) -> bool:
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = urlparse(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


class Server:
    def __init__(self, engine: Any, endpoint: str, queue_size: int = 32, max_batch: int = 8) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.endpoint = endpoint
        self.jobs: queue.Queue[tuple[bytes, dict[str, Any], list[Any]] | None] = queue.Queue(
            maxsize=queue_size
        )
        self.running = 0
        self.stop_event = threading.Event()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # zmq drops larger messages before allocating
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.replies = self.ctx.socket(zmq.PULL)
        self.replies.bind(_WORKER_ADDR)
        self.sock.bind(endpoint)
        self.bound = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def close(self) -> None:
        self.stop_event.set()
        self.sock.close(0)
        self.replies.close(0)
        self.ctx.term()

    # -- the worker thread ------------------------------------------------------------------------
    def _next_batch(self) -> list[tuple[bytes, dict[str, Any], list[Any]]] | None:
        """Block for one job, then take whatever else is already waiting, up to max_batch."""
        first = self.jobs.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)  # stop after this batch
                break
            batch.append(job)
        return batch

    def _work(self) -> None:
        out = self.ctx.socket(zmq.PUSH)
        out.connect(_WORKER_ADDR)
        try:
            while (batch := self._next_batch()) is not None:
                self.running = len(batch)
                for ident, reply in self._answer(batch):
                    out.send_multipart([ident, *encode(reply)])
                self.running = 0
        finally:
            out.close(0)

    def _answer(
        self, batch: list[tuple[bytes, dict[str, Any], list[Any]]]
    ) -> list[tuple[bytes, dict[str, Any]]]:
        """Prepare each request (its own errors are its own), decode the model's part as one batch,
        and fall back to one by one if the batch as a whole fails."""
        replies: list[tuple[bytes, dict[str, Any]]] = []
        ready: list[tuple[bytes, service.Job]] = []
        for ident, header, arrays in batch:
            try:
                ready.append((ident, service.prepare(header, arrays, self.engine)))
            except Exception as exc:
                replies.append((ident, _error(header, exc)))
        failed: dict[int, Exception] = {}
        try:
            service.generate([job for _, job in ready], self.engine)
        except Exception as exc:
            if len(ready) == 1:
                failed[0] = exc
            else:  # one bad request must not fail the others: decode each alone
                for i, (_, job) in enumerate(ready):
                    try:
                        service.generate([job], self.engine)
                    except Exception as one:
                        failed[i] = one
        for i, (ident, job) in enumerate(ready):
            try:
                if i in failed:
                    raise failed[i]
                replies.append((ident, ok_reply(job.header.get("id"), **service.finish(job, self.engine))))
            except Exception as exc:
                replies.append((ident, _error(job.header, exc)))
        return replies

    # -- the I/O loop -----------------------------------------------------------------------------
    def _send(self, ident: bytes, reply: dict[str, Any]) -> None:
        self.sock.send_multipart([ident, *encode(reply)], copy=False)

    def _on_request(self, frames: list[Any]) -> None:
        ident, body = frames[0].bytes, frames[1:]
        request_id = None
        try:
            msg = decode(body)
            request_id = msg.header.get("id")
            if not isinstance(request_id, (str, type(None))):
                raise EarthDialError(ErrorCode.BAD_REQUEST, "field 'id' must be a string")
            op = msg.header.get("op")
            if op == "status":
                self._send(
                    ident,
                    ok_reply(request_id, **service.status(self.engine, self.jobs.qsize(), self.running)),
                )
                return
            if op not in ("ask", "georef"):
                raise EarthDialError(
                    ErrorCode.UNKNOWN_OP, f"unknown op {op!r:.40}; known: ask, georef, status"
                )
            try:
                self.jobs.put_nowait((ident, msg.header, msg.arrays))
            except queue.Full:
                raise EarthDialError(
                    ErrorCode.BUSY, f"the server queue is full ({self.jobs.maxsize} waiting); retry later"
                ) from None
        except EarthDialError as exc:
            if request_id is None:
                request_id = _best_effort_id(body)
            self._send(ident, error_reply(request_id, exc))

    def serve_forever(self) -> None:
        worker = threading.Thread(target=self._work, name="earthdial-worker", daemon=True)
        worker.start()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.replies, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                events = dict(poller.poll(200))
                if self.replies in events:
                    self.sock.send_multipart(self.replies.recv_multipart(copy=False), copy=False)
                if self.sock in events:
                    frames = self.sock.recv_multipart(copy=False)
                    if len(frames) >= 1:
                        self._on_request(frames)
        finally:
            self.jobs.put(None)
            worker.join(timeout=5)


def _error(header: dict[str, Any], exc: Exception) -> dict[str, Any]:
    if not isinstance(exc, EarthDialError):  # never let one request take the server down
        log.error("request %s failed:\n%s", header.get("id"), traceback.format_exc())
        exc = EarthDialError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
    return error_reply(header.get("id"), exc)


def _best_effort_id(frames: list[Any]) -> str | None:
    """The id of a request that failed validation, when its header is at least readable JSON."""
    try:
        header = json.loads(bytes(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0]))
        rid = header.get("id")
        return rid if isinstance(rid, str) else None
    except Exception:
        return None
