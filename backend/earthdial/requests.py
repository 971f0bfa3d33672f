"""A request's fields, checked once into typed values: one check, and one message, per kind of error.

`ask`, `plan`, `georef` and the scans (`detect`, `detect_changes`) read their options through `options`,
and every header or source field through `field`, so that the same mistake gets the same typed error
whichever op it reaches. The server runs `check` at admission, before a request is queued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import imagery, prompts, scenes, sensors
from .protocol import EarthDialError, ErrorCode

MAX_NEW_TOKENS = 2048
SCAN_DEFAULTS: dict[str, Any] = {"tile_size": 448, "overlap": 0.1, "batch": 8, "min_score": 0.0}  # as Options


def field(mapping: dict[str, Any], name: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
    """``mapping[name]`` if it is a ``kind`` (None when absent and not ``required``); else `bad_request`
    naming the field, the type it must be and what came."""
    value = mapping.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"field {name!r} must be {expected}, got {value!r:.80}")
    return value


@dataclass(frozen=True)
class Options:
    """A request's `options`, checked. None: not given (the task's or the server's default applies)."""

    preset: str | None = None
    sensor: str | None = None
    gsd: float | None = None
    max_new_tokens: int | None = None
    decoding: str | None = None
    history: tuple[tuple[str, str], ...] = ()
    # whole-scene scans
    tile_size: int = 448
    overlap: float = 0.1
    batch: int = 8
    min_score: float = 0.0
    skip: frozenset[int] = frozenset()
    merge: bool = True

    def recorded(self) -> dict[str, Any]:
        """What a result's `request` keeps of them: how the pixels were chosen and read."""
        kept = {"preset": self.preset, "gsd": self.gsd, "sensor": self.sensor}
        return {k: v for k, v in kept.items() if v is not None}


def options(header: dict[str, Any]) -> Options:
    """The header's `options`, every one checked (typed errors, one message each)."""
    raw = field(header, "options", dict, required=False) or {}
    for name in ("preset", "sensor", "decoding"):
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise EarthDialError(
                ErrorCode.BAD_REQUEST, f"options.{name} must be a string, got {raw[name]!r:.40}"
            )
    sensor = raw.get("sensor") or None
    if sensor is not None:
        sensors.sensor(sensor)  # `bad_request` naming the known tags
    gsd = raw.get("gsd")
    if gsd is not None and (
        not _real(gsd) or not math.isfinite(gsd) or not imagery.MIN_GSD <= gsd <= imagery.MAX_GSD
    ):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"options.gsd must be {imagery.MIN_GSD} to {imagery.MAX_GSD:g} metres per pixel, got {gsd!r:.40}",
        )
    max_new = raw.get("max_new_tokens")
    if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool)
                                or not 1 <= max_new <= MAX_NEW_TOKENS):  # fmt: skip
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"options.max_new_tokens must be an int in 1..{MAX_NEW_TOKENS}, got {max_new!r:.40}",
        )
    history = raw.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
        for turn in history
    ):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, "options.history must be a list of [question, answer] pairs"
        )
    tile, overlap, batch = scenes.check_tiling(
        raw.get("tile_size", SCAN_DEFAULTS["tile_size"]),
        raw.get("overlap", SCAN_DEFAULTS["overlap"]),
        raw.get("batch", SCAN_DEFAULTS["batch"]),
    )
    score = raw.get("min_score", SCAN_DEFAULTS["min_score"])
    if not _real(score) or not 0 <= score <= 1:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"options.min_score must be 0 to 1, got {score!r:.20}")
    skip = raw.get("skip") or []
    if not isinstance(skip, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in skip):
        raise EarthDialError(ErrorCode.BAD_REQUEST, "options.skip must be a list of tile indexes")
    merge = raw.get("merge", True)
    if not isinstance(merge, bool):
        raise EarthDialError(ErrorCode.BAD_REQUEST, "options.merge must be true or false")
    return Options(
        preset=raw.get("preset") or None,
        sensor=sensor,
        gsd=float(gsd) if gsd is not None else None,
        max_new_tokens=max_new,
        decoding=raw.get("decoding") or None,
        history=tuple((q, a) for q, a in history),
        tile_size=tile,
        overlap=overlap,
        batch=batch,
        min_score=float(score),
        skip=frozenset(skip),
        merge=merge,
    )


def task(header: dict[str, Any], default: str | None = None) -> prompts.Task:
    """The task a request names (`unknown_task` naming the known ones); ``default`` when it names none."""
    name = field(header, "task", str, required=default is None) or default
    return prompts.task(str(name))


def prompt(header: dict[str, Any]) -> str:
    return field(header, "prompt", str, required=False) or ""


def check(header: dict[str, Any]) -> None:
    """At admission: the fields every work op shares, so a malformed request is refused before it queues."""
    op = header.get("op")
    if op in ("ask", "plan", "detect", "detect_changes"):
        options(header)
        prompt(header)
        if op in ("ask", "plan"):
            task(header)
        else:
            task(header, default="change" if op == "detect_changes" else "refer")


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
