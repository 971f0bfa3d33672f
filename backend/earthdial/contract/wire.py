"""EarthDial wire protocol v1: constants, error codes, sources, encode and decode.

One of the two modules shared with the QGIS plugin (with client.py): it is written here and
scripts/build_plugin.py copies it into the plugin, where it is never edited. A message is a ZeroMQ
multipart message. Frame 0 is a UTF-8 JSON header; frames 1..n are raw,
C-ordered array buffers described by the header's ``arrays`` list (sent and received without copies).
See docs/protocol.md for the full description. This module needs only the standard library and numpy
(1.x or 2.x), because it also runs inside QGIS's own Python.
"""

from __future__ import annotations

import json
import math
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
    # server limits: the message names the limit and the `earthdial serve` option raising it
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


# Pixel windows: both sides turn bounds into the same rows and columns, so a grid coordinate this close
# to an integer is that integer before floor/ceil (a float error never adds a row or column).
SNAP = 1e-6


def snap_floor(v: float) -> int:
    r = round(v)
    return int(r) if abs(v - r) < SNAP else math.floor(v)


def snap_ceil(v: float) -> int:
    r = round(v)
    return int(r) if abs(v - r) < SNAP else math.ceil(v)


def error_codes() -> list[str]:
    """Every ErrorCode value, as the server's status lists them for its clients."""
    return sorted(v for k, v in vars(ErrorCode).items() if k.isupper() and isinstance(v, str))


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
    transform: tuple[float, float, float, float, float, float],
    crs: str,
    nodata: float | None = None,
    name: str | None = None,
    path: str | None = None,
) -> dict[str, Any]:
    """Pixels sent as the request's first array frame, shape (bands, rows, cols).
    ``transform`` is the affine (a, b, c, d, e, f) of that array: x = a*col + b*row + c, y = d*col + e*row + f.
    ``name`` is the layer as the result's `source` field should say; ``path`` the file the pixels were read
    from, if any, recorded in the result's `request` so that export-training can read them again (the
    server never opens it)."""
    source: dict[str, Any] = {
        "kind": "value",
        "transform": [float(v) for v in transform],
        "crs": crs,
        "nodata": nodata,
    }
    if name:
        source["name"] = name
    if path:
        source["path"] = path
    return source


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
        buffers.append(memoryview(arr).cast("B") if arr.size else b"")  # type: ignore[arg-type]  # numpy arrays are buffers; numpy's stubs do not say so
    full = dict(header)
    full.setdefault("v", PROTOCOL_VERSION)
    full["arrays"] = specs
    head = json.dumps(full, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return [head, *buffers]


def json_frame(value: Any) -> np.ndarray:
    """A JSON value as an array frame: its UTF-8 bytes, uint8 of shape (1, n), for data beyond a header's
    64 KiB (a resumed scan's earlier boxes, `detect`'s `earlier`). `from_json_frame` reads it back."""
    data = json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return np.frombuffer(data, dtype=np.uint8).reshape(1, -1)


def from_json_frame(array: np.ndarray, what: str) -> Any:
    """The JSON value of a `json_frame`; `bad_request` naming ``what`` when it is not one."""
    if array.dtype != np.uint8 or array.ndim != 2 or array.shape[0] != 1:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"{what} must be one uint8 frame of shape (1, n) holding "
            f"UTF-8 JSON, got {array.dtype} {list(array.shape)}",
        )
    try:
        return json.loads(array.tobytes().decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"{what} is not UTF-8 JSON: {exc}"[:300]) from None
    except RecursionError:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"{what} is nested too deeply") from None


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
