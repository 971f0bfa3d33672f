"""Writing FeatureCollections to GeoPackage and GeoJSON: round trips, layers kept, atomic failures."""

from __future__ import annotations

import datetime
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import shapely

from earthdial.output import FIELDS, write_features
from earthdial.protocol import EarthDialError, ErrorCode

RING_A = [
    [500200.0, 3999700.0],
    [500400.0, 3999700.0],
    [500400.0, 3999400.0],
    [500200.0, 3999400.0],
    [500200.0, 3999700.0],
]
RING_B = [
    [500450.0, 3999650.0],
    [500450.0, 3999450.0],
    [500150.0, 3999450.0],
    [500150.0, 3999650.0],
    [500450.0, 3999650.0],
]


def feature(ring, **properties):
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": properties,
    }


def collection(*features, crs="EPSG:32633"):
    return {"type": "FeatureCollection", "crs": crs, "features": list(features)}


FULL = {
    "label": "ship",
    "angle": 0.0,
    "box": [20.0, 30.0, 40.0, 60.0, 0.0],  # not a stored field
    "task": "grounding",
    "prompt": "[grounding] [hr_rgb_0.5] <image>\n Describe the image in detail.",
    "answer": "<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box>",
    "model": "EarthDial_4B_RGB",
    "variant": "EarthDial_4B_RGB",
    "source": "/data/scene.tif",
    "tile": "0,448",
    "gsd": 0.5,
    "created": "2025-01-02T03:04:05Z",
    "score": 0.42,
    "change": "appeared",
    "pair": "a.tif -> b.tif",
}
TWO = collection(feature(RING_A, **FULL), feature(RING_B, label="pool", angle=90))


def read_back(path, layer=None):
    meta, _fids, wkb, values = pyogrio.raw.read(path, layer=layer, datetime_as_string=True)
    rows = [dict(zip(meta["fields"], row, strict=True)) for row in zip(*values, strict=True)]
    return meta, shapely.from_wkb(wkb), rows


def check_two(path, layer=None):
    info = pyogrio.read_info(path, layer=layer)
    assert info["crs"] == "EPSG:32633"
    assert info["features"] == 2
    assert info["geometry_type"] == "Polygon"
    assert list(info["fields"]) == list(FIELDS)
    _meta, geoms, rows = read_back(path, layer)
    assert shapely.equals(geoms[0], shapely.Polygon(RING_A))
    assert shapely.equals(geoms[1], shapely.Polygon(RING_B))
    assert [list(c) for c in geoms[0].exterior.coords] == RING_A  # order kept too
    assert rows[0] == {k: FULL[k] for k in FIELDS}
    assert rows[1]["label"] == "pool"
    assert rows[1]["angle"] == 90.0
    return info, rows


def test_geopackage_round_trip(tmp_path):
    path = str(tmp_path / "out.gpkg")
    assert write_features(path, TWO) == path
    info, rows = check_two(path, "earthdial")
    assert dict(zip(info["fields"], info["ogr_types"], strict=True)) == {
        "label": "OFTString",
        "angle": "OFTReal",
        "task": "OFTString",
        "prompt": "OFTString",
        "answer": "OFTString",
        "model": "OFTString",
        "variant": "OFTString",
        "source": "OFTString",
        "tile": "OFTString",
        "gsd": "OFTReal",
        "created": "OFTString",
        "score": "OFTReal",
        "change": "OFTString",
        "pair": "OFTString",
    }
    # missing properties are NULL
    assert all(rows[1][k] is None for k in ("task", "prompt", "answer", "model", "source", "created"))


@pytest.mark.parametrize("name", ["out.geojson", "out.json", "OUT.GeoJSON"])
def test_geojson_round_trip(tmp_path, name):
    path = str(tmp_path / name)
    write_features(path, TWO)
    check_two(path)


def test_missing_angle_is_null(tmp_path):
    path = str(tmp_path / "out.gpkg")
    write_features(path, collection(feature(RING_A, label="x"), feature(RING_B, label="y", angle=12.5)))
    _meta, _geoms, rows = read_back(path)
    assert rows[0]["angle"] is None or np.isnan(rows[0]["angle"])
    assert rows[1]["angle"] == 12.5


def test_values_are_written_as_text(tmp_path):
    path = str(tmp_path / "out.gpkg")
    created = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    write_features(path, collection(feature(RING_A, created=created, model=4, label="é 船")))
    _meta, _geoms, rows = read_back(path)
    assert rows[0]["created"] == "2025-01-02T03:04:05+00:00"
    assert rows[0]["model"] == "4"
    assert rows[0]["label"] == "é 船"


def test_empty_collection_writes_an_empty_layer(tmp_path):
    path = str(tmp_path / "empty.gpkg")
    write_features(path, collection(crs="EPSG:4326"))
    info = pyogrio.read_info(path, layer="earthdial")
    assert info["features"] == 0
    assert info["crs"] == "EPSG:4326"
    assert list(info["fields"]) == list(FIELDS)
    assert info["geometry_type"] == "Polygon"


def test_empty_geojson_is_valid(tmp_path):
    path = str(tmp_path / "empty.geojson")
    write_features(path, collection())
    info = pyogrio.read_info(path)
    assert info["features"] == 0
    assert info["crs"] == "EPSG:32633"


def test_collection_without_crs(tmp_path):
    path = str(tmp_path / "nocrs.gpkg")
    write_features(path, collection(feature(RING_A), crs=None))
    assert pyogrio.read_info(path)["crs"] is None


def test_existing_geopackage_keeps_other_layers(tmp_path):
    path = str(tmp_path / "project.gpkg")
    points = shapely.to_wkb(np.array([shapely.Point(1, 2)], dtype=object))
    pyogrio.raw.write(
        path,
        points,
        [np.array(["mine"], dtype=object)],
        ["name"],
        layer="roads",
        driver="GPKG",
        geometry_type="Point",
        crs="EPSG:3857",
    )

    write_features(path, TWO)
    write_features(path, collection(feature(RING_B, label="second")))  # replaces the earthdial layer only
    write_features(path, TWO, layer="run2")

    assert {name for name, _ in pyogrio.list_layers(path)} == {"roads", "earthdial", "run2"}
    _meta, geoms, rows = read_back(path, "roads")
    assert rows == [{"name": "mine"}]
    assert shapely.equals(geoms[0], shapely.Point(1, 2))
    assert pyogrio.read_info(path, layer="roads")["crs"] == "EPSG:3857"
    _meta, _geoms, rows = read_back(path, "earthdial")
    assert [r["label"] for r in rows] == ["second"]
    check_two(path, "run2")


# Another program holding a GeoPackage open in WAL mode, with a committed change still only in the log
# (to a plain table: editing a layer would need GeoPackage's SQL functions). It runs in its own process:
# SQLite's locks are per process, and pyogrio's GDAL carries its own SQLite.
HOLDER = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1])
con.execute("PRAGMA journal_mode=WAL")
con.execute("PRAGMA wal_autocheckpoint=0")
con.execute("CREATE TABLE notes (text TEXT)")
con.execute("INSERT INTO notes VALUES ('committed')")
con.commit()
print("ready", flush=True)
sys.stdin.readline()
print(con.execute("SELECT COUNT(*) FROM earthdial").fetchone()[0], flush=True)
con.close()
"""


def test_geopackage_open_in_wal_mode_is_updated_in_place(tmp_path):
    path = str(tmp_path / "project.gpkg")
    points = shapely.to_wkb(np.array([shapely.Point(1, 2)], dtype=object))
    pyogrio.raw.write(
        path,
        points,
        [np.array(["old"], dtype=object)],
        ["name"],
        layer="roads",
        driver="GPKG",
        geometry_type="Point",
        crs="EPSG:4326",
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        inode = os.stat(path).st_ino
        assert os.path.getsize(path + "-wal") > 0
        write_features(path, TWO)
        write_features(path, TWO)  # and once more, replacing the layer
        # Replacing the file would leave the holder's log beside the new one, to be replayed into it
        assert os.stat(path).st_ino == inode
        out, _ = holder.communicate("go\n", timeout=20)
        assert out.strip() == "2"  # the other program sees the new layer too
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    check_two(path, "earthdial")
    _meta, _geoms, rows = read_back(path, "roads")
    assert rows == [{"name": "old"}]
    con = sqlite3.connect(path)
    try:
        assert con.execute("SELECT text FROM notes").fetchall() == [("committed",)]
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        con.close()


def test_existing_geojson_is_replaced(tmp_path):
    path = str(tmp_path / "out.geojson")
    write_features(path, collection(feature(RING_B, label="old")))
    write_features(path, TWO)
    check_two(path)


def _fail_after_writing(monkeypatch):
    real_write = pyogrio.raw.write
    calls = []

    def write_then_fail(path, *args, **kwargs):
        calls.append(path)
        real_write(path, *args, **kwargs)  # the temporary file is complete...
        raise OSError("disk full")  # ... and then the write fails

    monkeypatch.setattr(pyogrio.raw, "write", write_then_fail)
    return calls


@pytest.mark.parametrize("name", ["project.gpkg", "out.geojson"])
def test_failed_write_leaves_existing_file_untouched(tmp_path, monkeypatch, name):
    path = str(tmp_path / name)
    write_features(path, collection(feature(RING_B, label="keep me")))
    before = open(path, "rb").read()
    listing = sorted(os.listdir(tmp_path))

    calls = _fail_after_writing(monkeypatch)
    with pytest.raises(EarthDialError) as info:
        write_features(path, TWO)
    assert info.value.code == ErrorCode.INTERNAL
    assert "disk full" in info.value.message
    assert calls and calls[0] != path  # it wrote somewhere else first
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == listing  # no temporary file left behind


def test_failed_write_of_a_new_file_leaves_nothing(tmp_path, monkeypatch):
    _fail_after_writing(monkeypatch)
    with pytest.raises(EarthDialError):
        write_features(str(tmp_path / "new.gpkg"), TWO)
    assert os.listdir(tmp_path) == []


def test_failed_replace_leaves_existing_file_untouched(tmp_path, monkeypatch):
    path = str(tmp_path / "project.gpkg")
    write_features(path, collection(feature(RING_B, label="keep me")))
    before = open(path, "rb").read()

    def no_replace(src, dst):
        raise PermissionError("file is locked")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(EarthDialError):
        write_features(path, TWO)
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["project.gpkg"]


@pytest.mark.parametrize(
    ("name", "coll", "code"),
    [
        ("out.shp", TWO, ErrorCode.BAD_REQUEST),
        ("out", TWO, ErrorCode.BAD_REQUEST),
        ("out.gpkg", {"type": "FeatureCollection"}, ErrorCode.BAD_REQUEST),
        ("out.gpkg", [], ErrorCode.BAD_REQUEST),
        ("out.gpkg", collection("not a feature"), ErrorCode.BAD_REQUEST),
        (
            "out.gpkg",
            collection({"geometry": {"type": "Polygon", "coordinates": "x"}}),
            ErrorCode.BAD_REQUEST,
        ),
        ("out.gpkg", collection(feature(RING_A, angle="steep")), ErrorCode.BAD_REQUEST),
        ("missing/out.gpkg", TWO, ErrorCode.FILE_NOT_FOUND),
    ],
)
def test_bad_requests(tmp_path, name, coll, code):
    with pytest.raises(EarthDialError) as info:
        write_features(str(tmp_path / name), coll)
    assert info.value.code == code
    assert not os.path.exists(tmp_path / name)


def test_bad_layer_name(tmp_path):
    with pytest.raises(EarthDialError) as info:
        write_features(str(tmp_path / "out.gpkg"), TWO, layer="")
    assert info.value.code == ErrorCode.BAD_REQUEST
