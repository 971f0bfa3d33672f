"""Reads of a user's file in a server: opened by descriptor, so a name swapped for a link
cannot lead outside the allowed folders."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from test_hostile import StatusProbe, _server, chat_request

from conftest import write_geotiff
from earthdial.contract.client import Client
from earthdial.contract.wire import EarthDialError, source_by_reference
from earthdial.geo import file_access

RENAME_EXCHANGE = 2  # renameat2 flag: swap two names atomically


def _tif(path: Path, size: int, crs: str) -> Path:
    return write_geotiff(
        path, np.ones((1, size, size), np.uint8), crs=crs, transform=from_origin(10, 50, 0.001, 0.001)
    )


def _exchange() -> object:
    """renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) through libc, or skip where it is missing."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        pytest.skip("no renameat2 in this libc")
    at_fdcwd = -100

    def swap(a: str, b: str) -> None:
        if libc.renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(), RENAME_EXCHANGE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return swap


@contextlib.contextmanager
def _swapping(a: Path, b: Path) -> Iterator[list[int]]:
    """Exchange the names a and b in a tight loop on a thread until the block ends; yields a list
    whose length is the number of swaps made."""
    swap = _exchange()
    done = threading.Event()
    count: list[int] = []

    def loop() -> None:
        while not done.is_set():
            swap(str(a), str(b))
            count.append(1)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        done.set()
        thread.join(5)


@pytest.fixture()
def outside_dir() -> Iterator[Path]:
    """A folder outside every allowed one (the test server reads pytest's temp root), holding
    `x.tif`: 16 x 16 px in EPSG:4326, unlike the 8 x 8 px EPSG:32633 file inside."""
    where = Path(tempfile.mkdtemp(prefix="earthdial-outside-"))
    _tif(where / "x.tif", 16, "EPSG:4326")
    yield where
    shutil.rmtree(where)


PLANS, GEOREFS = 500, 200


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_file_or_folder_swapped_for_a_link_never_reads_outside(
    server: str, tmp_path: Path, outside_dir: Path, what: str
) -> None:
    """The swap race: exchanging a checked file (or its folder) with a symlink to an outside one, in a
    loop, made 9 of 2 000 `plan`s and 2 of 2 000 `ask`s answer with the outside file's metadata, and
    ~35 % of racing requests `internal`. Bounded here: 500 plans and 200 georefs (which read the
    window exactly as `ask` does, without the model's time) while a thread swaps the names. No reply may
    describe the outside file; every error is typed, never `internal`."""
    inside = tmp_path / "inside"
    (inside / "sub").mkdir(parents=True)
    _tif(inside / "sub" / "x.tif", 8, "EPSG:32633")
    if what == "file":
        target, decoy = inside / "sub" / "x.tif", inside / "sub" / "decoy.tif"
        decoy.symlink_to(outside_dir / "x.tif")
    else:
        target, decoy = inside / "sub", inside / "decoy"
        decoy.symlink_to(outside_dir)
    source = source_by_reference(str(inside / "sub" / "x.tif"))
    codes: dict[str, int] = {}
    leaked: list[object] = []
    with StatusProbe(server), Client(server, timeout_s=30) as c, _swapping(target, decoy) as swaps:
        for i in range(PLANS + GEOREFS):
            try:
                if i < PLANS:
                    plan = c.plan({"task": "chat", "prompt": "what?", "source": source})
                    seen = (plan["width"], plan["height"])
                else:
                    chip = c.georef(source, "x")["chip"]
                    seen = (chip["width"], chip["height"], chip["crs"])
                codes["ok"] = codes.get("ok", 0) + 1
                if seen[0] != 8 or (len(seen) == 3 and seen[2] != "EPSG:32633"):
                    leaked.append(seen)
            except EarthDialError as exc:
                codes[exc.code] = codes.get(exc.code, 0) + 1
    assert len(swaps) > PLANS, f"the swap loop hardly ran ({len(swaps)} swaps)"
    assert not leaked, f"{len(leaked)} replies described the outside file: {leaked[:3]} ({codes})"
    assert set(codes) <= {"ok", "forbidden_path", "file_not_found"}, codes
    print(what, codes, f"{len(swaps)} swaps")
    assert codes.get("ok", 0) > 0 and codes.get("forbidden_path", 0) > 0, codes  # both sides were met


def test_links_are_not_followed_even_inside(tmp_path: Path) -> None:
    """A link inside an allowed folder to a file inside it is refused too: following it is what the
    swap above exploits; the error names the link."""
    from earthdial.geo import file_access
    from earthdial.serving import requests, service

    def ref(path: Path) -> requests.Source:
        return requests.source(source_by_reference(str(path)))

    _tif(tmp_path / "ok.tif", 8, "EPSG:32633")
    (tmp_path / "link.tif").symlink_to(tmp_path / "ok.tif")
    (tmp_path / "dirlink").symlink_to(tmp_path)
    previous = file_access.allowed_dirs()
    file_access.set_allowed_dirs([tmp_path])
    try:
        assert service.resolve_source(ref(tmp_path / "ok.tif"), []).width == 8
        for path in (tmp_path / "link.tif", tmp_path / "dirlink" / "ok.tif"):
            with pytest.raises(EarthDialError) as err:
                service.resolve_source(ref(path), [])
            assert err.value.code == "forbidden_path" and "link" in err.value.message, err.value
        with pytest.raises(EarthDialError) as err:
            service.resolve_source(ref(tmp_path / "ok.tif" / "x.tif"), [])
        assert err.value.code == "file_not_found", err.value
    finally:
        file_access.set_allowed_dirs(previous)


# --------------------------------------------------------------------------------------------------
# Reader processes: an open that never ends is killed, the server goes on
# --------------------------------------------------------------------------------------------------


def test_an_open_that_blocks_for_good_is_killed_and_the_server_keeps_answering(
    tmp_path: Path, outside_dir: Path
) -> None:
    """A GeoTIFF whose own CRS names a grid FIFO froze the server for good: GDAL opens the
    file and PROJ the grid, which blocks until someone writes to it. The byte checks that refuse such a
    file are turned off for this server (EARTHDIAL_UNSAFE_SKIP_FILE_PRECHECKS, honoured for tests only),
    so that the reader process is all that stands between the FIFO and the server: its open blocks,
    past --read-timeout it is killed and replaced, the request gets `timeout`, `status` answers within
    1 s throughout, and the next request is read by the new reader."""
    from test_hostile import geotiff_with_pe_citation, pe_citations

    os.mkfifo(outside_dir / "grid.gsb")  # outside the allowed folders; nobody writes to it
    citation = pe_citations(str(outside_dir / "grid.gsb"))["wkt1 PROJ4_GRIDS"]
    trap = str(geotiff_with_pe_citation(tmp_path / "trap.tif", citation))
    fine = str(_tif(tmp_path / "fine.tif", 8, "EPSG:32633"))
    os.environ[file_access.SKIP_PRECHECKS] = "1"  # inherited by the server and its readers
    try:
        context = _server("--read-timeout", "2", "--readers", "1")
        endpoint, _ = context.__enter__()
    finally:
        del os.environ[file_access.SKIP_PRECHECKS]
    try:
        with StatusProbe(endpoint), Client(endpoint, timeout_s=30) as c:
            for op in ("plan", "georef"):
                with pytest.raises(EarthDialError) as err:
                    c.request(chat_request(op, source_by_reference(trap)))
                assert err.value.code == "timeout" and "--read-timeout" in err.value.message, (op, err.value)
                assert (
                    c.plan({"task": "chat", "prompt": "what?", "source": source_by_reference(fine)})["width"]
                    == 8
                )
            assert c.georef(source_by_reference(fine), "x")["chip"]["width"] == 8
    finally:
        context.__exit__(None, None, None)


def test_a_reader_s_address_space_is_bounded_by_the_pixel_budget(tmp_path: Path) -> None:
    """Each reader runs under RLIMIT_AS: what it holds when ready plus the pixel budget (8 bytes a
    pixel) and the headroom; a read it cannot allocate fails in the reader, not in the server."""
    from earthdial import limits
    from earthdial.geo import imagery
    from earthdial.serving import readers

    path = str(_tif(tmp_path / "x.tif", 8, "EPSG:32633"))
    previous = file_access.allowed_dirs()
    file_access.set_allowed_dirs([tmp_path])
    pool = readers.ReaderPool(1, limits.Limits(max_pixels=1_000_000))
    try:
        assert pool.describe(path).width == 8  # the reader is up and reads by descriptor
        (reader,) = pool._idle
        with open(f"/proc/{reader.proc.pid}/limits") as f:
            line = next(x for x in f if x.startswith("Max address space"))
        soft = int(line.split()[3])
        with open(f"/proc/{reader.proc.pid}/status") as f:
            size = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmSize:"))
        assert size < soft <= size + readers.MEMORY_HEADROOM + 8 * 1_000_000 + 256 * limits.MIB, (size, soft)
        assert imagery.use_readers(None) is None  # the pool is used only where a server installs it
    finally:
        pool.close()
        file_access.set_allowed_dirs(previous)


def test_a_scan_s_tiles_are_read_in_a_reader_that_keeps_the_file_open_until_it_changes(
    tmp_path: Path,
) -> None:
    """A scan's tiles come from a reader process, which keeps the raster open from one tile to the next
    (reopening per tile loses GDAL's block cache) but never serves a file that was replaced or rewritten
    under the same name since: a second scan after the file changed reads the new pixels."""
    from rasterio.windows import Window

    from earthdial import limits
    from earthdial.geo import imagery
    from earthdial.serving import readers

    path = tmp_path / "scene.tif"
    _tif(path, 64, "EPSG:32633")  # all ones
    previous = file_access.allowed_dirs()
    file_access.set_allowed_dirs([tmp_path])
    pool = readers.ReaderPool(1, limits.Limits())
    before = imagery.use_readers(pool)
    try:
        area = imagery.scan_grid(str(path), [1], None, None)
        assert area.region == (0, 0, 64, 64) and area.crs == "EPSG:32633"
        tiles = [imagery.read_tile(str(path), [1], Window(c, 0, 32, 32), 16, 16) for c in (0, 32)]
        assert all(t.data.shape == (1, 16, 16) and (t.data == 1).all() for t in tiles)
        assert tiles[1].transform.c == 10 + 32 * 0.001  # the tile's own grid
        with rasterio.open(path, "r+") as dst:  # rewritten in place: new pixels, new mtime
            dst.write(np.full((1, 64, 64), 7, np.uint8))
        os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
        assert (imagery.read_tile(str(path), [1], Window(0, 0, 32, 32), 16, 16).data == 7).all()
    finally:
        imagery.use_readers(before)
        pool.close()
        file_access.set_allowed_dirs(previous)


def _until(condition, seconds: float) -> bool:
    """Whether `condition()` became true within `seconds` (polled; the state is in another process)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def test_a_stopped_scan_kills_the_tile_read_it_waits_for(
    tmp_path: Path, outside_dir: Path, monkeypatch
) -> None:
    """A scan that is cancelled (or past its deadline) closes its read-ahead; a tile read it was waiting
    for in a reader process is killed then, not left to run to --read-timeout. The tile here is of a
    file whose CRS names a grid FIFO, with the byte checks off (EARTHDIAL_UNSAFE_SKIP_FILE_PRECHECKS,
    for tests only), so the reader's open blocks for good."""
    from rasterio.windows import Window
    from test_hostile import geotiff_with_pe_citation, pe_citations

    from earthdial import limits
    from earthdial.geo import imagery
    from earthdial.scenes import runner as scenes
    from earthdial.serving import readers

    os.mkfifo(outside_dir / "grid.gsb")
    trap = str(
        geotiff_with_pe_citation(
            tmp_path / "trap.tif", pe_citations(str(outside_dir / "grid.gsb"))["wkt1 PROJ4_GRIDS"]
        )
    )
    monkeypatch.setenv(file_access.SKIP_PRECHECKS, "1")  # inherited by the readers started below
    previous = file_access.allowed_dirs()
    file_access.set_allowed_dirs([tmp_path])
    pool = readers.ReaderPool(1, limits.Limits(read_timeout_s=600))
    before = imagery.use_readers(pool)
    try:
        assert _until(lambda: len(pool._idle) == 1, 60)  # the reader is up
        tiles = (imagery.read_tile(trap, [1], Window(0, 0, 8, 8), 8, 8) for _ in range(1))
        ahead = scenes.ReadAhead(tiles, 1)  # its thread takes the reader and blocks in its open
        assert _until(lambda: not pool._idle, 10)
        ahead.close()
        assert _until(lambda: pool.killed == 1, 5), "the blocked read was not stopped"
        assert _until(lambda: len(pool._idle) == 1, 60)  # and a new reader took its place
    finally:
        imagery.use_readers(before)
        pool.close()
        file_access.set_allowed_dirs(previous)
