"""The streaming whole-scene ops: `detect` (a grounded task over every tile of a layer) and `detect_changes`
(EarthDial's change question over every tile of a pair or sequence of layers), with `scan_tiles` carrying
the pixels of a layer the backend cannot read itself.

A scan's results come back as they are made, in events small enough for any frame limit:

1. `{"event": "plan", "plan": {...}}`: the tile plan (`tiling.TilePlan.describe`), before any work;
2. `{"event": "progress", "done", "total", "tiles": [...], "features": [...]}` after each batch: the
   finished tiles (index, answer, score, footprint) and the boxes they found, complete per tile;
3. with `options.merge` (default true) `{"event": "merged", "features": [...]}` chunks of the merged boxes;
4. the reply: counts and timings only.

`options.skip` lists tiles already done (a resumed scan). Data flows one way: request -> tile plan ->
tiles -> engine -> answers -> features -> events.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from affine import Affine

from earthdial import limits
from earthdial.contract import result_features
from earthdial.contract.result_features import change_of, said_changed
from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.geo import file_access, imagery, presets, tiling
from earthdial.model import prompts
from earthdial.scenes import runner as scenes
from earthdial.serving import requests, service
from earthdial.serving.requests import field

if TYPE_CHECKING:  # torch only where the model runs
    from earthdial.model.engine import Engine

OPS = ("detect", "detect_changes")  # scan_tiles feeds a running detect; it gets no reply of its own
EVENT_BYTES = 48 * 1024  # JSON budget of one event's items: well under any header limit (64 KiB)
DEFAULTS = requests.SCAN_DEFAULTS

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


def options_of(header: dict[str, Any]) -> requests.Options:
    """A scan's options, checked (typed errors): the one request model's."""
    return requests.options(header)


def run(
    header: dict[str, Any],
    engine: Engine | None,
    emit: Emit,
    cancelled: Callable[[], bool] | None = None,
    stream: scenes.Stream | None = None,
    request: requests.Request | None = None,
    arrays: Sequence[Any] = (),
) -> dict[str, Any]:
    """Carry out a `detect` or `detect_changes` request, emitting its events; returns the reply's fields."""
    work = steps(header, engine, emit, cancelled, stream, request, arrays)
    while True:
        try:
            next(work)
        except StopIteration as end:
            return end.value


def steps(
    header: dict[str, Any],
    engine: Engine | None,
    emit: Emit,
    cancelled: Callable[[], bool] | None = None,
    stream: scenes.Stream | None = None,
    request: requests.Request | None = None,
    arrays: Sequence[Any] = (),
) -> Generator[None, None, dict[str, Any]]:
    """`run` one batch at a time: the generator yields after each batch's progress events and returns
    the reply's fields, so that the server can answer other clients between a scan's batches. Closing
    it early stops the scan's reader thread. `request`: the header as the server's admission checked it
    (else it is checked here, with `arrays`, the request's frames: a resumed scan's `earlier`)."""
    if engine is None:
        raise EarthDialError(ErrorCode.MODEL_ERROR, "no model is loaded in this process")
    op = header.get("op")
    if op not in OPS:
        raise EarthDialError(
            ErrorCode.UNKNOWN_OP, f"unknown op {op!r:.40}; a scan is one of {', '.join(OPS)}"
        )
    checked = request or requests.check(header, arrays)
    assert checked is not None
    options = checked.options
    before = checked.earlier
    started = time.perf_counter()
    stats = scenes.Stats()
    changes = op == "detect_changes"
    if changes:
        jobs, plan, total, crs, transform = _change_jobs(checked.sources, engine, options, cancelled, stream)
    else:
        jobs, plan, total, crs, transform = _detect_jobs(
            header, checked.sources[0], engine, options, cancelled, stream
        )
    found: list[dict[str, Any]] = []
    footprints: dict[int, dict[str, Any]] = {}  # what the merge needs of each tile
    if before is not None:  # a resumed scan: its earlier boxes are merged with the new ones as one scan's
        _check_earlier(before, plan, transform, total)
        found = [{**f, "properties": dict(f["properties"])} for f in before.features]
        footprints = {i: {"footprint": t["footprint"]} for i, t in before.tiles.items()}
    emit(
        "plan",
        plan=plan.describe(engine.info.image_size),
        total=total,
        crs=crs,
        pairs=len(jobs),
        properties=jobs[0][0].properties,
    )
    done = len(options.skip & set(range(total)))
    for ask, tiles, offset in jobs:
        for progress in scenes.run(
            engine,
            ask,
            tiles,
            total=total,
            batch_size=options.batch,
            cancelled=cancelled,
            stats=stats,
            starve_s=limits.stream_timeout_s() if stream is not None else None,
        ):
            done += len(progress.answers)
            entries = []
            for a in progress.answers:
                recorded = ask.request(a.index) if ask.request is not None else ""
                a.index += offset  # tiles of the k-th pair follow those of the pairs before
                entry = {
                    "index": a.index,
                    "answer": a.answer,
                    "score": a.score,
                    "footprint": a.footprint,
                    "request": recorded,
                }
                for f in a.features:
                    f["properties"]["tile"] = a.index
                    # answer and request are carried once, by the tile's entry (result_features.with_tile_fields)
                    f["properties"]["answer"] = f["properties"]["request"] = None
                    if changes:
                        f["properties"]["change"] = change_of(f["properties"].get("label"))
                if changes:
                    entry.update(pair=ask.properties["pair"], changed=said_changed(a.answer))
                entries.append((entry, a.features))
            _emit_progress(emit, entries, done, total)
            if options.merge:
                found += [f for a in progress.answers for f in a.features]
                footprints.update({a.index: {"footprint": a.footprint} for a in progress.answers})
            yield
    merged = scenes.finished(found, footprints) if options.merge else []
    for part in chunks(merged):
        emit("merged", features=part)
    elapsed = time.perf_counter() - started
    return {
        "answer": "",
        "tiles": total,
        "tiles_done": stats.tiles,
        "tiles_skipped": len(options.skip & set(range(total))),
        "raw_boxes": len(found) if options.merge else None,
        "boxes": len(merged) if options.merge else None,
        "crs": crs,
        "timings": {
            "total_s": elapsed,
            "model_s": stats.model_s,
            "read_wait_s": stats.waited_s,
            "read_s": stats.read_s,
            "tiles_per_s": stats.tiles / max(elapsed, 1e-9),
        },
    }


def _check_earlier(before: requests.Earlier, plan: tiling.TilePlan, transform: Affine, total: int) -> None:
    """A resumed scan's earlier tiles must be this request's: each inside its plan and with the outline
    that tile has on its grid, else the boxes would be merged with another layer's, area's or tiling's
    (`bad_request`: start the scan afresh)."""
    step = max(math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e))
    n = len(plan)
    for index, tile in sorted(before.tiles.items()):
        if index >= total:
            raise EarthDialError(
                ErrorCode.BAD_REQUEST,
                f"earlier tile {index} is not in this scan's plan "
                f"(0..{total - 1}): the layer, area or tiling changed; start the scan afresh",
            )
        w = plan.window(index % n)
        corners = [(0, 0), (w.width, 0), (w.width, w.height), (0, w.height), (0, 0)]
        t = transform @ Affine.translation(w.col_off, w.row_off)
        want = [t @ c for c in corners]
        got = tile["footprint"]
        if len(got) != len(want) or any(
            abs(gx - wx) > 1e-3 * step or abs(gy - wy) > 1e-3 * step
            for (gx, gy), (wx, wy) in zip(got, want, strict=True)
        ):
            raise EarthDialError(
                ErrorCode.BAD_REQUEST,
                f"earlier tile {index} does not lie where this scan's tile "
                f"{index} does: the layer, area or tiling changed since the scan stopped; start "
                "it afresh",
            )


def _emit_progress(
    emit: Emit, entries: list[tuple[dict[str, Any], list[dict[str, Any]]]], done: int, total: int
) -> None:
    """Events of at most EVENT_BYTES of items: a tile's entry comes with (after) the last of its boxes, so
    a client that keeps what it received knows a tile is finished exactly when its entry has arrived."""
    items: list[tuple[str, dict[str, Any]]] = []
    for entry, feats in entries:
        items += [("feature", f) for f in feats] + [("tile", entry)]
    sent = done - len(entries)
    for part in chunks(items):
        tiles = [item for kind, item in part if kind == "tile"]
        sent += len(tiles)
        emit(
            "progress",
            done=sent,
            total=total,
            tiles=tiles,
            features=[item for kind, item in part if kind == "feature"],
        )


def _tile_request(
    task: str,
    prompt: str,
    sensor: str,
    preset: str,
    options: requests.Options,
    paths: list[str | None],
    bands: list[int] | None,
    plan: tiling.TilePlan,
    transform: Affine,
    crs: str,
) -> Callable[[int], str]:
    """Tile index -> the tile's `request` field: its window on the raster's grid, as an `ask` of that
    window would record it, so that any box of a scan, reviewed, can become training data."""

    def request(index: int) -> str:
        w = plan.window(index)
        t = transform @ Affine.translation(w.col_off, w.row_off)
        x0, y0 = t @ (0, 0)
        x1, y1 = t @ (w.width, w.height)
        bounds = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
        sources = [{"path": p, "bands": bands, "bounds": bounds, "crs": crs} for p in paths]
        window = {
            "bands": bands,
            "width": int(w.width),
            "height": int(w.height),
            "transform": list(t)[:6],
            "crs": crs,
        }
        return service.record(task, prompt, sensor, preset, options, sources, window)

    return request


def _detect_jobs(
    header: dict[str, Any],
    source: requests.Source,
    engine: Engine,
    options: requests.Options,
    cancelled: Any,
    stream: scenes.Stream | None,
) -> tuple[list[Any], tiling.TilePlan, int, str, Affine]:
    from earthdial.model.engine import Query  # torch only where the model runs

    task = field(header, "task", str, required=False) or "refer"
    spec = prompts.task(task)
    if spec.images != 1 or not spec.grounded:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"detect runs a grounded one-image task (refer, grounding), not {task!r}"
        )
    prompt = requests.prompt(header)
    out_size = engine.info.image_size
    if isinstance(source, requests.Ref):
        path = file_access.check_path(source.path)
        info = imagery.describe(path)
        preset, _ = service.choose_preset(None, options, info)
        bands = list(source.bands or preset.bands or []) or None
        area = imagery.scan_grid(path, bands, list(source.bounds) if source.bounds else None, source.crs)
        indexes, region, crs, transform = area.band_indexes, area.window, area.crs, area.transform
        tiling.check_scan(region.width, region.height, options.tile_size, options.overlap)  # the budget
        plan = tiling.plan_for_window(region, options.tile_size, options.overlap)
        tiles = scenes.file_tiles([path], indexes, plan, out_size, options.skip)
        name, gsd_src = source.path, info.gsd_m
        recorded: str | None = source.path
    elif isinstance(source, requests.Stream):
        if stream is None:
            raise EarthDialError(
                ErrorCode.BAD_REQUEST,
                "a streamed scan needs the server (its tiles come as scan_tiles messages)",
            )
        grid = _stream_grid(source, options)
        tiling.check_scan(grid.width, grid.height, options.tile_size, options.overlap)
        plan = tiling.plan_tiles(grid.width, grid.height, options.tile_size, options.overlap)
        tiles = scenes.stream_tiles(
            stream, plan, grid.transform, grid.crs, grid.nodata, options.skip, cancelled
        )
        name, preset, crs = source.name or "<stream>", grid.preset, grid.crs
        gsd_src = imagery.ground_resolution(grid.transform, crs, grid.width / 2, grid.height / 2)
        transform, indexes = grid.transform, None
        recorded = source.path  # never opened here
    else:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"detect reads a source of kind {requests.KINDS['ref']} or {requests.KINDS['stream']}",
        )
    tag = options.sensor or preset.sensor or presets.rgb_tag_for(gsd_src)
    question = prompts.build_question(task, prompt, tag)
    engine.check_tags(question)
    how = prompts.decoding_for(
        task, options.decoding or str(getattr(engine, "decoding", prompts.DEFAULT_DECODING))
    )
    gsd = gsd_src * options.tile_size / out_size if gsd_src else None

    def make_query(tile: scenes.Tile) -> Any:
        chip = tile.chips[0]
        if not imagery.valid_mask(chip).any():
            return None  # an all-nodata tile: nothing to ask about
        data = presets.apply(preset, chip.data, chip.nodata)
        return Query(
            question,
            [engine.image(data, tag, chip.nodata)],
            spec.max_new_tokens,
            num_beams=how.num_beams,
            min_new_tokens=how.min_new_tokens,
            cancelled=cancelled,
            sampling=how.sampling,
            system=how.system_message,
        )

    props = _properties(engine, task, prompt if spec.needs_prompt else "", name, gsd_src, gsd)
    request = _tile_request(
        task, prompt, tag, preset.name, options, [recorded], indexes, plan, transform, crs
    )
    ask = scenes.Ask(make_query, props, options.min_score, request)
    return [(ask, tiles, 0)], plan, len(plan), crs, transform


def _properties(
    engine: Engine, task: str, prompt: str, source: str, gsd_data: float | None, gsd_model: float | None
) -> dict[str, Any]:
    return result_features.properties(
        task=task,
        prompt=prompt,
        model=os.path.basename(engine.info.path.rstrip("/")),
        variant=engine.info.variant,
        source=source,
        gsd_data=gsd_data,
        gsd_model=gsd_model,
    )


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


def _stream_grid(source: requests.Stream, options: requests.Options) -> _StreamGrid:
    transform = imagery.affine_from(source.transform)
    crs = imagery.crs_string(imagery.parse_crs(source.crs, "source"))
    preset = (
        presets.get(options.preset)
        if options.preset
        else presets.choose(source.band_count, source.dtype, [], None)[0]
    )
    return _StreamGrid(source.width, source.height, source.band_count, transform, crs, source.nodata, preset)


@dataclass
class _Sequence:
    """BEFORE AFTER [LATER ...] on one grid: names, tile plan, CRS, preset, ground resolution, and the
    tiles of pair k (its two images, numbered within the plan) without the skipped ones."""

    names: list[str]
    plan: tiling.TilePlan
    crs: str
    preset: Any
    gsd_m: float | None
    tiles: Callable[[int, frozenset[int]], Iterator[scenes.Tile]]
    paths: list[str | None]  # as recorded in each tile's request (streamed layers: the files named, if any)
    bands: list[int] | None
    transform: Any  # the first layer's grid, which the plan's windows are on


def _change_jobs(
    sources: tuple[requests.Source, ...],
    engine: Engine,
    options: requests.Options,
    cancelled: Any,
    stream: scenes.Stream | None = None,
) -> tuple[list[Any], tiling.TilePlan, int, str, Affine]:
    """BEFORE AFTER [LATER ...]: every later layer aligned on the first one's grid, over their common
    extent; each consecutive pair of each tile is asked the change question. By reference (`sources`,
    files the backend reads and warps), or streamed (`source.kind` 'stream' naming its `layers`: the
    client reads every layer on one grid and sends each tile's images stacked in one frame)."""
    from earthdial.model.engine import Query  # torch only where the model runs

    first = sources[0]
    if isinstance(first, requests.Stream):
        seq = _streamed_sequence(first, options, engine, stream, cancelled)
    else:
        seq = _sequence_by_reference([s for s in sources if isinstance(s, requests.Ref)], options, engine)
    pairs = len(seq.names) - 1
    per_pair = tiling.check_scan(seq.plan.width, seq.plan.height, options.tile_size, options.overlap)
    budget = limits.current()
    if budget is not None and per_pair * pairs > budget.max_scan_tiles:
        raise limits.too_large(f"{pairs} pairs of {per_pair:,} tiles", per_pair * pairs, "max_scan_tiles")
    spec = prompts.task("change")
    tag = options.sensor or spec.sensor
    question = prompts.build_question("change", "", tag)
    engine.check_tags(question)
    how = prompts.decoding_for(
        "change", options.decoding or str(getattr(engine, "decoding", prompts.DEFAULT_DECODING))
    )
    gsd = seq.gsd_m * options.tile_size / engine.info.image_size if seq.gsd_m else None
    preset = seq.preset

    def make_query(tile: scenes.Tile) -> Any:
        masks = [imagery.valid_mask(c) for c in tile.chips]
        if not all(m.any() for m in masks):
            return None
        data = [presets.apply(preset, c.data, c.nodata) for c in tile.chips]
        images = [engine.image(d, tag, c.nodata) for d, c in zip(data, tile.chips, strict=True)]
        return Query(
            question,
            images,
            spec.max_new_tokens,
            num_beams=how.num_beams,
            min_new_tokens=how.min_new_tokens,
            cancelled=cancelled,
            sampling=how.sampling,
            system=how.system_message,
        )

    jobs = []
    n = len(seq.plan)
    for k in range(pairs):
        before, after = seq.names[k], seq.names[k + 1]
        props = _properties(engine, "change", "", f"{before} | {after}", seq.gsd_m, gsd)
        props["pair"] = f"{os.path.basename(before)} -> {os.path.basename(after)}"
        skip = frozenset(i - k * n for i in options.skip if k * n <= i < (k + 1) * n)
        request = _tile_request(
            "change",
            "",
            tag,
            preset.name,
            options,
            [seq.paths[k], seq.paths[k + 1]],
            seq.bands,
            seq.plan,
            seq.transform,
            seq.crs,
        )
        jobs.append((scenes.Ask(make_query, props, options.min_score, request), seq.tiles(k, skip), k * n))
    return jobs, seq.plan, n * pairs, seq.crs, seq.transform


def _sequence_by_reference(
    sources: list[requests.Ref], options: requests.Options, engine: Engine
) -> _Sequence:
    names = [s.path for s in sources]
    paths = [file_access.check_path(n) for n in names]
    infos = [imagery.describe(p) for p in paths]
    for name, info in zip(names, infos, strict=True):
        if not info.crs:
            raise EarthDialError(
                ErrorCode.BAD_CRS, f"{name} has no CRS, so it cannot be aligned with the others"
            )
    for k, (name, info) in enumerate(zip(names[1:], infos[1:], strict=True), start=2):
        if info.count != infos[0].count:
            raise EarthDialError(
                ErrorCode.BAND_OUT_OF_RANGE,
                f"layer {k} ({name}) has {info.count} band(s) "
                f"but {names[0]} has {infos[0].count}: a sequence needs the same bands",
            )
    common = imagery.common_grid(paths, names)
    region, crs, transform = common.window, common.crs, common.transform
    preset, _ = service.choose_preset(None, options, infos[0])
    bands = list(preset.bands or []) or None
    indexes = imagery.check_bands(bands, infos[0].count, paths[0])
    tiling.check_scan(region.width, region.height, options.tile_size, options.overlap)
    plan = tiling.plan_for_window(region, options.tile_size, options.overlap)
    out_size = engine.info.image_size

    def tiles(k: int, skip: frozenset[int]) -> Iterator[scenes.Tile]:
        if k == 0:
            return scenes.file_tiles([paths[0], paths[1]], indexes, plan, out_size, skip)
        # later pairs are read on the first layer's grid too; only the pair's own two images are asked
        return _drop_first_image(
            scenes.file_tiles([paths[0], paths[k], paths[k + 1]], indexes, plan, out_size, skip)
        )

    return _Sequence(names, plan, crs, preset, infos[0].gsd_m, tiles, list(names), indexes, transform)


def _streamed_sequence(
    source: requests.Stream,
    options: requests.Options,
    engine: Engine,
    stream: scenes.Stream | None,
    cancelled: Any,
) -> _Sequence:
    if stream is None:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, "a streamed scan needs the server (its tiles come as scan_tiles messages)"
        )
    names = list(source.layers)
    grid = _stream_grid(source, options)
    tiling.check_scan(grid.width, grid.height, options.tile_size, options.overlap)
    plan = tiling.plan_tiles(grid.width, grid.height, options.tile_size, options.overlap)
    total = len(plan) * (len(names) - 1)

    def tiles(k: int, skip: frozenset[int]) -> Iterator[scenes.Tile]:
        return scenes.stream_tiles(
            stream,
            plan,
            grid.transform,
            grid.crs,
            grid.nodata,
            frozenset(i + k * len(plan) for i in skip),
            cancelled,
            first=k * len(plan),
            total=total,
            images=2,
        )

    gsd = imagery.ground_resolution(grid.transform, grid.crs, grid.width / 2, grid.height / 2)
    paths: list[str | None] = list(source.paths)
    names = [p or n for p, n in zip(paths, names, strict=True)]  # named as by reference where they are files
    return _Sequence(names, plan, grid.crs, grid.preset, gsd, tiles, paths, None, grid.transform)


def _drop_first_image(tiles: Iterator[scenes.Tile]) -> Iterator[scenes.Tile]:
    """Later pairs are read on the first layer's grid (every pair shares one grid); only the pair's own
    two images are asked about."""
    for tile in tiles:
        yield scenes.Tile(tile.index, tile.window, tile.chips[1:])
