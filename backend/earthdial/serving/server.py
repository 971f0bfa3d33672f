"""The ZeroMQ server: one ROUTER socket, one model, a fair bounded queue and a worker thread.

The I/O loop owns the ROUTER socket (ZeroMQ sockets are not thread-safe): it decodes requests, answers
`ping`, `status`, `cancel` and malformed messages at once, queues work, and forwards the worker's replies,
which come back over an inproc socket. Every failure of one request becomes a typed error reply to that
request; nothing a client sends may stop the loop. The worker answers requests in batches and advances
whole-scene scans one batch of tiles at a time, in turn, so a long scan never holds the model from others.

Clients that go away: a monitor on the ROUTER socket reports each dropped connection by file descriptor;
requests remember the descriptor they came on (ZMQ_SRCFD), so a dropped connection's queued requests are
taken off the queue and its running ones flagged to stop. A client waiting for a reply sends nothing but
stays connected, so it is never mistaken for a gone one; a vanished peer that did not close its socket
is dropped by ZMTP heartbeats (HEARTBEAT_TIMEOUT_MS).

Hostile input: a client's identity is its connection (routing id) or its CURVE key, never a
field of its requests; connections are capped and idle ones ended (connections.py); every request is
bounded before it is queued and while it runs (limits.py); see docs/security.md.
"""

from __future__ import annotations

import logging
import struct
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import zmq

from earthdial import limits
from earthdial.contract.wire import (
    MAX_HEADER_BYTES,
    MAX_ID_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_TOTAL_BYTES,
    OPS,
    EarthDialError,
    ErrorCode,
    decode,
    encode,
    error_reply,
    ok_reply,
    peek_id,
)
from earthdial.geo import file_access, imagery
from earthdial.scenes import runner as scenes
from earthdial.serving import auth, readers, requests, scan, service
from earthdial.serving.connections import HANDSHAKE_IVL_MS, Connections, connection_cap
from earthdial.serving.scheduling import FairQueue, Pending

if TYPE_CHECKING:  # torch only where the model runs
    from earthdial.model.engine import Engine

log = logging.getLogger("earthdial.serving.server")
_WORKER_ADDR = "inproc://earthdial-replies"
LOOP_OPS = ("ping", "status", "cancel")  # answered by the I/O loop; the other OPS go to the worker
HEARTBEAT_IVL_MS = 2000
HEARTBEAT_TIMEOUT_MS = 6000
MAX_SCANS = 4  # whole-scene scans advanced in turn; more wait in the queue (each holds a reader thread)
MAX_STREAM_BACKLOG = 16  # scan_tiles messages waiting for one scan (the client keeps two batches in flight)
BUFFER_CHECK_S = 0.1  # how often the bytes libzmq holds per connection are checked
MAX_PLANS = 64  # `plan`s waiting for a reader process; past it `busy`
_DRAIN = 256  # messages handled per socket per loop turn, so that neither socket starves the other


class Server:
    def __init__(
        self,
        engine: Engine | None,
        endpoint: str,
        queue_size: int = 64,
        max_batch: int = 8,
        *,
        client_queue: int | None = None,
        curve_secret_key: bytes | None = None,
        curve_clients: set[bytes] | None = None,
        allowed_dirs: list[str] | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        budgets: limits.Limits | None = None,
        max_connections: int | None = None,
        idle_timeout_s: float | None = None,
        reader_processes: int = 2,
    ) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.endpoint = endpoint
        self.instance = uuid.uuid4().hex  # tells a client that the server it talks to was restarted
        self.started = time.monotonic()
        self.budgets = budgets or limits.Limits()
        self._previous_limits = limits.configure(self.budgets)
        self.queue = FairQueue(
            queue_size, client_queue or max(1, queue_size // 2), self.budgets.max_queue_bytes
        )
        self.connections = Connections(
            connection_cap(max_connections or 512), 300.0 if idle_timeout_s is None else idle_timeout_s
        )
        self._next_sweep = 0.0
        self._next_buffer_check = 0.0
        self.stop_event = threading.Event()
        self._peer_fd: dict[bytes, int] = {}  # routing id -> socket fd it last sent on
        self._streams: dict[tuple[bytes, Any], scenes.Stream] = {}  # streamed detects' tile inboxes
        self._worker: threading.Thread | None = None
        self._previous_policy = file_access.policy()
        self._set_dirs = allowed_dirs is not None
        if allowed_dirs is not None:  # the folders it reads: one value, which the reading code asks for
            file_access.install(file_access.FilePolicy.of(allowed_dirs))
        # every open and read of a user's file runs in a reader process (readers.py); a server that
        # reads no file by reference needs none
        self.readers = readers.ReaderPool(reader_processes, self.budgets) if allowed_dirs else None
        self._previous_readers = imagery.use_readers(self.readers) if self.readers is not None else None
        self._plans = ThreadPoolExecutor(max(1, reader_processes), thread_name_prefix="earthdial-plan")
        self._plans_waiting = 0
        self._plans_lock = threading.Lock()

        self.ctx = zmq.Context()
        # the ZAP handler must be bound before the first CURVE handshake; it also names each client's key
        self.zap = auth.ZapHandler(self.ctx, curve_clients) if curve_secret_key else None
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)  # per frame; libzmq drops the peer past it
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to gone clients are dropped silently
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        if curve_secret_key:
            auth.enable_curve(self.sock, curve_secret_key)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.replies = self.ctx.socket(zmq.PULL)
        self.replies.bind(_WORKER_ADDR)
        self._plan_out = self.ctx.socket(zmq.PUSH)  # plans answered off the I/O loop (under _plans_lock)
        self._plan_out.connect(_WORKER_ADDR)
        self.sock.bind(endpoint)
        self.bound = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def close(self) -> None:
        self.stop_event.set()
        self.queue.cancel_running()  # a read in progress stops at its next strip
        self.queue.close()
        self._plans.shutdown(wait=False, cancel_futures=True)
        if self.readers is not None:
            self.readers.close()  # a plan waiting on a reader stops
            imagery.use_readers(self._previous_readers)
        self.sock.disable_monitor()
        with self._plans_lock:
            self._plan_out.close(0)
        for s in (self.monitor, self.sock, self.replies):
            s.close(0)
        if self.zap is not None:
            self.zap.close()
        if self._worker is None or not self._worker.is_alive():
            self.ctx.term()  # else a job is still on the device: its socket would block term()
        if self._set_dirs:
            file_access.install(self._previous_policy)
        limits.configure(self._previous_limits)

    # -- the worker thread ------------------------------------------------------------------------
    def _work(self) -> None:
        """Answers batches of requests and advances whole-scene scans one batch at a time, in turn, so
        that a long scan shares the model: a request that arrives during it waits at most for the scan
        batch in progress (and one batch of each other running scan), not for the whole scene."""
        out = self.ctx.socket(zmq.PUSH)
        out.connect(_WORKER_ADDR)
        scans: deque[tuple[Pending, Generator[None, None, dict[str, Any]]]] = deque()
        try:
            while True:
                taken = len(scans)

                def admit(job: Pending) -> bool:  # at most MAX_SCANS scans at once; the rest wait queued
                    nonlocal taken
                    if job.header.get("op") not in scan.OPS:
                        return True
                    taken += 1
                    return taken <= MAX_SCANS

                batch = self.queue.take(self.max_batch, wait=not scans, admit=admit)
                if batch is None:
                    break
                asks = [job for job in batch if job.header.get("op") not in scan.OPS]
                scans.extend((job, self._start_scan(job, out)) for job in batch if job not in asks)
                if asks:
                    self._answer_and_send(asks, out)
                if scans:
                    job, work = scans.popleft()
                    reply = self._step_scan(job, work)
                    if reply is None:
                        scans.append((job, work))
                    else:
                        self.queue.done([job])
                        self._streams.pop((job.ident, job.request_id), None)
                        out.send_multipart([job.ident, *_encode_reply(reply)])
        finally:
            for _, work in scans:
                work.close()  # stops its reader thread
            out.close(0)

    def _answer_and_send(self, batch: list[Pending], out: zmq.Socket) -> None:
        try:
            replies = self._answer(batch)
        except Exception as exc:  # a bug here must cost this batch, not the worker
            replies = [(job.ident, _error(job.header, exc)) for job in batch]
        finally:
            self.queue.done(batch)
        for ident, reply in replies:
            out.send_multipart([ident, *_encode_reply(reply)])

    # -- whole scenes: streamed events, tiles by value ------------------------------------------------
    def _start_scan(self, job: Pending, out: zmq.Socket) -> Generator[None, None, dict[str, Any]]:
        """A whole-scene job as steps of one batch: its events (plan, progress with the boxes of each
        batch, merged chunks) go out as they are made; a cancel stops it at the next step."""

        def emit(event: str, **fields: Any) -> None:
            if event == "progress":
                job.stage = f"scanning {fields['done']} of {fields['total']} tiles"
            out.send_multipart([job.ident, *_encode_reply(ok_reply(job.request_id, event=event, **fields))])

        stream = self._streams.get((job.ident, job.request_id))
        return scan.steps(job.header, self.engine, emit, job.cancel.is_set, stream, job.request, job.arrays)

    def _step_scan(self, job: Pending, work: Generator[None, None, dict[str, Any]]) -> dict[str, Any] | None:
        """Run a scan's next step under its cancel flag and deadline: None while it is unfinished, else
        its reply (the result, or its error)."""
        try:
            with _running(job):
                limits.checkpoint()  # cancelled, or past its deadline (also while it waited its turn)
                next(work)
            return None
        except StopIteration as end:
            return ok_reply(job.request_id, **end.value)
        except Exception as exc:
            work.close()
            if _out_of_memory(exc):
                _free_device_memory()
                exc = _oom_error(exc)
            return _error(job.header, exc)

    def _scan(self, job: Pending, out: zmq.Socket) -> dict[str, Any]:
        """A scan run to its end in one go (the in-process fuzzer drives scans this way)."""
        work = self._start_scan(job, out)
        while (reply := self._step_scan(job, work)) is None:
            pass
        return reply

    def _open_stream(self, ident: bytes, header: dict[str, Any], request: requests.Request | None) -> None:
        """A detect whose tiles come by value: an inbox for its scan_tiles messages, made before it is
        queued so that tiles sent early wait there."""
        if request is not None and isinstance(request.sources[0], requests.Stream):
            self._streams[(ident, header.get("id"))] = scenes.Stream()

    def _feed_stream(self, ident: bytes, header: dict[str, Any], arrays: list[Any]) -> None:
        """scan_tiles: pixels for a running (or queued) streamed detect of the same connection. No reply
        unless it cannot be delivered; a bad tile fails the scan itself."""
        target = header.get("scan")
        stream = self._streams.get((ident, target))
        if stream is None:
            raise EarthDialError(
                ErrorCode.BAD_REQUEST,
                f"scan_tiles: no streamed detect {target!r:.60} is running on this connection",
            )
        if stream.inbox.qsize() > MAX_STREAM_BACKLOG:
            raise EarthDialError(
                ErrorCode.BUSY,
                "scan_tiles: too many tile messages waiting; wait for progress events before sending more",
            )
        stream.inbox.put((header, arrays))

    def _answer(self, batch: list[Pending]) -> list[tuple[bytes, dict[str, Any]]]:
        """Prepare each request (its own errors are its own), decode the model's part as one batch,
        and fall back to one by one if the batch as a whole fails. Cancellation is honoured between
        these stages."""
        replies: list[tuple[bytes, dict[str, Any]]] = []
        ready: list[tuple[Pending, service.Job]] = []
        for job in batch:
            try:
                with _running(job):
                    limits.checkpoint("reading")  # cancelled, or past its deadline while it waited
                    ready.append((job, service.prepare(job.header, job.arrays, self.engine, job.request)))
                    job.stage = "waiting for the model"
            except Exception as exc:
                replies.append((job.ident, _error(job.header, exc)))
        for job, _ in ready:
            if job.cancel.is_set():
                replies.append((job.ident, _error(job.header, _cancelled())))
        ready = [(job, prepared) for job, prepared in ready if not job.cancel.is_set()]
        failed = self._generate(ready)
        for i, (job, prepared) in enumerate(ready):
            try:
                if i in failed:
                    raise failed[i]
                with _running(job):
                    limits.checkpoint("finishing")  # a decode stopped by a cancel or the deadline
                fields = service.finish(prepared, self.engine)
                replies.append((job.ident, ok_reply(job.request_id, **fields)))
            except Exception as exc:
                replies.append((job.ident, _error(job.header, exc)))
        return replies

    def _generate(self, ready: list[tuple[Pending, service.Job]]) -> dict[int, Exception]:
        """Run the model on the prepared jobs; failures by index. A failed batch is retried one job at a
        time, after freeing the device's cached memory when it ran out of it."""
        jobs = [prepared for _, prepared in ready]
        for job, _ in ready:
            job.stage = f"generating (a batch of {len(ready)})"
        try:
            service.generate(jobs, self.engine, [_stop_flag(job) for job, _ in ready])
            return {}
        except Exception as exc:
            if _out_of_memory(exc):
                _free_device_memory()
                log.warning("out of memory on a batch of %d; retrying one by one", len(jobs))
            if len(jobs) <= 1:
                return {0: _oom_error(exc) if _out_of_memory(exc) else exc}
        failed: dict[int, Exception] = {}
        for i, (job, prepared) in enumerate(ready):
            if job.cancel.is_set():
                continue  # answered as cancelled afterwards
            try:
                service.generate([prepared], self.engine, [_stop_flag(job)])
            except Exception as one:
                if _out_of_memory(one):
                    _free_device_memory()
                    one = _oom_error(one)
                failed[i] = one
        return failed

    # -- the I/O loop -----------------------------------------------------------------------------
    def _send(self, ident: bytes, reply: dict[str, Any]) -> None:
        self.sock.send_multipart([ident, *_encode_reply(reply)], copy=False)

    def _on_request(self, frames: list[Any]) -> None:
        ident, body = frames[0].bytes, frames[1:]
        try:
            fd = frames[0].get(zmq.SRCFD)
            self._peer_fd[ident] = fd
            self.connections.message(fd, time.monotonic(), sum(self._wire_bytes(len(f)) for f in body))
        except zmq.ZMQError:
            pass  # inproc peers have no descriptor
        header: dict[str, Any] = {}
        try:
            msg = decode(body)
            header = msg.header
            self._dispatch(ident, _identity(ident, body), header, msg.arrays, body)
        except EarthDialError as exc:
            self._send(ident, error_reply(_valid_id(header.get("id")) if header else peek_id(body[0]), exc))
        except Exception as exc:  # a bug: typed `internal`, and the loop goes on
            self._send(ident, _error({"id": _valid_id(header.get("id"))}, exc))

    def _dispatch(
        self, ident: bytes, client: str, header: dict[str, Any], arrays: list[Any], frames: Sequence[Any] = ()
    ) -> None:
        raw = _frame_bytes(frames[0]) if frames else None
        request = admit(header, arrays, raw)
        request_id, op = header.get("id"), header["op"]
        if op == "ping":
            reply = ok_reply(
                request_id, pong=True, server=self.instance, uptime_s=time.monotonic() - self.started
            )
            self._send(ident, reply)
        elif op == "status":
            counts = self.queue.counts()
            fields = service.status(self.engine, counts["queue"], counts["running"])
            fields.update(
                clients=counts["clients"],
                queue_size=self.queue.maxsize,
                server=self.instance,
                jobs=self.queue.jobs(),
                queue_bytes=counts["queue_bytes"],
                connections=self.connections.counts(),
                limits=_limits_view(self.budgets),
            )
            self._send(ident, ok_reply(request_id, **fields))
        elif op == "plan":
            self._plan(ident, header, arrays, request)
        elif op == "cancel":
            target = header.get("target")
            if not isinstance(target, str):
                raise EarthDialError(
                    ErrorCode.BAD_REQUEST, "field 'target' must be the id of the request to cancel"
                )
            state, job = self.queue.cancel(target, ident, client)
            if state == "queued" and job is not None:
                self._streams.pop((job.ident, job.request_id), None)
                self._send(job.ident, error_reply(job.request_id, _cancelled()))
            self._send(ident, ok_reply(request_id, target=target, state=state))
        elif op == "scan_tiles":
            self._feed_stream(ident, header, arrays)
        else:
            nbytes = sum(int(a.nbytes) for a in arrays) + (raw.nbytes if raw is not None else 0)
            if self.queue.max_bytes is not None and nbytes > self.queue.max_bytes:
                raise limits.too_large("the request holds", nbytes, "max_queue_bytes", "bytes")
            self._open_stream(ident, header, request)
            try:
                self.queue.put(Pending(ident, client, header, arrays, nbytes=nbytes, request=request))
            except Exception:
                self._streams.pop((ident, request_id), None)
                raise

    def _plan(
        self, ident: bytes, header: dict[str, Any], arrays: list[Any], request: requests.Request | None
    ) -> None:
        """Answer a `plan`: on the I/O loop when no file can be read by reference (by value, the
        metadata is in the request), else on a plan thread that waits for a reader process, so the I/O
        loop never opens a file."""
        if self.readers is None:
            self._send(
                ident, ok_reply(header.get("id"), **service.plan(header, arrays, self.engine, request))
            )
            return
        with self._plans_lock:
            if self._plans_waiting >= MAX_PLANS:
                raise EarthDialError(ErrorCode.BUSY, f"{MAX_PLANS} plans are waiting for a reader; try again")
            self._plans_waiting += 1
        self._plans.submit(self._plan_job, ident, header, arrays, request)

    def _plan_job(
        self, ident: bytes, header: dict[str, Any], arrays: list[Any], request: requests.Request | None
    ) -> None:
        try:
            with limits.running(self.stop_event.is_set, None):  # the reader's own timeout bounds it
                reply = ok_reply(header.get("id"), **service.plan(header, arrays, self.engine, request))
        except Exception as exc:
            reply = _error(header, exc)
        frames = [ident, *_encode_reply(reply)]
        with self._plans_lock:
            self._plans_waiting -= 1
            if not self.stop_event.is_set():
                self._plan_out.send_multipart(frames)

    def _on_monitor(self) -> None:
        while True:
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event, fd = struct.unpack("=HI", frames[0][:6])  # native order: event id, then the fd
            if event == zmq.EVENT_ACCEPTED:
                self.connections.accepted(fd, time.monotonic())
                continue
            if event != zmq.EVENT_DISCONNECTED:
                continue
            self.connections.closed(fd)
            for ident in [i for i, f in self._peer_fd.items() if f == fd]:
                del self._peer_fd[ident]
                gone = self.queue.drop_connection(ident)
                for job in gone:
                    self._streams.pop((job.ident, job.request_id), None)
                if gone:
                    log.info("a client went away: dropped %d queued request(s)", len(gone))

    def _sweep(self) -> None:
        """End idle connections and those over the cap (connections.py); at most once a second."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        busy_fds = {self._peer_fd.get(job_ident) for job_ident in self._busy_idents()}
        for fd in busy_fds:  # busy counts as active: a job just done has its reply still to come
            if fd is not None:
                self.connections.message(fd, now)
        for fd in self.connections.to_end(now, lambda fd: fd in busy_fds):
            self.connections.end(fd)
        if self.connections.dropped:
            log.debug("connections: %s", self.connections.counts())

    def _wire_bytes(self, n: int) -> int:
        """The least a frame of n bytes takes on the wire: ZMTP's frame header, and with CURVE the
        MESSAGE command wrapping it (name, nonce, MAC, flags). A lower bound, so that a peer cannot
        earn more credit than it sent (connections.py counts what libzmq holds from the difference)."""
        return n + (2 if n < 256 else 9) + (33 if self.zap is not None else 0)

    def _bound_buffers(self) -> None:
        """End the connections whose unfinished messages make libzmq hold more than the queue budget
        (connections.py); checked every BUFFER_CHECK_S, so a peer gets at most that long past it."""
        now = time.monotonic()
        if now < self._next_buffer_check:
            return
        self._next_buffer_check = now + BUFFER_CHECK_S
        budget = self.budgets.max_queue_bytes or MAX_TOTAL_BYTES
        for fd in self.connections.over_buffer(budget + MAX_HEADER_BYTES):
            log.warning("ending a connection: its unfinished messages hold more than %d bytes", budget)
            self.connections.end(fd)

    def _busy_idents(self) -> set[bytes]:
        return {i for i in self._peer_fd if self.queue.has_connection(i)}

    def _drain(self, sock: zmq.Socket, handle: Any) -> None:
        for _ in range(_DRAIN):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handle(frames)

    def _forward(self, frames: list[Any]) -> None:
        fd = self._peer_fd.get(frames[0].bytes)
        if fd is not None:
            self.connections.message(fd, time.monotonic())  # a reply is activity too
        self.sock.send_multipart(frames, copy=False)

    def _on_frames(self, frames: list[Any]) -> None:
        if len(frames) >= 2:  # ROUTER always prepends the routing id; a DEALER sends at least one frame
            self._on_request(frames)

    def serve_forever(self) -> None:
        self._worker = threading.Thread(target=self._work, name="earthdial-worker", daemon=True)
        self._worker.start()
        poller = zmq.Poller()
        for s in (self.sock, self.replies, self.monitor, self.zap.sock if self.zap else None):
            if s is not None:
                poller.register(s, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                events = dict(poller.poll(int(BUFFER_CHECK_S * 1000)))
                # disconnects first: a descriptor reused by a new connection must not inherit them
                if self.monitor in events:
                    self._on_monitor()
                if self.zap is not None and self.zap.sock in events:
                    self.zap.handle()
                if self.replies in events:
                    self._drain(self.replies, self._forward)
                if self.sock in events:
                    self._drain(self.sock, self._on_frames)
                self._sweep()
                self._bound_buffers()
        finally:
            self.queue.cancel_running()
            self.queue.close()
            self._worker.join(timeout=5)


def admit(header: dict[str, Any], arrays: list[Any], raw: Any = None) -> requests.Request | None:
    """The checks a decoded request passes before the I/O loop answers or queues it (typed errors):
    the envelope fields; then, for work, the form of what its sources name (paths refused before any
    service code opens them, CRSs before PROJ parses them; resolve_source checks again when it reads),
    by-value pixels' shape and the budgets that need no file (requests.admit). Returns the request
    as checked (`requests.check`), for the op that runs it; None for the ops the I/O loop answers."""
    request_id, op, client = header.get("id"), header.get("op"), header.get("client")
    if request_id is not None and not (isinstance(request_id, str) and len(request_id) <= MAX_ID_CHARS):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"field 'id' must be a string of at most {MAX_ID_CHARS} characters"
        )
    # `client` is accepted for older clients and ignored: identity comes from the transport
    if client is not None and not (isinstance(client, str) and 0 < len(client) <= MAX_ID_CHARS):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"field 'client' must be a string of 1 to {MAX_ID_CHARS} characters"
        )
    if not isinstance(op, str) or op not in OPS:
        raise EarthDialError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r:.40}; known: {', '.join(OPS)}")
    if op in LOOP_OPS:
        return None
    for i, array in enumerate(arrays):
        if array.ndim not in (2, 3) or 0 in array.shape:
            raise EarthDialError(
                ErrorCode.BAD_ARRAY,
                f"array {i}: pixels must be (rows, cols) or (bands, rows, cols) with no empty axis, got shape {list(array.shape)}",
            )
    # task, prompt, options, sources (and a resumed scan's earlier boxes): the one request model's checks,
    # before queueing
    request = requests.check(header, arrays)
    sources = request.sources if request is not None else ()
    requests.admit(header, arrays, raw.tobytes() if raw is not None else None, sources)
    return request


def _identity(ident: bytes, body: list[Any]) -> str:
    """Who sent a message, from the transport: its CURVE key when the ZAP handler named one (any
    connection of that key is that client), else its connection's routing id."""
    try:
        user = body[0].get("User-Id") if hasattr(body[0], "get") else None
    except (zmq.ZMQError, UnicodeDecodeError):
        user = None
    return f"key:{user}" if user else "conn:" + ident.hex()


def _running(job: Pending) -> Any:
    """limits.running for a server job: its cancel flag, its deadline and where its stage goes."""

    def stage(text: str) -> None:
        job.stage = text

    return limits.running(
        job.cancel.is_set, limits.deadline_for(str(job.header.get("op")), job.received), stage
    )


def _stop_flag(job: Pending) -> Any:
    """What stops a job's decoding at its next token: a cancel, or its deadline passing."""
    deadline = limits.deadline_for(str(job.header.get("op")), job.received)
    if deadline is None:
        return job.cancel.is_set
    return lambda: job.cancel.is_set() or time.monotonic() > deadline


def _limits_view(budgets: limits.Limits) -> dict[str, Any]:
    return {name: getattr(budgets, name) for name in limits.OPTIONS}


def _frame_bytes(frame: Any) -> memoryview:
    return memoryview(getattr(frame, "buffer", frame)).cast("B")


def _cancelled() -> EarthDialError:
    return EarthDialError(ErrorCode.CANCELLED, "cancelled by its client (or the client went away)")


def _out_of_memory(exc: BaseException | None) -> bool:
    """Whether an exception, or one it was raised from, is the device running out of memory."""
    seen = 0
    while exc is not None and seen < 8:
        if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _oom_error(exc: Exception) -> EarthDialError:
    return EarthDialError(
        ErrorCode.MODEL_ERROR,
        f"out of memory on the device even for this request alone (fewer tiles or a smaller window may fit): {exc}",
    )


def _free_device_memory() -> None:
    torch = sys.modules.get("torch")  # only when the engine loaded it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _encode_reply(reply: dict[str, Any]) -> list[Any]:
    try:
        frames = encode(reply)
        limits.check_reply(len(frames[0]))
        return frames
    except EarthDialError as exc:  # over the reply budget
        log.warning("reply %s refused: %s", reply.get("id"), exc.message)
        return encode(error_reply(_valid_id(reply.get("id")), exc))
    except Exception as exc:  # e.g. a NaN in the reply, which JSON cannot carry
        log.error("reply %s cannot be encoded: %s", reply.get("id"), exc)
        err = EarthDialError(
            ErrorCode.INTERNAL, f"the reply could not be encoded: {type(exc).__name__}: {exc}"
        )
        return encode(error_reply(_valid_id(reply.get("id")), err))


def _error(header: dict[str, Any], exc: Exception) -> dict[str, Any]:
    if not isinstance(exc, EarthDialError):  # never let one request take the server down
        log.error("request %s failed:\n%s", header.get("id"), traceback.format_exc())
        exc = EarthDialError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
    return error_reply(_valid_id(header.get("id")), exc)


def _valid_id(value: Any) -> str | None:
    return value if isinstance(value, str) and len(value) <= MAX_ID_CHARS else None
