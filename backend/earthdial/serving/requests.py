"""A request's fields, checked once into typed values: one check, and one message, per kind of error.

`ask`, `plan`, `georef` and the scans (`detect`, `detect_changes`) read their options through `options`
and their sources through `sources` (typed `Ref`, `Value` and `Stream` values), so that the same mistake
gets the same typed error whichever op it reaches. The server runs `check` at admission, before a request
is queued, and hands the `Request` it returns on with the job: the readers take the typed sources.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from earthdial import limits
from earthdial.contract.wire import EarthDialError, ErrorCode, from_json_frame
from earthdial.geo import file_access, imagery, tiling
from earthdial.model import prompts, sensors

MAX_NEW_TOKENS = 2048
MAX_IMAGES = 8  # images in one `ask` (a pair, or a short time series)
MAX_LAYERS = 8  # layers of a change scan (BEFORE AFTER [LATER ...])
MAX_NAME_CHARS = 1000  # a by-value source's `name` kept in results
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
    if max_new is not None and (
        not isinstance(max_new, int) or isinstance(max_new, bool) or not 1 <= max_new <= MAX_NEW_TOKENS
    ):
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
    tile, overlap, batch = tiling.check_tiling(
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


@dataclass(frozen=True)
class Ref:
    """A raster file the server reads itself (`source.kind` 'ref')."""

    path: str  # as the client named it (file_access.check_path resolves it when it is opened)
    bands: tuple[int, ...] | None = None  # 1-based; None: the preset's
    bounds: tuple[float, float, float, float] | None = None  # minx, miny, maxx, maxy in `crs`
    crs: str | None = None  # of the bounds; None: the raster's own


@dataclass(frozen=True)
class Value:
    """Pixels sent as an array frame (`source.kind` 'value')."""

    transform: tuple[float, float, float, float, float, float]
    crs: str = ""
    nodata: float | None = None
    name: str | None = None  # the layer as the client names it (`name`, else `path`): recorded only
    path: str | None = None  # the file the client read them from: recorded, never opened here
    shape: tuple[int, int] | None = None  # `plan`: [rows, cols] of the array the `ask` will send
    gsd_data: float | None = None  # the layer's stored GSD, as the client declares it


@dataclass(frozen=True)
class Stream:
    """A layer whose tiles the client sends as `scan_tiles` messages (`source.kind` 'stream')."""

    width: int
    height: int
    band_count: int
    transform: tuple[float, float, float, float, float, float]
    crs: str
    dtype: str = "uint8"
    nodata: float | None = None
    name: str | None = None
    path: str | None = None  # the file the client reads: recorded in each tile's request, never opened
    layers: tuple[str, ...] = ()  # `detect_changes`: the layers' names, BEFORE AFTER [LATER ...]
    paths: tuple[str | None, ...] = ()  # `detect_changes`: the file of each layer, where it is one


Source = Ref | Value | Stream

KINDS = {
    "ref": "'ref' (a file the server reads)",
    "value": "'value' (pixels in an array frame)",
    "stream": "'stream' (tiles sent as scan_tiles)",
}


def source(
    raw: Any, where: str = "source", kinds: Sequence[str] = ("ref", "value"), op: str = "ask"
) -> Source:
    """One source's fields, checked (typed errors naming `where`, e.g. ``sources[1].bounds``)."""
    kind = raw.get("kind") if isinstance(raw, dict) else None
    if kind not in kinds:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"{where} must be an object of kind {' or '.join(KINDS[k] for k in kinds)}, got {raw!r:.80}",
        )
    crs = raw.get("crs")
    if crs is not None and not isinstance(crs, str):
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where}.crs must be a string, got {crs!r:.80}")
    if kind == "ref":
        path = raw.get("path")
        if not isinstance(path, str):
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where}.path must be a string, got {path!r:.80}")
        return Ref(path, _bands(raw.get("bands"), where), _bounds(raw.get("bounds"), where), crs)
    transform = _transform(raw.get("transform"), where)
    nodata = _nodata(raw.get("nodata"), where)
    path = _text_or_none(raw.get("path"))
    name = _text_or_none(raw.get("name"))
    if kind == "value":
        shape = raw.get("shape") if op == "plan" else None  # only a plan's source declares it
        if shape is not None and not (
            isinstance(shape, list) and len(shape) == 2 and all(_count(n) and n > 0 for n in shape)
        ):
            raise EarthDialError(
                ErrorCode.BAD_REQUEST, f"{where}.shape must be [rows, cols], got {shape!r:.60}"
            )
        named = name or path
        return Value(
            transform,
            crs or "",
            nodata,
            named[:MAX_NAME_CHARS] if named else None,
            path,
            (int(shape[0]), int(shape[1])) if shape else None,
            _positive(raw.get("gsd_data")),
        )
    sizes = {}
    for key in ("width", "height", "band_count"):
        value = raw.get(key)
        if not _count(value):
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where}.{key} must be an int, got {value!r:.40}")
        sizes[key] = int(value)
    if sizes["band_count"] < 1:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"the streamed layer's band_count must be at least 1, got {sizes['band_count']}",
        )
    if not crs:
        raise EarthDialError(
            ErrorCode.BAD_CRS, "the streamed layer has no CRS: a scan's boxes could not be placed on a map"
        )
    dtype = raw.get("dtype") or "uint8"
    if not isinstance(dtype, str):
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where}.dtype must be a string, got {dtype!r:.40}")
    layers: tuple[str, ...] = ()
    paths: tuple[str | None, ...] = ()
    if op == "detect_changes":
        listed = raw.get("layers")
        if not isinstance(listed, list):
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where}.layers must be a list, got {listed!r:.80}")
        _layer_count(len(listed))
        files = raw.get("paths") if isinstance(raw.get("paths"), list) else []
        layers = tuple(str(x)[:200] for x in listed)
        paths = tuple(_text_or_none(p) for p in files[: len(layers)])
        paths += (None,) * (len(layers) - len(paths))
    return Stream(
        sizes["width"],
        sizes["height"],
        sizes["band_count"],
        transform,
        crs,
        dtype,
        nodata,
        name,
        path,
        layers,
        paths,
    )


def sources(header: dict[str, Any]) -> tuple[Source, ...]:
    """The request's `source` (one) or `sources` (a pair or sequence), checked for its op: `ask`, `plan`
    and `georef` take files or pixels by value; `detect` a file or a streamed layer; `detect_changes`
    files (`sources`) or one streamed source naming its `layers`."""
    op = str(header.get("op"))
    if op == "detect":
        return (source(header.get("source"), "source", ("ref", "stream"), op),)
    if op == "detect_changes":
        raw = header.get("source")
        if isinstance(raw, dict) and raw.get("kind") == "stream":
            return (source(raw, "source", ("stream",), op),)
        listed = field(header, "sources", list)
        _layer_count(len(listed))
        return tuple(source(s, f"sources[{i}]", ("ref",), op) for i, s in enumerate(listed))
    if "sources" in header:
        listed = field(header, "sources", list)
        if not 1 <= len(listed) <= MAX_IMAGES:
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"'sources' must hold 1 to {MAX_IMAGES} sources")
        return tuple(source(s, f"sources[{i}]", ("ref", "value"), op) for i, s in enumerate(listed))
    return (source(header.get("source"), "source", ("ref", "value"), op),)


def check_frames(listed: Sequence[Source], frames: int) -> None:
    """`missing_frames` unless the request holds one array frame per source by value."""
    needed = sum(isinstance(s, Value) for s in listed)
    if needed != frames:
        raise EarthDialError(
            ErrorCode.MISSING_FRAMES,
            f"{needed} source(s) by value need {needed} array frame(s), got {frames}",
        )


@dataclass(frozen=True)
class Request:
    """What admission checked of a work request, carried with it to the op that runs it."""

    options: Options
    sources: tuple[Source, ...]
    earlier: Earlier | None = None  # a resumed scan's earlier tiles and boxes


WORK_OPS = ("ask", "plan", "georef", "detect", "detect_changes")


def check(header: dict[str, Any], arrays: Sequence[Any] = ()) -> Request | None:
    """At admission: the fields every work op shares, so a malformed request is refused before it queues.
    Returns them checked (None for an op that takes none)."""
    op = header.get("op")
    if op not in WORK_OPS:
        return None
    before: Earlier | None = None
    if op == "georef":
        field(header, "answer", str)
        checked = Options()
    else:
        checked = options(header)
        prompt(header)
        if op in ("ask", "plan"):
            task(header)
        else:
            task(header, default="change" if op == "detect_changes" else "refer")
            before = earlier(header, arrays)
    listed = sources(header)
    if op in ("ask", "plan", "georef"):
        check_frames(listed, len(arrays))
    return Request(checked, listed, before)


def check_source_fields(source: Source, where: str) -> None:
    """A source's band count within the server's budget (limits.py), and the path and CRS it names ones
    this server may use (their form was checked by `source`; their values are checked against the raster
    later)."""
    budget = limits.current()
    bands = len(source.bands or ()) if isinstance(source, Ref) else None
    if bands is not None and budget is not None and bands > budget.max_bands:
        raise limits.too_large(f"{where}.bands names {bands} bands", bands, "max_bands")
    if isinstance(source, Stream) and budget is not None and source.band_count > budget.max_bands:
        raise limits.too_large(
            f"the streamed layer declares {source.band_count:,} bands", source.band_count, "max_bands"
        )
    if source.crs:
        file_access.check_crs(source.crs, f"{where}")
    if isinstance(source, Ref):
        file_access.check_path(source.path)


def admit(
    header: dict[str, Any], arrays: Sequence[Any], raw: bytes | None = None, sources: Sequence[Source] = ()
) -> None:
    """Checks of a worker request that need no file, after `check`: text, sources' fields (as `sources`
    read them), by-value pixels (the budgets of limits.py)."""
    limits.check_text(header, raw)
    limits.check_numbers(header, raw)
    one = len(sources) == 1 and isinstance(header.get("source"), dict)
    for i, item in enumerate(sources):
        check_source_fields(item, "source" if one else f"sources[{i}]")
    for i, array in enumerate(arrays):
        limits.check_array(i, tuple(array.shape))


def _layer_count(n: int) -> None:
    if not 2 <= n <= MAX_LAYERS:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"detect_changes takes 2 to {MAX_LAYERS} layers (BEFORE AFTER [LATER ...])"
        )


def _bands(bands: Any, where: str) -> tuple[int, ...] | None:
    if bands is None:
        return None
    if not isinstance(bands, list) or not all(_count(b) for b in bands):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"{where}.bands must be a list of 1-based ints, got {bands!r:.80}"
        )
    return tuple(int(b) for b in bands) or None


def _bounds(bounds: Any, where: str) -> tuple[float, float, float, float] | None:
    if bounds is None:
        return None
    values = _floats(bounds, 4)
    if values is None:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"{where}.bounds must be 4 finite numbers [minx, miny, maxx, maxy], got {bounds!r:.80}",
        )
    minx, miny, maxx, maxy = values
    if minx >= maxx or miny >= maxy:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"bounds {values} need minx < maxx and miny < maxy")
    return minx, miny, maxx, maxy


def _transform(transform: Any, where: str) -> tuple[float, float, float, float, float, float]:
    values = _floats(transform, 6)
    if values is None:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"{where}.transform must be 6 finite numbers (a, b, c, d, e, f), got {transform!r:.80}",
        )
    a, b, c, d, e, f = imagery.affine_from(values)[:6]  # `bad_request` when it is not invertible
    return a, b, c, d, e, f


def _nodata(nodata: Any, where: str) -> float | None:
    if nodata is None:
        return None
    if not _real(nodata):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"{where}.nodata must be a number or null, got {nodata!r:.40}"
        )
    try:
        return float(nodata)
    except OverflowError:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where}.nodata is beyond any pixel value") from None


def _floats(values: Any, n: int) -> tuple[float, ...] | None:
    """`values` as n finite floats, or None when it is not a list of n finite numbers."""
    if not isinstance(values, list) or len(values) != n or not all(_real(v) for v in values):
        return None
    try:
        out = tuple(float(v) for v in values)
    except OverflowError:
        return None
    return out if all(math.isfinite(v) for v in out) else None


def _positive(value: Any) -> float | None:
    """A positive finite number a client declared, else None (an optional, informative field)."""
    try:
        ok = _real(value) and 0 < float(value) < math.inf
    except OverflowError:
        ok = False
    return float(value) if ok else None


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        raise EarthDialError(
            ErrorCode.MISSING_FRAMES, f"'earlier' comes as the scan's one array frame; {len(arrays)} came"
        )
    opts = options(header)
    if not opts.merge:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, "'earlier' boxes are merged with the new ones: it needs options.merge"
        )
    data = from_json_frame(arrays[0], "the 'earlier' frame")
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("tiles"), list)
        or not isinstance(data.get("features"), list)
    ):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, 'the \'earlier\' frame must be {"tiles": [...], "features": [...]}'
        )
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
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"options.skip must list exactly the earlier tiles ({len(tiles)} "
            f"sent, {len(opts.skip)} skipped): the merge covers every tile once",
        )
    for k, feature in enumerate(data["features"]):
        where = f"earlier.features[{k}]"
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        props = feature.get("properties") if isinstance(feature, dict) else None
        if not isinstance(geometry, dict) or geometry.get("type") != "Polygon" or not isinstance(props, dict):
            raise EarthDialError(
                ErrorCode.BAD_REQUEST, f"{where} must be a Feature with a Polygon and properties"
            )
        rings = geometry.get("coordinates")
        if not isinstance(rings, list) or not rings:
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where}.geometry has no ring")
        for r, ring in enumerate(rings):
            _ring(ring, f"{where}.geometry.coordinates[{r}]")
        if props.get("tile") not in tiles or not _index(props.get("tile")):
            raise EarthDialError(
                ErrorCode.BAD_REQUEST, f"{where}.properties.tile must be one of the earlier tiles"
            )
        if not _index(props.get("order")):
            raise EarthDialError(
                ErrorCode.BAD_REQUEST, f"{where}.properties.order must be the box's index in its tile"
            )
        distance: Any = props.get("edge_distance")
        score = props.get("score")
        if not _real(distance) or not math.isfinite(distance) or distance < 0:
            raise EarthDialError(
                ErrorCode.BAD_REQUEST,
                f"{where}.properties.edge_distance must be a number "
                "of at least 0, as the scan's progress event gave it",
            )
        if score is not None and not _real(score):
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where}.properties.score must be a number or null")
        if props.get("label") is not None and not isinstance(props["label"], str):
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"{where}.properties.label must be a string")
    return Earlier(tiles, data["features"])


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _ring(value: Any, where: str) -> None:
    """A closed ring of at least 4 finite [x, y] points."""
    if not (
        isinstance(value, list)
        and len(value) >= 4
        and all(
            isinstance(p, list) and len(p) == 2 and all(_real(v) and math.isfinite(v) for v in p)
            for p in value
        )
    ):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"{where} must be a ring of at least 4 finite [x, y] points"
        )


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
