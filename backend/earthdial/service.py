"""What a request does, independent of how it arrived: header + arrays -> reply fields.

The ZeroMQ server and the in-process CLI both call `run`, so a request behaves the same either way.
Data flows one way: source -> chip -> question + tiles -> engine -> answer -> boxes -> features.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from . import answers, georef, imagery
from .prompts import DEFAULT_SENSOR, TASKS, build_question
from .protocol import PROTOCOL_VERSION, EarthDialError, ErrorCode

MAX_CHIP_SIZE = 2048  # long side, in pixels, a window is read at; more would only be resized away


def _field(header: dict[str, Any], name: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
    value = header.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"field {name!r} must be {expected}, got {value!r:.80}")
    return value


def resolve_source(source: Any, arrays: list[np.ndarray]) -> imagery.Chip:
    """The chip a request's source names: a window of a file (by reference) or the sent array (by value)."""
    if not isinstance(source, dict):
        raise EarthDialError(ErrorCode.BAD_REQUEST, "field 'source' must be an object")
    kind = source.get("kind")
    if kind == "ref":
        if arrays:
            raise EarthDialError(ErrorCode.MISSING_FRAMES, "a source by reference takes no array frames")
        path = _field(source, "path", str)
        bands = _field(source, "bands", list, required=False)
        if bands is not None and not all(isinstance(b, int) and not isinstance(b, bool) for b in bands):
            raise EarthDialError(
                ErrorCode.BAD_REQUEST, f"'bands' must be a list of 1-based ints, got {bands!r:.80}"
            )
        bounds = _field(source, "bounds", list, required=False)
        if bounds is not None and (len(bounds) != 4 or not all(isinstance(v, (int, float)) for v in bounds)):
            raise EarthDialError(
                ErrorCode.BAD_REQUEST, f"'bounds' must be [minx, miny, maxx, maxy], got {bounds!r:.80}"
            )
        crs = _field(source, "crs", str, required=False)
        return imagery.read_chip(
            path,
            bands=bands,
            bounds=tuple(bounds) if bounds else None,
            bounds_crs=crs,
            max_size=MAX_CHIP_SIZE,
        )
    if kind == "value":
        if len(arrays) != 1:
            raise EarthDialError(
                ErrorCode.MISSING_FRAMES, f"a source by value takes 1 array frame, got {len(arrays)}"
            )
        transform = _field(source, "transform", list)
        crs = _field(source, "crs", str, required=False)
        nodata = _field(source, "nodata", (int, float), required=False)
        return imagery.chip_from_array(arrays[0], transform, crs, nodata)
    raise EarthDialError(ErrorCode.BAD_REQUEST, f"source kind must be 'ref' or 'value', got {kind!r:.40}")


def features_for(answer: str, chip: imagery.Chip, properties: dict[str, Any]) -> dict[str, Any]:
    boxes = answers.parse_boxes(answer)
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


def run(header: dict[str, Any], arrays: list[np.ndarray], engine: Any) -> dict[str, Any]:
    """Carry out one `ask` or `georef` request; returns the reply's fields (without v/id/ok)."""
    op = header.get("op")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if op == "georef":
        answer = _field(header, "answer", str)
        chip = resolve_source(header.get("source"), arrays)
        timings["read_s"] = time.perf_counter() - t0
        props = {"task": "georef", "prompt": "", "answer": answer, "model": "", "source": chip.source}
        features = features_for(answer, chip, props)
        timings["total_s"] = time.perf_counter() - t0
        return {"answer": answer, "features": features, "chip": chip_description(chip), "timings": timings}
    if op != "ask":
        raise EarthDialError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r:.40}; known: ask, georef, status")
    task = _field(header, "task", str)
    prompt = _field(header, "prompt", str, required=False) or ""
    options = _field(header, "options", dict, required=False) or {}
    sensor = options.get("sensor", DEFAULT_SENSOR)
    question = build_question(task, prompt, sensor)  # validates the task before any pixels are read
    chip = resolve_source(header.get("source"), arrays)
    t1 = time.perf_counter()
    timings["read_s"] = t1 - t0
    if engine is None:
        raise EarthDialError(ErrorCode.MODEL_ERROR, "no model is loaded in this process")
    from .engine import Query

    max_new = options.get("max_new_tokens", TASKS[task].max_new_tokens)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or not 1 <= max_new <= 2048:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"options.max_new_tokens must be an int in 1..2048, got {max_new!r}"
        )
    tiles = engine.image_tiles(chip.data, chip.nodata)
    t2 = time.perf_counter()
    timings["preprocess_s"] = t2 - t1
    try:
        (answer,) = engine.generate([Query(question, [tiles], max_new)])
    except EarthDialError:
        raise
    except Exception as exc:  # a model failure is this request's error, not the server's
        raise EarthDialError(ErrorCode.MODEL_ERROR, f"{type(exc).__name__}: {exc}") from exc
    t3 = time.perf_counter()
    timings["generate_s"] = t3 - t2
    model_name = engine.info.variant
    props = {"task": task, "prompt": prompt, "answer": answer, "model": model_name, "source": chip.source}
    features = features_for(answer, chip, props)
    timings["total_s"] = time.perf_counter() - t0
    return {
        "answer": answer,
        "features": features,
        "chip": chip_description(chip),
        "model": {"variant": model_name, "path": engine.info.path},
        "tiles": int(tiles.shape[0]),
        "timings": timings,
    }


def status(engine: Any, queued: int = 0, running: int = 0) -> dict[str, Any]:
    return {
        "protocol": PROTOCOL_VERSION,
        "model": engine.describe() if engine is not None else None,
        "queue": queued,
        "running": running,
        "tasks": [
            {
                "name": t.name,
                "description": t.description,
                "needs_prompt": t.needs_prompt,
                "grounded": t.grounded,
            }
            for t in TASKS.values()
        ],
    }
