"""EarthDial wire protocol v1: the one module both the QGIS plugin and the backend import.

A message is a ZeroMQ multipart message. Frame 0 is a UTF-8 JSON header; frames 1..n are raw,
C-ordered array buffers described by the header's ``arrays`` list (sent and received without copies).
See docs/protocol.md for the full description. This module needs only the standard library, numpy
(1.x or 2.x) and pyzmq, because it also runs inside QGIS's own Python.
"""

from __future__ import annotations

import json
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
MAX_MESSAGE_BYTES = MAX_ARRAY_BYTES + MAX_HEADER_BYTES

ALLOWED_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
OPS = ("ask", "georef", "status")


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
    BAND_OUT_OF_RANGE = "band_out_of_range"
    BUSY = "busy"
    WRONG_VARIANT = "wrong_variant"  # the loaded checkpoint lacks a task/sensor tag the request needs
    MODEL_ERROR = "model_error"
    INTERNAL = "internal"
    # client side only
    TIMEOUT = "timeout"


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
        header = json.loads(head.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EarthDialError(ErrorCode.BAD_HEADER, f"header frame is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise EarthDialError(ErrorCode.BAD_HEADER, "header frame must be a JSON object")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
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
    arrays = [_array_from_frame(i, spec, frames[i + 1]) for i, spec in enumerate(specs)]
    return Message(header, arrays)


def _array_from_frame(index: int, spec: Any, frame: Any) -> np.ndarray:
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
    buf = _frame_bytes(frame)
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


class Client:
    """A DEALER-socket client. Replies are matched by request id, so a reply that arrives after its
    request timed out is dropped instead of being taken for the answer to the next one."""

    def __init__(
        self, endpoint: str = DEFAULT_ENDPOINT, timeout_s: float = 120.0, context: Any = None
    ) -> None:
        import zmq  # imported here so that encode/decode work where pyzmq is missing

        self._zmq = zmq
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)

    def close(self) -> None:
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
    ) -> Message:
        """Send one request and wait for its reply. Raises EarthDialError for error replies and timeouts.
        ``cancelled`` is an optional callable polled while waiting (a QgsTask's isCanceled)."""
        header = dict(header)
        header.setdefault("id", new_request_id())
        header.setdefault("v", PROTOCOL_VERSION)
        self._sock.send_multipart(encode(header, arrays), copy=False)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EarthDialError(
                    ErrorCode.TIMEOUT, f"no reply from the EarthDial backend at {self.endpoint} in time"
                )
            if cancelled is not None and cancelled():
                raise EarthDialError("cancelled", "request cancelled by the user")
            if not self._sock.poll(int(min(remaining, 0.2) * 1000)):
                continue
            reply = decode(self._sock.recv_multipart(copy=False))
            if reply.header.get("id") != header["id"]:
                continue  # a late reply to an earlier, timed-out request
            if not reply.header.get("ok", False):
                err = reply.header.get("error") or {}
                raise EarthDialError(str(err.get("code", ErrorCode.INTERNAL)), str(err.get("message", "")))
            return reply

    # Convenience wrappers for the three operations ------------------------------------------------

    def status(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self.request({"op": "status"}, timeout_s=timeout_s).header

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
