"""The streaming whole-scene ops: `detect` (a grounded task over every tile of a layer) and `detect_changes`
(EarthDial's change question over every tile of a pair or sequence of layers), with `scan_tiles` carrying
the pixels of a layer the backend cannot read itself.

A scan's results come back as they are made, in events small enough for any frame limit:

1. `{"event": "plan", "plan": {...}}`: the tile plan (`scenes.TilePlan.describe`), before any work;
2. `{"event": "progress", "done", "total", "tiles": [...], "features": [...]}` after each batch: the
   finished tiles (index, answer, score, footprint) and the boxes they found, complete per tile;
3. with `options.merge` (default true) `{"event": "merged", "features": [...]}` chunks of the merged boxes;
4. the reply: counts and timings only.

`options.skip` lists tiles already done (a resumed scan). Data flows one way: request -> tile plan ->
tiles -> engine -> answers -> features -> events.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from rasterio.warp import transform_bounds

from . import access, imagery, limits, presets, prompts, scenes
from .protocol import EarthDialError, ErrorCode
from .service import _choose_preset, _field

OPS = ("detect", "detect_changes")  # scan_tiles feeds a running detect; it gets no reply of its own
EVENT_BYTES = 48 * 1024  # JSON budget of one event's items: well under any header limit (64 KiB)
DEFAULTS = {"tile_size": 448, "overlap": 0.1, "batch": 8, "min_score": 0.0}

Emit = Callable[..., None]  # emit(event_name, **fields)


def chunks(items: list[Any], budget: int = EVENT_BYTES) -> Iterator[list[Any]]:
    """Consecutive runs of `items` whose JSON stays within `budget` bytes (one item alone may not be split,
    and none is near the budget: a tile's answer is at most a few hundred tokens)."""
    run: list[Any] = []
    size = 0
    for item in items:
        n = len(json.dumps(item, separators=(",", ":"), allow_nan=False)) + 1
        if run and size + n > budget:
            yield run
            run, size = [], 0
        run.append(item)
        size += n
    if run:
        yield run


def options_of(header: dict[str, Any]) -> dict[str, Any]:
    """A scan's options, checked (typed errors)."""
    options = _field(header, "options", dict, required=False) or {}
    values = {k: options.get(k, v) for k, v in DEFAULTS.items()}
    scenes.check_tiling(values["tile_size"], values["overlap"], values["batch"])
    score = values["min_score"]
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not 0 <= score <= 1:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"options.min_score must be 0 to 1, got {score!r:.20}")
    skip = options.get("skip") or []
    if not isinstance(skip, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in skip):
        raise EarthDialError(ErrorCode.BAD_REQUEST, "options.skip must be a list of tile indexes")
    for name in ("preset", "sensor", "decoding"):
        if options.get(name) is not None and not isinstance(options[name], str):
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"options.{name} must be a string")
    merge = options.get("merge", True)
    if not isinstance(merge, bool):
        raise EarthDialError(ErrorCode.BAD_REQUEST, "options.merge must be true or false")
    values.update(skip=frozenset(skip), merge=merge, preset=options.get("preset"), sensor=options.get("sensor"),
                  decoding=options.get("decoding"),
                  overlap=float(values["overlap"]), min_score=float(score))  # fmt: skip
    return values


def run(header: dict[str, Any], engine: Any, emit: Emit, cancelled: Callable[[], bool] | None = None,
        stream: scenes.Stream | None = None) -> dict[str, Any]:  # fmt: skip
    """Carry out a `detect` or `detect_changes` request, emitting its events; returns the reply's fields."""
    work = steps(header, engine, emit, cancelled, stream)
    while True:
        try:
            next(work)
        except StopIteration as end:
            return end.value


def steps(header: dict[str, Any], engine: Any, emit: Emit, cancelled: Callable[[], bool] | None = None,
          stream: scenes.Stream | None = None) -> Generator[None, None, dict[str, Any]]:  # fmt: skip
    """`run` one batch at a time: the generator yields after each batch's progress events and returns
    the reply's fields, so that the server can answer other clients between a scan's batches. Closing
    it early stops the scan's reader thread."""
    if engine is None:
        raise EarthDialError(ErrorCode.MODEL_ERROR, "no model is loaded in this process")
    op = header.get("op")
    options = options_of(header)
    started = time.perf_counter()
    stats = scenes.Stats()
    changes = op == "detect_changes"
    if changes:
        jobs, plan, total, crs = _change_jobs(header, engine, options, cancelled, stream)
    else:
        jobs, plan, total, crs = _detect_jobs(header, engine, options, cancelled, stream)
    emit("plan", plan=plan.describe(engine.info.image_size), total=total, crs=crs, pairs=len(jobs))
    found: list[dict[str, Any]] = []
    done = len(options["skip"] & set(range(total)))
    for ask, tiles, offset in jobs:
        for progress in scenes.run(engine, ask, tiles, total=total, batch_size=options["batch"], cancelled=cancelled,
                                   stats=stats, starve_s=limits.stream_timeout_s() if stream is not None else None):  # fmt: skip
            done += len(progress.answers)
            entries = []
            for a in progress.answers:
                a.index += offset  # tiles of the k-th pair follow those of the pairs before
                entry = {"index": a.index, "answer": a.answer, "score": a.score, "footprint": a.footprint}
                for f in a.features:
                    f["properties"]["tile"] = a.index
                    del f["properties"]["answer"]  # carried once, by the tile's entry (see attach_answers)
                    if changes:
                        f["properties"]["change"] = change_of(f["properties"].get("label"))
                if changes:
                    entry.update(pair=ask.properties["pair"], changed=said_changed(a.answer))
                entries.append((entry, a.features))
            _emit_progress(emit, entries, done, total)
            if options["merge"]:
                found += [f for a in progress.answers for f in a.features]
            yield
    merged = scenes.finished(found) if options["merge"] else []
    for part in chunks(merged):
        emit("merged", features=part)
    elapsed = time.perf_counter() - started
    return {
        "answer": "",
        "tiles": total,
        "tiles_done": stats.tiles,
        "tiles_skipped": len(options["skip"] & set(range(total))),
        "raw_boxes": len(found) if options["merge"] else None,
        "boxes": len(merged) if options["merge"] else None,
        "crs": crs,
        "timings": {
            "total_s": elapsed,
            "model_s": stats.model_s,
            "read_wait_s": stats.waited_s,
            "read_s": stats.read_s,
            "tiles_per_s": stats.tiles / max(elapsed, 1e-9),
        },
    }


def _emit_progress(emit: Emit, entries: list[tuple[dict[str, Any], list[dict[str, Any]]]], done: int, total: int) -> None:  # fmt: skip
    """Events of at most EVENT_BYTES of items: a tile's entry comes with (after) the last of its boxes, so
    a client that keeps what it received knows a tile is finished exactly when its entry has arrived."""
    items: list[tuple[str, dict[str, Any]]] = []
    for entry, feats in entries:
        items += [("feature", f) for f in feats] + [("tile", entry)]
    sent = done - len(entries)
    for part in chunks(items):
        tiles = [item for kind, item in part if kind == "tile"]
        sent += len(tiles)
        emit("progress", done=sent, total=total, tiles=tiles,
             features=[item for kind, item in part if kind == "feature"])  # fmt: skip


def attach_answers(features: list[dict[str, Any]], tiles: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Features with the answer of the tile that found them (events carry each answer once)."""
    for f in features:
        tile = tiles.get(f["properties"].get("tile"))
        if tile is not None:
            f["properties"]["answer"] = tile.get("answer")
    return features


def _base_properties(engine: Any, task: str, prompt: str, source: str, gsd: float | None) -> dict[str, Any]:
    return {"task": task, "prompt": prompt, "model": os.path.basename(engine.info.path.rstrip("/")),
            "variant": engine.info.variant, "source": source, "gsd": gsd,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip


def _detect_jobs(header: dict[str, Any], engine: Any, options: dict[str, Any], cancelled: Any,
                 stream: scenes.Stream | None) -> tuple[list[Any], scenes.TilePlan, int, str]:  # fmt: skip
    from .engine import Query

    task = _field(header, "task", str, required=False) or "refer"
    spec = prompts.task(task)
    if spec.images != 1 or not spec.grounded:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"detect runs a grounded one-image task (refer, grounding), not {task!r}")  # fmt: skip
    prompt = _field(header, "prompt", str, required=False) or ""
    source = header.get("source")
    if not isinstance(source, dict) or source.get("kind") not in ("ref", "stream"):
        raise EarthDialError(ErrorCode.BAD_REQUEST, "detect reads a raster by reference (source.kind 'ref') or "
                             "tiles streamed by value (source.kind 'stream')")  # fmt: skip
    out_size = engine.info.image_size
    if source["kind"] == "ref":
        path = access.check_path(_field(source, "path", str))
        info = imagery.describe(path)
        preset, _ = _choose_preset(
            source, None, {"preset": options["preset"]} if options["preset"] else {}, info
        )
        bands = _field(source, "bands", list, required=False) or list(preset.bands or []) or None
        bounds = _field(source, "bounds", list, required=False)
        with imagery.open_raster(path) as src:
            if src.crs is None:
                raise EarthDialError(ErrorCode.BAD_CRS, f"{source['path']} has no CRS: a scan's boxes could not be placed on a map")  # fmt: skip
            indexes = imagery.check_bands(bands, src.count, path)
            region = imagery.window_for(src, tuple(bounds) if bounds else None,
                                        _field(source, "crs", str, required=False), path)  # fmt: skip
            crs = imagery.crs_string(src.crs)
        limits.check_scan(region.width, region.height, options["tile_size"], options["overlap"])  # the budget
        plan = scenes.plan_for_window(region, options["tile_size"], options["overlap"])
        tiles = scenes.file_tiles([path], indexes, plan, out_size, options["skip"])
        name, gsd_src = source["path"], info.gsd_m
    else:
        if stream is None:
            raise EarthDialError(ErrorCode.BAD_REQUEST, "a streamed scan needs the server (its tiles come as scan_tiles messages)")  # fmt: skip
        grid = _stream_grid(source, options)
        limits.check_scan(grid.width, grid.height, options["tile_size"], options["overlap"])
        plan = scenes.plan_tiles(grid.width, grid.height, options["tile_size"], options["overlap"])
        tiles = scenes.stream_tiles(
            stream, plan, grid.transform, grid.crs, grid.nodata, options["skip"], cancelled
        )
        name, preset, crs = str(source.get("name") or "<stream>"), grid.preset, grid.crs
        gsd_src = imagery.ground_resolution(grid.transform, crs, grid.width / 2, grid.height / 2)
    tag = options["sensor"] or preset.sensor or presets.rgb_tag_for(gsd_src)
    question = prompts.build_question(task, prompt, tag)
    engine.check_tags(question)
    beams, min_new = prompts.decoding_for(task, options["decoding"] or getattr(engine, "decoding", "greedy"))
    gsd = gsd_src * options["tile_size"] / out_size if gsd_src else None

    def make_query(tile: scenes.Tile) -> Any:
        chip = tile.chips[0]
        if not imagery.valid_mask(chip).any():
            return None  # an all-nodata tile: nothing to ask about
        data = presets.apply(preset, chip.data, chip.nodata)
        return Query(question, [engine.image(data, tag, chip.nodata)], spec.max_new_tokens, num_beams=beams,
                     min_new_tokens=min_new, cancelled=cancelled)  # fmt: skip

    props = _base_properties(engine, task, prompt, name, gsd)
    ask = scenes.Ask(make_query, props, options["min_score"])
    return [(ask, tiles, 0)], plan, len(plan), crs


@dataclass
class _StreamGrid:
    """The pixel grid of a layer the client streams (width, height, transform, CRS) and how to read it."""

    width: int
    height: int
    band_count: int
    transform: Any
    crs: str
    nodata: float | None
    preset: Any


def _stream_grid(source: dict[str, Any], options: dict[str, Any]) -> _StreamGrid:
    width, height = _field(source, "width", int), _field(source, "height", int)
    count = _field(source, "band_count", int)
    installed = limits.current()
    budget = installed.max_bands if installed is not None else None
    if count < 1 or (budget is not None and count > budget):
        if count >= 1:
            raise limits.too_large(f"the streamed layer declares {count:,} bands", count, "max_bands")
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"the streamed layer's band_count must be at least 1, got {count}")  # fmt: skip
    transform = imagery._affine_from(_field(source, "transform", list))
    crs_in = _field(source, "crs", str, required=False) or ""
    if not crs_in:
        raise EarthDialError(ErrorCode.BAD_CRS, "the streamed layer has no CRS: a scan's boxes could not be placed on a map")  # fmt: skip
    crs = imagery.crs_string(imagery._parse_crs(crs_in, "source"))
    dtype = _field(source, "dtype", str, required=False) or "uint8"
    nodata = _field(source, "nodata", (int, float), required=False)
    preset = (
        presets.get(options["preset"]) if options["preset"] else presets.choose(count, dtype, [], None)[0]
    )
    return _StreamGrid(width, height, count, transform, crs, nodata, preset)


@dataclass
class _Sequence:
    """BEFORE AFTER [LATER ...] on one grid: names, tile plan, CRS, preset, ground resolution, and the
    tiles of pair k (its two images, numbered within the plan) without the skipped ones."""

    names: list[str]
    plan: scenes.TilePlan
    crs: str
    preset: Any
    gsd_m: float | None
    tiles: Callable[[int, frozenset[int]], Iterator[scenes.Tile]]


def _change_jobs(header: dict[str, Any], engine: Any, options: dict[str, Any], cancelled: Any,
                 stream: scenes.Stream | None = None) -> tuple[list[Any], scenes.TilePlan, int, str]:  # fmt: skip
    """BEFORE AFTER [LATER ...]: every later layer aligned on the first one's grid, over their common
    extent; each consecutive pair of each tile is asked the change question. By reference (`sources`,
    files the backend reads and warps), or streamed (`source.kind` 'stream' naming its `layers`: the
    client reads every layer on one grid and sends each tile's images stacked in one frame)."""
    from .engine import Query

    source = header.get("source")
    if isinstance(source, dict) and source.get("kind") == "stream":
        seq = _streamed_sequence(source, options, engine, stream, cancelled)
    else:
        seq = _sequence_by_reference(header, options, engine)
    pairs = len(seq.names) - 1
    per_pair = limits.check_scan(seq.plan.width, seq.plan.height, options["tile_size"], options["overlap"])
    budget = limits.current()
    if budget is not None and per_pair * pairs > budget.max_scan_tiles:
        raise limits.too_large(f"{pairs} pairs of {per_pair:,} tiles", per_pair * pairs, "max_scan_tiles")
    spec = prompts.task("change")
    tag = options["sensor"] or spec.sensor
    question = prompts.build_question("change", "", tag)
    engine.check_tags(question)
    beams, min_new = prompts.decoding_for(
        "change", options["decoding"] or getattr(engine, "decoding", "greedy")
    )
    gsd = seq.gsd_m * options["tile_size"] / engine.info.image_size if seq.gsd_m else None
    preset = seq.preset

    def make_query(tile: scenes.Tile) -> Any:
        masks = [imagery.valid_mask(c) for c in tile.chips]
        if not all(m.any() for m in masks):
            return None
        data = [presets.apply(preset, c.data, c.nodata) for c in tile.chips]
        images = [engine.image(d, tag, c.nodata) for d, c in zip(data, tile.chips, strict=True)]
        return Query(question, images, spec.max_new_tokens, num_beams=beams, min_new_tokens=min_new,
                     cancelled=cancelled)  # fmt: skip

    jobs = []
    n = len(seq.plan)
    for k in range(pairs):
        before, after = seq.names[k], seq.names[k + 1]
        props = _base_properties(engine, "change", "", f"{before} | {after}", gsd)
        props["pair"] = f"{os.path.basename(before)} -> {os.path.basename(after)}"
        skip = frozenset(i - k * n for i in options["skip"] if k * n <= i < (k + 1) * n)
        jobs.append((scenes.Ask(make_query, props, options["min_score"]), seq.tiles(k, skip), k * n))
    return jobs, seq.plan, n * pairs, seq.crs


def _check_count(sources: list[Any]) -> None:
    if not 2 <= len(sources) <= 8:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, "detect_changes takes 2 to 8 layers (BEFORE AFTER [LATER ...])"
        )


def _sequence_by_reference(header: dict[str, Any], options: dict[str, Any], engine: Any) -> _Sequence:
    sources = _field(header, "sources", list)
    _check_count(sources)
    if not all(isinstance(s, dict) and s.get("kind") == "ref" for s in sources):
        raise EarthDialError(ErrorCode.BAD_REQUEST, "detect_changes reads its layers by reference (`sources` "
                             "of kind 'ref') or streamed (a `source` of kind 'stream')")  # fmt: skip
    names = [_field(s, "path", str) for s in sources]
    paths = [access.check_path(n) for n in names]
    infos = [imagery.describe(p) for p in paths]
    for name, info in zip(names, infos, strict=True):
        if not info.crs:
            raise EarthDialError(
                ErrorCode.BAD_CRS, f"{name} has no CRS, so it cannot be aligned with the others"
            )
    for k, (name, info) in enumerate(zip(names[1:], infos[1:], strict=True), start=2):
        if info.count != infos[0].count:
            raise EarthDialError(ErrorCode.BAND_OUT_OF_RANGE, f"layer {k} ({name}) has {info.count} band(s) "
                                 f"but {names[0]} has {infos[0].count}: a sequence needs the same bands")  # fmt: skip
    with imagery.open_raster(paths[0]) as src:
        left, bottom, right, top = src.bounds
        for name, path in zip(names[1:], paths[1:], strict=True):
            with imagery.open_raster(path) as other:
                b = transform_bounds(other.crs, src.crs, *other.bounds, densify_pts=21)
            left, bottom, right, top = max(left, b[0]), max(bottom, b[1]), min(right, b[2]), min(top, b[3])
            if left >= right or bottom >= top:
                raise EarthDialError(ErrorCode.NO_OVERLAP, f"{name} does not overlap {names[0]} (nor their common extent)")  # fmt: skip
        region = imagery.window_for(src, (left, bottom, right, top), None, paths[0])
        crs = imagery.crs_string(src.crs)
    preset, _ = _choose_preset(
        sources[0], None, {"preset": options["preset"]} if options["preset"] else {}, infos[0]
    )
    bands = list(preset.bands or []) or None
    indexes = imagery.check_bands(bands, infos[0].count, paths[0])
    limits.check_scan(region.width, region.height, options["tile_size"], options["overlap"])
    plan = scenes.plan_for_window(region, options["tile_size"], options["overlap"])
    out_size = engine.info.image_size

    def tiles(k: int, skip: frozenset[int]) -> Iterator[scenes.Tile]:
        if k == 0:
            return scenes.file_tiles([paths[0], paths[1]], indexes, plan, out_size, skip)
        # later pairs are read on the first layer's grid too; only the pair's own two images are asked
        return _drop_first_image(
            scenes.file_tiles([paths[0], paths[k], paths[k + 1]], indexes, plan, out_size, skip)
        )

    return _Sequence(names, plan, crs, preset, infos[0].gsd_m, tiles)


def _streamed_sequence(source: dict[str, Any], options: dict[str, Any], engine: Any,
                       stream: scenes.Stream | None, cancelled: Any) -> _Sequence:  # fmt: skip
    if stream is None:
        raise EarthDialError(ErrorCode.BAD_REQUEST, "a streamed scan needs the server (its tiles come as scan_tiles messages)")  # fmt: skip
    layers = _field(source, "layers", list)
    _check_count(layers)
    names = [str(x)[:200] for x in layers]
    grid = _stream_grid(source, options)
    limits.check_scan(grid.width, grid.height, options["tile_size"], options["overlap"])
    plan = scenes.plan_tiles(grid.width, grid.height, options["tile_size"], options["overlap"])
    total = len(plan) * (len(names) - 1)

    def tiles(k: int, skip: frozenset[int]) -> Iterator[scenes.Tile]:
        return scenes.stream_tiles(stream, plan, grid.transform, grid.crs, grid.nodata,
                                   frozenset(i + k * len(plan) for i in skip), cancelled,
                                   first=k * len(plan), total=total, images=2)  # fmt: skip

    gsd = imagery.ground_resolution(grid.transform, grid.crs, grid.width / 2, grid.height / 2)
    return _Sequence(names, plan, grid.crs, grid.preset, gsd, tiles)


def _drop_first_image(tiles: Iterator[scenes.Tile]) -> Iterator[scenes.Tile]:
    """Later pairs are read on the first layer's grid (every pair shares one grid); only the pair's own
    two images are asked about."""
    for tile in tiles:
        yield scenes.Tile(tile.index, tile.window, tile.chips[1:])


def change_of(label: str | None) -> str:
    """`appeared` or `disappeared` as a change box's label says (`ship appeared`), else ''."""
    words = (label or "").lower().split()
    return next((w for w in reversed(words) if w in ("appeared", "disappeared")), "")


def said_changed(answer: str) -> bool:
    return answer.strip().lower().startswith("yes")
