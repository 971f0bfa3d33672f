"""What a request does, independent of how it arrived: header + arrays -> reply fields.

The ZeroMQ server and the in-process CLI both call `run`, so a request behaves the same either way.
Data flows one way: source -> chip -> question + tiles -> engine -> answer -> boxes -> features.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import answers, georef, imagery, prompts, sensors
from .prompts import TASKS
from .protocol import PROTOCOL_VERSION, EarthDialError, ErrorCode
from .tokens import VARIANTS, earthdial_tokens

MAX_CHIP_SIZE = 2048  # long side, in pixels, a window is read at; more would only be resized away
MAX_IMAGES = 8  # images in one request (a pair, or a short time series)


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


@dataclass
class Job:
    """A validated request, ready for the engine (query) or already answered (georef)."""

    header: dict[str, Any]
    chips: list[imagery.Chip]
    query: Any = None  # engine.Query, for `ask`
    answer: str | None = None  # set for `georef`; for `ask` once generated
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


def _sources(header: dict[str, Any], arrays: list[np.ndarray]) -> list[imagery.Chip]:
    """`source` (one image) or `sources` (a pair or sequence); by-value sources take array frames in order."""
    if "sources" in header:
        sources = _field(header, "sources", list)
        if not 1 <= len(sources) <= MAX_IMAGES:
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"'sources' must hold 1 to {MAX_IMAGES} sources")
    else:
        sources = [header.get("source")]
    needed = sum(1 for s in sources if isinstance(s, dict) and s.get("kind") == "value")
    if needed != len(arrays):
        raise EarthDialError(
            ErrorCode.MISSING_FRAMES,
            f"{needed} source(s) by value need {needed} array frame(s), got {len(arrays)}",
        )
    frames = iter(arrays)
    chips = []
    for src in sources:
        by_value = isinstance(src, dict) and src.get("kind") == "value"
        chips.append(resolve_source(src, [next(frames)] if by_value else []))
    return chips


def _history(options: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    history = options.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
        for turn in history
    ):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, "options.history must be a list of [question, answer] pairs"
        )
    return tuple((q, a) for q, a in history)


def prepare(header: dict[str, Any], arrays: list[np.ndarray], engine: Any) -> Job:
    """Validate a request, read its pixels and build its engine query. Raises EarthDialError."""
    op = header.get("op")
    if op == "georef":
        answer = _field(header, "answer", str)
        job = Job(header, _sources(header, arrays), answer=answer)
        job.timings["read_s"] = time.perf_counter() - job.started
        return job
    if op != "ask":
        raise EarthDialError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r:.40}; known: ask, georef, status")
    name = _field(header, "task", str)
    spec = prompts.task(name)  # validates the task before any pixels are read
    prompt = _field(header, "prompt", str, required=False) or ""
    options = _field(header, "options", dict, required=False) or {}
    tag = options.get("sensor") or spec.sensor
    sensors.sensor(tag)
    max_new = options.get("max_new_tokens", spec.max_new_tokens)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or not 1 <= max_new <= 2048:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"options.max_new_tokens must be an int in 1..2048, got {max_new!r}"
        )
    history = _history(options)
    started = time.perf_counter()
    chips = _sources(header, arrays)
    in_history = any(prompts.IMAGE in q for q, _ in history)  # a follow-up: the images came with turn one
    question = prompts.build_question(name, prompt, tag, images=0 if in_history else len(chips))
    job = Job(header, chips, started=started)
    job.timings["read_s"] = time.perf_counter() - started
    if engine is None:
        raise EarthDialError(ErrorCode.MODEL_ERROR, "no model is loaded in this process")
    engine.check_tags(question)
    t = time.perf_counter()
    from .engine import Query

    images = [engine.image(chip.data, tag, chip.nodata) for chip in chips]
    job.query = Query(question, images, max_new, history)
    job.timings["preprocess_s"] = time.perf_counter() - t
    return job


def finish(job: Job, engine: Any) -> dict[str, Any]:
    """Reply fields for a job whose answer is known: the answer's boxes georeferenced on the first
    image's grid (later images of a pair are read on the same window)."""
    header = job.header
    chip = job.chips[0]
    answer = job.answer or ""
    model_name = engine.info.variant if (engine is not None and job.query is not None) else ""
    props = {
        "task": header.get("task", "georef") if job.query is not None else "georef",
        "prompt": header.get("prompt", "") if job.query is not None else "",
        "answer": answer,
        "model": model_name,
        "source": " | ".join(c.source for c in job.chips),
    }
    reply: dict[str, Any] = {
        "answer": answer,
        "features": features_for(answer, chip, props),
        "chip": chip_description(chip),
        "chips": [chip_description(c) for c in job.chips],
    }
    if job.query is not None:
        reply["model"] = {"variant": model_name, "path": engine.info.path}
        reply["tiles"] = sum(im.tiles for im in job.query.images)
    job.timings["total_s"] = time.perf_counter() - job.started
    reply["timings"] = job.timings
    return reply


def generate(jobs: list[Job], engine: Any) -> None:
    """Answer the jobs that need the model, in one batch."""
    todo = [j for j in jobs if j.query is not None and j.answer is None]
    if not todo:
        return
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


def run(header: dict[str, Any], arrays: list[np.ndarray], engine: Any) -> dict[str, Any]:
    """Carry out one `ask` or `georef` request; returns the reply's fields (without v/id/ok)."""
    job = prepare(header, arrays, engine)
    generate([job], engine)
    return finish(job, engine)


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
                "images": t.images,
                "sensor": t.sensor,
                "max_new_tokens": t.max_new_tokens,
                "variants": [v for v in VARIANTS if _supports(v, t)],
            }
            for t in TASKS.values()
        ],
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
