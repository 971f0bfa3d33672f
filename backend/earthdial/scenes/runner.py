"""Whole scenes: the one scene engine. It reads the tiles of a region's plan (geo/tiling.py) ahead of the
model on another thread, runs them through the engine in batches, and merges the boxes that neighbouring
tiles both found (rotated-polygon non-maximum suppression).

Every whole-scene job goes through here: a raster read by reference, tiles streamed by value from a
client that reads a layer the backend cannot open (WMS, XYZ, memory), and pairs or sequences of layers
for change detection.

Memory stays flat as the scene grows: tiles are made lazily, only a few batches are read ahead, and only
the features found are kept.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from earthdial import limits
from earthdial.contract import wire
from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.geo import georef, imagery
from earthdial.geo.tiling import MAX_BATCH, TilePlan
from earthdial.model import answers, prompts

if TYPE_CHECKING:  # torch only where the model runs
    from earthdial.model.engine import Engine

SCENE_CACHE_MB = 128
# streamed tiles of a later pair held before their turn (clients send 2 batches ahead)
MAX_EARLY_TILES = 4 * MAX_BATCH
IOU_THRESHOLD = 0.5  # two boxes of one label overlapping this much are one object
IOS_THRESHOLD = 0.5  # ... and so are boxes of two tiles with this share of the smaller inside the other
# parts of one object cut by a seam (merge_boxes): how far apart they may stop (share of a tile side), how
# much their extents along the seam overlap (share of the shorter), how far off a tile beside may be
SEAM_GAP, SEAM_ALONG, SEAM_OFFSET = 0.02, 0.3, 0.25
READ_AHEAD_BATCHES = 2  # batches read while the model works on the current one
PATIENCE_S = 0.05  # how long a scan waits for a tile before letting its caller do other work


# -- tiles and how they are read ----------------------------------------------------------------------


_UNSET: Any = object()


@dataclass(eq=False)
class Tile:
    index: int
    window: Window  # in the first image's source pixels
    chips: list[imagery.Chip]  # one per image (later images on the first one's grid)
    query: Any = _UNSET  # the engine query, made on the reader thread (None: nothing to ask)


def tile_transform(transform: Affine, window: Window, out_w: int, out_h: int) -> Affine:
    """The affine of a window of a grid read (resampled) at out_w x out_h pixels."""
    a, b, c, d, e, f = transform[:6]
    sx, sy = window.width / out_w, window.height / out_h
    col0, row0 = window.col_off, window.row_off
    return Affine(a * sx, b * sy, a * col0 + b * row0 + c, d * sx, e * sy, d * col0 + e * row0 + f)


def read_shape(window: Window, out_size: int) -> tuple[int, int]:
    """(width, height) a window is read at: the protocol's rule, which clients streaming tiles follow too."""
    return wire.read_shape(int(window.width), int(window.height), out_size)


def file_tiles(
    paths: list[str], indexes: list[int], plan: TilePlan, out_size: int, skip: frozenset[int] = frozenset()
) -> Iterator[Tile]:
    """Tiles of a raster (and of later rasters warped onto each tile's grid), made one at a time. In a
    server each tile is read in a reader process (imagery.read_tile), which keeps the file open."""
    if imagery.reads_elsewhere():
        for i in range(len(plan)):
            if i in skip:
                continue
            window = plan.window(i)
            out_w, out_h = read_shape(window, out_size)
            first = imagery.read_tile(paths[0], indexes, window, out_w, out_h)
            later = [imagery.read_on_grid(p, indexes, first) for p in paths[1:]]
            yield Tile(i, window, [first, *later])
        return
    # rasterio takes GDAL_CACHEMAX in bytes: 128 here was a 128-byte cache, which made every tile
    # decode its rows again (a 448 px tile of a 4480 px wide strip file read 4x slower)
    with rasterio.Env(GDAL_CACHEMAX=SCENE_CACHE_MB * 1024 * 1024), imagery.open_raster(paths[0]) as src:
        crs = imagery.crs_string(src.crs)
        for i in range(len(plan)):
            if i in skip:
                continue
            window = plan.window(i)
            out_w, out_h = read_shape(window, out_size)
            first = imagery.tile_chip(src, paths[0], indexes, window, out_w, out_h, crs)
            later = [imagery.read_on_grid(p, indexes, first) for p in paths[1:]]
            yield Tile(i, window, [first, *later])


@dataclass
class Stream:
    """Tiles sent by value for a running scan: (header, arrays) messages put by the server's I/O loop.
    `early` holds tiles that came before their turn: those of a change scan's next pair, sent while the
    pair before is still being asked about."""

    inbox: queue.Queue = field(default_factory=queue.Queue)
    idle_timeout_s: float = 120.0
    early: dict[int, Any] = field(default_factory=dict)


def stream_tiles(
    stream: Stream,
    plan: TilePlan,
    transform: Affine,
    crs: str,
    nodata: float | None,
    skip: frozenset[int],
    cancelled: Callable[[], bool] | None,
    *,
    first: int = 0,
    total: int | None = None,
    images: int = 1,
) -> Iterator[Tile]:
    """Tiles as a client sends them: each message names its tile indexes, one array frame per tile, read
    over that tile's window of the layer's grid (at any size; the affine follows from the shape).
    A change scan numbers the tiles of its k-th pair from k x len(plan) (`first`; `total` over all
    pairs) and sends each tile's `images` images stacked band-wise in one frame; its tiles come out
    numbered within the plan, as file tiles do."""
    total = len(plan) if total is None else total
    wanted = set(range(first, first + len(plan))) - set(skip)
    waited = 0.0

    def tile(index: int, array: Any) -> Tile:
        local = index - first
        window = plan.window(local)
        data = array if array.ndim == 3 else array[None]
        if data.shape[0] % images:
            raise EarthDialError(
                ErrorCode.BAD_REQUEST,
                f"scan_tiles: tile {index} has {data.shape[0]} bands, not a multiple of its {images} images",
            )
        aff = tile_transform(transform, window, data.shape[2], data.shape[1])
        chips = []
        for part in np.split(data, images):
            chip = imagery.chip_from_array(part, aff, crs, nodata)
            chip.source = "<stream>"
            chips.append(chip)
        return Tile(local, window, chips)

    while wanted:
        ready = sorted(wanted & stream.early.keys())
        if ready:
            for index in ready:
                wanted.discard(index)
                yield tile(index, stream.early.pop(index))
            continue
        try:
            header, arrays = stream.inbox.get(timeout=0.2)
        except queue.Empty:
            waited += 0.2
            if cancelled is not None and cancelled():
                return
            if waited >= stream.idle_timeout_s:
                raise EarthDialError(
                    ErrorCode.MISSING_FRAMES,
                    f"no tiles arrived for {stream.idle_timeout_s:g} s; "
                    f"{len(wanted)} of the plan's tiles are missing",
                ) from None
            continue
        waited = 0.0
        indexes = header.get("tiles")
        if not isinstance(indexes, list) or len(indexes) != len(arrays):
            raise EarthDialError(
                ErrorCode.MISSING_FRAMES, "scan_tiles: 'tiles' must list one tile index per array frame"
            )
        for index, array in zip(indexes, arrays, strict=True):
            if not isinstance(index, int) or isinstance(index, bool):
                raise EarthDialError(
                    ErrorCode.BAD_REQUEST, f"scan_tiles: tile {index!r:.20} is not a tile index"
                )
            if index in wanted:
                wanted.discard(index)
                yield tile(index, array)
            elif first + len(plan) <= index < total and index not in stream.early:
                if len(stream.early) >= MAX_EARLY_TILES:
                    raise EarthDialError(
                        ErrorCode.BUSY,
                        f"scan_tiles: more than {MAX_EARLY_TILES} tiles sent "
                        "ahead of their turn; send tiles as progress events ask for them",
                    )
                stream.early[index] = array  # a later pair's: kept for its turn
            else:
                raise EarthDialError(
                    ErrorCode.BAD_REQUEST, f"scan_tiles: tile {index!r:.20} is not a tile still to do"
                )


NOT_READY: Any = object()  # ReadAhead.next: no tile was read in time


class ReadAhead:
    """Runs a tile iterator on its own thread, `depth` tiles ahead of the consumer (a bounded queue), so
    the model never waits on GDAL unless reading is slower than the model. `waited_s` is the time the
    consumer spent waiting for a tile."""

    _END = object()

    def __init__(self, tiles: Iterable[Tile], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.waited_s = 0.0
        self.read_s = 0.0
        self._thread = threading.Thread(
            target=self._run, args=(iter(tiles),), name="earthdial-read", daemon=True
        )
        self._thread.start()

    def _run(self, tiles: Iterator[Tile]) -> None:
        # stopping the read-ahead stops a tile read waiting on a reader process (readers.py kills it)
        with limits.running(self._stop.is_set, None):
            self._read(tiles)

    def _read(self, tiles: Iterator[Tile]) -> None:
        try:
            while not self._stop.is_set():
                t = time.perf_counter()
                item = next(tiles, self._END)
                self.read_s += time.perf_counter() - t
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if item is self._END:
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            if self._stop.is_set():
                return  # nobody waits for it (a full queue would block this thread for good)
            self._error = exc
            self._queue.put(self._END)
        finally:
            close = getattr(tiles, "close", None)
            if close is not None:  # in this thread: a file's GDAL environment is this thread's and ends here
                close()

    def next(self, timeout: float | None = None) -> Any:
        """The next tile; None after the last one; NOT_READY when none came within `timeout` seconds."""
        t = time.perf_counter()
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return NOT_READY
        finally:
            self.waited_s += time.perf_counter() - t
        if item is self._END:
            if self._error is not None:
                raise self._error
            return None
        return item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a reader waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)


# -- running tiles through the model --------------------------------------------------------------


@dataclass
class Ask:
    """What each tile is asked: how to turn a tile's chips into an engine query, and the properties every
    feature found carries."""

    make_query: Callable[[Tile], Any]  # -> engine.Query, or None to skip the tile (all nodata)
    properties: dict[str, Any]
    min_score: float = 0.0
    request: Callable[[int], str] | None = None  # tile index in the plan -> its `request` field (JSON)


@dataclass
class TileAnswer:
    index: int
    answer: str
    score: float | None  # probability of the answer's first token (its yes/no, or box/none, decision)
    features: list[dict[str, Any]]  # boxes kept (score >= min_score), georeferenced, in the tile's order
    footprint: list[list[float]]  # the tile's outline in map coordinates


@dataclass
class Progress:
    done: int  # tiles finished, including any skipped as done before
    total: int
    answers: list[TileAnswer]


@dataclass
class Stats:
    tiles: int = 0
    model_s: float = 0.0
    waited_s: float = 0.0  # the model waiting for tiles to be read
    read_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)


def run(
    engine: Engine,
    ask: Ask,
    tiles: Iterable[Tile],
    *,
    total: int,
    skipped: int = 0,
    batch_size: int = 8,
    cancelled: Callable[[], bool] | None = None,
    stats: Stats | None = None,
    patience_s: float | None = PATIENCE_S,
    starve_s: float | None = None,
) -> Iterator[Progress]:
    """Stream tiles through the model in batches; yields after each batch. While no tile is ready for
    `patience_s` (a slow disk, a client streaming its tiles) it yields an empty Progress instead of
    holding the caller, so a server can answer others meanwhile. A cancel is honoured between batches
    and while waiting (typed `cancelled`). `starve_s`: when the model has waited that long for a tile
    without one coming (a streaming client that stopped sending), the scan ends with `timeout`; the
    model's own time never counts."""
    stats = stats if stats is not None else Stats()
    # the reader thread also turns each tile into its query (presets, pixel normalisation, resizing), so
    # the model's thread does nothing but generate
    reader = ReadAhead(_with_queries(tiles, ask), depth=READ_AHEAD_BATCHES * batch_size)
    done = skipped
    try:
        batch: list[Tile] = []
        tile: Any = NOT_READY
        starved = 0.0  # seconds waited for a tile since the last one came
        while tile is not None:
            waited = reader.waited_s
            tile = reader.next(patience_s if starve_s is None else min(patience_s or starve_s, starve_s))
            starved = starved + reader.waited_s - waited if tile is NOT_READY else 0.0
            if tile is NOT_READY:
                limits.checkpoint()  # past the deadline while waiting
                if starve_s is not None and starved >= starve_s:
                    raise limits.stream_timeout(starve_s, done, total)
                if cancelled is not None and cancelled():
                    raise EarthDialError(ErrorCode.CANCELLED, f"scan cancelled after {done} of {total} tiles")
                yield Progress(done, total, [])
                continue
            if tile is not None:
                batch.append(tile)
            if batch and (len(batch) >= batch_size or tile is None):
                limits.checkpoint(f"scanning {done} of {total} tiles")  # a cancel, or past the deadline
                if cancelled is not None and cancelled():
                    raise EarthDialError(ErrorCode.CANCELLED, f"scan cancelled after {done} of {total} tiles")
                found = _answer_batch(engine, ask, batch, stats)
                if cancelled is not None and cancelled():  # its decoding was cut short: not finished work
                    raise EarthDialError(ErrorCode.CANCELLED, f"scan cancelled after {done} of {total} tiles")
                done += len(batch)
                stats.tiles += len(batch)
                batch = []
                yield Progress(done, total, found)
        if cancelled is not None and cancelled():
            raise EarthDialError(ErrorCode.CANCELLED, f"scan cancelled after {done} of {total} tiles")
    finally:
        reader.close()
        stats.waited_s += reader.waited_s
        stats.read_s += reader.read_s


def _with_queries(tiles: Iterable[Tile], ask: Ask) -> Iterator[Tile]:
    try:
        for tile in tiles:
            tile.query = ask.make_query(tile)
            yield tile
    finally:
        close = getattr(tiles, "close", None)
        if close is not None:  # closed with this one, on the reader thread (ReadAhead._run)
            close()


def _answer_batch(engine: Engine, ask: Ask, batch: list[Tile], stats: Stats) -> list[TileAnswer]:
    queries, kept = [], []
    for tile in batch:
        query = tile.query if tile.query is not _UNSET else ask.make_query(tile)
        if query is not None:
            queries.append(query)
            kept.append(tile)
    t = time.perf_counter()
    decode = getattr(engine, "generate_by_decoding", None) or engine.generate  # greedy or upstream's beams
    texts = decode(queries) if queries else []
    stats.model_s += time.perf_counter() - t
    asked = {id(tile) for tile in kept}
    out = [
        TileAnswer(tile.index, "", None, [], footprint(tile.chips[0]))
        for tile in batch
        if id(tile) not in asked
    ]
    for tile, text in zip(kept, texts, strict=True):
        out.append(tile_answer(tile, text, ask))
    return sorted(out, key=lambda a: a.index)


def tile_answer(tile: Tile, text: str, ask: Ask) -> TileAnswer:
    chip = tile.chips[0]
    boxes = answers.parse_boxes(text)
    scores = text.box_scores() if hasattr(text, "box_scores") else [float("nan")] * len(boxes)
    logprobs = getattr(text, "logprobs", ())
    first = round(math.exp(logprobs[0]), 4) if logprobs else float("nan")
    props = dict(ask.properties, answer=str(text), tile=tile.index)
    fc = georef.features_from_boxes(boxes, chip.transform, chip.width, chip.height, chip.crs, props)
    kept = []
    for k, (feat, box, score) in enumerate(zip(fc["features"], boxes, scores, strict=True)):
        if not score >= ask.min_score and not (math.isnan(score) and ask.min_score <= 0):
            continue
        cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
        feat["properties"].update(
            score=_json_number(score), edge_distance=max(abs(cx - 50), abs(cy - 50)), order=k
        )
        kept.append(feat)
    return TileAnswer(tile.index, str(text), _json_number(first), kept, footprint(chip))


def _json_number(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def footprint(chip: imagery.Chip) -> list[list[float]]:
    a, b, c, d, e, f = chip.transform[:6]
    corners = [(0, 0), (chip.width, 0), (chip.width, chip.height), (0, chip.height), (0, 0)]
    return [[float(a * x + b * y + c), float(d * x + e * y + f)] for x, y in corners]


def merge_boxes(
    features: list[dict[str, Any]],
    tiles: Mapping[int, Mapping[str, Any]],
    iou_threshold: float = IOU_THRESHOLD,
) -> list[dict[str, Any]]:
    """One box per object across a scan's tiles (docs/outputs.md, "Merging a scan's tiles"), from the
    features and the tile entries (their `footprint`) its progress events carry.

    1. Parts of an object cut by a seam are joined into one box (the rectangle around them): two boxes of
       one label from two tiles side by side (or one above the other) that touch or nearly touch (a gap
       up to SEAM_GAP of a tile side), each reaching beyond the other's tile (neither lies in the strip
       both tiles see), lined up along the seam (their extents along it overlap by SEAM_ALONG of the
       shorter). A joined box keeps the properties of its best-ranked part.
    2. Non-maximum suppression: of boxes of one label overlapping by IoU >= `iou_threshold`, or from two
       tiles with at least IOS_THRESHOLD of the smaller one inside the other (a part that one tile saw
       of what another saw whole), the one seen nearest its tile's centre (least likely cut by a tile
       edge) is kept, then the higher score.

    The order is fixed by (tile, order in the tile), not by arrival, so a resumed scan merges exactly as
    an uninterrupted one."""
    from shapely import STRtree
    from shapely.geometry import Polygon, shape

    if not features:
        return []
    features = sorted(
        features, key=lambda f: (f["properties"].get("tile", 0), f["properties"].get("order", 0))
    )
    polys = [shape(f["geometry"]) for f in features]
    footprints = {i: Polygon(t["footprint"]) for i, t in tiles.items() if t.get("footprint")}
    features, polys = _join_seam_parts(features, polys, footprints)

    order = sorted(range(len(features)), key=lambda i: _rank(features[i]))
    tree = STRtree(polys)
    removed: set[int] = set()
    kept: list[int] = []
    for i in order:
        if i in removed:
            continue
        kept.append(i)
        p = features[i]["properties"]
        for j in tree.query(polys[i]):
            j = int(j)
            q = features[j]["properties"]
            if j == i or j in removed or q.get("label") != p.get("label"):
                continue
            inter = polys[i].intersection(polys[j]).area
            union = polys[i].area + polys[j].area - inter
            smaller = min(polys[i].area, polys[j].area)
            if (union > 0 and inter / union >= iou_threshold) or (
                q.get("tile", 0) != p.get("tile", 0) and smaller > 0 and inter / smaller >= IOS_THRESHOLD
            ):
                removed.add(j)
    return [features[i] for i in sorted(kept)]


def _join_seam_parts(
    features: list[dict[str, Any]], polys: list[Any], footprints: Mapping[int, Any]
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Step 1 of `merge_boxes`: groups of seam parts (union-find over pairs, in index order) become one
    feature each, at the place of the group's first member."""
    from shapely import STRtree

    parent = list(range(len(features)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    tree = STRtree(polys)
    for i, a in enumerate(polys):
        pa = features[i]["properties"]
        ta = footprints.get(pa.get("tile", 0))
        if ta is None:
            continue
        gap = SEAM_GAP * _side(ta)
        for j in sorted(int(j) for j in tree.query(a.buffer(gap))):
            pb = features[j]["properties"]
            if j <= i or pb.get("label") != pa.get("label") or pb.get("tile", 0) == pa.get("tile", 0):
                continue
            tb = footprints.get(pb.get("tile", 0))
            if tb is not None and _seam_parts(a, polys[j], ta, tb, gap):
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(features)):
        groups.setdefault(root(i), []).append(i)
    if all(len(g) == 1 for g in groups.values()):
        return features, polys

    out, out_polys = [], []
    for members in sorted(groups.values()):
        if len(members) == 1:
            out.append(features[members[0]])
            out_polys.append(polys[members[0]])
            continue
        joined = _rectangle_around([polys[k] for k in members])
        best = features[min(members, key=lambda k: _rank(features[k]))]
        ring = [[float(x), float(y)] for x, y in joined.exterior.coords]
        out.append({**best, "geometry": {"type": "Polygon", "coordinates": [ring]}})
        out_polys.append(joined)
    return out, out_polys


def _rank(feature: dict[str, Any]) -> tuple[float, float]:
    """Which of two boxes of one object to keep: the one seen nearest its tile's centre, then the higher
    score."""
    p = feature["properties"]
    score = p.get("score")
    return (p.get("edge_distance", 0.0), -(score if isinstance(score, (int, float)) else 0.0))


def _side(footprint: Any) -> float:
    """The shorter side of a tile's footprint, in map units."""
    xy = np.asarray(footprint.exterior.coords)
    return float(np.min(np.hypot(*np.diff(xy, axis=0).T)))


def _seam_parts(a: Any, b: Any, ta: Any, tb: Any, gap: float) -> bool:
    """Whether boxes `a` (found in the tile of footprint `ta`) and `b` (in `tb`) are the two sides of one
    object cut by the seam between the two tiles (step 1 of `merge_boxes`)."""
    if a.distance(b) > gap:
        return False
    if a.difference(tb.buffer(gap)).is_empty or b.difference(ta.buffer(gap)).is_empty:
        return False  # one lies where both tiles see: a duplicate or a part of a whole box, not a cut
    corners = np.asarray(ta.exterior.coords)[:4]
    u, v = corners[1] - corners[0], corners[3] - corners[0]  # the tile's x and y directions
    d = np.asarray(tb.centroid.coords[0]) - np.asarray(ta.centroid.coords[0])
    du, dv = abs(d @ u) / (u @ u), abs(d @ v) / (v @ v)  # offset between the tiles, in tile sides
    if min(du, dv) > SEAM_OFFSET:
        return False  # corner neighbours: their parts join through the tiles beside both
    axis = v if du > dv else u  # the seam runs along the tiles' common side
    axis = axis / np.hypot(*axis)
    sa, sb = np.asarray(a.exterior.coords) @ axis, np.asarray(b.exterior.coords) @ axis
    shared = min(sa.max(), sb.max()) - max(sa.min(), sb.min())
    shorter = min(sa.max() - sa.min(), sb.max() - sb.min())
    return shorter > 0 and shared >= SEAM_ALONG * shorter


def _rectangle_around(parts: list[Any]) -> Any:
    """The box around joined parts: axis-aligned when every part is (north-up boxes of angle 0), else the
    smallest rotated rectangle."""
    from shapely.ops import unary_union

    union = unary_union(parts)
    if all(p.envelope.area - p.area <= 1e-6 * p.area for p in parts):  # a turned box is 1e-3 or more larger
        return union.envelope
    return union.minimum_rotated_rectangle


def finished(features: list[dict[str, Any]], tiles: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Merged features (`merge_boxes`) without the merge's working fields."""
    out = []
    for f in merge_boxes(features, tiles):
        props = {k: v for k, v in f["properties"].items() if k not in ("edge_distance", "order")}
        out.append({**f, "properties": props})
    return out


def estimate_seconds(engine: Engine, tiles: int, batch_size: int) -> float:
    """A rough time for `tiles` tiles, from one timed batch of blank tiles (shown before a long job)."""
    from earthdial.model.engine import Query  # torch only where the model runs

    blank = np.zeros((3, engine.info.image_size, engine.info.image_size), dtype=np.uint8)
    q = Query(prompts.build_question("refer", "x"), [engine.image(blank, "[hr_rgb_0.5]")], 20)
    t = time.perf_counter()
    engine.generate([q] * min(batch_size, tiles or 1))
    per_batch = time.perf_counter() - t
    return per_batch * math.ceil(tiles / max(1, batch_size))
