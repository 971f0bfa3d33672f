"""What a request does, independent of how it arrived: header + arrays -> reply fields.

The ZeroMQ server and the in-process CLI both call `run`, so a request behaves the same either way.
Data flows one way: source -> chip -> question + tiles -> engine -> answer -> boxes -> features.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from earthdial import limits
from earthdial.contract import result_features
from earthdial.contract.wire import PROTOCOL_VERSION, EarthDialError, ErrorCode, error_codes
from earthdial.geo import file_access, georef, imagery, presets, tiling
from earthdial.model import answers, prompts, sensors
from earthdial.model.prompts import TASKS
from earthdial.model.tokens import VARIANTS, earthdial_tokens
from earthdial.serving import requests

if TYPE_CHECKING:  # torch only where the model runs
    from earthdial.model.engine import Engine

MAX_CHIP_SIZE = 2048  # long side, in pixels, a window is read at; more would only be resized away


def resolve_source(
    source: requests.Source,
    arrays: list[np.ndarray],
    *,
    grid: imagery.Chip | None = None,
    default_bands: list[int] | None = None,
    gsd: float | None = None,
) -> imagery.Chip:
    """The chip a request's source names: a window of a file (by reference) or the sent array (by value).
    With `grid` (the first image of a pair) the source is warped onto that grid instead."""
    if isinstance(source, requests.Stream):
        raise EarthDialError(ErrorCode.BAD_REQUEST, "a source of kind 'stream' feeds a scan, not one window")
    requests.check_frames([source], len(arrays))
    if isinstance(source, requests.Ref):
        real = file_access.check_path(source.path)  # `forbidden_path` outside the allowed directories
        bands = list(source.bands) if source.bands else default_bands
        if grid is not None:
            chip = imagery.read_on_grid(real, bands, grid)
        else:
            chip = imagery.read_chip(
                real,
                bands=bands,
                bounds=source.bounds,
                bounds_crs=source.crs,
                max_size=MAX_CHIP_SIZE,
                gsd=gsd,
            )
        chip.source = source.path  # the file as the client named it (`real` may have resolved links)
        return chip
    chip = imagery.chip_from_array(arrays[0], source.transform, source.crs, source.nodata)
    chip = imagery.warp_to_grid(chip, grid) if grid is not None else chip
    # the layer the client read the pixels from, as it names it (recorded, never opened here)
    chip.source = source.name or chip.source
    return chip


def features_for(answer: str, chip: imagery.Chip, properties: dict[str, Any]) -> dict[str, Any]:
    boxes = answers.parse_boxes(answer)
    # every feature repeats the properties (the answer among them): bound the reply before building it
    limits.check_features(len(boxes), sum(len(v) for v in properties.values() if isinstance(v, str)))
    return georef.features_from_boxes(boxes, chip.transform, chip.width, chip.height, chip.crs, properties)


def chip_description(chip: imagery.Chip) -> dict[str, Any]:
    return {
        "source": chip.source,
        "bands": chip.band_indexes,
        "width": chip.width,
        "height": chip.height,
        "transform": list(chip.transform[:6]),  # a, b, c, d, e, f (the last row is 0, 0, 1)
        "crs": chip.crs,
    }


@dataclass
class Job:
    """A validated request, ready for the engine (query) or already answered (georef)."""

    header: dict[str, Any]
    chips: list[imagery.Chip]
    query: Any = None  # engine.Query, for `ask`
    answer: str | None = None  # set for `georef`; for `ask` once generated
    inputs: Inputs | None = None
    sensor: str = ""
    options: requests.Options = field(default_factory=requests.Options)  # as checked once, at admission
    sources: tuple[requests.Source, ...] = ()  # as checked once, at admission
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Inputs:
    """The images of a request, aligned, with how their bands were chosen."""

    chips: list[imagery.Chip]
    preset: presets.Preset
    reason: str
    gsd_m: float | None  # of the first chip as read (a large window is read coarser than stored)
    warnings: list[str] = field(default_factory=list)
    native_gsd_m: float | None = None  # of the first raster as stored


def choose_preset(
    array: np.ndarray | None, options: requests.Options, info: imagery.RasterInfo | None, sample: bool = False
) -> tuple[presets.Preset, str]:
    """The band preset of a request's first image and why: named in the options, else chosen from the
    raster's metadata (`info`) or the array sent by value (`sample`: the array is a small sample of
    the pixels, all of whose values tell)."""
    if options.preset is not None:
        return presets.get(options.preset), "named in the request"
    if array is not None:
        if array.ndim not in (2, 3) or array.size == 0:
            raise EarthDialError(
                ErrorCode.BAD_ARRAY, f"pixels must be (rows, cols) or (bands, rows, cols), got {array.shape}"
            )
        data = array if array.ndim == 3 else array[None]
        return presets.choose(data.shape[0], data.dtype.name, [], data[0] if sample else data[0, ::16, ::16])
    if info is None:
        return presets.PRESETS["rgb8"], "default"
    sample_band = None
    if info.count == 1:
        sample_band = imagery.sample_band(info.path, 1, 64)
    return presets.choose(info.count, info.dtype, info.descriptions, sample_band)


@dataclass
class Window:
    """What an `ask` reads of its first image, worked out once from the request and the raster's metadata:
    `plan` describes it (`describe`) and `prepare` reads it (`read`), from the same arguments, so that
    what a plan promises is what the ask reads."""

    source: requests.Ref | requests.Value
    preset: presets.Preset
    reason: str
    info: imagery.RasterInfo | None = None  # the raster as stored (by reference)
    bands: list[int] | None = None  # what is read of a file (the source's, else the preset's)
    max_size: int | None = MAX_CHIP_SIZE  # None: at the layer's own resolution (a scan's region)
    gsd: float | None = None  # metres per pixel the window is read at; None: as stored

    def describe(self, array: np.ndarray | None) -> imagery.ChipPlan:
        """The bands, size and grid `read` reads, from metadata alone (by value: the array's, or the
        `shape` its plan declares with a sample)."""
        if isinstance(self.source, requests.Ref):
            assert self.info is not None
            return imagery.plan_chip(
                self.info.path, self.bands, self.source.bounds, self.source.crs, self.max_size, self.gsd
            )
        assert array is not None
        data = array if array.ndim == 3 else array[None]
        height, width = self.source.shape or data.shape[1:]
        grid = imagery.chip_from_array(data, self.source.transform, self.source.crs, self.source.nodata)
        return imagery.ChipPlan(grid.band_indexes, int(width), int(height), grid.transform, grid.crs)

    def read(self, arrays: list[np.ndarray]) -> imagery.Chip:
        """The pixels: what `describe` names (a file's window through the same `imagery` plan)."""
        if isinstance(self.source, requests.Ref):
            assert self.info is not None
            chip = imagery.read_chip(
                self.info.path, self.bands, self.source.bounds, self.source.crs, self.max_size, self.gsd
            )
            chip.source = self.source.path  # the file as the client named it (`info.path` resolved links)
            return chip
        return resolve_source(self.source, arrays)


def window(
    source: requests.Source, array: np.ndarray | None, options: requests.Options, scan: bool = False
) -> Window:
    """The window an `ask` of this first source reads (`scan`: the region a scan of it covers, at the
    layer's own resolution): its preset, and the bands, bounds, size and GSD it is read at."""
    if isinstance(source, requests.Stream):
        raise EarthDialError(ErrorCode.BAD_REQUEST, "a source of kind 'stream' feeds a scan, not one window")
    if isinstance(source, requests.Value):
        if array is None:
            requests.check_frames([source], 0)
        preset, reason = choose_preset(array, options, None, sample=source.shape is not None)
        return Window(source, preset, reason)
    info = imagery.describe(file_access.check_path(source.path))  # opened once for all
    preset, reason = choose_preset(None, options, info)
    if preset.bands and preset.band_count and info.count < max(preset.bands):
        raise EarthDialError(
            ErrorCode.BAND_OUT_OF_RANGE,
            f"preset {preset.name} needs {max(preset.bands)} bands; the raster has {info.count}",
        )
    bands = list(source.bands) if source.bands else (list(preset.bands) if preset.bands else None)
    return Window(
        source, preset, reason, info, bands, None if scan else MAX_CHIP_SIZE, None if scan else options.gsd
    )


def read_inputs(
    sources: tuple[requests.Source, ...], arrays: list[np.ndarray], options: requests.Options
) -> Inputs:
    """The request's sources (one image, or a pair or sequence) -> aligned chips. Later images are warped
    onto the first image's grid and all are cropped to their common extent; by-value sources take the
    array frames in order."""
    requests.check_frames(sources, len(arrays))
    frames = iter(arrays)
    own = [[next(frames)] if isinstance(s, requests.Value) else [] for s in sources]
    first_window = window(sources[0], own[0][0] if own[0] else None, options)
    preset, reason, info = first_window.preset, first_window.reason, first_window.info
    bands = list(preset.bands) if preset.bands else None
    first = first_window.read(own[0])
    chips = [first] + [
        resolve_source(s, a, grid=first, default_bands=bands)
        for s, a in zip(sources[1:], own[1:], strict=True)
    ]
    chips = [
        imagery.Chip(
            presets.apply(preset, c.data, c.nodata),
            c.transform,
            c.crs,
            c.band_indexes,
            c.nodata,
            c.source,
            c.valid,
        )
        for c in chips
    ]
    warnings: list[str] = []
    masks = [imagery.valid_mask(c) for c in chips]
    common = np.logical_and.reduce(masks) if len(masks) > 1 else masks[0]
    for chip in chips[1:]:
        if chip.valid is not None and not chip.valid.any():
            raise EarthDialError(
                ErrorCode.NO_OVERLAP,
                f"{chip.source} does not overlap the first image's window ({chips[0].source})",
            )
    if not common.any():
        empty = next((c.source for c, m in zip(chips, masks, strict=True) if not m.any()), chips[0].source)
        if all(m.any() for m in masks):
            raise EarthDialError(ErrorCode.NO_OVERLAP, "the images hold data in no common pixel")
        raise EarthDialError(ErrorCode.EMPTY_WINDOW, f"the window of {empty} holds only nodata")
    if len(chips) > 1:
        rows, cols = np.nonzero(common.any(axis=1))[0], np.nonzero(common.any(axis=0))[0]
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        if (r1 - r0, c1 - c0) != common.shape:
            chips = [imagery.crop(c, r0, r1, c0, c1) for c in chips]
            warnings.append(
                f"images cropped to their common extent: {c1 - c0} x {r1 - r0} pixels of the first image's grid"
            )
    share = float(common.mean())
    if share < 0.5:
        warnings.append(f"only {share:.0%} of the window holds data in every image; the rest is filled")
    first = chips[0]
    gsd_m = imagery.ground_resolution(first.transform, first.crs, first.width / 2, first.height / 2)
    first_src = sources[0]
    native = (
        info.gsd_m
        if info is not None
        else (first_src.gsd_data if isinstance(first_src, requests.Value) else None)
    )
    return Inputs(chips, preset, reason, gsd_m, warnings, native_gsd_m=native or gsd_m)


def _sensor_for(
    spec: prompts.Task, inputs: Inputs, options: requests.Options, vocab: frozenset[str] = frozenset()
) -> str:
    """The sensor tag: named in the request, else the task's own (methane, UHI), else for pairs the
    temporal tag of the data's kind (SAR's only if `vocab` holds it), else the preset's, else the RGB
    tag nearest the window's GSD."""
    if options.sensor:
        return options.sensor
    sar = inputs.preset.name.startswith("s1_")
    if spec.images > 1:
        return sensors.pair_tag(sar, spec.sensor, vocab)
    if spec.sensor != prompts.DEFAULT_SENSOR:
        return spec.sensor
    return inputs.preset.sensor or presets.rgb_tag_for(inputs.gsd_m)


def prepare(
    header: dict[str, Any],
    arrays: list[np.ndarray],
    engine: Engine | None,
    request: requests.Request | None = None,
) -> Job:
    """Validate a request (unless the server's admission did: `request`), read its pixels and build its
    engine query. Raises EarthDialError."""
    op = header.get("op")
    if op not in ("ask", "georef"):
        raise EarthDialError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r:.40}; known: ask, georef, status")
    request = request or requests.check(header, arrays)
    assert request is not None  # an ask or a georef
    if op == "georef":
        inputs = read_inputs(request.sources, arrays, requests.Options())
        job = Job(header, inputs.chips, answer=str(header["answer"]), inputs=inputs, sources=request.sources)
        job.timings["read_s"] = time.perf_counter() - job.started
        return job
    name = str(header["task"])
    spec = prompts.task(name)
    prompt = requests.prompt(header)
    options = request.options
    max_new = options.max_new_tokens or spec.max_new_tokens
    history = options.history
    decoding = options.decoding or (engine.decoding if engine is not None else prompts.DEFAULT_DECODING)
    how = prompts.decoding_for(name, decoding)
    started = time.perf_counter()
    inputs = read_inputs(request.sources, arrays, options)
    chips = inputs.chips
    tag = _sensor_for(spec, inputs, options, engine.info.vocab if engine is not None else frozenset())
    inputs.warnings += _gsd_warnings(inputs.gsd_m, tag)
    in_history = any(prompts.IMAGE in q for q, _ in history)  # a follow-up: the images came with turn one
    question = prompts.build_question(
        name, prompt, sensors.prompt_tag(tag, chips[0].data.shape[0]), images=0 if in_history else len(chips)
    )
    job = Job(
        header, chips, started=started, inputs=inputs, sensor=tag, options=options, sources=request.sources
    )
    job.timings["read_s"] = time.perf_counter() - started
    if engine is None:
        raise EarthDialError(ErrorCode.MODEL_ERROR, "no model is loaded in this process")
    _check_model(engine, question, tag)
    t = time.perf_counter()
    from earthdial.model.engine import Query  # torch only where the model runs

    images = [engine.image(chip.data, tag, chip.nodata, task=name, images=len(chips)) for chip in chips]
    job.query = Query(
        question,
        images,
        max_new,
        history,
        num_beams=how.num_beams,
        min_new_tokens=how.min_new_tokens,
        sampling=how.sampling,
        system=how.system_message,
    )
    job.timings["preprocess_s"] = time.perf_counter() - t
    return job


def _gsd_warnings(gsd_m: float | None, tag: str) -> list[str]:
    spec = sensors.sensor(tag)
    if gsd_m and not 0.25 <= gsd_m / spec.gsd_m <= 4:
        return [
            f"the window's ground resolution ({gsd_m:.3g} m) is far from {tag}'s {spec.gsd_m:g} m: "
            "answers may suffer; set a GSD or another sensor"
        ]
    return []


def _check_model(engine: Engine, question: str, tag: str) -> None:
    """`wrong_variant` when the loaded checkpoint lacks a tag of the question or was not trained on the
    input's path (multispectral or SAR to the RGB checkpoint)."""
    engine.check_tags(question)
    presets.check_variant(engine.info.variant, tag)


def plan(
    header: dict[str, Any],
    arrays: list[np.ndarray],
    engine: Engine | None,
    request: requests.Request | None = None,
) -> dict[str, Any]:
    """What an `ask` with this header would send to the model, from metadata alone: the band preset and
    why, the bands, the sensor tag, the GSD, the window's size and grid, the model tiles, by reference or
    by value, and warnings; or the error the `ask` would get. Reads no pixels beyond a small sample of a
    one-band raster (to tell SAR in dB from linear power). A by-value source may carry ``shape``
    ([rows, cols] of the array the `ask` will send) with a small sample of it as its array frame. The
    window is the one `prepare` reads (`window`)."""
    request = request or requests.check({**header, "op": "plan"}, arrays)
    assert request is not None
    name = str(header["task"])
    spec = prompts.task(name)
    prompt = requests.prompt(header)
    options = request.options
    # `scan`: the plan of a `detect`/`detect_changes` with these options (tile_size, overlap, batch) over
    # the same area, read at the layer's own resolution (a by-value source's `shape` is its full grid)
    scanning = requests.field(header, "scan", dict, required=False)
    sources = request.sources
    first = sources[0]
    array = arrays[0] if isinstance(first, requests.Value) else None
    win = window(first, array, options, scan=scanning is not None)
    chip = win.describe(array)
    preset, reason = win.preset, win.reason
    width, height = chip.width, chip.height
    gsd_m = imagery.ground_resolution(chip.transform, chip.crs, width / 2, height / 2)
    inputs = Inputs([], preset, reason, gsd_m)
    tag = _sensor_for(spec, inputs, options, engine.info.vocab if engine is not None else frozenset())
    warnings = _gsd_warnings(gsd_m, tag)
    question = prompts.build_question(
        name, prompt, sensors.prompt_tag(tag, len(chip.band_indexes)), images=len(sources)
    )
    tiles = None
    model = None
    model_gsd_m = None
    if engine is not None:
        _check_model(engine, question, tag)
        per_image = _tiles_for(engine, width, height, tag, name, len(sources))
        tiles = per_image * len(sources)
        model = {"variant": engine.info.variant, "path": engine.info.path}
        model_gsd_m = model_gsd(engine, width, height, gsd_m, tag, name, len(sources))
    scan_plan = None
    if scanning is not None:
        image_size = engine.info.image_size if engine is not None else None
        scan_plan = describe_scan(
            width, height, gsd_m, requests.options({"options": scanning}), image_size, len(sources)
        )
    return {
        "plan": {
            "task": name,
            "preset": preset.name,
            "reason": reason,
            "bands": chip.band_indexes,
            "sensor": tag,
            "gsd_m": gsd_m,
            "width": int(width),
            "height": int(height),
            "transform": list(chip.transform)[:6],
            "crs": chip.crs,
            "images": len(sources),
            "tiles": tiles,
            "model_gsd_m": model_gsd_m,
            "scan": scan_plan,
            "by": "value" if isinstance(first, requests.Value) else "reference",
            "warnings": warnings,
            "model": model,
        }
    }


def describe_scan(
    width: int,
    height: int,
    gsd_m: float | None,
    options: requests.Options,
    image_size: int | None,
    images: int = 1,
) -> dict[str, Any]:
    """What a scan of a width x height px region (at the layer's resolution, `gsd_m` its GSD) with
    `options` would run, for `plan`: its tiles and batches (checked against the scan budget as the scan
    is; a change scan of `images` layers runs them for each of its pairs) and the GSD the model sees each
    tile at (a tile is resized to the model's `image_size`)."""
    tile, overlap, batch = options.tile_size, options.overlap, options.batch
    tiling.check_scan(width, height, tile, overlap)
    tiles = tiling.tile_count(width, height, tile, overlap) * max(1, images - 1)
    side = max(min(tile, width), min(tile, height))  # a tile is cut to a region smaller than it
    return {
        "tiles": tiles,
        "batches": -(-tiles // batch),
        "tile_size": tile,
        "overlap": overlap,
        "batch": batch,
        "model_gsd_m": gsd_m * side / image_size if gsd_m and image_size else None,
    }


def _grid_for(
    engine: Engine, width: int, height: int, tag: str, task: str | None = None, images: int = 1
) -> tuple[int, int]:
    """(columns, rows) of model tiles one image of this size is resized to: one for the band-group path,
    InternVL's dynamic grid for RGB within each image's share of the budget; the same choice
    `engine.image` makes."""
    from earthdial.model import pixels  # torch only where the model runs

    if sensors.pixel_path(tag, task) != "rgb":
        return 1, 1
    size = engine.info.image_size
    return pixels.choose_grid(width, height, size, engine.info.min_tiles, engine.tile_budget(images))


def _tiles_for(
    engine: Engine, width: int, height: int, tag: str, task: str | None = None, images: int = 1
) -> int:
    """Model tiles one image of this size gets: its grid (`_grid_for`), plus the thumbnail."""
    cols, rows = _grid_for(engine, width, height, tag, task, images)
    n = cols * rows
    return n + 1 if engine.info.use_thumbnail and n > 1 else n


def _model_view(
    engine: Engine, width: int, height: int, tag: str, task: str | None = None, images: int = 1
) -> tuple[int, int]:
    """The (width, height) in pixels the model sees a window of width x height at: its tile grid."""
    cols, rows = _grid_for(engine, width, height, tag, task, images)
    return cols * engine.info.image_size, rows * engine.info.image_size


def finish(job: Job, engine: Engine | None) -> dict[str, Any]:
    """Reply fields for a job whose answer is known: the answer's boxes georeferenced on the first
    image's grid (later images of a pair are read on the same window)."""
    header = job.header
    chip = job.chips[0]
    answer = job.answer or ""
    model = engine if job.query is not None else None  # georef runs no model
    model_name = os.path.basename(model.info.path.rstrip("/")) if model is not None else ""
    variant = model.info.variant if model is not None else ""
    task = str(header.get("task", "georef")) if job.query is not None else "georef"
    spec = prompts.TASKS.get(task)
    prompt = str(header.get("prompt") or "") if spec is not None and spec.needs_prompt else ""
    props = result_features.properties(
        task=task,
        prompt=prompt,
        answer=answer,
        model=model_name,
        variant=variant,
        source=" | ".join(c.source for c in job.chips),
        gsd_data=job.inputs.native_gsd_m if job.inputs is not None else None,
        gsd_model=model_gsd(
            model,
            chip.width,
            chip.height,
            imagery.ground_resolution(chip.transform, chip.crs, chip.width / 2, chip.height / 2),
            job.sensor,
            task,
            len(job.chips),
        )
        if model is not None
        else None,
        request=request_record(job) if job.query is not None else "",
    )
    reply: dict[str, Any] = {
        "answer": answer,
        "request": props["request"],  # also with no boxes: a missed object drawn by hand needs it
        "properties": props,  # what every box of this answer shares (a box drawn by hand starts from it)
        "features": features_for(answer, chip, props),
        "chip": chip_description(chip),
        "chips": [chip_description(c) for c in job.chips],
    }
    if job.inputs is not None:
        reply["input"] = {
            "preset": job.inputs.preset.name,
            "reason": job.inputs.reason,
            "sensor": job.sensor,
            "gsd_m": job.inputs.gsd_m,
            "warnings": job.inputs.warnings,
        }
    if job.query is not None and model is not None:
        reply["model"] = {"name": model_name, "variant": variant, "path": model.info.path}
        reply["tiles"] = sum(im.tiles for im in job.query.images)
    job.timings["total_s"] = time.perf_counter() - job.started
    reply["timings"] = job.timings
    return reply


def model_gsd(
    engine: Engine, width: int, height: int, gsd_m: float | None, tag: str, task: str | None, images: int = 1
) -> float | None:
    """Ground metres per pixel of the image the model sees: a width x height window of `gsd_m` resized
    onto its model tiles, along the coarser of its two axes. `plan` promises it, an answer records it."""
    if not gsd_m:
        return None
    view_w, view_h = _model_view(engine, width, height, tag, task, images)
    return float(gsd_m * max(width / view_w, height / view_h))


def request_record(job: Job) -> str:
    """What an answer's boxes need to become training data again (`training_data`): the task, prompt, band
    options, sensor tag, each source (a by-value source names the file it was read from when its client
    said so) and the window read, as JSON."""
    header = job.header
    sources = []
    for src in job.sources:
        if isinstance(src, requests.Ref):
            sources.append(
                {
                    "path": src.path,
                    "bands": list(src.bands) if src.bands else None,
                    "bounds": list(src.bounds) if src.bounds else None,
                    "crs": src.crs,
                }
            )
        else:  # pixels sent by value: only the file they came from, if any
            sources.append({"path": src.path, "bands": None, "bounds": None, "crs": src.crs or None})
    return record(
        header.get("task"),
        header.get("prompt", ""),
        job.sensor,
        job.inputs.preset.name if job.inputs else None,
        job.options,
        sources,
        chip_description(job.chips[0]),
    )


def record(
    task: Any,
    prompt: Any,
    sensor: str,
    preset: str | None,
    options: requests.Options,
    sources: list[dict[str, Any]],
    window: dict[str, Any],
) -> str:
    """The `request` field: one JSON form for an answer's window and for each tile of a scan."""
    kept = options.recorded()
    window = {k: v for k, v in window.items() if k != "source"}
    return result_features.request_json(
        {
            "task": task,
            "prompt": prompt,
            "sensor": sensor,
            "preset": preset,
            "options": kept,
            "sources": sources,
            "window": window,
        }
    )


def generate(jobs: list[Job], engine: Engine | None, stop: list[Any] | None = None) -> None:
    """Answer the jobs that need the model, in one batch. ``stop`` (one callable per job) stops a job's
    decoding at the next token once it returns true (a cancelled request); the batch's others go on."""
    todo = [j for j in jobs if j.query is not None and j.answer is None]
    if not todo:
        return
    if engine is None:
        raise EarthDialError(ErrorCode.MODEL_ERROR, "no model is loaded in this process")
    if stop:  # the engine ends each query's own rows (beams included) once its flag is set
        for job, flag in zip(jobs, stop, strict=True):
            if job.query is not None:
                job.query.cancelled = flag
    t = time.perf_counter()
    try:
        answers_ = engine.generate([j.query for j in todo])
    except EarthDialError:
        raise
    except Exception as exc:  # a model failure is these requests' error, not the server's
        raise EarthDialError(ErrorCode.MODEL_ERROR, f"{type(exc).__name__}: {exc}") from exc
    elapsed = time.perf_counter() - t
    for job, answer in zip(todo, answers_, strict=True):
        job.answer = answer
        job.timings["generate_s"] = elapsed
        job.timings["batch"] = len(todo)


def run(header: dict[str, Any], arrays: list[np.ndarray], engine: Engine | None) -> dict[str, Any]:
    """Carry out one `ask` or `georef` request; returns the reply's fields (without v/id/ok)."""
    job = prepare(header, arrays, engine)
    generate([job], engine)
    return finish(job, engine)


def status(engine: Engine | None, queued: int = 0, running: int = 0) -> dict[str, Any]:
    return {
        "protocol": PROTOCOL_VERSION,
        "model": engine.describe() if engine is not None else None,
        "machine": engine.machine if engine is not None else None,  # what this machine can run (machine.py)
        "queue": queued,
        "running": running,
        "tasks": [
            {
                "name": t.name,
                "description": t.description,
                "needs_prompt": t.needs_prompt,
                "grounded": t.grounded,
                "images": t.images,
                "sensor": t.sensor,
                "max_new_tokens": t.max_new_tokens,
                "variants": [v for v in VARIANTS if _supports(v, t)],
            }
            for t in TASKS.values()
        ],
        "presets": [
            {"name": p.name, "bands": list(p.bands) if p.bands else None, "description": p.description}
            for p in presets.PRESETS.values()
        ],
        "error_codes": error_codes(),
        "sensors": [
            {
                "tag": s.tag,
                "description": s.description,
                "path": s.path,
                "gsd_m": s.gsd_m,
                "temporal": s.temporal,
            }
            for s in sensors.SENSORS.values()
        ],
    }


def _supports(variant: str, spec: prompts.Task) -> bool:
    """Whether a variant's vocabulary has every tag a task's prompt uses."""
    vocab = set(earthdial_tokens(variant))
    text = spec.template.format(sensor=spec.sensor, images="", prompt="")
    return all(tag in vocab for tag in re.findall(r"\[[a-z0-9_.]+\]", text))
