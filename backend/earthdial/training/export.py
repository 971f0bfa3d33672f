"""Reviewed result layers -> EarthDial training records: the analyst's corrections become conversations.

A result layer (a GeoPackage table written by the plugin or `earthdial ask -o`) holds one polygon per box
with a ``review`` field (docs/outputs.md) and, in ``request``, the request that produced it (task, prompt,
sensor tag, band options, source file and bounds, the window read). Per request:

* boxes marked ``accepted``, ``corrected`` or ``added`` are the truth; ``rejected`` ones are not objects;
  an empty ``review`` is a box nobody looked at: a class with one of those gives no record (teaching its
  other boxes alone would teach the model to leave that one out);
* each reviewed class gives a referring record (``[refer] {sensor} <image>\\n Give me the location of
  <ref>X</ref>`` -> ``<ref>X</ref><box>[[x1, y1, x2, y2, angle]]...</box>``), and a class whose every box was
  rejected a negative (``There is no X.``); a grounding request whose boxes were all reviewed also gives a
  grounding record with every kept box;
* boxes go from map polygons back onto the window's 0-100 scale: the inverse of `georef` (its corner
  order and rotation convention), the polygon's minimum rotated rectangle giving centre, sides and angle;
* the chip is read again through the request's own path (`service.read_inputs`: the same bounds, bands and
  band preset as inference) and written as a GeoTIFF beside the records.

Records are JSON lines: ``{"id", "image", "sensor", "task", "conversations": [{"from": "human", ...},
{"from": "gpt", ...}], "layer", "source"}`` with ``image`` relative to the output folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from earthdial.contract.wire import REVIEWS, EarthDialError, ErrorCode
from earthdial.geo import file_access
from earthdial.geo.georef import box_pixel_corners
from earthdial.model import prompts
from earthdial.model.answers import Box
from earthdial.serving import requests, service
from earthdial.training.data import absent_answer as trained_absent_answer

ACCEPTED, REJECTED, CORRECTED, ADDED = REVIEWS  # "" (or NULL): not reviewed
KEPT = (ACCEPTED, CORRECTED, ADDED)
RECORDS_FILE = "records.jsonl"
CHIPS_DIR = "chips"
EXPORTED_TASKS = ("refer", "grounding")  # tasks whose answers are boxes of named classes on one image


def absent_answer(label: str) -> str:
    """The answer for a class that is not in the image: the one sentence the demo model is trained to say
    (`train.absent_answer`), so that corrections and the demo's own training agree."""
    return trained_absent_answer(label)


@dataclass
class Export:
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # what gave no record, and why

    def lines(self) -> list[str]:
        kinds: dict[str, int] = {}
        for r in self.records:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        out = [f"{len(self.records)} record(s): " + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))]
        return out + [f"skipped: {s}" for s in self.skipped]


# ------------------------------------------------------------------------------------------------
# Polygons on the map -> boxes on the window's 0-100 scale
# ------------------------------------------------------------------------------------------------


def polygon_to_box(
    ring: Iterable[tuple[float, float]], transform: Any, width: float, height: float, label: str = ""
) -> Box:
    """The box whose `georef.box_to_polygon` on this window is (closest to) ``ring``: map points go to
    pixels by the inverse affine, the minimum rotated rectangle gives the centre, the sides and the angle
    (positive clockwise on screen, as georef turns it), folded into [0, 90) by swapping the sides."""
    import shapely.geometry
    from affine import Affine

    aff = transform if isinstance(transform, Affine) else Affine(*[float(v) for v in list(transform)[:6]])
    inv = ~aff
    pts = [inv @ (float(x), float(y)) for x, y in ring]
    poly = shapely.geometry.Polygon(pts)
    if not poly.is_valid or poly.area <= 0:
        poly = poly.buffer(0) if poly.area > 0 else shapely.geometry.MultiPoint(pts).convex_hull
    if poly.area <= 0:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"a {label or 'box'} polygon has no area")
    rect = list(poly.minimum_rotated_rectangle.exterior.coords)[:4]
    (x0, y0), (x1, y1), (x2, y2) = rect[0], rect[1], rect[2]
    w, h = math.hypot(x1 - x0, y1 - y0), math.hypot(x2 - x1, y2 - y1)
    # the angle of the side rect[0] -> rect[1], in georef's sense of a positive turn on screen
    angle = math.degrees(math.atan2(_TURN * (y1 - y0), x1 - x0)) % 180.0
    if angle >= 90.0:
        angle, w, h = angle - 90.0, h, w
    angle = float(round(angle))
    if angle >= 90.0:  # 89.6 rounds to 90: the same rectangle at 0 with its sides swapped
        angle, w, h = 0.0, h, w
    cx, cy = sum(p[0] for p in rect) / 4, sum(p[1] for p in rect) / 4
    sx, sy = 100.0 / width, 100.0 / height

    def scale(v: float) -> int:
        return int(min(max(round(v), 0), 100))

    return Box(
        scale((cx - w / 2) * sx),
        scale((cy - h / 2) * sy),
        scale((cx + w / 2) * sx),
        scale((cy + h / 2) * sy),
        angle,
        label,
    )


def _turn_sense() -> float:
    """+1 when georef turns a positive angle clockwise on screen (y down), -1 when counter-clockwise: read
    off georef itself, so that this inverse follows its convention."""
    (x0, y0), (x1, y1) = box_pixel_corners(Box(40, 40, 60, 60, 30, ""), 100.0, 100.0)[:2]
    return 1.0 if y1 > y0 else -1.0


_TURN = _turn_sense()


def box_text(boxes: list[Box]) -> str:
    """``[[x1, y1, x2, y2, angle]]`` per box, in EarthDial's integer form."""
    return "".join(f"[[{b.x1:g}, {b.y1:g}, {b.x2:g}, {b.y2:g}, {b.angle:g}]]" for b in boxes)


def grounded(label: str, boxes: list[Box]) -> str:
    return f"<ref>{label}</ref><box>{box_text(boxes)}</box>"


def _reading_order(boxes: list[Box]) -> list[Box]:
    return sorted(boxes, key=lambda b: ((b.y1 + b.y2) / 2, (b.x1 + b.x2) / 2))


# ------------------------------------------------------------------------------------------------
# GeoPackage layers -> records
# ------------------------------------------------------------------------------------------------


@dataclass
class Feature:
    ring: list[tuple[float, float]]
    label: str
    review: str
    request: str


def read_layer(path: str, layer: str) -> tuple[list[Feature], str]:
    """The polygons of one layer with their label, review and request, and the layer's CRS."""
    import pyogrio.raw
    import shapely

    try:
        meta, _, geometry, values = pyogrio.raw.read(path, layer=layer)
    except Exception as exc:  # pyogrio raises its own DataSourceError / DataLayerError
        raise EarthDialError(
            ErrorCode.FILE_NOT_FOUND, f"cannot read layer {layer!r} of {path}: {exc}"
        ) from None
    fields = list(meta["fields"])
    missing = [f for f in ("label", "review") if f not in fields]
    if missing:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"layer {layer!r} of {path} has no {' or '.join(missing)} field: not an EarthDial result layer",
        )
    column = {name: values[i] for i, name in enumerate(fields)}
    features = []
    if geometry is None:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"layer {layer!r} of {path} has no geometry: not a result layer"
        )
    for k, wkb in enumerate(geometry):
        if wkb is None:
            continue
        geom = shapely.from_wkb(wkb)
        polys = list(getattr(geom, "geoms", [geom]))
        if not polys or polys[0].geom_type != "Polygon":
            continue
        ring = [(float(x), float(y)) for x, y, *_ in polys[0].exterior.coords]

        label, review, request = (_text(column.get(name), k) for name in ("label", "review", "request"))
        features.append(Feature(ring, label, review.lower(), request))
    return features, str(meta.get("crs") or "")


def _text(values: Any, k: int) -> str:
    v = None if values is None else values[k]
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).strip()


def result_layers(path: str) -> list[str]:
    """The layers of a GeoPackage that carry a review field."""
    import pyogrio

    try:
        names = [str(n) for n, _ in pyogrio.list_layers(path)]
    except Exception as exc:
        raise EarthDialError(ErrorCode.FILE_NOT_FOUND, f"cannot open {path} as a GeoPackage: {exc}") from None
    out = []
    for name in names:
        try:
            info = pyogrio.read_info(path, layer=name)
        except Exception:
            continue
        if "review" in list(info["fields"]):
            out.append(name)
    return out


def parse_request(text: str, layer: str) -> dict[str, Any]:
    """A feature's `request` field as the dict `service.record` wrote; a typed error for anything else."""
    try:
        request = json.loads(text)
    except json.JSONDecodeError:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"layer {layer!r}: a request field is not JSON") from None
    window = request.get("window") if isinstance(request, dict) else None
    sources = request.get("sources") if isinstance(request, dict) else None
    if (
        not isinstance(window, dict)
        or not isinstance(sources, list)
        or not sources
        or not all(isinstance(s, dict) for s in sources)
        or not isinstance(window.get("transform"), list)
        or len(window["transform"]) < 6
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in window["transform"][:6])
        or not all(isinstance(window.get(k), int) and window[k] > 0 for k in ("width", "height"))
    ):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"layer {layer!r}: a request field is not an EarthDial request (no window)"
        )
    return request


def window_polygon(request: dict[str, Any]) -> Any:
    """The window a request read, as a polygon in its CRS (the layer's)."""
    import shapely.geometry
    from affine import Affine

    w = request["window"]
    aff = Affine(*[float(v) for v in w["transform"][:6]])
    corners = [aff @ (0, 0), aff @ (w["width"], 0), aff @ (w["width"], w["height"]), aff @ (0, w["height"])]
    return shapely.geometry.Polygon(corners)


INSIDE_SHARE = 0.5  # a box belongs to a window when at least this share of its area lies inside it


def _windows(features: list[Feature], layer: str) -> list[tuple[str, dict[str, Any], list[Feature]]]:
    """(request text, request, the features seen in its window) for every request of a layer.

    A feature belongs to every window that holds at least half of it, whichever request produced it: a
    merged scan kept one box for an object two overlapping tiles saw, and each tile's record must show it
    (its own tile's request alone would teach the other tile that nothing is there). A box partly outside
    a window is clipped to it; one mostly outside is left out of that window. Boxes drawn by hand count
    wherever they lie."""
    import shapely.geometry

    shapes = []  # each polygon built once, not once per window
    for f in features:
        poly = shapely.geometry.Polygon(f.ring)
        if not poly.is_valid:
            poly = poly.buffer(0)
        if poly.is_empty or poly.area <= 0:
            if f.review and f.review != REJECTED:  # a kept box that shows nothing: its window would lie
                raise EarthDialError(
                    ErrorCode.BAD_REQUEST, f"layer {layer!r}: a {f.label or 'box'} polygon has no area"
                )
            continue
        shapes.append((f, poly))
    out = []
    for text in sorted({f.request for f in features if f.request}):
        request = parse_request(text, layer)
        area = window_polygon(request)
        seen = []
        for f, poly in shapes:
            inside = poly.intersection(area)
            share = inside.area / poly.area
            if share < INSIDE_SHARE:
                continue
            if share < 1.0 - 1e-9:  # clipped to the window: the part of the object the window shows
                inside = (
                    inside
                    if inside.geom_type == "Polygon"
                    else max(getattr(inside, "geoms", [inside]), key=lambda g: g.area)
                )
                f = Feature(
                    [(float(x), float(y)) for x, y, *_ in inside.exterior.coords],
                    f.label,
                    f.review,
                    f.request,
                )
            seen.append(f)
        out.append((text, request, seen))
    return out


def _read_chip(request: dict[str, Any], layer: str) -> Any:
    """The request's first image, read as inference read it (bounds, bands, preset, GSD)."""
    sources = request.get("sources") or []
    if not sources or not isinstance(sources[0].get("path"), str) or not sources[0]["path"]:
        raise EarthDialError(
            ErrorCode.FILE_NOT_FOUND,
            f"layer {layer!r}: its request was sent by value from a layer that is not a file, so its pixels "
            "cannot be read again",
        )
    src = dict(sources[0], kind="ref")
    # the request is data from a file: a /vsicurl/ path would make GDAL call out, a FIFO block for good
    file_access.check_local_path(str(src["path"]), f"layer {layer!r}: its request's path")
    file_access.check_regular(str(src["path"]))
    options = dict(request.get("options") or {}) if isinstance(request.get("options"), dict) else {}
    if request.get("preset"):
        options["preset"] = request["preset"]
    return service.read_inputs(
        requests.sources({"op": "ask", "source": src}), [], requests.options({"options": options})
    ).chips[0]


def records_for_request(
    request: dict[str, Any], features: list[Feature], chip: Any, layer: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """The conversations of one reviewed request on its re-read ``chip``: (records, reasons skipped)."""
    task = str(request.get("task") or "")
    sensor = str(request.get("sensor") or prompts.DEFAULT_SENSOR)
    prompt = str(request.get("prompt") or "").strip()
    labels: dict[str, list[Feature]] = {}
    if task == "refer":  # every box answers the one question, named as it was asked (the model's own
        labels[prompt] = list(features)  # label may be the wrong class whose box the analyst moved)
    else:
        for f in features:
            labels.setdefault(f.label, []).append(f)
    records, skipped = [], []
    complete = True
    for label, group in labels.items():
        if not label:
            skipped.append(f"layer {layer!r}: {len(group)} box(es) without a label")
            complete = False
            continue
        unknown = [f.review for f in group if f.review and f.review not in REVIEWS]
        if unknown:
            raise EarthDialError(
                ErrorCode.BAD_REQUEST,
                f"layer {layer!r}: review {unknown[0]!r} is none of {', '.join(REVIEWS)} (or empty)",
            )
        if any(not f.review for f in group):
            skipped.append(f"layer {layer!r}: {label!r} has boxes nobody reviewed")
            complete = False
            continue
        kept = [f for f in group if f.review in KEPT]
        boxes = _reading_order(
            [polygon_to_box(f.ring, chip.transform, chip.width, chip.height, label) for f in kept]
        )
        asked = prompt if task == "refer" and prompt else label
        question = prompts.build_question("refer", asked, sensor)
        answer = grounded(label, boxes) if boxes else absent_answer(label)
        records.append(
            {
                "kind": "refer" if boxes else "negative",
                "label": label,
                "boxes": boxes,
                "conversations": _record(question, answer),
            }
        )
    if task == "grounding" and complete:
        labelled = [(lbl, f) for lbl, g in labels.items() for f in g if f.review in KEPT]
        boxes = _reading_order(
            [polygon_to_box(f.ring, chip.transform, chip.width, chip.height, lbl) for lbl, f in labelled]
        )
        if boxes:
            answer = " ".join(grounded(b.label or "", [b]) for b in boxes)
            question = prompts.build_question("grounding", "", sensor)
            records.append(
                {"kind": "grounding", "label": "", "boxes": boxes, "conversations": _record(question, answer)}
            )
    return records, skipped


def _record(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def export(path: str, out_dir: str, layers: list[str] | None = None) -> Export:
    """Write the records of the reviewed layers of the GeoPackage ``path`` (all layers with a review
    field, or ``layers``) to ``out_dir``/records.jsonl and their chips to ``out_dir``/chips/. An existing
    records file is never overwritten: the folder must be new or hold no records yet."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EarthDialError(ErrorCode.FILE_NOT_FOUND, f"no such file: {path}")
    out = Path(out_dir)
    if (out / RECORDS_FILE).exists():
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"{out / RECORDS_FILE} exists; export into a new folder (nothing was written)",
        )
    names = layers or result_layers(path)
    if not names:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"{path} has no EarthDial result layer (no review field)")
    result = Export()
    pending: list[tuple[dict[str, Any], Any]] = []  # (record, chip)
    for name in names:
        try:  # one odd layer never stops the others: it is reported and skipped
            records, skipped = _layer_records(path, name)
        except EarthDialError as exc:
            result.skipped.append(f"layer {name!r}: {exc.code}: {exc.message}")
            continue
        result.skipped += skipped
        pending += records
    if pending:  # an empty records file would pass for an export and leave the folder "used"
        _write(out, pending)
    result.records = [rec for rec, _ in pending]
    return result


def _layer_records(path: str, name: str) -> tuple[list[tuple[dict[str, Any], Any]], list[str]]:
    """The records of one layer (one per reviewed window and class) with their chips, and what was
    skipped and why (each reason once, with how many windows it cost)."""
    features, _ = read_layer(path, name)
    if not features:
        return [], [f"layer {name!r}: no boxes"]
    if not any(f.request for f in features):
        return [], [f"layer {name!r}: boxes without a request (written before reviews existed)"]
    if all(not f.review for f in features):
        return [], [f"layer {name!r}: not reviewed"]
    reasons: dict[str, int] = {}
    pending: list[tuple[dict[str, Any], Any]] = []
    for text, request, group in _windows(features, name):
        task = request.get("task")
        if task not in EXPORTED_TASKS:
            reasons[f"task {task!r} (only {', '.join(EXPORTED_TASKS)} export)"] = 1
            continue
        if not group or all(not f.review for f in group):
            reasons["window(s) with no reviewed box"] = reasons.get("window(s) with no reviewed box", 0) + 1
            continue
        try:
            chip = _read_chip(request, name)
        except EarthDialError as exc:  # this window's pixels are gone or unreadable: the others still export
            why = f"{exc.code}: {exc.message}"
            reasons[why] = reasons.get(why, 0) + 1
            continue
        records, skipped = records_for_request(request, group, chip, name)
        for why in skipped:
            why = why.split(": ", 1)[-1] if why.startswith(f"layer {name!r}: ") else why
            reasons[why] = reasons.get(why, 0) + 1
        stem = chip_stem(name, text)
        for k, rec in enumerate(records):
            rec.update(
                id=f"{stem}-{k}",
                image=f"{CHIPS_DIR}/{stem}.tif",
                sensor=request.get("sensor"),
                task=task,
                layer=name,
                source=request["sources"][0].get("path"),
            )
            pending.append((rec, chip))
    skipped = [f"layer {name!r}: {why}" + (f" ({n} windows)" if n > 1 else "") for why, n in reasons.items()]
    return pending, skipped


def chip_stem(layer: str, request: str) -> str:
    """A chip's file name: readable, and unique per layer and request (layers `a b` and `a_b`, or names
    that agree in their first characters, must never share a chip)."""
    digest = hashlib.sha256(f"{layer}\n{request}".encode()).hexdigest()[:16]
    return f"{_safe(layer)[:48]}-{digest}"


def _safe(name: str) -> str:
    return re.sub(r"[^\w\-]+", "_", name).strip("_")[:80] or "layer"


def _write(out: Path, pending: list[tuple[dict[str, Any], Any]]) -> None:
    """Chips first, then the records file in one rename: a reader never sees records without chips."""
    import rasterio

    out.mkdir(parents=True, exist_ok=True)
    (out / CHIPS_DIR).mkdir(exist_ok=True)
    written: set[str] = set()
    for rec, chip in pending:
        if rec["image"] in written:
            continue
        written.add(rec["image"])
        target = out / rec["image"]
        tmp = target.with_suffix(".tif.part")
        data = np.asarray(chip.data)
        with rasterio.open(
            tmp,
            "w",
            driver="GTiff",
            width=chip.width,
            height=chip.height,
            count=data.shape[0],
            dtype=data.dtype,
            crs=chip.crs or None,
            transform=chip.transform,
            nodata=chip.nodata,
        ) as dst:
            dst.write(data)
        os.replace(tmp, target)
    tmp = out / (RECORDS_FILE + ".part")
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec, _ in pending:
            row = {k: v for k, v in rec.items() if k != "boxes"}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out / RECORDS_FILE)


def load_records(directory: str | Path) -> list[dict[str, Any]]:
    """The records of an export folder, each with its chip's path made absolute."""
    directory = Path(directory)
    path = directory / RECORDS_FILE
    if not path.is_file():
        raise EarthDialError(
            ErrorCode.FILE_NOT_FOUND, f"{directory} holds no {RECORDS_FILE} (run export-training)"
        )
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"{path} line {n} is not JSON") from None
        conv = rec.get("conversations")
        if not isinstance(conv, list) or len(conv) < 2 or len(conv) % 2:
            raise EarthDialError(
                ErrorCode.BAD_REQUEST, f"{path} line {n}: conversations must be human/gpt pairs"
            )
        rec["image"] = str(directory / rec["image"])
        records.append(rec)
    return records


__all__ = ["REVIEWS", "absent_answer", "export", "load_records", "polygon_to_box"]
