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

from . import access, answers, georef, imagery, limits, presets, prompts, requests, result_features, sensors
from .prompts import TASKS
from .protocol import PROTOCOL_VERSION, EarthDialError, ErrorCode, error_codes
from .tokens import VARIANTS, earthdial_tokens

if TYPE_CHECKING:  # torch only where the model runs
    from .engine import Engine

MAX_NAME_CHARS = 1000  # a by-value source's `name` kept in results
MAX_CHIP_SIZE = 2048  # long side, in pixels, a window is read at; more would only be resized away
MAX_IMAGES = 8  # images in one request (a pair, or a short time series)


def resolve_source(
    source: Any,
    arrays: list[np.ndarray],
    *,
    grid: imagery.Chip | None = None,
    default_bands: list[int] | None = None,
    gsd: float | None = None,
) -> imagery.Chip:
    """The chip a request's source names: a window of a file (by reference) or the sent array (by value).
    With `grid` (the first image of a pair) the source is warped onto that grid instead."""
    if not isinstance(source, dict):
        raise EarthDialError(ErrorCode.BAD_REQUEST, "field 'source' must be an object")
    kind = source.get("kind")
    if kind == "ref":
        if arrays:
            raise EarthDialError(ErrorCode.MISSING_FRAMES, "a source by reference takes no array frames")
        path = requests.field(source, "path", str)
        real = access.check_path(path)  # `forbidden_path` outside the server's allowed directories
        bands = requests.field(source, "bands", list, required=False)
        if bands is not None and not all(isinstance(b, int) and not isinstance(b, bool) for b in bands):
            raise EarthDialError(
                ErrorCode.BAD_REQUEST, f"'bands' must be a list of 1-based ints, got {bands!r:.80}"
            )
        bounds = requests.field(source, "bounds", list, required=False)
        if bounds is not None and (len(bounds) != 4 or not all(isinstance(v, (int, float)) for v in bounds)):
            raise EarthDialError(
                ErrorCode.BAD_REQUEST, f"'bounds' must be [minx, miny, maxx, maxy], got {bounds!r:.80}"
            )
        crs = requests.field(source, "crs", str, required=False)
        bands = bands or default_bands
        if grid is not None:
            chip = imagery.read_on_grid(real, bands, grid)
        else:
            chip = imagery.read_chip(
                real,
                bands=bands,
                bounds=tuple(bounds) if bounds else None,
                bounds_crs=crs,
                max_size=MAX_CHIP_SIZE,
                gsd=gsd,
            )
        chip.source = path  # the file as the client named it (`real` may have resolved links)
        return chip
    if kind == "value":
        if len(arrays) != 1:
            raise EarthDialError(
                ErrorCode.MISSING_FRAMES, f"a source by value takes 1 array frame, got {len(arrays)}"
            )
        transform = requests.field(source, "transform", list)
        crs = requests.field(source, "crs", str, required=False)
        nodata = requests.field(source, "nodata", (int, float), required=False)
        chip = imagery.chip_from_array(arrays[0], transform, crs, nodata)
        chip = imagery.warp_to_grid(chip, grid) if grid is not None else chip
        # the layer the client read the pixels from, as it names it (recorded, never opened here)
        name = _text_or_none(source.get("name")) or _text_or_none(source.get("path"))
        chip.source = name[:MAX_NAME_CHARS] if name else chip.source
        return chip
    raise EarthDialError(ErrorCode.BAD_REQUEST, f"source kind must be 'ref' or 'value', got {kind!r:.40}")


def features_for(answer: str, chip: imagery.Chip, properties: dict[str, Any]) -> dict[str, Any]:
    boxes = answers.parse_boxes(answer)
    # every feature repeats the properties (the answer among them): bound the reply before building it
    limits.check_features(len(boxes), sum(len(v) for v in properties.values() if isinstance(v, str)))
    return georef.features_from_boxes(boxes, chip.transform, chip.width, chip.height, chip.crs, properties)


def chip_description(chip: imagery.Chip) -> dict[str, Any]:
    a, b, c, d, e, f = (chip.transform.a, chip.transform.b, chip.transform.c, chip.transform.d,
                        chip.transform.e, chip.transform.f)  # fmt: skip
    return {
        "source": chip.source,
        "bands": chip.band_indexes,
        "width": chip.width,
        "height": chip.height,
        "transform": [a, b, c, d, e, f],
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
    options: requests.Options = field(default_factory=requests.Options)  # as checked once, at prepare
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


def _source_list(header: dict[str, Any]) -> list[Any]:
    if "sources" in header:
        sources = requests.field(header, "sources", list)
        if not 1 <= len(sources) <= MAX_IMAGES:
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"'sources' must hold 1 to {MAX_IMAGES} sources")
        return sources
    return [header.get("source")]


def choose_preset(
    source: Any, array: np.ndarray | None, options: requests.Options, info: imagery.RasterInfo | None
) -> tuple[presets.Preset, str]:
    if options.preset is not None:
        return presets.get(options.preset), "named in the request"
    if array is not None:
        if array.ndim not in (2, 3) or array.size == 0:
            raise EarthDialError(
                ErrorCode.BAD_ARRAY, f"pixels must be (rows, cols) or (bands, rows, cols), got {array.shape}"
            )
        data = array if array.ndim == 3 else array[None]
        return presets.choose(data.shape[0], data.dtype.name, [], data[0, ::16, ::16])
    if info is None:
        return presets.PRESETS["rgb8"], "default"
    sample = None
    if info.count == 1:
        sample = imagery.sample_band(info.path, 1, 64)
    return presets.choose(info.count, info.dtype, info.descriptions, sample)


def read_inputs(header: dict[str, Any], arrays: list[np.ndarray], options: requests.Options) -> Inputs:
    """`source` (one image) or `sources` (a pair or sequence) -> aligned chips. Later images are warped
    onto the first image's grid and all are cropped to their common extent; by-value sources take the
    array frames in order."""
    sources = _source_list(header)
    needed = sum(1 for s in sources if isinstance(s, dict) and s.get("kind") == "value")
    if needed != len(arrays):
        raise EarthDialError(
            ErrorCode.MISSING_FRAMES,
            f"{needed} source(s) by value need {needed} array frame(s), got {len(arrays)}",
        )
    frames = iter(arrays)
    own = [[next(frames)] if isinstance(s, dict) and s.get("kind") == "value" else [] for s in sources]
    first_src = sources[0]
    by_ref = not own[0] and isinstance(first_src, dict) and isinstance(first_src.get("path"), str)
    info = imagery.describe(access.check_path(first_src["path"])) if by_ref else None  # opened once for all
    preset, reason = choose_preset(first_src, own[0][0] if own[0] else None, options, info)
    gsd = options.gsd
    bands = list(preset.bands) if preset.bands else None
    if bands and preset.band_count and info is not None:
        count = info.count
        if count < max(bands):
            raise EarthDialError(
                ErrorCode.BAND_OUT_OF_RANGE,
                f"preset {preset.name} needs {max(bands)} bands; the raster has {count}",
            )
    first = resolve_source(sources[0], own[0], default_bands=bands, gsd=gsd)
    chips = [first] + [
        resolve_source(s, a, grid=first, default_bands=bands)
        for s, a in zip(sources[1:], own[1:], strict=True)
    ]
    chips = [imagery.Chip(presets.apply(preset, c.data, c.nodata), c.transform, c.crs, c.band_indexes,
                          c.nodata, c.source, c.valid) for c in chips]  # fmt: skip
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
    native = info.gsd_m if info is not None else _number(first_src.get("gsd_data"))
    return Inputs(chips, preset, reason, gsd_m, warnings, native_gsd_m=native or gsd_m)


def _number(value: Any) -> float | None:
    """A positive finite number a client declared (the stored GSD of a layer it sends by value), else None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
    return float(value) if ok else None


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


def prepare(header: dict[str, Any], arrays: list[np.ndarray], engine: Engine | None) -> Job:
    """Validate a request, read its pixels and build its engine query. Raises EarthDialError."""
    op = header.get("op")
    if op == "georef":
        answer = requests.field(header, "answer", str)
        inputs = read_inputs(header, arrays, requests.Options())
        job = Job(header, inputs.chips, answer=answer, inputs=inputs)
        job.timings["read_s"] = time.perf_counter() - job.started
        return job
    if op != "ask":
        raise EarthDialError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r:.40}; known: ask, georef, status")
    name = requests.field(header, "task", str)
    spec = prompts.task(name)  # validates the task before any pixels are read
    prompt = requests.prompt(header)
    options = requests.options(header)
    max_new = options.max_new_tokens or spec.max_new_tokens
    history = options.history
    decoding = options.decoding or (engine.decoding if engine is not None else prompts.DEFAULT_DECODING)
    how = prompts.decoding_for(name, decoding)
    started = time.perf_counter()
    inputs = read_inputs(header, arrays, options)
    chips = inputs.chips
    tag = _sensor_for(spec, inputs, options, engine.info.vocab if engine is not None else frozenset())
    inputs.warnings += _gsd_warnings(inputs.gsd_m, tag)
    in_history = any(prompts.IMAGE in q for q, _ in history)  # a follow-up: the images came with turn one
    question = prompts.build_question(
        name, prompt, sensors.prompt_tag(tag, chips[0].data.shape[0]), images=0 if in_history else len(chips)
    )
    job = Job(header, chips, started=started, inputs=inputs, sensor=tag, options=options)
    job.timings["read_s"] = time.perf_counter() - started
    if engine is None:
        raise EarthDialError(ErrorCode.MODEL_ERROR, "no model is loaded in this process")
    _check_model(engine, question, tag)
    t = time.perf_counter()
    from .engine import Query

    images = [engine.image(chip.data, tag, chip.nodata, task=name, images=len(chips)) for chip in chips]
    job.query = Query(question, images, max_new, history, num_beams=how.num_beams, min_new_tokens=how.min_new_tokens,
                      sampling=how.sampling, system=how.system_message)  # fmt: skip
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


def plan(header: dict[str, Any], arrays: list[np.ndarray], engine: Engine | None) -> dict[str, Any]:
    """What an `ask` with this header would send to the model, from metadata alone: the band preset and
    why, the bands, the sensor tag, the GSD, the window's size, the model tiles, by reference or by
    value, and warnings; or the error the `ask` would get. Reads no pixels beyond a small sample of a
    one-band raster (to tell SAR in dB from linear power). A by-value source may carry ``shape``
    ([rows, cols] of the array the `ask` will send) with a small sample of it as its array frame."""
    name = requests.field(header, "task", str)
    spec = prompts.task(name)
    prompt = requests.prompt(header)
    options = requests.options(header)
    # `scan`: the plan of a `detect`/`detect_changes` with these options (tile_size, overlap, batch) over
    # the same area, read at the layer's own resolution (a by-value source's `shape` is its full grid)
    scanning = requests.field(header, "scan", dict, required=False)
    sources = _source_list(header)
    needed = sum(1 for s in sources if isinstance(s, dict) and s.get("kind") == "value")
    if needed != len(arrays):
        raise EarthDialError(
            ErrorCode.MISSING_FRAMES,
            f"{needed} source(s) by value need {needed} array frame(s), got {len(arrays)}",
        )
    gsd = options.gsd
    first = sources[0]
    if not isinstance(first, dict) or first.get("kind") not in ("ref", "value"):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, "field 'source' must be an object of kind 'ref' or 'value'"
        )
    if first["kind"] == "ref":
        path = access.check_path(requests.field(first, "path", str))
        info = imagery.describe(path)
        preset, reason = choose_preset(first, None, options, info)
        bands = requests.field(first, "bands", list, required=False) or (
            list(preset.bands) if preset.bands else None
        )
        if preset.bands and preset.band_count and info.count < max(preset.bands):
            raise EarthDialError(
                ErrorCode.BAND_OUT_OF_RANGE,
                f"preset {preset.name} needs {max(preset.bands)} bands; the raster has {info.count}",
            )
        bounds = requests.field(first, "bounds", list, required=False)
        chip = imagery.plan_chip(path, bands, tuple(bounds) if bounds else None,
                                 requests.field(first, "crs", str, required=False),
                                 None if scanning is not None else MAX_CHIP_SIZE,
                                 None if scanning is not None else gsd)  # fmt: skip
    else:
        array = arrays[0]
        shape = requests.field(first, "shape", list, required=False)
        if shape is not None and not (len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)):
            raise EarthDialError(
                ErrorCode.BAD_REQUEST, f"source.shape must be [rows, cols], got {shape!r:.60}"
            )
        data = array if array.ndim == 3 else array[None]
        if shape is not None and options.preset is None:  # a sample: all of it tells the values
            preset, reason = presets.choose(data.shape[0], data.dtype.name, [], data[0])
        else:
            preset, reason = choose_preset(first, array, options, None)
        height, width = shape if shape is not None else data.shape[1:]
        sample = imagery.chip_from_array(data, requests.field(first, "transform", list),
                                         requests.field(first, "crs", str, required=False))  # fmt: skip
        chip = imagery.ChipPlan(sample.band_indexes, int(width), int(height), sample.transform, sample.crs)
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
        view_w, view_h = _model_view(engine, width, height, tag, name, len(sources))
        model_gsd_m = gsd_m * max(width / view_w, height / view_h) if gsd_m else None
    scan_plan = None
    if scanning is not None:
        from . import scan  # scan imports this module

        image_size = engine.info.image_size if engine is not None else None
        scan_plan = scan.describe(
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
            "images": len(sources),
            "tiles": tiles,
            "model_gsd_m": model_gsd_m,
            "scan": scan_plan,
            "by": "value" if first["kind"] == "value" else "reference",
            "warnings": warnings,
            "model": model,
        }
    }


def _grid_for(
    engine: Engine, width: int, height: int, tag: str, task: str | None = None, images: int = 1
) -> tuple[int, int]:
    """(columns, rows) of model tiles one image of this size is resized to: one for the band-group path,
    InternVL's dynamic grid for RGB within each image's share of the budget; the same choice
    `engine.image` makes."""
    from . import pixels

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
        gsd_model=model_gsd(model, chip, job.sensor, task, len(job.chips)) if model is not None else None,
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
    engine: Engine, chip: imagery.Chip, tag: str, task: str | None, images: int = 1
) -> float | None:
    """Ground metres per pixel of the image the model sees: the chip resized onto its model tiles."""
    gsd = imagery.ground_resolution(chip.transform, chip.crs, chip.width / 2, chip.height / 2)
    if not gsd:
        return None
    view_w, view_h = _model_view(engine, chip.width, chip.height, tag, task, images)
    return float(gsd * ((chip.width / view_w) * (chip.height / view_h)) ** 0.5)


def request_record(job: Job) -> str:
    """What an answer's boxes need to become training data again (`training_data`): the task, prompt, band
    options, sensor tag, each source (a by-value source names the file it was read from when its client
    said so) and the window read, as JSON."""
    header = job.header
    sources = []
    for src in _source_list(header):
        src = src if isinstance(src, dict) else {}
        if src.get("kind") == "value":  # pixels sent by value: only the file they came from, if any
            sources.append(
                {"path": _text_or_none(src.get("path")), "bands": None, "bounds": None, "crs": src.get("crs")}
            )
        else:
            sources.append({k: src.get(k) for k in ("path", "bands", "bounds", "crs")})
    return record(header.get("task"), header.get("prompt", ""), job.sensor,
                  job.inputs.preset.name if job.inputs else None, job.options, sources,
                  chip_description(job.chips[0]))  # fmt: skip


def record(task: Any, prompt: Any, sensor: str, preset: str | None, options: requests.Options,
           sources: list[dict[str, Any]], window: dict[str, Any]) -> str:  # fmt: skip
    """The `request` field: one JSON form for an answer's window and for each tile of a scan."""
    kept = options.recorded()
    window = {k: v for k, v in window.items() if k != "source"}
    return result_features.request_json({"task": task, "prompt": prompt, "sensor": sensor, "preset": preset,
                                 "options": kept, "sources": sources, "window": window})  # fmt: skip


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


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
