"""Whole scenes: tile a raster (or part of it) into model-sized windows, stream them through the engine in
batches, and merge the boxes found in overlapping tiles.

Memory stays flat as the scene grows: only one batch of windows is in memory at a time, and only the
features found are kept.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from . import answers, georef, imagery, limits, presets, prompts
from .protocol import EarthDialError, ErrorCode

SCENE_CACHE_MB = 128


@dataclass
class SceneResult:
    features: dict[str, Any]  # FeatureCollection in the raster's CRS, merged across tiles
    tiles: int
    tiles_done: int
    raw_boxes: int  # boxes before merging
    seconds: float
    answers: list[str] = field(default_factory=list)


def tile_windows(region: Window, tile: int, overlap: float) -> list[Window]:
    """Windows of `tile` x `tile` pixels covering `region` with at least `overlap` (0..0.9) shared between
    neighbours; the last row and column are moved back to end at the region's edge."""
    if tile < 16:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"tile size {tile} px is too small (at least 16)")
    if not 0 <= overlap < 0.9:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"overlap {overlap} must be in [0, 0.9)")
    stride = max(1, int(tile * (1 - overlap)))

    def starts(origin: int, length: int) -> list[int]:
        if length <= tile:
            return [origin]
        n = math.ceil((length - tile) / stride) + 1
        return [origin + min(i * stride, length - tile) for i in range(n)]

    col0, row0 = int(region.col_off), int(region.row_off)
    width, height = int(region.width), int(region.height)
    return [
        Window(c, r, min(tile, width), min(tile, height))
        for r in starts(row0, height)
        for c in starts(col0, width)
    ]


def merge_boxes(features: list[dict[str, Any]], iou_threshold: float = 0.5) -> list[dict[str, Any]]:
    """Rotated-polygon non-maximum suppression across tiles: of boxes with the same label overlapping by
    IoU >= threshold, keep the one seen nearest its tile's centre (least likely cut by a tile edge)."""
    from shapely import STRtree
    from shapely.geometry import shape

    if not features:
        return []
    order = sorted(range(len(features)), key=lambda i: features[i]["properties"].get("edge_distance", 0.0))
    polys = [shape(f["geometry"]) for f in features]
    tree = STRtree(polys)
    kept: list[int] = []
    removed: set[int] = set()
    for i in order:
        if i in removed:
            continue
        kept.append(i)
        label = features[i]["properties"].get("label")
        for j in tree.query(polys[i]):
            j = int(j)
            if j == i or j in removed or features[j]["properties"].get("label") != label:
                continue
            inter = polys[i].intersection(polys[j]).area
            union = polys[i].area + polys[j].area - inter
            if union > 0 and inter / union >= iou_threshold:
                removed.add(j)
    return [features[i] for i in sorted(kept)]


def _read_tile(
    src: Any, path: str, indexes: list[int], window: Window, out_size: int, crs: str
) -> imagery.Chip:
    scale = out_size / max(window.width, window.height)
    out_w, out_h = max(1, round(window.width * scale)), max(1, round(window.height * scale))
    data = src.read(indexes, window=window, out_shape=(len(indexes), out_h, out_w),
                    resampling=rasterio.enums.Resampling.average)  # fmt: skip
    a, b, c, d, e, f = src.transform[:6]
    sx, sy = window.width / out_w, window.height / out_h
    col0, row0 = window.col_off, window.row_off
    transform = Affine(a * sx, b * sy, a * col0 + b * row0 + c, d * sx, e * sy, d * col0 + e * row0 + f)
    nodata = src.nodatavals[indexes[0] - 1]
    return imagery.Chip(data, transform, crs, indexes, None if nodata is None else float(nodata), path)


def detect(
    engine: Any,
    path: str,
    prompt: str,
    *,
    task: str = "refer",
    tile_size: int = 448,
    overlap: float = 0.1,
    batch_size: int = 8,
    bands: list[int] | None = None,
    bounds: tuple[float, float, float, float] | None = None,
    bounds_crs: str | None = None,
    preset: str | None = None,
    sensor: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> SceneResult:
    """Run a grounded task over every tile of a raster (or of `bounds` in it) and merge the boxes."""
    spec = prompts.task(task)
    if spec.images != 1:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"task {task!r} takes {spec.images} images; detect runs one"
        )
    info = imagery.describe(path)
    if preset:
        chosen = presets.get(preset)
    else:
        sample = imagery.sample_band(path) if info.count == 1 else None
        chosen, _ = presets.choose(info.count, info.dtype, info.descriptions, sample)
    indexes = list(bands or chosen.bands or range(1, min(info.count, 3) + 1))
    tag = sensor or chosen.sensor or presets.rgb_tag_for(info.gsd_m)
    question = prompts.build_question(task, prompt, tag)
    engine.check_tags(question)
    out_size = engine.info.image_size
    gsd = info.gsd_m * tile_size / out_size if info.gsd_m else None  # tiles are resized to the model's size
    model_name = os.path.basename(engine.info.path.rstrip("/"))
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    started = time.perf_counter()
    # GDAL's block cache (5% of RAM by default) would otherwise grow with the scene; one row of tiles
    # in cache is all a streaming pass can reuse.
    with rasterio.Env(GDAL_CACHEMAX=SCENE_CACHE_MB), imagery.open_raster(path) as src:
        indexes = imagery.check_bands(indexes, src.count, path)
        region = imagery.window_for(src, bounds, bounds_crs, path)
        limits.check_scan(region.width, region.height, tile_size, overlap)  # before any tile is built
        windows = tile_windows(region, tile_size, overlap)
        crs = imagery.crs_string(src.crs)
        found: list[dict[str, Any]] = []
        texts: list[str] = []
        done = 0
        raw = 0
        for batch in _batches(windows, batch_size):
            limits.checkpoint(f"scanning {done} of {len(windows)} tiles")  # a cancel, or past the deadline
            if cancelled is not None and cancelled():
                raise EarthDialError(
                    ErrorCode.CANCELLED, f"detect cancelled after {done} of {len(windows)} tiles"
                )
            from .engine import Query

            chips = [_read_tile(src, path, indexes, w, out_size, crs) for w in batch]
            queries, kept = [], []
            for window, chip in zip(batch, chips, strict=True):
                if not imagery.valid_mask(chip).any():
                    continue  # an all-nodata tile: nothing to ask about
                data = presets.apply(chosen, chip.data, chip.nodata)
                queries.append(Query(question, [engine.image(data, tag, chip.nodata)], spec.max_new_tokens))
                kept.append((window, chip))
            for (window, chip), text in zip(kept, engine.generate(queries) if queries else [], strict=True):
                texts.append(text)
                boxes = answers.parse_boxes(text)
                raw += len(boxes)
                props = {"task": task, "prompt": prompt, "answer": text, "model": model_name,
                         "variant": engine.info.variant, "source": path, "created": created,
                         "tile": f"{int(window.col_off)},{int(window.row_off)}", "gsd": gsd}  # fmt: skip
                fc = georef.features_from_boxes(boxes, chip.transform, chip.width, chip.height, crs, props)
                for feat, box in zip(fc["features"], boxes, strict=True):
                    cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
                    feat["properties"]["edge_distance"] = max(abs(cx - 50), abs(cy - 50))
                    found.append(feat)
            done += len(batch)
            if progress is not None:
                progress(done, len(windows))
    merged = merge_boxes(found)
    for feat in merged:
        feat["properties"].pop("edge_distance", None)
    collection = {"type": "FeatureCollection", "crs": crs, "features": merged}
    return SceneResult(collection, len(windows), done, raw, time.perf_counter() - started, texts)


def _batches(items: list[Window], size: int) -> Iterator[list[Window]]:
    for i in range(0, len(items), max(1, size)):
        yield items[i : i + size]


def estimate_seconds(engine: Any, tiles: int, batch_size: int) -> float:
    """A rough time for `tiles` tiles, from one timed batch of blank tiles (shown before a long job)."""
    from .engine import Query

    blank = np.zeros((3, engine.info.image_size, engine.info.image_size), dtype=np.uint8)
    q = Query(prompts.build_question("refer", "x"), [engine.image(blank, "[hr_rgb_0.5]")], 20)
    t = time.perf_counter()
    engine.generate([q] * min(batch_size, tiles or 1))
    per_batch = time.perf_counter() - t
    return per_batch * math.ceil(tiles / max(1, batch_size))
