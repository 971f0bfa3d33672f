"""One analyst session across the features: a scan's boxes carry their tile's request and the schema's
fields, reviewed scan layers export, one odd layer never stops an export, chip names never collide."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import rasterio
import shapely
import shapely.geometry
from rasterio.transform import from_origin
from test_detect_protocol import mosaic

from conftest import demo_model_args, run_earthdial, write_geotiff
from earthdial.contract import result_features
from earthdial.geo.georef import box_to_polygon
from earthdial.model.answers import Box
from earthdial.outputs.files import write_features
from earthdial.training import export as training_data


def _rows(path: Path, layer: str) -> list[dict]:
    meta, fids, wkb, values = pyogrio.raw.read(str(path), layer=layer, return_fids=True)
    rows = []
    for k, fid in enumerate(fids):
        row = {name: values[i][k] for i, name in enumerate(meta["fields"])}
        rows.append({**row, "fid": int(fid), "geometry": shapely.from_wkb(wkb[k])})
    return rows


def _reviewed(rows: list[dict], verdicts: dict[int, str], path: Path, layer: str) -> None:
    """The layer as the analyst saved it after Accept/Reject (review.py sets the same column)."""
    features = []
    for row in rows:
        props = {k: v for k, v in row.items() if k in result_features.NAMES}
        props["review"] = verdicts.get(row["fid"], "")
        features.append(
            {"type": "Feature", "geometry": shapely.geometry.mapping(row["geometry"]), "properties": props}
        )
    write_features(str(path), {"type": "FeatureCollection", "crs": "EPSG:32633", "features": features}, layer)


@pytest.fixture(scope="module")
def scanned(tmp_path_factory) -> tuple[Path, Path, str]:
    """`earthdial detect` of a 2 x 2 mosaic of demo scenes (4 tiles of 224 px with overlap), demo model."""
    folder = tmp_path_factory.mktemp("session")
    scene = mosaic(folder / "mosaic.tif", n=2)
    out = folder / "project_earthdial.gpkg"
    run = run_earthdial(
        "detect",
        str(scene),
        "--prompt",
        "ships",
        "--tile-size",
        "224",
        "--batch",
        "4",
        *demo_model_args(),
        "-o",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    (layer,) = [name for name, _ in pyogrio.list_layers(str(out))]
    return scene, out, layer


def test_a_scan_layer_has_the_one_schema_and_every_box_its_tiles_request(scanned) -> None:
    scene, out, layer = scanned
    info = pyogrio.read_info(str(out), layer=layer)
    assert list(info["fields"]) == list(result_features.NAMES)
    assert layer.startswith("scan_refer_ships_mosaic_")  # names a scan, with its time (two scans differ)
    rows = _rows(out, layer)
    assert len(rows) >= 2
    with rasterio.open(scene) as src:
        gsd = src.transform.a
    for row in rows:
        assert (row["task"], row["prompt"], row["source"]) == ("refer", "ships", str(scene))
        assert row["label"] and row["angle"] is not None and 0 < row["score"] <= 1  # the box's own fields
        assert row["gsd_data"] == pytest.approx(gsd)
        assert row["gsd_model"] == pytest.approx(gsd * 224 / 112)  # the demo model sees 112 px tiles
        request = json.loads(row["request"])
        assert request["task"] == "refer" and request["sources"][0]["path"] == str(scene)
        window = training_data.window_polygon(request)
        assert window.area == pytest.approx((224 * gsd) ** 2)  # its tile's window, not the whole scene
        assert row["geometry"].intersection(window).area / row["geometry"].area > 0.99
        assert row["answer"] and row["tile"] != ""


def test_a_reviewed_scan_layer_exports_the_windows_whose_boxes_were_all_reviewed(scanned, tmp_path) -> None:
    """The analyst reviews the boxes of one tile's window (accepts all but one, rejects that one) and
    leaves the rest: that window gives its record; the others are reported as not reviewed."""
    _scene, out, layer = scanned
    rows = _rows(out, layer)
    requests = sorted({r["request"] for r in rows})
    assert len(requests) >= 2  # boxes came from several tiles

    def members_of(request: str) -> list[dict]:
        area = training_data.window_polygon(json.loads(request))
        return [r for r in rows if r["geometry"].intersection(area).area / r["geometry"].area >= 0.5]

    busiest = max(requests, key=lambda r: len(members_of(r)))
    window, members = training_data.window_polygon(json.loads(busiest)), members_of(busiest)
    assert members
    verdicts = {r["fid"]: "accepted" for r in members}
    rejected = len(members) > 1  # one of them is wrong, when there are two
    if rejected:
        verdicts[members[0]["fid"]] = "rejected"
    reviewed = tmp_path / "reviewed.gpkg"
    _reviewed(rows, verdicts, reviewed, layer)
    result = training_data.export(str(reviewed), str(tmp_path / "train"))
    x0, _y0, _x1, y1 = window.bounds
    mine = []
    for record in result.records:
        with rasterio.open(tmp_path / "train" / record["image"]) as chip:
            if (chip.transform.c, chip.transform.f) == pytest.approx((x0, y1)):
                mine.append(record)
    assert len(mine) == 1  # before: bad_request "a feature has no request", nothing written
    assert mine[0]["kind"] == "refer" and len(mine[0]["boxes"]) == len(members) - rejected
    assert mine[0]["conversations"][0]["value"].endswith("<ref>ships</ref>")
    if len(members) < len(rows):  # boxes outside that window were never reviewed: said, not failed
        assert any("no reviewed box" in s or "nobody reviewed" in s for s in result.skipped), result.skipped


# --- membership of boxes in overlapping windows, by hand ---------------------------------------------

ORIGIN = (500_000.0, 4_000_100.0)


def _raster(tmp_path: Path) -> Path:
    path = tmp_path / "scene.tif"
    data = np.random.default_rng(1).integers(0, 256, (3, 100, 160), dtype=np.uint8)
    return write_geotiff(path, data, transform=from_origin(*ORIGIN, 1.0, 1.0))


def _tile_request(path: Path, col: int) -> tuple[str, tuple[float, ...]]:
    """The request of a 100 x 100 px tile starting at column ``col`` (as scan.py records it)."""
    transform = (1.0, 0.0, ORIGIN[0] + col, 0.0, -1.0, ORIGIN[1])
    bounds = [ORIGIN[0] + col, ORIGIN[1] - 100, ORIGIN[0] + col + 100, ORIGIN[1]]
    text = json.dumps(
        {
            "task": "refer",
            "prompt": "ship",
            "sensor": "[hr_rgb_0.5]",
            "preset": "rgb8",
            "options": {},
            "sources": [{"path": str(path), "bands": [1, 2, 3], "bounds": bounds, "crs": "EPSG:32633"}],
            "window": {
                "bands": [1, 2, 3],
                "width": 100,
                "height": 100,
                "transform": list(transform),
                "crs": "EPSG:32633",
            },
        }
    )
    return text, transform


def _box(request: tuple[str, tuple[float, ...]], box: tuple[int, ...], review: str, tile: int) -> dict:
    text, transform = request
    ring = box_to_polygon(Box(*box, "ship"), transform, 100, 100)
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in ring]]},
        "properties": {"label": "ship", "review": review, "request": text, "tile": tile, "task": "refer"},
    }


def test_a_box_in_two_overlapping_tiles_is_in_both_records(tmp_path) -> None:
    """Tiles at columns 0 and 60 overlap over columns 60-100. The merge kept the box at columns 70-90 with
    tile 0's request; tile 1's record must show it too, or it would teach that nothing is there."""
    path = _raster(tmp_path)
    left, right = _tile_request(path, 0), _tile_request(path, 60)
    feats = [_box(left, (70, 40, 90, 60, 0), "accepted", 0),  # in both tiles
             _box(left, (5, 5, 20, 20, 0), "accepted", 0),  # left only
             _box(right, (80, 70, 95, 90, 0), "accepted", 1)]  # right only (columns 140-155)  # fmt: skip
    gpkg = tmp_path / "scan.gpkg"
    write_features(str(gpkg), {"type": "FeatureCollection", "crs": "EPSG:32633", "features": feats}, "scan")
    result = training_data.export(str(gpkg), str(tmp_path / "out"))
    assert sorted(len(r["boxes"]) for r in result.records) == [2, 2]
    right_record = next(r for r in result.records if any(b.x1 >= 75 for b in r["boxes"]))
    shared = min(right_record["boxes"], key=lambda b: b.x1)
    assert (shared.x1, shared.x2) == (10, 30)  # columns 70-90 on the tile starting at column 60


def test_a_drawn_box_without_a_request_counts_in_the_window_it_lies_in(tmp_path) -> None:
    path = _raster(tmp_path)
    left, right = _tile_request(path, 0), _tile_request(path, 60)
    drawn = _box(right, (80, 10, 95, 25, 0), "added", 1)
    drawn["properties"]["request"] = ""  # drawn in QGIS without the plugin
    feats = [
        _box(left, (5, 5, 20, 20, 0), "accepted", 0),
        _box(right, (80, 70, 95, 90, 0), "accepted", 1),
        drawn,
    ]
    gpkg = tmp_path / "scan.gpkg"
    write_features(str(gpkg), {"type": "FeatureCollection", "crs": "EPSG:32633", "features": feats}, "scan")
    result = training_data.export(str(gpkg), str(tmp_path / "out"))  # it raised bad_request before
    assert sorted(len(r["boxes"]) for r in result.records) == [1, 2]


def test_one_odd_layer_never_stops_the_others_and_says_why(tmp_path) -> None:
    path = _raster(tmp_path)
    good = _box(_tile_request(path, 0), (5, 5, 20, 20, 0), "accepted", 0)
    gpkg = tmp_path / "mixed.gpkg"
    odd = {
        "a_list": json.dumps([1, 2]),
        "sources_text": json.dumps({"task": "refer", "sources": "x.tif"}),
        "null_source": json.dumps({"task": "refer", "sources": [None], "window": {}}),
    }
    for name, text in odd.items():
        feature = json.loads(json.dumps(good))
        feature["properties"]["request"] = text
        write_features(
            str(gpkg), {"type": "FeatureCollection", "crs": "EPSG:32633", "features": [feature]}, name
        )
    write_features(str(gpkg), {"type": "FeatureCollection", "crs": "EPSG:32633", "features": [good]}, "good")
    with sqlite3.connect(gpkg) as con:  # a plain table with a review column and no geometry
        con.execute("CREATE TABLE notes (fid INTEGER PRIMARY KEY, review TEXT, label TEXT)")
        con.execute(
            "INSERT INTO gpkg_contents (table_name, data_type, identifier) VALUES ('notes', 'attributes', 'notes')"
        )
    result = training_data.export(str(gpkg), str(tmp_path / "out"))
    assert [r["layer"] for r in result.records] == ["good"]
    for name in odd:
        assert any(s.startswith(f"layer {name!r}: bad_request") for s in result.skipped), result.skipped


def test_layers_whose_names_agree_once_made_safe_get_their_own_chips(tmp_path) -> None:
    path = _raster(tmp_path)
    gpkg = tmp_path / "two.gpkg"
    long = "x" * 90
    names = ["a b", "a_b", long + "1", long + "2"]
    for k, name in enumerate(names):
        box = _box(_tile_request(path, 0 if k % 2 else 60), (5 + k, 5, 20 + k, 20, 0), "accepted", 0)
        write_features(str(gpkg), {"type": "FeatureCollection", "crs": "EPSG:32633", "features": [box]}, name)
    result = training_data.export(str(gpkg), str(tmp_path / "out"))
    images = [r["image"] for r in result.records]
    assert len(images) == 4 and len(set(images)) == 4
    for rec in result.records:  # each chip holds its own request's pixels
        with rasterio.open(tmp_path / "out" / rec["image"]) as chip:
            want = 0.0 if names.index(rec["layer"]) % 2 else 60.0
            assert chip.transform.c == ORIGIN[0] + want


def test_a_kept_box_with_no_area_skips_its_layer_instead_of_vanishing(tmp_path) -> None:
    """A reviewed box drawn as a line has no area: leaving it out would teach its window there is nothing."""
    path = _raster(tmp_path)
    left = _tile_request(path, 0)
    flat = _box(left, (5, 5, 20, 20, 0), "added", 0)
    x, y = flat["geometry"]["coordinates"][0][0]
    flat["geometry"]["coordinates"] = [[[x, y], [x + 5, y], [x + 10, y], [x, y]]]
    gpkg = tmp_path / "flat.gpkg"
    feats = [_box(left, (30, 30, 50, 50, 0), "accepted", 0), flat]
    write_features(str(gpkg), {"type": "FeatureCollection", "crs": "EPSG:32633", "features": feats}, "flat")
    result = training_data.export(str(gpkg), str(tmp_path / "out"))
    assert result.records == []
    assert any(s.startswith("layer 'flat': bad_request") and "no area" in s for s in result.skipped), (
        result.skipped
    )
