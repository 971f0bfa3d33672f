"""EarthDial wire protocol v1: the one module both the QGIS plugin and the backend import.

A message is a ZeroMQ multipart message. Frame 0 is a UTF-8 JSON header; frames 1..n are raw,
C-ordered array buffers described by the header's ``arrays`` list (sent and received without copies).
See docs/protocol.md for the full description. This module needs only the standard library, numpy
(1.x or 2.x) and pyzmq, because it also runs inside QGIS's own Python.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"

# Limits checked before anything is allocated for a message's arrays.
MAX_HEADER_BYTES = 64 * 1024
MAX_FRAMES = 65  # header + 64 arrays
MAX_ARRAY_BYTES = 512 * 1024 * 1024
MAX_ARRAY_NDIM = 3
MAX_MESSAGE_BYTES = MAX_ARRAY_BYTES + MAX_HEADER_BYTES  # per frame: the server's ZMQ_MAXMSGSIZE
MAX_TOTAL_BYTES = 2 * 1024 * 1024 * 1024  # all array frames of one message together
MAX_ID_CHARS = 256  # request ids and client names
PEEK_ID_MAX_BYTES = 4 * 1024 * 1024  # an oversize header up to this size is still parsed for its id

ALLOWED_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
OPS = ("ask", "georef", "detect", "detect_changes", "scan_tiles", "status", "ping", "cancel", "plan")
# A layer or file written by EarthDial says so with a description starting with this (docs/outputs.md):
# only such layers and files are ever replaced, by the command line and by the plugin.
RESULT_MARK = "EarthDial result"
# A result feature's `review` field (docs/outputs.md), set by the analyst in QGIS; empty: not reviewed.
REVIEWS = ("accepted", "rejected", "corrected", "added")


class ErrorCode:
    """Typed error codes carried in ``{"ok": false, "error": {"code", "message"}}`` replies."""

    BAD_HEADER = "bad_header"  # frame 0 is not a JSON object, or is too large
    BAD_REQUEST = "bad_request"  # a field is missing or has the wrong type
    VERSION_MISMATCH = "version_mismatch"
    UNKNOWN_OP = "unknown_op"
    UNKNOWN_TASK = "unknown_task"
    MISSING_FRAMES = "missing_frames"  # fewer (or more) array frames than the header announces
    BAD_ARRAY = "bad_array"  # dtype, shape or byte count of an array frame is wrong
    FILE_NOT_FOUND = "file_not_found"
    NOT_A_RASTER = "not_a_raster"
    BAD_CRS = "bad_crs"
    BOUNDS_OUTSIDE = "bounds_outside"
    NO_OVERLAP = "no_overlap"  # the images of a pair/sequence share no ground
    EMPTY_WINDOW = "empty_window"  # the window holds only nodata
    BAND_OUT_OF_RANGE = "band_out_of_range"
    BUSY = "busy"
    WRONG_VARIANT = "wrong_variant"  # the loaded checkpoint lacks a task/sensor tag the request needs
    MODEL_ERROR = "model_error"
    CANCELLED = "cancelled"  # cancelled by its client (`cancel` op or the client went away)
    FORBIDDEN_PATH = "forbidden_path"  # a path outside the directories the server may read
    # server limits (issue 15): the message names the limit and the `earthdial serve` option raising it
    TOO_LARGE = "too_large"  # pixels, tiles, bands, reply or queue bytes over a budget
    DEADLINE = "deadline"  # the request ran (or waited) past the server's per-request deadline
    INTERNAL = "internal"
    # client side only
    TIMEOUT = "timeout"
    DISCONNECTED = "disconnected"  # the connection dropped while a reply was awaited: the reply is lost
    # writing output files (`earthdial ... -o`, `--preview`)
    OUTPUT_EXISTS = "output_exists"  # a result of that name is there: --overwrite, or another name/--layer
    FOREIGN_OUTPUT = "foreign_output"  # the file or layer there is not an EarthDial result: never replaced
    DISK_FULL = "disk_full"
    READ_ONLY = "read_only"  # the folder or file cannot be written (read-only file system, no permission)
    # a Python package a feature needs is not installed (torchao for --quantize; pyzmq in QGIS's Python)
    MISSING_DEPENDENCY = "missing_dependency"


class EarthDialError(Exception):
    """An error with a protocol code; raised on the server, travels as an error reply, re-raised by clients."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def new_request_id() -> str:
    return uuid.uuid4().hex


# --------------------------------------------------------------------------------------------------
# Sources: where the pixels come from
# --------------------------------------------------------------------------------------------------


def source_by_reference(
    path: str,
    bands: list[int] | None = None,
    bounds: tuple[float, float, float, float] | None = None,
    crs: str | None = None,
) -> dict[str, Any]:
    """A raster file the server reads itself; ``bounds`` (minx, miny, maxx, maxy) are in ``crs``,
    or in the raster's own CRS when ``crs`` is None. ``bands`` are 1-based."""
    return {
        "kind": "ref",
        "path": str(path),
        "bands": list(bands) if bands else None,
        "bounds": [float(v) for v in bounds] if bounds is not None else None,
        "crs": crs,
    }


def source_by_value(
    transform: tuple[float, float, float, float, float, float], crs: str, nodata: float | None = None
) -> dict[str, Any]:
    """Pixels sent as the request's first array frame, shape (bands, rows, cols).
    ``transform`` is the affine (a, b, c, d, e, f) of that array: x = a*col + b*row + c, y = d*col + e*row + f."""
    return {"kind": "value", "transform": [float(v) for v in transform], "crs": crs, "nodata": nodata}


# --------------------------------------------------------------------------------------------------
# Encoding and decoding
# --------------------------------------------------------------------------------------------------


def plan_window(plan: dict[str, Any], index: int) -> tuple[int, int, int, int]:
    """Tile `index` of a scan's plan (the `plan` event): (col, row, width, height) in the layer's pixels.
    Tiles are row-major over the plan's column and row starts, cut to the region where it is smaller."""
    cols, rows = plan["columns"], plan["rows"]
    r, c = divmod(index, len(cols))
    _, _, width, height = plan["region"]
    size = plan["tile_size"]
    return cols[c], rows[r], min(size, width), min(size, height)


def read_shape(width: int, height: int, read_size: int) -> tuple[int, int]:
    """(width, height) a tile of width x height layer pixels is read at: its long side at the model's
    image size `read_size`, never larger than the tile itself."""
    scale = min(1.0, read_size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass
class Message:
    header: dict[str, Any]
    arrays: list[np.ndarray] = field(default_factory=list)


def encode(header: dict[str, Any], arrays: list[np.ndarray] | tuple[np.ndarray, ...] = ()) -> list[Any]:
    """Frames for a message: the JSON header then each array's buffer (no copy when already contiguous)."""
    specs = []
    buffers: list[Any] = []
    for arr in arrays:
        arr = np.ascontiguousarray(arr)
        if arr.dtype.name not in ALLOWED_DTYPES:
            raise EarthDialError(
                ErrorCode.BAD_ARRAY, f"dtype {arr.dtype.name} is not one of {ALLOWED_DTYPES}"
            )
        specs.append({"dtype": arr.dtype.name, "shape": list(arr.shape)})
        buffers.append(memoryview(arr).cast("B") if arr.size else b"")
    full = dict(header)
    full.setdefault("v", PROTOCOL_VERSION)
    full["arrays"] = specs
    head = json.dumps(full, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return [head, *buffers]


def _frame_bytes(frame: Any) -> memoryview:
    # zmq.Frame (copy=False), bytes, or anything with the buffer protocol
    buf = getattr(frame, "buffer", frame)
    return memoryview(buf).cast("B")


def decode(frames: list[Any]) -> Message:
    """Parse and validate a message. Raises EarthDialError with a typed code; allocates no array memory
    beyond views on the received frames, and only after every limit has been checked."""
    if not frames:
        raise EarthDialError(ErrorCode.MISSING_FRAMES, "empty message: expected a JSON header frame")
    if len(frames) > MAX_FRAMES:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"{len(frames)} frames; at most {MAX_FRAMES} are accepted"
        )
    head = _frame_bytes(frames[0])
    if head.nbytes > MAX_HEADER_BYTES:
        raise EarthDialError(ErrorCode.BAD_HEADER, f"header of {head.nbytes} bytes; limit {MAX_HEADER_BYTES}")
    try:
        header = json.loads(head.tobytes().decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise EarthDialError(ErrorCode.BAD_HEADER, f"header frame is not UTF-8 JSON: {exc}") from None
    except RecursionError:  # deeply nested JSON: json raises this instead of ValueError
        raise EarthDialError(ErrorCode.BAD_HEADER, "header frame is nested too deeply") from None
    if not isinstance(header, dict):
        raise EarthDialError(ErrorCode.BAD_HEADER, "header frame must be a JSON object")
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # not True, not 1.0
        raise EarthDialError(
            ErrorCode.VERSION_MISMATCH,
            f"protocol version {version!r} received; this side speaks version {PROTOCOL_VERSION}",
        )
    specs = header.get("arrays", [])
    if not isinstance(specs, list):
        raise EarthDialError(ErrorCode.BAD_REQUEST, "'arrays' must be a list")
    if len(specs) != len(frames) - 1:
        raise EarthDialError(
            ErrorCode.MISSING_FRAMES,
            f"header announces {len(specs)} array frame(s) but {len(frames) - 1} followed",
        )
    buffers = [_frame_bytes(f) for f in frames[1:]]
    total = sum(b.nbytes for b in buffers)
    if total > MAX_TOTAL_BYTES:
        raise EarthDialError(ErrorCode.BAD_ARRAY, f"{total} bytes of arrays; limit {MAX_TOTAL_BYTES}")
    arrays = [_array_from_frame(i, spec, buffers[i]) for i, spec in enumerate(specs)]
    return Message(header, arrays)


def peek_id(frame: Any) -> str | None:
    """The top-level `id` of a header that failed validation (too large, wrong version, ...), so that
    the error reply reaches the request that caused it; None when the frame is not a readable JSON
    object or is larger than PEEK_ID_MAX_BYTES (parsing it would cost more than answering it)."""
    try:
        head = _frame_bytes(frame)
        if head.nbytes > PEEK_ID_MAX_BYTES:
            return None
        value = json.loads(head.tobytes().decode("utf-8"), parse_constant=_no_constant).get("id")
    except (ValueError, AttributeError, RecursionError, TypeError):
        return None
    return value if isinstance(value, str) and len(value) <= MAX_ID_CHARS else None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: encode never writes them either


def _array_from_frame(index: int, spec: Any, buf: memoryview) -> np.ndarray:
    if not isinstance(spec, dict):
        raise EarthDialError(ErrorCode.BAD_ARRAY, f"array {index}: spec must be an object")
    dtype, shape = spec.get("dtype"), spec.get("shape")
    if dtype not in ALLOWED_DTYPES:
        raise EarthDialError(
            ErrorCode.BAD_ARRAY, f"array {index}: dtype {dtype!r} is not one of {ALLOWED_DTYPES}"
        )
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= MAX_ARRAY_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise EarthDialError(
            ErrorCode.BAD_ARRAY,
            f"array {index}: shape {shape!r} must be 1 to {MAX_ARRAY_NDIM} non-negative ints",
        )
    itemsize = np.dtype(dtype).itemsize
    expected = itemsize
    for n in shape:
        expected *= n
        if expected > MAX_ARRAY_BYTES:
            raise EarthDialError(
                ErrorCode.BAD_ARRAY, f"array {index}: {shape} exceeds {MAX_ARRAY_BYTES} bytes"
            )
    if buf.nbytes != expected:
        raise EarthDialError(
            ErrorCode.BAD_ARRAY,
            f"array {index}: {dtype} {shape} needs {expected} bytes, frame has {buf.nbytes}",
        )
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def error_reply(request_id: str | None, error: EarthDialError) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error.to_dict()}


def ok_reply(request_id: str | None, **fields: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, **fields}


# --------------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------------


# Client sockets: reconnect fast to a restarted server, notice a vanished one within seconds (milliseconds).
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 1000
HEARTBEAT_IVL_MS = 1000  # ZMTP pings: a peer gone without closing its socket is dropped after the timeout
HEARTBEAT_TIMEOUT_MS = 3000

_client_name: tuple[int, str] = (0, "")


def client_name() -> str:
    """This process's name in the `client` field of its requests: the server shares its queue fairly
    between names (per process, so that the many short-lived Clients of one QGIS count as one)."""
    global _client_name
    if _client_name[0] != os.getpid():  # a forked child is a client of its own
        _client_name = (os.getpid(), uuid.uuid4().hex[:16])
    return _client_name[1]


def _z85_key(key: str | bytes, what: str) -> bytes:
    text = (key.decode("ascii", "replace") if isinstance(key, bytes) else str(key)).strip()
    if len(text) != 40:
        raise ValueError(f"{what} must be a 40-character Z85 CURVE key, got {len(text)} characters")
    return text.encode("ascii")


class Client:
    """A DEALER-socket client. Replies are matched by request id, so a reply that arrives after its
    request timed out is dropped instead of being taken for the answer to the next one.

    The socket reconnects by itself: after a server restart the next request goes through on the same
    Client. Nothing is queued while no server is connected (ZMQ_IMMEDIATE): a request sent then waits
    for a connection until its timeout (`timeout`), and a connection that drops while a reply is awaited
    ends the request at once (`disconnected`), because a restarted server knows nothing of it.

    CURVE: pass the server's public key (Z85 text, from `earthdial keygen`) as ``server_public_key``;
    ``client_keys`` (public, secret) identifies this client to a server with an allow-list, otherwise a
    fresh key pair is made."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout_s: float = 120.0,
        context: Any = None,
        *,
        server_public_key: str | bytes | None = None,
        client_keys: tuple[str | bytes, str | bytes] | None = None,
    ) -> None:
        import zmq  # imported here so that encode/decode work where pyzmq is missing

        self._zmq = zmq
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._ctx = context or zmq.Context.instance()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        if hasattr(zmq, "HEARTBEAT_IVL"):  # libzmq >= 4.2
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if server_public_key is not None:
            public, secret = client_keys if client_keys is not None else zmq.curve_keypair()
            sock.setsockopt(zmq.CURVE_SERVERKEY, _z85_key(server_public_key, "server_public_key"))
            sock.setsockopt(zmq.CURVE_PUBLICKEY, _z85_key(public, "the client public key"))
            sock.setsockopt(zmq.CURVE_SECRETKEY, _z85_key(secret, "the client secret key"))
        self._sock = sock
        self._monitor = self._open_monitor()
        self._up = False  # a connection is up: its handshake was the last event seen
        self._lost = False  # the connection dropped (since the last request was sent)
        self._refused = False  # a handshake failed: wrong CURVE key, or not on the server's allow-list
        self._poller = zmq.Poller()  # replies and connection events, waited for together
        self._poller.register(sock, zmq.POLLIN)
        if self._monitor is not None:
            self._poller.register(self._monitor, zmq.POLLIN)
        sock.connect(endpoint)

    def _open_monitor(self) -> Any:
        zmq = self._zmq
        # a connection counts as up once its handshake is done (libzmq >= 4.3), else once TCP connects
        self._up_event = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", zmq.EVENT_CONNECTED)
        events = zmq.EVENT_DISCONNECTED | self._up_event
        for name in ("EVENT_HANDSHAKE_FAILED_NO_DETAIL", "EVENT_HANDSHAKE_FAILED_PROTOCOL",
                     "EVENT_HANDSHAKE_FAILED_AUTH"):  # fmt: skip
            events |= getattr(zmq, name, 0)
        if self.endpoint.startswith("inproc://"):
            return None  # no handshake events in-process: rely on POLLOUT and the timeout alone
        try:
            return self._sock.get_monitor_socket(events)
        except (zmq.ZMQError, AttributeError, NotImplementedError):
            return None  # without events a dead server is noticed by the timeout alone

    def _read_events(self) -> bool:
        """Take the monitor's pending events; True when one was a disconnect."""
        zmq, dropped = self._zmq, False
        while self._monitor is not None:
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            event = int.from_bytes(frames[0][:2], sys.byteorder)  # native uint16 event id, then a value
            if event == zmq.EVENT_DISCONNECTED:
                dropped = self._lost = True
                self._up = False
            elif event == self._up_event:
                self._up, self._refused = True, False
            else:
                self._refused = True
        return dropped

    def close(self) -> None:
        if self._monitor is not None:
            try:
                self._sock.disable_monitor()
            except self._zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
            self._monitor = None
        self._sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        header: dict[str, Any],
        arrays: list[np.ndarray] | tuple[np.ndarray, ...] = (),
        timeout_s: float | None = None,
        cancelled: Any = None,
        progress: Any = None,
    ) -> Message:
        """Send one request and wait for its reply. Long jobs (`detect`) send progress events before their
        reply: each is passed to ``progress`` (a callable taking the event's header) and restarts the
        timeout, so the timeout bounds silence, not the whole job. Raises EarthDialError for error replies, timeouts
        (`timeout`) and connections lost while waiting (`disconnected`). ``cancelled`` is an optional
        callable polled while waiting (a QgsTask's isCanceled); when it turns true the server is asked to
        drop the request and `cancelled` is raised."""
        header = dict(header)
        header.setdefault("id", new_request_id())
        header.setdefault("v", PROTOCOL_VERSION)
        header.setdefault("client", client_name())
        frames = encode(header, arrays)
        if len(frames[0]) > MAX_HEADER_BYTES:  # the server would refuse it: say so now, not after a wait
            raise EarthDialError(
                ErrorCode.BAD_HEADER,
                f"the request header is {len(frames[0])} bytes; the protocol's limit is {MAX_HEADER_BYTES} "
                "(a long chat history or prompt? shorten it)",
            )
        wait = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait
        self._send(frames, deadline, wait, cancelled)
        return self._receive(header["id"], deadline, wait, cancelled, progress)

    def _send(self, frames: list[Any], deadline: float, wait: float, cancelled: Any) -> None:
        zmq = self._zmq
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why = (
                    " (the CURVE handshake failed: wrong server key, or this client's key is not allowed)"
                    if self._refused
                    else " (is `earthdial serve` running there?)"
                )
                raise EarthDialError(
                    ErrorCode.TIMEOUT,
                    f"no connection to the EarthDial backend at {self.endpoint} within {wait:g} s{why}",
                )
            if cancelled is not None and cancelled():
                raise EarthDialError(ErrorCode.CANCELLED, "request cancelled by the user")
            writable = self._sock.poll(max(1, int(min(remaining, 0.2) * 1000)), zmq.POLLOUT)
            self._read_events()
            if not writable:
                continue
            # A dropped connection's pipe can look writable until the socket has processed its end; a
            # message written then is lost. So send only once the newest event is a handshake, and after
            # one more poll, which processes every command issued before that handshake.
            if self._monitor is not None and not self._up:
                time.sleep(0.001)
                continue
            if not self._sock.poll(0, zmq.POLLOUT):
                continue
            self._lost = False
            try:
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                continue

    def _receive(
        self, request_id: str, deadline: float, wait: float, cancelled: Any, progress: Any = None
    ) -> Message:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EarthDialError(
                    ErrorCode.TIMEOUT,
                    f"no reply from the EarthDial backend at {self.endpoint} within {wait:g} s",
                )
            if cancelled is not None and cancelled():
                self._send_cancel(request_id)
                raise EarthDialError(ErrorCode.CANCELLED, "request cancelled by the user")
            events = dict(self._poller.poll(max(1, int(min(remaining, 0.2) * 1000))))
            if self._sock in events:
                reply = decode(self._sock.recv_multipart(copy=False))
                unread = reply.header.get("id") is None and not reply.header.get("ok", True)
                if reply.header.get("id") != request_id and not unread:
                    continue  # a late reply to an earlier, timed-out or cancelled request
                # (an error without an id: the server could not read our header's id, and this Client
                # has one request in flight at a time, so it is this request's error)
                if reply.header.get("event"):  # progress, and a scan's plan and merged-box chunks
                    deadline = time.monotonic() + wait
                    if progress is not None:
                        progress(reply.header)
                    continue
                if not reply.header.get("ok", False):
                    err = reply.header.get("error") or {}
                    raise EarthDialError(
                        str(err.get("code", ErrorCode.INTERNAL)), str(err.get("message", ""))
                    )
                return reply
            if self._read_events() or self._lost:  # checked only when no reply is waiting
                raise EarthDialError(
                    ErrorCode.DISCONNECTED,
                    f"the connection to the EarthDial backend at {self.endpoint} dropped while waiting for "
                    "the reply (the server stopped, restarted or refused the message); send it again",
                )

    def _send_cancel(self, target: str) -> None:
        """Best effort: ask the server to drop a request we no longer wait for; its reply is ignored."""
        header = {"v": PROTOCOL_VERSION, "id": new_request_id(), "op": "cancel", "target": target,
                  "client": client_name()}  # fmt: skip
        try:
            self._sock.send_multipart(encode(header), flags=self._zmq.NOBLOCK)
        except self._zmq.ZMQError:
            pass

    def scan(
        self,
        header: dict[str, Any],
        read_tile: Any = None,
        on_event: Any = None,
        cancelled: Any = None,
        timeout_s: float | None = None,
        ahead: int = 2,
    ) -> dict[str, Any]:
        """A whole-scene `detect` / `detect_changes`: every event (plan, progress, merged) goes to
        ``on_event``; returns the reply. For a layer streamed by value (``source.kind`` 'stream'),
        ``read_tile(index, (col, row, width, height), (out_w, out_h))`` returns the tile's pixels
        ((bands, rows, cols) array); tiles are read and sent as the plan and progress events come, at
        most ``ahead`` batches ahead of the model."""
        header = dict(header)
        header.setdefault("id", new_request_id())
        options = header.get("options") or {}
        batch = int(options.get("batch", 8))
        state: dict[str, Any] = {"plan": None, "todo": [], "sent": 0, "read_size": 0}

        def feed(done: int) -> None:
            while state["todo"] and state["sent"] - done < ahead * batch:
                part, state["todo"] = state["todo"][:batch], state["todo"][batch:]
                arrays = []
                for i in part:
                    window = plan_window(state["plan"], i)
                    arrays.append(read_tile(i, window, read_shape(window[2], window[3], state["read_size"])))
                tiles = {"op": "scan_tiles", "scan": header["id"], "tiles": part, "id": new_request_id(),
                         "v": PROTOCOL_VERSION, "client": header.get("client") or client_name()}  # fmt: skip
                self._sock.send_multipart(encode(tiles, arrays), copy=False)
                state["sent"] += len(part)

        def event(ev: dict[str, Any]) -> None:
            if ev.get("event") == "plan":
                state["plan"] = ev["plan"]
                state["read_size"] = int(ev["plan"].get("read_size") or 448)
                skip = set(options.get("skip") or [])
                state["todo"] = [i for i in range(ev["total"]) if i not in skip]
                state["base"] = ev["total"] - len(state["todo"])
            if read_tile is not None and state["plan"] is not None:
                done = int(ev.get("done", state.get("base", 0))) - state.get("base", 0)
                feed(done)
            if on_event is not None:
                on_event(ev)

        return self.request(header, timeout_s=timeout_s, cancelled=cancelled, progress=event).header

    # Convenience wrappers ------------------------------------------------------------------------

    def status(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self.request({"op": "status"}, timeout_s=timeout_s).header

    def ping(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """A cheap liveness check the server's I/O loop answers even while the model is busy."""
        return self.request({"op": "ping"}, timeout_s=timeout_s).header

    def cancel(self, target: str, timeout_s: float | None = None) -> dict[str, Any]:
        """Cancel a request of this client by id; the reply's `state` says what happened to it
        (`queued`: removed, its reply is a `cancelled` error; `running`: stopped at its next batch
        boundary; `unknown`: finished already, or never seen)."""
        return self.request({"op": "cancel", "target": target}, timeout_s=timeout_s).header

    def plan(self, header: dict[str, Any], arrays: list[np.ndarray] | tuple[np.ndarray, ...] = (),
             timeout_s: float | None = None) -> dict[str, Any]:  # fmt: skip
        """What an `ask` with this header would send (preset, bands, sensor, GSD, tiles), from metadata."""
        return self.request({**header, "op": "plan"}, arrays, timeout_s=timeout_s).header["plan"]

    def ask(
        self,
        source: dict[str, Any],
        prompt: str,
        task: str = "chat",
        pixels: np.ndarray | None = None,
        options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        header = {"op": "ask", "task": task, "prompt": prompt, "source": source, "options": options or {}}
        arrays = [pixels] if pixels is not None else []
        return self.request(header, arrays, **kwargs).header

    def georef(
        self, source: dict[str, Any], answer: str, pixels: np.ndarray | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        header = {"op": "georef", "answer": answer, "source": source}
        arrays = [pixels] if pixels is not None else []
        return self.request(header, arrays, **kwargs).header
