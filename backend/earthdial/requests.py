"""A request's fields, checked once into typed values: one check, and one message, per kind of error.

`ask`, `plan`, `georef` and the scans (`detect`, `detect_changes`) read their options through `options`,
and every header or source field through `field`, so that the same mistake gets the same typed error
whichever op it reaches. The server runs `check` at admission, before a request is queued.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import imagery, prompts, scenes, sensors
from .protocol import EarthDialError, ErrorCode
from .wire import from_json_frame

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


def check(header: dict[str, Any], arrays: Sequence[Any] = ()) -> None:
    """At admission: the fields every work op shares, so a malformed request is refused before it queues."""
    op = header.get("op")
    if op in ("ask", "plan", "detect", "detect_changes"):
        options(header)
        prompt(header)
        if op in ("ask", "plan"):
            task(header)
        else:
            task(header, default="change" if op == "detect_changes" else "refer")
            earlier(header, arrays)


@dataclass(frozen=True)
class Earlier:
    """A resumed scan's earlier part (`detect`'s `earlier`): the tiles it finished, by index (their
    entries, `footprint` included), and their boxes, as that scan's progress events carried them. The
    scan merges them with its new tiles' boxes as one uninterrupted scan's (scenes.merge_boxes)."""

    tiles: dict[int, dict[str, Any]]
    features: list[dict[str, Any]]


def earlier(header: dict[str, Any], arrays: Sequence[Any]) -> Earlier | None:
    """A scan's `earlier` (true: its one array frame is a `wire.json_frame` of `{"tiles": [...],
    "features": [...]}`), checked: every tile an index with its footprint, exactly the tiles
    `options.skip` lists, every box a polygon of one of them with the merge's fields. None without."""
    flag = header.get("earlier")
    if flag is None or flag is False:
        return None
    if flag is not True:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"field 'earlier' must be true or false, got {flag!r:.40}"
        )
    if len(arrays) != 1:
        raise EarthDialError(ErrorCode.MISSING_FRAMES, f"'earlier' comes as the scan's one array frame; "
                             f"{len(arrays)} came")  # fmt: skip
    opts = options(header)
    if not opts.merge:
        raise EarthDialError(ErrorCode.BAD_REQUEST, "'earlier' boxes are merged with the new ones: it needs options.merge")  # fmt: skip
    data = from_json_frame(arrays[0], "the 'earlier' frame")
    if not isinstance(data, dict) or not isinstance(data.get("tiles"), list) or not isinstance(data.get("features"), list):  # fmt: skip
        raise EarthDialError(ErrorCode.BAD_REQUEST, "the 'earlier' frame must be {\"tiles\": [...], \"features\": [...]}")  # fmt: skip
    tiles: dict[int, dict[str, Any]] = {}
    for k, tile in enumerate(data["tiles"]):
        where = f"earlier.tiles[{k}]"
        if not isinstance(tile, dict) or not _index(tile.get("index")):
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where} must be a tile entry with its 'index'")
        if tile["index"] in tiles:
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where}: tile {tile['index']} is listed twice")
        _ring(tile.get("footprint"), f"{where}.footprint")
        tiles[tile["index"]] = tile
    if set(tiles) != opts.skip:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"options.skip must list exactly the earlier tiles ({len(tiles)} "
                             f"sent, {len(opts.skip)} skipped): the merge covers every tile once")  # fmt: skip
    for k, feature in enumerate(data["features"]):
        where = f"earlier.features[{k}]"
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        props = feature.get("properties") if isinstance(feature, dict) else None
        if not isinstance(geometry, dict) or geometry.get("type") != "Polygon" or not isinstance(props, dict):
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where} must be a Feature with a Polygon and properties")  # fmt: skip
        rings = geometry.get("coordinates")
        if not isinstance(rings, list) or not rings:
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where}.geometry has no ring")
        for r, ring in enumerate(rings):
            _ring(ring, f"{where}.geometry.coordinates[{r}]")
        if props.get("tile") not in tiles or not _index(props.get("tile")):
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where}.properties.tile must be one of the earlier tiles")  # fmt: skip
        if not _index(props.get("order")):
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where}.properties.order must be the box's index in its tile")  # fmt: skip
        distance: Any = props.get("edge_distance")
        score = props.get("score")
        if not _real(distance) or not math.isfinite(distance) or distance < 0:
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where}.properties.edge_distance must be a number "
                                 "of at least 0, as the scan's progress event gave it")  # fmt: skip
        if score is not None and not _real(score):
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where}.properties.score must be a number or null")
        if props.get("label") is not None and not isinstance(props["label"], str):
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where}.properties.label must be a string")
    return Earlier(tiles, data["features"])


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _ring(value: Any, where: str) -> None:
    """A closed ring of at least 4 finite [x, y] points."""
    if not (isinstance(value, list) and len(value) >= 4 and all(
            isinstance(p, list) and len(p) == 2 and all(_real(v) and math.isfinite(v) for v in p) for p in value)):  # fmt: skip
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"{where} must be a ring of at least 4 finite [x, y] points"
        )


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
