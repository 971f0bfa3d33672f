"""Budgets: every request is bounded before its work starts, and work in progress can stop. One module
below every package that reads or scans (geo, scenes, serving), set by the server (`configure`).

- Admission (`requests.admit`, in the I/O loop, before a request is queued, after `requests.check` has
  checked the form of its fields): the paths and CRSs its sources name are ones this server may use, the
  band lists and by-value pixels are within budget (`check_array`), no string holds a lone surrogate
  (`check_text`).
- Before a read (`plan_read`): the source pixels GDAL would decode for a window (through the overview it
  would use, or a decimated nearest read when averaging costs too much) are within budget; before a scan
  (`tiling.check_scan`): its tile count, computed arithmetically, is.
- While working (`checkpoint`): a job's cancel flag (a `cancel`, its client gone) and deadline are
  checked between the strips of a read and between stages, so neither waits for the end of the job.

Each refusal is `too_large` (or `deadline`) and names the limit and the `earthdial serve` option that
raises it. No budget applies until a server installs its Limits (`configure`): the in-process CLI reads
what its own user names.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from earthdial.contract.wire import EarthDialError, ErrorCode

MIB = 1024 * 1024
STRIP_PIXELS = 16 * MIB  # source pixels per strip of a large read: a cancel is seen within one strip


@dataclass(frozen=True)
class Limits:
    """Budgets of one server; each field has an `earthdial serve` option (see OPTIONS)."""

    max_pixels: int = 500_000_000  # source pixels decoded for one image (window x bands, after overviews)
    max_value_pixels: int = 64 * MIB  # pixels (rows x cols x bands) of one array sent by value
    max_bands: int = 32  # bands named in one source (or sent in one by-value array)
    max_scan_tiles: int = 20_000  # tiles of one `detect` scan
    max_reply_bytes: int = 64 * MIB  # one encoded reply
    max_queue_bytes: int = 1024 * MIB  # arrays and headers of all queued and running requests
    deadline_s: float = 600.0  # an ask/georef request, from its arrival; 0: none
    scan_deadline_s: float = 0.0  # a detect scan, from its arrival; 0: none
    stream_timeout_s: float = 60.0  # a streamed scan waiting for its client's tiles; 0: forever
    read_timeout_s: float = 60.0  # one open or read of a user's file in a reader process


OPTIONS = {
    "max_pixels": "--max-pixels",
    "max_value_pixels": "--max-value-pixels",
    "max_bands": "--max-bands",
    "max_scan_tiles": "--max-scan-tiles",
    "max_reply_bytes": "--max-reply-mb",
    "max_queue_bytes": "--max-queue-mb",
    "deadline_s": "--deadline",
    "scan_deadline_s": "--scan-deadline",
    "stream_timeout_s": "--stream-timeout",
    "read_timeout_s": "--read-timeout",
}

_limits: Limits | None = None


def configure(limits: Limits | None) -> Limits | None:
    """Install a server's budgets (None: none); returns the previous ones."""
    global _limits
    previous, _limits = _limits, limits
    return previous


def current() -> Limits | None:
    return _limits


def too_large(what: str, value: float, name: str, unit: str = "") -> EarthDialError:
    """`too_large` for `what` (value) over the budget `name` of the installed Limits."""
    limit = getattr(_limits or Limits(), name)
    option = OPTIONS[name]
    shown = f"{limit // MIB} MiB" if unit == "bytes" else f"{limit:,}"
    value_shown = f"{value / MIB:.1f} MiB" if unit == "bytes" else f"{value:,.0f}"
    return EarthDialError(
        ErrorCode.TOO_LARGE,
        f"{what}: {value_shown}, over the server's limit of {shown} (`earthdial serve {option}` raises it)",
    )


# --------------------------------------------------------------------------------------------------
# Work in progress: cancel flag, deadline and stage of the job this thread runs
# --------------------------------------------------------------------------------------------------


@dataclass
class Active:
    cancelled: Callable[[], bool]
    deadline: float | None  # time.monotonic() past which the job stops; None: none
    on_stage: Callable[[str], None] | None = None


_local = threading.local()


@contextlib.contextmanager
def running(
    cancelled: Callable[[], bool], deadline: float | None, on_stage: Callable[[str], None] | None = None
) -> Iterator[Active]:
    """Mark the job this thread works on, for `checkpoint` calls in the code it runs."""
    previous = getattr(_local, "active", None)
    _local.active = active = Active(cancelled, deadline, on_stage)
    try:
        yield active
    finally:
        _local.active = previous


def checkpoint(stage: str | None = None) -> None:
    """Raise `cancelled` or `deadline` when the job this thread runs must stop; record its stage."""
    active: Active | None = getattr(_local, "active", None)
    if active is None:
        return
    if stage is not None and active.on_stage is not None:
        active.on_stage(stage)
    if active.cancelled():
        raise EarthDialError(ErrorCode.CANCELLED, "cancelled by its client (or the client went away)")
    if active.deadline is not None and time.monotonic() > active.deadline:
        raise EarthDialError(
            ErrorCode.DEADLINE,
            "the request ran past the server's deadline (`earthdial serve --deadline` / `--scan-deadline` "
            "set it)",
        )


def stream_timeout_s() -> float | None:
    """Seconds a streamed scan may wait for its client's next tile (None: no limit)."""
    seconds = _limits.stream_timeout_s if _limits is not None else 0.0
    return seconds if seconds > 0 else None


def stream_timeout(seconds: float, done: int, total: int) -> EarthDialError:
    """`timeout` for a streamed scan whose client stopped sending tiles: its scan slot is freed."""
    return EarthDialError(
        ErrorCode.TIMEOUT,
        f"no tile arrived for {seconds:g} s while the scan waited for one ({done} of {total} tiles done); a "
        "streamed scan's client must keep sending tiles (`earthdial serve --stream-timeout` sets the wait)",
    )


def deadline_for(op: str, received: float) -> float | None:
    """The monotonic time at which a request that arrived at `received` must stop (None: never)."""
    limits = _limits
    if limits is None:
        return None
    seconds = limits.scan_deadline_s if op in ("detect", "detect_changes") else limits.deadline_s
    return received + seconds if seconds > 0 else None


# --------------------------------------------------------------------------------------------------
# Reads and scans
# --------------------------------------------------------------------------------------------------


def average_cost(win_w: int, win_h: int, out_w: int, out_h: int, bands: int, overviews: list[int]) -> int:
    """Source pixels an averaged read of a window into out_w x out_h decodes: GDAL reads the overview
    with the largest factor that is still at least as fine as the output."""
    wanted = min(win_w / max(out_w, 1), win_h / max(out_h, 1))
    factor = max([1, *(f for f in overviews if f <= wanted)])
    return math.ceil(win_w / factor) * math.ceil(win_h / factor) * bands


def decimated_cost(win_w: int, win_h: int, out_w: int, out_h: int, bands: int, block: tuple[int, int]) -> int:
    """Source pixels a nearest-neighbour (decimated) read decodes: the blocks its sample points hit."""
    block_h, block_w = max(1, block[0]), max(1, block[1])
    cols = min(out_w, math.ceil(win_w / block_w)) * block_w
    rows = min(out_h, math.ceil(win_h / block_h)) * block_h
    return min(cols, win_w + block_w) * min(rows, win_h + block_h) * bands


def blocks_cost(
    window: tuple[int, int, int, int],
    size: tuple[int, int],
    block: tuple[int, int],
    bands: int,
    sequential: bool = False,
) -> int:
    """Source pixels GDAL decodes for a full-resolution read of `window` (col, row, width, height) of a
    raster of `size` (width, height): every block the window touches, whole; for a file decoded from its
    top (PNG, JPEG), every row above the window's last one."""
    col, row, w, h = window
    width, height = size
    if sequential:
        return min(height, row + h) * width * bands
    bh, bw = max(1, block[0]), max(1, block[1])
    across = (col + max(w, 1) - 1) // bw - col // bw + 1
    down = (row + max(h, 1) - 1) // bh - row // bh + 1
    # not clipped to the raster: a tile is decoded whole even where it reaches past the image's edge (a
    # 7 x 16 px image in one 32 768 px tile decodes 1 G px); strips are reported no taller than the image
    return across * bw * down * bh * bands


def plan_read(
    win_w: int,
    win_h: int,
    out_w: int,
    out_h: int,
    bands: int,
    overviews: list[int],
    block: tuple[int, int],
    what: str,
    touched: int = 0,
    sequential: bool = False,
) -> tuple[bool, int]:
    """(average?, source pixels) for a read: averaged when that fits the pixel budget, else decimated
    (nearest) when that does; `too_large` otherwise, naming the budget. `touched`: what the blocks under
    the window hold at full resolution (blocks_cost), decoded whenever no overview serves the read:
    a 10 x 10 px window of a file with 24 576 px tiles decodes 600 M px. A decimated read decodes the
    blocks its sample points hit, but a `sequential` file (decoded from its top) all of `touched`."""
    cost = average_cost(win_w, win_h, out_w, out_h, bands, overviews)
    wanted = min(win_w / max(out_w, 1), win_h / max(out_h, 1))
    floor = 0 if any(f <= wanted for f in overviews) else touched  # full resolution: whole blocks
    cost = max(cost, floor)
    limits = _limits
    if limits is None or cost <= limits.max_pixels:
        return True, cost
    sparse = max(decimated_cost(win_w, win_h, out_w, out_h, bands, block), floor if sequential else 0)
    if sparse <= limits.max_pixels:
        return False, sparse
    raise too_large(
        f"reading {what} ({win_w} x {win_h} px x {bands} band(s) into {out_w} x {out_h}) decodes "
        f"{cost:,} source pixels ({'no overviews' if not overviews else 'overviews ' + ','.join(map(str, overviews))}"
        f"{f'; blocks of {block[1]} x {block[0]} px' if touched > win_w * win_h * bands else ''}; build overviews "
        "with gdaladdo, retile with gdal_translate -co TILED=YES, ask for a smaller window or a coarser GSD)",
        cost,
        "max_pixels",
    )


def check_source_pixels(pixels: int, what: str) -> None:
    """A read whose source pixel count is known (e.g. a warp onto another image's grid)."""
    if _limits is not None and pixels > _limits.max_pixels:
        raise too_large(what, pixels, "max_pixels")


def check_features(count: int, chars_each: int) -> None:
    """Before georeferencing an answer's boxes: the reply they make (every feature repeats the answer
    and prompt in its properties) must fit the reply budget."""
    if _limits is None:
        return
    estimate = count * (600 + chars_each)
    if estimate > _limits.max_reply_bytes:
        raise too_large(
            f"the answer's {count} box(es) would make a reply of about this size",
            estimate,
            "max_reply_bytes",
            "bytes",
        )


def check_reply(nbytes: int) -> None:
    if _limits is not None and nbytes > _limits.max_reply_bytes:
        raise too_large("the reply", nbytes, "max_reply_bytes", "bytes")


# --------------------------------------------------------------------------------------------------
# Admission: the form of what a request names, before it is queued
# --------------------------------------------------------------------------------------------------

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_surrogate(node: Any, depth: int = 0) -> bool:
    if isinstance(node, str):
        try:
            node.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if depth > 200:
        return False
    if isinstance(node, dict):
        return any(_has_surrogate(k, depth + 1) or _has_surrogate(v, depth + 1) for k, v in node.items())
    if isinstance(node, list):
        return any(_has_surrogate(v, depth + 1) for v in node)
    return False


def check_text(header: dict[str, Any], raw: bytes | None = None) -> None:
    """No string of the header holds a lone surrogate (JSON can escape one; no file name, prompt or
    tokenizer takes it). `raw`, the header's bytes, lets the common case skip the walk."""
    if raw is not None and not _SURROGATE_ESCAPE.search(raw.decode("utf-8", "replace")):
        return
    if _has_surrogate(header):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            "a string of the request holds a lone surrogate (\\ud800-\\udfff): not valid Unicode",
        )


MAX_JSON_INT = 2**63  # no count, index or coordinate of the protocol is larger; a float cannot hold 10**400
_LONG_NUMBER = re.compile(rb"\d{19}")


def _huge_int(node: Any, depth: int = 0) -> bool:
    if isinstance(node, int) and not isinstance(node, bool):
        return abs(node) >= MAX_JSON_INT
    if depth > 200:
        return False
    if isinstance(node, dict):
        return any(_huge_int(v, depth + 1) for v in node.values())
    if isinstance(node, list):
        return any(_huge_int(v, depth + 1) for v in node)
    return False


def check_numbers(header: dict[str, Any], raw: bytes | None = None) -> None:
    """No integer of the header is beyond 2**63: JSON allows 10**400, which no float holds (Python's
    float() and math.isfinite() raise on it). `raw` lets the common case skip the walk."""
    if raw is not None and not _LONG_NUMBER.search(raw):
        return
    if _huge_int(header):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"a number of the request is beyond {MAX_JSON_INT:.3g}: no field takes one"
        )


def check_array(index: int, shape: tuple[int, ...]) -> None:
    if _limits is None:
        return
    pixels = math.prod(shape)
    if pixels > _limits.max_value_pixels:
        raise too_large(f"array {index} holds {list(shape)} pixels", pixels, "max_value_pixels")
    if len(shape) == 3 and shape[0] > _limits.max_bands:
        raise too_large(f"array {index} has {shape[0]} bands", shape[0], "max_bands")
