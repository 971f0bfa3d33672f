"""How a region is laid out in model-sized tiles: the tile plan of every whole-scene scan, and its tile
count. Arithmetic only (a list of column and row starts), so the scan engine (scenes/runner.py), the scan
budget (limits.py) and `plan` (serving/service.py) count tiles by one rule, and a client that
needs tile positions receives the plan instead of computing its own (`wire.plan_window`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rasterio.windows import Window

from earthdial import limits
from earthdial.contract import wire
from earthdial.contract.wire import EarthDialError, ErrorCode

MIN_TILE, MAX_TILE = 32, 8192  # tile side in source pixels
MAX_OVERLAP = 0.5  # share of a tile shared with its neighbour; more would read every pixel 4x or more
MAX_BATCH = 64


@dataclass(frozen=True)
class TilePlan:
    """Tiles of `tile` x `tile` source pixels over a region, row-major; tile i is at
    (cols[i % len(cols)], rows[i // len(cols)]), cut to the region's size where the region is smaller."""

    col0: int
    row0: int
    width: int
    height: int
    tile: int
    overlap: float
    cols: tuple[int, ...]
    rows: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.cols) * len(self.rows)

    def window(self, index: int) -> Window:
        if not 0 <= index < len(self):
            raise EarthDialError(
                ErrorCode.BAD_REQUEST, f"tile {index} is not in the plan (0..{len(self) - 1})"
            )
        return Window(*wire.plan_window(self.describe(), index))

    def describe(self, read_size: int | None = None) -> dict[str, Any]:
        """The plan on the wire: what a client needs to read tile i itself (`wire.plan_window`), and
        the model's image size its tiles are read at (`wire.read_shape`)."""
        plan = {"tiles": len(self), "tile_size": self.tile, "overlap": self.overlap,
                "region": [self.col0, self.row0, self.width, self.height],
                "columns": list(self.cols), "rows": list(self.rows)}  # fmt: skip
        if read_size is not None:
            plan["read_size"] = read_size
        return plan


def check_tiling(tile: Any, overlap: Any, batch: Any = 1) -> tuple[int, float, int]:
    """Typed errors for a tile size, overlap or batch out of range."""
    if not isinstance(tile, int) or isinstance(tile, bool) or not MIN_TILE <= tile <= MAX_TILE:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"tile size {tile!r:.20} px is out of range ({MIN_TILE} to {MAX_TILE})"
        )
    if (
        not isinstance(overlap, (int, float))
        or isinstance(overlap, bool)
        or not math.isfinite(overlap)
        or not 0 <= overlap <= MAX_OVERLAP
    ):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"overlap {overlap!r:.20} is out of range (0 to {MAX_OVERLAP})"
        )
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= MAX_BATCH:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"batch {batch!r:.20} is out of range (1 to {MAX_BATCH})")
    return tile, float(overlap), batch


def plan_tiles(width: int, height: int, tile: int, overlap: float, col0: int = 0, row0: int = 0) -> TilePlan:
    """Tiles covering a region of width x height pixels starting at (col0, row0): neighbours `stride` =
    tile x (1 - overlap) apart, the last row and column moved back to end at the region's edge."""
    tile, overlap, _ = check_tiling(tile, overlap)
    if width < 1 or height < 1:
        raise EarthDialError(ErrorCode.BOUNDS_OUTSIDE, f"the region to tile is empty ({width} x {height} px)")
    stride = max(1, int(tile * (1 - overlap)))

    def starts(origin: int, length: int) -> tuple[int, ...]:
        if length <= tile:
            return (origin,)
        n = math.ceil((length - tile) / stride) + 1
        return tuple(origin + min(i * stride, length - tile) for i in range(n))

    return TilePlan(col0, row0, width, height, tile, overlap, starts(col0, width), starts(row0, height))


def plan_for_window(region: Window, tile: int, overlap: float) -> TilePlan:
    return plan_tiles(
        int(region.width), int(region.height), tile, overlap, int(region.col_off), int(region.row_off)
    )


def tile_count(width: int, height: int, tile: int, overlap: float) -> int:
    """How many tiles the plan of a width x height region has: its column starts times its row starts,
    without building any tile (typed errors as `plan_tiles`)."""
    return len(plan_tiles(int(width), int(height), tile, overlap))


def check_scan(width: int, height: int, tile: int, overlap: float) -> int:
    """The tile count of a scan, or `too_large` when it exceeds the scan budget (0, unchecked, for a
    tile size or overlap the tiling itself refuses)."""
    if tile < 16 or not 0 <= overlap < 0.9:
        return 0
    n = tile_count(width, height, tile, overlap)  # the scan's own tile plan, counted
    budget = limits.current()
    if budget is not None and n > budget.max_scan_tiles:
        raise limits.too_large(
            f"a scan of {int(width)} x {int(height)} px in tiles of {tile} px with overlap {overlap:g} makes "
            f"{n:,} tiles (use larger tiles, less overlap or smaller bounds)",
            n,
            "max_scan_tiles",
        )
    return n
