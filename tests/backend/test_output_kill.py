"""A write killed (SIGKILL) at any moment leaves the GeoPackage with its old layers, or with the whole new
one: never half. The writer runs in a child process forked per trial from a process that has already
imported GDAL and built a large result, so that each trial is quick; each is killed on a state it
reaches (its scratch folder appearing, its scratch file growing, a journal or write-ahead log on the
target growing), not after a sleep."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import time
from collections.abc import Callable

import pyogrio
import pytest
from test_output import TWO, check_two, check_users_layer, user_geopackage

from conftest import python_child
from earthdial.outputs.files import check_target, write_features

N = 12000  # features of the large write: several MB, more than SQLite's page cache holds

# Forks one writer per line read ("path layer"), prints its pid, then how it ended.
ZYGOTE = """
import json, os, sys
from earthdial.outputs.files import write_features
ring = [[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]
big = {"type": "FeatureCollection", "crs": "EPSG:32633", "features": [
    {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[x + i, y] for x, y in ring]]},
     "properties": {"label": "ship", "answer": "x" * 400, "task": "refer"}} for i in range(int(sys.argv[1]))]}
print("ready", flush=True)
for line in sys.stdin:
    path, layer = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            write_features(path, big, layer, overwrite=True)
        except BaseException:
            os._exit(3)
        os._exit(0)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


@pytest.fixture(scope="module")
def zygote():
    proc = python_child(ZYGOTE, str(N))
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.stdin.close()
    proc.wait(30)


def write_and_kill(zygote, path: str, layer: str, when: Callable[[], bool]) -> bool:
    """Start a write of the large result; SIGKILL it as soon as ``when()`` holds. True when it was
    killed (False: it finished first)."""
    zygote.stdin.write(json.dumps([path, layer]) + "\n")
    zygote.stdin.flush()
    pid = int(zygote.stdout.readline())
    killed = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if when():
            os.kill(pid, signal.SIGKILL)
            killed = True
            break
        try:
            os.kill(pid, 0)
        except ProcessLookupError:  # finished and reaped
            break
        time.sleep(0.0005)
    status = int(zygote.stdout.readline())
    assert killed or status == 0, f"the writer failed (status {status})"
    return killed and os.WIFSIGNALED(status)


def scratch_files(folder: str) -> list[str]:
    return [
        os.path.join(folder, d, f)
        for d in os.listdir(folder)
        if d.startswith(".earthdial-tmp-")
        for f in os.listdir(os.path.join(folder, d))
    ]


def size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def features(path: str, layer: str) -> int:
    return pyogrio.read_info(path, layer=layer)["features"]


def check_old_or_new(path: str, old: int) -> int:
    """The file is sound, the user's layer and the other result are as they were, and the replaced
    layer has its old or its new features; returns how many."""
    con = sqlite3.connect(path)  # a read-write open rolls a killed transaction's journal back
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        con.close()
    check_users_layer(path)
    check_two(path, "first")
    count = features(path, "earthdial")
    assert count in (old, N)
    if count == 2:
        check_two(path, "earthdial")
    return count


def test_a_write_killed_at_any_point_leaves_the_old_layers(tmp_path, zygote):
    template = str(tmp_path / "template.gpkg")
    user_geopackage(template)
    write_features(template, TWO, "first")
    write_features(template, TWO, "earthdial")
    folder = str(tmp_path / "work")
    os.mkdir(folder)
    path = os.path.join(folder, "project.gpkg")
    journal = path + "-journal"
    base = size(template)
    points = {
        "scratch folder made": lambda: any(d.startswith(".earthdial-tmp-") for d in os.listdir(folder)),
        "scratch file half written": lambda: any(size(f) > 1 << 20 for f in scratch_files(folder)),
        "transaction under way": lambda: os.path.exists(journal),
        "new pages spilled into the file": lambda: os.path.exists(journal) and size(path) > base + (1 << 20),
    }
    outcomes = {}
    for name, when in points.items():
        shutil.copyfile(template, path)
        killed = write_and_kill(zygote, path, "earthdial", when)
        # the next run: rolls a killed transaction's journal back, cleans the killed one's scratch
        check_target(path, "earthdial", overwrite=True)
        assert not [d for d in os.listdir(folder) if d.startswith(".earthdial")]
        outcomes[name] = (killed, check_old_or_new(path, 2))
    # every point was reached and killed before the commit: the old layer each time
    assert outcomes == {name: (True, 2) for name in points}, outcomes
    # and a write left alone replaces it whole
    write_features(path, TWO, "earthdial", overwrite=True)
    check_two(path, "earthdial")


def test_a_geojson_write_killed_leaves_the_old_file_byte_for_byte(tmp_path, zygote):
    path = str(tmp_path / "ships.geojson")
    write_features(path, TWO)
    before = open(path, "rb").read()
    for when in (
        lambda: bool(scratch_files(str(tmp_path))),
        lambda: any(size(f) > 1 << 20 for f in scratch_files(str(tmp_path))),
    ):
        assert write_and_kill(zygote, path, "ships", when)
        assert open(path, "rb").read() == before
    assert not write_and_kill(zygote, path, "ships", lambda: False)  # left alone: replaced whole
    assert pyogrio.read_info(path)["features"] == N


# QGIS's way: a connection kept open on the GeoPackage in WAL mode, reading it now and then.
HOLDER = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1])
assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
con.execute("PRAGMA wal_autocheckpoint=0")
print("ready", flush=True)
for line in sys.stdin:
    print(con.execute('SELECT COUNT(*) FROM "earthdial"').fetchone()[0], flush=True)
"""


def test_a_write_killed_while_another_program_holds_the_file_in_wal_mode_keeps_the_old_layer(
    tmp_path, zygote
):
    path = str(tmp_path / "project.gpkg")
    user_geopackage(path)
    write_features(path, TWO, "first")
    write_features(path, TWO, "earthdial")
    holder = python_child(HOLDER, path)
    try:
        assert holder.stdout.readline().strip() == "ready"
        wal = path + "-wal"
        mid_transaction = 0
        for trial in range(15):
            write_features(path, TWO, "earthdial", overwrite=True)  # the old layer: 2 features
            if trial % 5 == 0:  # while the scratch GeoPackage is being built

                def when():
                    return any(size(f) > 1 << 20 for f in scratch_files(str(tmp_path)))
            else:  # once the transaction's pages spill into the log, before its commit
                base = size(wal)

                def when(base=base):
                    return size(wal) > base + (256 << 10)

            killed = write_and_kill(zygote, path, "earthdial", when)
            holder.stdin.write("count\n")
            holder.stdin.flush()
            seen = int(holder.stdout.readline())  # what the other program reads now
            now = check_old_or_new(path, 2)
            assert seen == now
            mid_transaction += killed and trial % 5 != 0 and now == 2
        assert mid_transaction >= 8, f"only {mid_transaction} of 12 kills landed inside the transaction"
    finally:
        holder.stdin.close()
        holder.wait(20)
