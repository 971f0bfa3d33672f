"""Writing FeatureCollections to GeoPackage and GeoJSON: round trips, layers added and kept, refusals of
what is not ours, atomic failures, scratch clean-up, disk-full and read-only errors."""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import sqlite3
import subprocess

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import shapely

from conftest import python_child
from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.outputs import atomic, geopackage
from earthdial.outputs.files import FIELDS, MARK, check_target, write_features

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
    "gsd_data": 0.25,
    "gsd_model": 0.5,
    "created": "2025-01-02T03:04:05Z",
    "score": 0.42,
    "change": "appeared",
    "pair": "a.tif -> b.tif",
    "review": "accepted",
    "request": '{"task": "grounding"}',
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
    # GDAL's GeoJSON driver re-spaces a string field that holds a JSON object: compare it as JSON
    assert json.loads(rows[0].pop("request")) == json.loads(FULL["request"])
    assert rows[0] == {k: FULL[k] for k in FIELDS if k != "request"}
    assert rows[1]["label"] == "pool"
    assert rows[1]["angle"] == 90.0
    return info, rows


def test_geopackage_round_trip(tmp_path):
    path = str(tmp_path / "out.gpkg")
    assert write_features(path, TWO, "earthdial") == "earthdial"
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
        "gsd_data": "OFTReal",
        "gsd_model": "OFTReal",
        "created": "OFTString",
        "score": "OFTReal",
        "change": "OFTString",
        "pair": "OFTString",
        "review": "OFTString",
        "request": "OFTString",
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
    write_features(path, collection(crs="EPSG:4326"), "earthdial")
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


def user_geopackage(path, layer="roads", crs="EPSG:3857"):
    """A GeoPackage of the user's own, written by GDAL without our mark."""
    points = shapely.to_wkb(np.array([shapely.Point(1, 2)], dtype=object))
    pyogrio.raw.write(
        path,
        points,
        [np.array(["mine"], dtype=object)],
        ["name"],
        layer=layer,
        driver="GPKG",
        geometry_type="Point",
        crs=crs,
    )


def check_users_layer(path, layer="roads"):
    _meta, geoms, rows = read_back(path, layer)
    assert rows == [{"name": "mine"}]
    assert shapely.equals(geoms[0], shapely.Point(1, 2))
    assert pyogrio.read_info(path, layer=layer)["crs"] == "EPSG:3857"


def layers(path):
    return [name for name, _ in pyogrio.list_layers(path)]


def test_each_write_adds_a_layer_and_keeps_the_users_and_earlier_ones(tmp_path):
    path = str(tmp_path / "project.gpkg")
    user_geopackage(path)
    first = write_features(path, TWO)
    second = write_features(path, collection(feature(RING_B, **{**FULL, "label": "second"})))  # same name
    # FULL carries a scan tile: the default name says it is a scan
    assert first == "scan_grounding_Describe_the_image_in_detail_scene_20250102_030405"
    assert second == first + "_2"
    assert write_features(path, TWO, base_name="refer_ships") == "refer_ships"
    assert layers(path) == ["roads", first, second, "refer_ships"]
    check_users_layer(path)
    check_two(path, first)
    assert [r["label"] for r in read_back(path, second)[2]] == ["second"]
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        described = dict(con.execute("SELECT table_name, description FROM gpkg_contents"))
    finally:
        con.close()
    assert described[first].startswith(MARK) and "'grounding'" in described[first]
    assert not described["roads"].startswith(MARK)


def test_a_layer_name_is_refused_when_taken_and_replaced_only_when_ours(tmp_path):
    path = str(tmp_path / "project.gpkg")
    user_geopackage(path)
    write_features(path, TWO, "run")
    for attempt in (
        lambda: write_features(path, TWO, "run"),
        lambda: write_features(path, TWO, "RUN"),
        lambda: check_target(path, "run"),
    ):
        with pytest.raises(EarthDialError) as info:
            attempt()
        assert info.value.code == ErrorCode.OUTPUT_EXISTS
        assert "--overwrite" in info.value.message
    check_two(path, "run")
    write_features(path, collection(feature(RING_B, label="again")), "run", overwrite=True)
    assert [r["label"] for r in read_back(path, "run")[2]] == ["again"]
    # the user's layer, and a plain table of theirs, are never replaced, --overwrite or not
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE notes (text TEXT)")
    con.execute("INSERT INTO notes VALUES ('keep')")
    con.commit()
    con.close()
    for name in ("roads", "Roads", "notes"):
        with pytest.raises(EarthDialError) as info:
            write_features(path, TWO, name, overwrite=True)
        assert info.value.code == ErrorCode.FOREIGN_OUTPUT
    check_users_layer(path)
    assert layers(path) == ["roads", "run", "notes"]  # GDAL lists plain tables too
    con = sqlite3.connect(path)
    assert con.execute("SELECT text FROM notes").fetchall() == [("keep",)]
    con.close()


def test_new_geopackages_are_version_1_2(tmp_path):
    path = str(tmp_path / "new.gpkg")
    write_features(path, TWO)
    con = sqlite3.connect(path)
    try:  # QGIS 3.22's GDAL 3.6 says 1.4 "may only be partially supported"
        assert con.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47
        assert con.execute("PRAGMA user_version").fetchone()[0] == 10200
    finally:
        con.close()


def test_a_crs_whose_id_is_taken_gets_another_and_the_geometries_say_so(tmp_path):
    path = str(tmp_path / "project.gpkg")
    user_geopackage(path)
    con = sqlite3.connect(path)  # srs_id 32633 used by the user for some local system
    con.execute(
        "INSERT INTO gpkg_spatial_ref_sys VALUES ('local', 32633, 'NONE', 32633, 'LOCAL_CS[\"x\"]', '')"
    )
    con.commit()
    con.close()
    layer = write_features(path, TWO)
    check_two(path, layer)  # EPSG:32633 as written
    con = sqlite3.connect(path)
    try:
        srs = con.execute(
            "SELECT srs_id FROM gpkg_geometry_columns WHERE table_name = ?", (layer,)
        ).fetchone()[0]
        assert srs != 32633
        assert (
            con.execute("SELECT srs_id FROM gpkg_contents WHERE table_name = ?", (layer,)).fetchone()[0]
            == srs
        )
        blob = con.execute(f'SELECT geom FROM "{layer}"').fetchone()[0]
        assert int.from_bytes(blob[4:8], "little" if blob[3] & 1 else "big") == srs
    finally:
        con.close()
    # and the spatial index answers a bounding-box query
    assert len(pyogrio.raw.read(path, layer=layer, bbox=(500100, 3999300, 500250, 3999800))[2]) == 2
    assert len(pyogrio.raw.read(path, layer=layer, bbox=(0, 0, 10, 10))[2]) == 0


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.gpkg", b"my notes, not a GeoPackage\n"),
        ("empty.gpkg", b""),
        ("package.json", b'{"name": "app", "version": "1.0.0"}\n'),
        ("other.geojson", b'{"type": "FeatureCollection", "features": []}'),
        ("broken.json", b"{not json"),
    ],
)
def test_a_file_that_is_not_ours_is_never_replaced(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    for attempt in (
        lambda: write_features(str(path), TWO),
        lambda: write_features(str(path), TWO, overwrite=True),
        lambda: check_target(str(path), overwrite=True),
    ):
        with pytest.raises(EarthDialError) as info:
            attempt()
        assert info.value.code == ErrorCode.FOREIGN_OUTPUT
        assert "never" in info.value.message
    assert path.read_bytes() == content
    assert sorted(os.listdir(tmp_path)) == [name]


def test_an_sqlite_database_that_is_not_a_geopackage_is_never_changed(tmp_path):
    path = tmp_path / "app.gpkg"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE users (name TEXT)")
    con.execute("INSERT INTO users VALUES ('ada')")
    con.commit()
    con.close()
    before = path.read_bytes()
    with pytest.raises(EarthDialError) as info:
        write_features(str(path), TWO, "users", overwrite=True)
    assert info.value.code == ErrorCode.FOREIGN_OUTPUT
    assert path.read_bytes() == before


def test_a_folder_at_the_path_is_refused(tmp_path):
    (tmp_path / "out.gpkg").mkdir()
    with pytest.raises(EarthDialError) as info:
        write_features(str(tmp_path / "out.gpkg"), TWO)
    assert info.value.code == ErrorCode.FOREIGN_OUTPUT


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
    user_geopackage(path)
    holder = python_child(HOLDER, path)
    try:
        assert holder.stdout.readline().strip() == "ready"
        inode = os.stat(path).st_ino
        assert os.path.getsize(path + "-wal") > 0
        write_features(path, collection(feature(RING_A)), "earthdial")
        write_features(path, TWO, "earthdial", overwrite=True)  # and once more, replacing the layer
        # Replacing the file would leave the holder's log beside the new one, to be replayed into it
        assert os.stat(path).st_ino == inode
        out, _ = holder.communicate("go\n", timeout=20)
        assert out.strip() == "2"  # the other program sees the new layer too
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    check_two(path, "earthdial")
    check_users_layer(path)
    con = sqlite3.connect(path)
    try:
        assert con.execute("SELECT text FROM notes").fetchall() == [("committed",)]
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        con.close()


def test_existing_geojson_result_is_replaced_only_with_overwrite(tmp_path):
    path = str(tmp_path / "out.geojson")
    write_features(path, collection(feature(RING_B, label="old")))
    with pytest.raises(EarthDialError) as info:
        write_features(path, TWO)
    assert info.value.code == ErrorCode.OUTPUT_EXISTS
    assert [r["label"] for r in read_back(path)[2]] == ["old"]
    write_features(path, TWO, overwrite=True)
    check_two(path)


def _fail_after_writing(monkeypatch, error=None):
    real_write = pyogrio.raw.write
    calls = []

    def write_then_fail(path, *args, **kwargs):
        calls.append(path)
        real_write(path, *args, **kwargs)  # the temporary file is complete...
        raise error or OSError("disk full")  # ... and then the write fails

    monkeypatch.setattr(pyogrio.raw, "write", write_then_fail)
    return calls


@pytest.mark.parametrize("name", ["project.gpkg", "out.geojson"])
def test_failed_write_leaves_existing_file_untouched(tmp_path, monkeypatch, name):
    path = str(tmp_path / name)
    write_features(path, collection(feature(RING_B, label="keep me")), "earthdial")
    before = open(path, "rb").read()
    listing = sorted(os.listdir(tmp_path))

    calls = _fail_after_writing(monkeypatch)
    with pytest.raises(EarthDialError) as info:
        write_features(path, TWO, "earthdial", overwrite=True)
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
    path = str(tmp_path / "out.geojson")
    write_features(path, collection(feature(RING_B, label="keep me")))
    before = open(path, "rb").read()

    def no_replace(src, dst):
        raise PermissionError(errno.EACCES, "file is locked")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(EarthDialError) as info:
        write_features(path, TWO, overwrite=True)
    monkeypatch.undo()
    assert info.value.code == ErrorCode.READ_ONLY
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["out.geojson"]


def test_a_failure_inside_the_transaction_keeps_the_old_layer(tmp_path, monkeypatch):
    """The old layer is dropped inside the transaction that adds the new one: a failure after the drop
    rolls both back."""
    path = str(tmp_path / "project.gpkg")
    user_geopackage(path)
    write_features(path, TWO, "earthdial")
    real_copy = geopackage._copy_layer

    def copy_then_fail(con, name):
        real_copy(con, name)
        assert con.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0] == 1  # the new one, in place
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(geopackage, "_copy_layer", copy_then_fail)
    with pytest.raises(EarthDialError) as info:
        write_features(path, collection(feature(RING_B, label="new")), "earthdial", overwrite=True)
    assert info.value.code == ErrorCode.DISK_FULL
    check_two(path, "earthdial")
    check_users_layer(path)


# Another program in the middle of a write transaction on the GeoPackage, holding its lock.
LOCKER = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN IMMEDIATE")
con.execute("CREATE TABLE pending (x)")
print("locked", flush=True)
sys.stdin.readline()
con.execute("ROLLBACK")
"""


def test_a_geopackage_another_program_keeps_locked_is_busy_and_untouched(tmp_path, monkeypatch):
    path = str(tmp_path / "project.gpkg")
    user_geopackage(path)
    write_features(path, TWO, "earthdial")
    before = open(path, "rb").read()
    monkeypatch.setattr(geopackage, "BUSY_TIMEOUT_S", 0.3)
    locker = python_child(LOCKER, path)
    try:
        assert locker.stdout.readline().strip() == "locked"
        with pytest.raises(EarthDialError) as info:
            write_features(path, TWO, "earthdial", overwrite=True)
        assert info.value.code == ErrorCode.BUSY
        assert "another program" in info.value.message
    finally:
        locker.communicate("done\n", timeout=20)
    assert open(path, "rb").read() == before
    assert write_features(path, TWO, "second") == "second"  # once it lets go


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), ErrorCode.DISK_FULL),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), ErrorCode.DISK_FULL),
        (OSError(errno.EROFS, "Read-only file system"), ErrorCode.READ_ONLY),
        (PermissionError(errno.EACCES, "Permission denied"), ErrorCode.READ_ONLY),
        (RuntimeError("sqlite3_exec(INSERT ...) failed: database or disk is full"), ErrorCode.DISK_FULL),
    ],
)
@pytest.mark.parametrize("name", ["new.gpkg", "out.geojson"])
def test_disk_full_and_read_only_have_their_own_codes(tmp_path, monkeypatch, error, code, name):
    _fail_after_writing(monkeypatch, error)
    with pytest.raises(EarthDialError) as info:
        write_features(str(tmp_path / name), TWO)
    assert info.value.code == code
    assert os.listdir(tmp_path) == []


def test_a_folder_that_cannot_be_written_is_read_only(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", refuse)
    with pytest.raises(EarthDialError) as info:
        write_features(str(tmp_path / "new.gpkg"), TWO)
    assert info.value.code == ErrorCode.READ_ONLY
    assert "read-only" in info.value.message


@contextlib.contextmanager
def mounted_tmpfs(where, options):
    """A real tmpfs mounted at ``where`` (root only: skipped elsewhere)."""
    where.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def big_collection(n, text=400):
    ring = [[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]
    return collection(
        *[feature([[x + i, y] for x, y in ring], label="ship", answer="x" * text) for i in range(n)]
    )


@pytest.mark.parametrize("name", ["big.gpkg", "big.geojson", "old.gpkg"])
def test_a_real_full_disk_is_disk_full(tmp_path, name):
    with mounted_tmpfs(tmp_path / "small", "size=256k") as small:
        path = str(small / name)
        if name == "old.gpkg":
            write_features(path, TWO, "earthdial")
            before = open(path, "rb").read()
        with pytest.raises(EarthDialError) as info:
            write_features(path, big_collection(2000), "earthdial", overwrite=True)
        assert info.value.code == ErrorCode.DISK_FULL, info.value.message
        if name == "old.gpkg":
            assert open(path, "rb").read() == before
            check_two(path, "earthdial")
            assert os.listdir(small) == [name]
        else:
            assert os.listdir(small) == []


def test_a_disk_that_fills_up_inside_the_transaction_leaves_the_old_file(tmp_path):
    """Room for the scratch GeoPackage but not for copying it into the file: SQLite's own disk-full,
    rolled back."""
    big = big_collection(3000)
    probe = str(tmp_path / "probe.gpkg")
    write_features(probe, big, "earthdial")
    layer_bytes = os.path.getsize(probe)
    with mounted_tmpfs(
        tmp_path / "small", f"size={(layer_bytes * 3 // 2) // 4096 * 4096 + 4096 * 8}"
    ) as small:
        path = str(small / "old.gpkg")
        write_features(path, TWO, "earthdial")
        before = open(path, "rb").read()
        with pytest.raises(EarthDialError) as info:
            write_features(path, big, "earthdial", overwrite=True)
        assert info.value.code == ErrorCode.DISK_FULL, info.value.message
        assert "database or disk is full" in info.value.message  # SQLite's, in the transaction
        assert open(path, "rb").read() == before
        check_two(path, "earthdial")
        assert os.listdir(small) == ["old.gpkg"]


def test_a_real_read_only_folder_is_read_only(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        for name in ("new.gpkg", "new.geojson"):
            with pytest.raises(EarthDialError) as info:
                write_features(str(ro / name), TWO)
            assert info.value.code == ErrorCode.READ_ONLY, info.value.message


# A writer that holds its scratch folder's lock until told to let go (a live write in another process).
LIVE_WRITER = """
import sys
from earthdial.outputs import atomic
with atomic.scratch_folder(sys.argv[1]) as scratch:
    print(scratch, flush=True)
    sys.stdin.readline()
"""


def test_scratch_folders_of_killed_writes_are_removed_by_the_next_write(tmp_path):
    killed = tmp_path / ".earthdial-tmp-abcd1234"  # nobody holds its lock
    killed.mkdir()
    (killed / "layer.gpkg").write_bytes(b"half")
    old = tmp_path / ".earthdial-x1y2z3w4"  # an earlier version's
    old.mkdir()
    (old / "out.gpkg").write_bytes(b"half")
    users = tmp_path / ".earthdial-notes"  # not a name of ours
    users.mkdir()
    (tmp_path / ".earthdial-tmp-file0000").write_text("a file, not a folder of ours")
    live = python_child(LIVE_WRITER, str(tmp_path))
    try:
        live_scratch = live.stdout.readline().strip()
        assert os.path.isdir(live_scratch)
        write_features(str(tmp_path / "out.gpkg"), TWO)
        left = sorted(os.listdir(tmp_path))
        assert left == sorted(
            ["out.gpkg", users.name, ".earthdial-tmp-file0000", os.path.basename(live_scratch)]
        )
    finally:
        live.communicate("done\n", timeout=20)
    assert not os.path.exists(live_scratch)  # the live writer removes its own


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


def test_a_file_name_too_long_is_a_bad_request_not_internal(tmp_path) -> None:
    """Found by test_fuzz_output_paths_and_layer_names: ENAMETOOLONG was reported as `internal`."""
    import errno

    from earthdial.contract.wire import ErrorCode
    from earthdial.outputs.write_errors import write_error

    long_name = str(tmp_path / ("x" * 300 + ".gpkg"))
    error = write_error(OSError(errno.ENAMETOOLONG, "File name too long"), long_name, "writing it")
    assert error.code == ErrorCode.BAD_REQUEST and "shorter" in error.message
