"""Hostile input, second round (the second adversarial run of docs/security.md): each finding's attack,
scaled to seconds, against a real `earthdial serve` over loopback ZeroMQ; `status` must keep answering
within 1 s throughout."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import (
    TILES_224,
    demo_model_args,
    free_port,
    grid_outside,
    nobody_called,
    run_earthdial,
    start_server,
    stop_server,
    write_geotiff,
)
from earthdial.contract.client import Client
from earthdial.contract.wire import EarthDialError, source_by_reference, source_by_value

STATUS_WITHIN_S = 1.0
ANSWER = "<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box>"


class StatusProbe:
    """Asks `status` every 0.1 s on its own connection while an attack runs; every reply must come
    within STATUS_WITHIN_S (a frozen I/O loop answers none)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with Client(self.endpoint, timeout_s=STATUS_WITHIN_S) as c:
            while not self._stop.is_set():
                t = time.monotonic()
                try:
                    c.status(timeout_s=STATUS_WITHIN_S)
                    self.latencies.append(time.monotonic() - t)
                except Exception as exc:  # a timeout (or anything else) is a missed probe
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    return  # the client's socket is in an unknown state after a timeout
                self._stop.wait(0.1)

    def __enter__(self) -> StatusProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        assert not self.failures, f"status missed while under attack: {self.failures}"
        assert self.latencies and max(self.latencies) < STATUS_WITHIN_S, self.latencies


# --------------------------------------------------------------------------------------------------
# 1: a raster's own CRS names a grid file (a FIFO outside the allowed folders)
# --------------------------------------------------------------------------------------------------


def hand_geotiff(
    path: Path,
    geokeys: list[int],
    text: str = "",
    size: int = 8,
    scale: tuple[float, float] = (10.0, 10.0),
    matrix: list[float] | None = None,
    doubles: list[float] | None = None,
) -> Path:
    """A little-endian uncompressed uint8 GeoTIFF written byte by byte: `geokeys` (GeoKeyDirectory
    entries, 4 values each) and GeoAsciiParams `text`; georeferenced by a pixel scale and a tie point,
    or by a ModelTransformation `matrix` (16 values); GeoDoubleParams `doubles`. Any value, NaN and 0
    included, is written as is."""
    ascii_params = text.encode("latin-1") + b"\0"
    directory = [1, 1, 0, len(geokeys) // 4, *geokeys]
    pixels = bytes(size * size)
    tags: list[tuple[int, int, int, bytes]] = []

    def add(tag: int, kind: int, values: list | bytes) -> None:
        if kind == 2:
            tags.append((tag, kind, len(values), bytes(values)))
        else:
            code = {3: "H", 4: "I", 12: "d"}[kind]
            tags.append((tag, kind, len(values), struct.pack(f"<{len(values)}{code}", *values)))

    for tag, value in ((256, size), (257, size), (258, 8), (259, 1), (262, 1), (277, 1), (278, size)):
        add(tag, 3, [value])
    add(273, 4, [0])  # strip offset, set below
    add(279, 4, [len(pixels)])
    if matrix is None:
        add(33550, 12, [scale[0], scale[1], 0.0])
        add(33922, 12, [0.0, 0.0, 0.0, 500_000.0, 4_000_000.0, 0.0])
    else:
        add(34264, 12, matrix)
    add(34735, 3, directory)
    if doubles:
        add(34736, 12, doubles)  # GeoDoubleParams
    if text:
        add(34737, 2, ascii_params)
    tags.sort()
    data_at = 8 + 2 + 12 * len(tags) + 4
    blobs, entries = bytearray(pixels), b""
    for tag, kind, count, value in tags:
        if tag == 273:
            value = struct.pack("<I", data_at)
        if len(value) <= 4:
            entries += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0")
        else:
            if len(blobs) % 2:
                blobs += b"\0"
            entries += struct.pack("<HHII", tag, kind, count, data_at + len(blobs))
            blobs += value
    path.write_bytes(b"II*\0" + struct.pack("<IH", 8, len(tags)) + entries + b"\0\0\0\0" + bytes(blobs))
    return path


UTM33_KEYS = [1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633]  # projected, pixel is area, EPSG:32633


def geotiff_with_pe_citation(path: Path, citation: str, size: int = 8) -> Path:
    """A GeoTIFF whose GeoKeys make GDAL build its CRS from an ESRI PE citation: a user-defined model
    type and `PCSCitationGeoKey` holding `citation` (what ArcGIS writes for CRSs it has no code for)."""
    text = citation + "|"
    return hand_geotiff(path, [1024, 0, 1, 32767, 1025, 0, 1, 1, 3073, 34737, len(text), 0], text, size)


_GEOG = (
    'GEOGCS["GCS_WGS_1984",DATUM["D_WGS_1984",SPHEROID["WGS_1984",6378137.0,298.257223563]{ext}],'
    'PRIMEM["Greenwich",0.0],UNIT["Degree",0.0174532925199433]]'
)
_PROJ = (
    'PROJCS["UTM33",{geog},PROJECTION["Transverse_Mercator"],PARAMETER["False_Easting",500000.0],'
    'PARAMETER["False_Northing",0.0],PARAMETER["Central_Meridian",15.0],PARAMETER["Scale_Factor",0.9996],'
    'PARAMETER["Latitude_Of_Origin",0.0],UNIT["Meter",1.0]]'
)
_BOUND = (
    'BOUNDCRS[SOURCECRS[GEOGCRS["WGS 84",DATUM["World Geodetic System 1984",ELLIPSOID["WGS 84",6378137,'
    '298.257223563]],CS[ellipsoidal,2],AXIS["lat",north],AXIS["lon",east],ANGLEUNIT["degree",0.0174532925199433]]],'
    'TARGETCRS[GEOGCRS["WGS 84",DATUM["World Geodetic System 1984",ELLIPSOID["WGS 84",6378137,298.257223563]],'
    'CS[ellipsoidal,2],AXIS["lat",north],AXIS["lon",east],ANGLEUNIT["degree",0.0174532925199433]]],'
    'ABRIDGEDTRANSFORMATION["t",METHOD["NTv2",ID["EPSG",9615]],'
    'PARAMETERFILE["Latitude and longitude difference file","{grid}"]]]'
)


def pe_citations(grid: str) -> dict[str, str]:
    return {
        "wkt1 PROJ4_GRIDS": "ESRI PE String = "
        + _PROJ.format(geog=_GEOG.format(ext=f',EXTENSION["PROJ4_GRIDS","{grid}"]')),
        "wkt2 PARAMETERFILE": "ESRI PE String = " + _BOUND.format(grid=grid),
    }


@pytest.fixture()
def outside_fifo() -> Iterator[str]:
    """A FIFO outside every allowed folder that nobody writes to: opening it blocks for good."""
    where = Path(tempfile.mkdtemp(prefix="earthdial-outside-"))
    os.mkfifo(where / "grid.gsb")
    yield str(where / "grid.gsb")
    shutil.rmtree(where)


def test_a_grid_fifo_named_in_a_raster_s_own_crs_is_refused_and_the_server_keeps_answering(
    server: str, tmp_path: Path, outside_fifo: str
) -> None:
    """The critical finding of that run: `plan` froze the I/O loop and `ask` the worker in PROJ's open of
    the FIFO, for good (no status, ping, cancel; SIGTERM ignored)."""
    with StatusProbe(server), Client(server, timeout_s=10) as c:
        for name, citation in pe_citations(outside_fifo).items():
            tif = str(geotiff_with_pe_citation(tmp_path / f"{name.replace(' ', '_')}.tif", citation))
            source = source_by_reference(tif)
            for op in ("plan", "ask"):
                with pytest.raises(EarthDialError) as err:
                    c.request({"op": op, "task": "refer", "prompt": "ships", "source": source})
                assert err.value.code == "bad_crs", (name, op, err.value)


def test_a_grid_file_in_a_raster_s_crs_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    """With a regular file as the grid, its access time changed before the `bad_crs` reply: the check
    ran after GDAL/PROJ had opened it. Now the file is never read."""
    from earthdial.geo import file_access
    from earthdial.serving import requests, service

    grid, inside, past = grid_outside(tmp_path)
    previous = file_access.allowed_dirs()
    file_access.set_allowed_dirs([inside])
    try:
        for name, citation in pe_citations(str(grid)).items():
            tif = geotiff_with_pe_citation(inside / "x.tif", citation)
            with pytest.raises(EarthDialError) as err:
                service.resolve_source(requests.source(source_by_reference(str(tif))), [])
            assert err.value.code == "bad_crs", (name, err.value)
    finally:
        file_access.set_allowed_dirs(previous)
    assert os.stat(grid).st_atime == past


def test_a_pe_citation_naming_no_file_still_opens(tmp_path: Path) -> None:
    """The refusal is about files, not about ESRI citations: a plain PE string georeferences as before."""
    from earthdial.geo import file_access
    from earthdial.serving import requests, service

    tif = geotiff_with_pe_citation(
        tmp_path / "pe.tif", "ESRI PE String = " + _PROJ.format(geog=_GEOG.format(ext=""))
    )
    previous = file_access.allowed_dirs()
    file_access.set_allowed_dirs([tmp_path])
    try:
        chip = service.resolve_source(requests.source(source_by_reference(str(tif))), [])
    finally:
        file_access.set_allowed_dirs(previous)
    assert chip.width == 8 and chip.crs not in ("", "EPSG:4326")


@contextlib.contextmanager
def _server(*extra: str, model: Path | None = None) -> Iterator[tuple[str, object]]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(model, endpoint, extra=extra)
    try:
        yield endpoint, proc
    finally:
        stop_server(proc)


# --------------------------------------------------------------------------------------------------
# 5: unfinished multipart messages
# --------------------------------------------------------------------------------------------------


def _rss_mb(pid: int, field: str = "VmRSS:") -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith(field))
    return int(line.split()[1]) / 1024


def _zmtp_dealer(port: int) -> socket.socket:
    """A raw ZMTP 3.0 peer (NULL mechanism, socket type DEALER) that writes frames by hand."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\x00" + bytes(31))
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    sock.sendall(b"\x04" + bytes([len(ready)]) + ready)
    return sock


def test_an_unfinished_multipart_message_is_bounded_in_total() -> None:
    """A peer sending 512 MiB frames with MORE set and never the last one took the server from 0.94 to
    4.6 GB after 8 frames: libzmq's limit is per frame. Scaled: 16 MiB frames against an 8 MiB queue
    budget; the server ends the connection once it holds more than the budget."""
    frame = 16 << 20
    with _server("--max-queue-mb", "8") as (endpoint, proc):
        port = int(endpoint.rsplit(":", 1)[1])
        before = _rss_mb(proc.pid)
        sent = 0
        with StatusProbe(endpoint):
            peer = _zmtp_dealer(port)
            payload = bytes(frame)
            try:
                for _ in range(32):  # 512 MiB in all, if nobody stops it
                    peer.sendall(b"\x03" + struct.pack(">Q", frame) + payload)
                    sent += frame
            except OSError:  # the server ended the connection
                pass
            finally:
                peer.close()
            with Client(endpoint, timeout_s=20) as c:  # a request within the budget still goes through
                pixels = np.zeros((3, 1024, 1024), np.uint8)
                assert c.georef(
                    source_by_value((10, 0, 500_000, 0, -10, 4_000_000), "EPSG:32633"), ANSWER, pixels=pixels
                )["ok"]
        grew = _rss_mb(proc.pid, "VmHWM:") - before
    assert sent < 256 << 20, f"the server took {sent >> 20} MiB of one unfinished message"
    assert grew < 200, f"the server grew by {grew:.0f} MB"


# --------------------------------------------------------------------------------------------------
# 7: streamed scans that never send tiles
# --------------------------------------------------------------------------------------------------


def _small_tif(path: Path, size: int = 300) -> Path:
    return write_geotiff(path, np.random.default_rng(0).integers(0, 255, (3, size, size), dtype=np.uint8))


def _stream_detect(band_count: int = 3) -> dict:
    source = {
        "kind": "stream",
        "width": 2000,
        "height": 2000,
        "band_count": band_count,
        "dtype": "uint8",
        "transform": [1, 0, 500_000, 0, -1, 4_000_000],
        "crs": "EPSG:32633",
        "name": "never sent",
    }
    return {
        "op": "detect",
        "task": "refer",
        "prompt": "ships",
        "source": source,
        "options": {"tile_size": 224, "overlap": 0, "batch": 2},
    }


def test_streamed_scans_that_send_no_tiles_time_out_and_free_their_slots(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """4 stream detects with no tiles held all 4 scan slots for minutes; every other detect timed out."""
    tif = _small_tif(tmp_path / "scene.tif")
    with _server("--stream-timeout", "1", model=tiny_checkpoint) as (endpoint, _), StatusProbe(endpoint):
        errors: list[EarthDialError] = []

        def stuck() -> None:
            with Client(endpoint, timeout_s=30) as c:
                try:
                    c.request(_stream_detect(), progress=lambda ev: None)
                except EarthDialError as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=stuck) for _ in range(4)]
        for t in threads:
            t.start()
        with Client(endpoint, timeout_s=60) as c:
            header = {
                "op": "detect",
                "task": "refer",
                "prompt": "ships",
                "source": source_by_reference(str(tif)),
                "options": {"tile_size": 224, "overlap": 0, "batch": 2},
            }
            assert c.scan(header)["tiles"] == 4  # another client's scan gets a slot
            for t in threads:
                t.join(30)
            assert len(errors) == 4
            assert all(e.code == "timeout" and "--stream-timeout" in e.message for e in errors), errors
            assert c.status()["running"] == 0
            with pytest.raises(EarthDialError) as err:  # declared bands are capped like any source's
                c.request(_stream_detect(band_count=10**6))
            assert err.value.code == "too_large" and "--max-bands" in err.value.message


# --------------------------------------------------------------------------------------------------
# 8: GDAL virtual file systems in paths from STAC items, list files and stored requests
# --------------------------------------------------------------------------------------------------


def _vsi_paths(port: int) -> list[str]:
    url = f"http://127.0.0.1:{port}/scene.tif"
    return [
        f"/vsicurl/{url}",
        f"/vsicurl?url={url}",
        f"/vsicurl_streaming/{url}",
        f"//vsicurl/{url}",
        f"file:///vsicurl/{url}",
    ]


def test_detect_many_refuses_vsi_hrefs_and_sends_no_request(
    tmp_path: Path, http_listener, monkeypatch
) -> None:
    """detect-many's workers sent HEAD/GET to a loopback listener for STAC hrefs `/vsicurl/http://...`."""
    import json

    from earthdial.jobs import archive, many
    from earthdial.training import DEMO_DIR

    port, listener = http_listener
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "2")  # before the fix: GDAL waits on the silent listener
    paths = _vsi_paths(port)
    items = [
        {"type": "Feature", "id": f"item{k}", "assets": {"visual": {"href": p}}} for k, p in enumerate(paths)
    ]
    stac = tmp_path / "items.json"
    stac.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths) + "\n")
    scenes = archive.scenes_of([paths[0]], [str(listing)], [str(stac)])
    runnable = [s for s in scenes if s.error is None]
    if runnable:  # what a worker would do with them (only before the fix)
        from earthdial.model.engine import Engine

        engine = Engine(str(DEMO_DIR), device="cpu")
        for s in runnable:
            with contextlib.suppress(Exception):
                many.detect_scene(many.scene_header(s.path, "refer", "ships", {"tile_size": 224}), engine)
    assert nobody_called(listener)
    assert scenes and all(s.error is not None and s.error.code == "forbidden_path" for s in scenes), [
        (s.path, s.error) for s in scenes
    ]


def test_export_training_refuses_a_vsi_or_fifo_request_path(tmp_path: Path, http_listener) -> None:
    """`export-training` followed a stored `request` naming `/vsicurl` (HTTP HEAD) or a FIFO (hung)."""
    from earthdial.training import export

    port, listener = http_listener
    os.mkfifo(tmp_path / "fifo.tif")
    cases = [(p, "forbidden_path") for p in _vsi_paths(port)[:3]] + [
        (str(tmp_path / "fifo.tif"), "not_a_raster")
    ]
    for path, code in cases:
        outcome: list[BaseException] = []

        def read(path: str = path, outcome: list[BaseException] = outcome) -> None:
            try:
                export._read_chip({"task": "refer", "sources": [{"path": path}]}, "layer")
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=read, daemon=True)
        worker.start()
        worker.join(5)
        assert not worker.is_alive(), f"reading {path} blocked"
        assert outcome and isinstance(outcome[0], EarthDialError) and outcome[0].code == code, (path, outcome)
    assert nobody_called(listener)


# --------------------------------------------------------------------------------------------------
# 10: outputs of the CLI
# --------------------------------------------------------------------------------------------------


def _detect_to(output: Path, scene: Path) -> subprocess.CompletedProcess:
    return run_earthdial(
        "detect",
        str(scene),
        "--task",
        "refer",
        "--prompt",
        "ships",
        *demo_model_args(),
        *TILES_224,
        "-o",
        str(output),
    )


@pytest.mark.parametrize("disk", ["read-only", "full"])
def test_detect_o_on_a_read_only_or_full_disk_is_a_typed_error_and_leaves_no_journal(
    tmp_path: Path, disk: str
) -> None:
    """`detect -o` printed a traceback from the journal (and left a partial .scan.jsonl)."""
    from test_output import mounted_tmpfs

    scene = _small_tif(tmp_path / "scene.tif", 224)
    options = "ro,size=64k" if disk == "read-only" else "size=64k"
    with mounted_tmpfs(tmp_path / "mnt", options) as mnt:
        if disk == "full":
            with open(mnt / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
                while True:
                    f.write(bytes(4096))
        before = sorted(os.listdir(mnt))
        done = _detect_to(mnt / "out.gpkg", scene)
        after = sorted(os.listdir(mnt))
    code = "read_only" if disk == "read-only" else "disk_full"
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert code in done.stderr, done.stderr
    assert after == before  # no journal, no scratch folder, no output


CONCURRENT_WRITER = """
import json, sys
from earthdial.outputs import files as output
collection = json.loads(sys.argv[2])
sys.stdin.readline()  # all writers start together
print(output.write_features(sys.argv[1], collection), flush=True)
"""


def test_concurrent_writes_with_default_names_all_land_under_unique_names(tmp_path: Path) -> None:
    """Six concurrent `ask -o` into one GeoPackage with default names: 1 wrote, 5 exited `output_exists`
    and their answers were lost (docs/outputs.md promises `_2`, `_3`, ...)."""
    import json

    import pyogrio
    from test_output import TWO

    path = tmp_path / "project.gpkg"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_WRITER, str(path), json.dumps(TWO)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    for w in writers:  # each has imported GDAL and waits: start them all at once
        w.stdin.write("\n")
    for w in writers:
        w.stdin.close()
    results = [(w.wait(120), w.stdout.read().strip(), w.stderr.read()[-300:]) for w in writers]
    assert all(rc == 0 for rc, _, _ in results), results
    names = sorted(name for _, name, _ in results)
    base = min(names, key=len)
    assert names == sorted([base, *(f"{base}_{k}" for k in range(2, 7))]), names
    assert sorted(n for n, _ in pyogrio.list_layers(path)) == names


# --------------------------------------------------------------------------------------------------
# 12: bad values are typed errors, never `internal`
# --------------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
_UTM_UNIT0 = (
    'PROJCRS["x",BASEGEOGCRS["WGS 84",DATUM["World Geodetic System 1984",ELLIPSOID["WGS 84",6378137,'
    '298.257223563]]],CONVERSION["UTM zone 33N",METHOD["Transverse Mercator",ID["EPSG",9807]],'
    'PARAMETER["Latitude of natural origin",0,ANGLEUNIT["degree",0.0174532925199433]],'
    'PARAMETER["Longitude of natural origin",15,ANGLEUNIT["degree",0.0174532925199433]],'
    'PARAMETER["Scale factor at natural origin",0.9996,SCALEUNIT["unity",1]],'
    'PARAMETER["False easting",500000,LENGTHUNIT["metre",1]],PARAMETER["False northing",0,LENGTHUNIT["metre",1]]],'
    'CS[Cartesian,2],AXIS["easting",east],AXIS["northing",north],LENGTHUNIT["metre",0]]'
)
_GEOG_VALUES = 'GEOGCS["x",DATUM["d",SPHEROID["WGS 84",6378137,298.257223563]{towgs}],PRIMEM["Greenwich",0],UNIT["degree",{unit}]]'
BAD_CRSS = {
    "WKT2 length unit 0": _UTM_UNIT0,
    "TOWGS84 1e308": _GEOG_VALUES.format(
        towgs=",TOWGS84[1e308,1e308,1e308,0,0,0,0]", unit="0.0174532925199433"
    ),
    "angle unit 0": _GEOG_VALUES.format(towgs="", unit="0"),
}


def _bad_rasters(root: Path) -> dict[str, Path]:
    m = [0.0] * 4 + [0.0] * 4 + [0.0] * 8  # ModelTransformation rows
    user_datum = [
        1024,
        0,
        1,
        2,
        1025,
        0,
        1,
        1,
        2048,
        0,
        1,
        32767,
        2050,
        0,
        1,
        32767,
        2056,
        0,
        1,
        7030,
        2054,
        0,
        1,
        9102,
        2062,
        34736,
        3,
        0,
    ]
    degrees_far_off = [1024, 0, 1, 2, 1025, 0, 1, 1, 2048, 0, 1, 4326]
    singular = [1, 2, 0, 500_000, 2, 4, 0, 4_000_000, *m[8:15], 1]
    nan_matrix = [NAN, 0, 0, 500_000, 0, -10, 0, 4_000_000, *m[8:15], 1]
    return {
        "NaN scale": hand_geotiff(root / "nan.tif", UTM33_KEYS, scale=(NAN, 10.0)),
        "inf scale": hand_geotiff(root / "inf.tif", UTM33_KEYS, scale=(INF, 10.0)),
        "singular matrix": hand_geotiff(root / "singular.tif", UTM33_KEYS, matrix=singular),
        "NaN matrix": hand_geotiff(root / "nanmatrix.tif", UTM33_KEYS, matrix=nan_matrix),
        "1e308 scale": hand_geotiff(root / "huge.tif", UTM33_KEYS, scale=(1e308, 1e308)),
        "1e-320 scale": hand_geotiff(root / "tiny.tif", UTM33_KEYS, scale=(1e-320, 1e-320)),
        "own TOWGS84 1e308": hand_geotiff(
            root / "towgs.tif", user_datum, scale=(0.001, 0.001), doubles=[1e308] * 3
        ),
        "degrees far off the globe": hand_geotiff(root / "far.tif", degrees_far_off, scale=(0.001, 0.001)),
    }


def test_bad_values_are_typed_errors_never_internal(server: str, tmp_path: Path) -> None:
    """NaN/inf/singular geotransforms, WKT2 with unit 0, a TOWGS84[1e308...], a 10**400 bound: `internal`
    (the code for our bugs) instead of a typed error."""
    ok = hand_geotiff(tmp_path / "ok.tif", UTM33_KEYS)
    answer = "<ref>a</ref><box>[[0, 0, 500, 500]]</box>"
    pixels = np.zeros((3, 8, 8), np.uint8)
    by_value = source_by_value((10, 0, 500_000, 0, -10, 4_000_000), "EPSG:32633")
    cases: list[tuple[str, dict, list, set[str]]] = []
    for name, path in _bad_rasters(tmp_path).items():
        cases.append((name, source_by_reference(str(path)), [], {"not_a_raster", "bad_crs", "ok"}))
    for name, crs in BAD_CRSS.items():
        cases.append(
            (
                f"bounds in {name}",
                {**source_by_reference(str(ok)), "bounds": [10, 10, 20, 20], "crs": crs},
                [],
                {"bad_crs"},
            )
        )
        cases.append((f"pixels in {name}", {**by_value, "crs": crs}, [pixels], {"bad_crs"}))
    huge = 10**400
    cases += [
        ("a 10**400 bound", {**source_by_reference(str(ok)), "bounds": [0, 0, huge, 1]}, [], {"bad_request"}),
        (
            "a 10**400 transform term",
            {**by_value, "transform": [huge, 0, 0, 0, -10, 0]},
            [pixels],
            {"bad_request"},
        ),
        ("a 10**400 nodata", {**by_value, "nodata": huge}, [pixels], {"bad_request"}),
        ("a 10**400 band", {**source_by_reference(str(ok)), "bands": [huge]}, [], {"bad_request"}),
    ]
    seen = []
    with StatusProbe(server), Client(server, timeout_s=20) as c:
        for name, source, arrays, codes in cases:
            for header in (
                {"op": "georef", "answer": answer, "source": source},
                {"op": "plan", "task": "refer", "prompt": "ships", "source": source},
            ):
                try:
                    c.request(header, arrays)
                    code = "ok"
                except EarthDialError as exc:
                    code = exc.code
                seen.append((name, header["op"], code))
                assert code in codes, (name, header["op"], code, codes)
    assert not [s for s in seen if s[2] == "internal"]


# --------------------------------------------------------------------------------------------------
# 6: block size in the read cost
# --------------------------------------------------------------------------------------------------


def _blocky_tif(path: Path, size: int, **layout: Any) -> Path:
    return write_geotiff(path, np.zeros((3, size, size), np.uint8), compress="DEFLATE", **layout)


def test_big_blocks_count_in_the_pixel_budget(tmp_path: Path) -> None:
    """A 7 MB file with 24 576 px tiles: a 10 x 10 px ask took the server from 0.42 to 2.80 GB; a
    one-strip DEFLATE 100 000 px TIFF: a 100 x 100 window at the last row decoded ~10 G px. Scaled: a
    budget of 1 M px, one 2 048 px tile, a one-strip 2 048 px file."""
    tiles = _blocky_tif(tmp_path / "tile.tif", 2048, tiled=True, blockxsize=2048, blockysize=2048)
    strip = _blocky_tif(tmp_path / "strip.tif", 2048, blockysize=2048)
    small = _blocky_tif(tmp_path / "small.tif", 2048, tiled=True, blockxsize=256, blockysize=256)
    answer = "<ref>a</ref><box>[[0, 0, 500, 500]]</box>"

    def window(path: Path, row: int) -> dict:
        top = 4_000_000 - row
        return {
            **source_by_reference(str(path)),
            "bounds": [500_000, top - 10, 500_010, top],
            "crs": "EPSG:32633",
        }

    with (
        _server("--max-pixels", "1000000") as (endpoint, _),
        StatusProbe(endpoint),
        Client(endpoint, timeout_s=20) as c,
    ):
        for path, row in ((tiles, 0), (strip, 2038)):
            with pytest.raises(EarthDialError) as err:
                c.georef(window(path, row), answer)
            assert err.value.code == "too_large" and "--max-pixels" in err.value.message, (
                path.name,
                err.value,
            )
        assert c.georef(window(small, 1000), answer)["ok"]  # 256 px tiles: 1 tile of 65 536 px x 3 bands
        assert c.georef(window(strip, 0), answer)["ok"]  # the strip's first rows: decoded from its top


# --------------------------------------------------------------------------------------------------
# 4: `plan` samples pixels on the I/O loop
# --------------------------------------------------------------------------------------------------


def test_plans_of_a_big_png_do_not_freeze_the_io_loop(server: str, tmp_path: Path) -> None:
    """One `plan` on a 65 500 px one-band PNG froze the I/O loop 5.3 s (its central sample decodes
    every row above it); ten pipelined: 20 of 30 status probes failed. Scaled: 16 000 px, ten plans."""
    import rasterio
    from rasterio.io import MemoryFile

    size = 16_000
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=size, height=size, count=1, dtype="uint8") as tmp:
            tmp.write(np.zeros((1, size, size), np.uint8))
            png = tmp_path / "big.png"
            with rasterio.open(
                png, "w", driver="PNG", width=size, height=size, count=1, dtype="uint8"
            ) as dst:
                dst.write(tmp.read())
    header = {"task": "chat", "prompt": "what is this?", "source": source_by_reference(str(png))}
    with StatusProbe(server):
        clients = [Client(server, timeout_s=60) for _ in range(10)]
        try:
            threads = [threading.Thread(target=c.plan, args=(header,)) for c in clients]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        finally:
            for c in clients:
                c.close()
    with Client(server, timeout_s=60) as c:
        assert c.plan(header)["preset"]  # still answered, from the first rows' sample


# --------------------------------------------------------------------------------------------------
# 3: a TIFF of very many image directories
# --------------------------------------------------------------------------------------------------


def many_ifd_geotiff(path: Path, extra: int) -> Path:
    """A small GeoTIFF followed by `extra` 1 x 1 px reduced-resolution images (overview directories),
    chained after its own: GDAL reads every one of them when it lists the file's overviews."""
    hand_geotiff(path, UTM33_KEYS)
    data = bytearray(path.read_bytes())
    (count,) = struct.unpack_from("<H", data, 8)
    link = 8 + 2 + 12 * count  # where the first directory names the next one
    tags = (
        (254, 4, 1),
        (256, 3, 1),
        (257, 3, 1),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 0),
        (277, 3, 1),
        (278, 3, 1),
        (279, 4, 1),
    )
    size = 2 + 12 * len(tags) + 4
    start = len(data) + (len(data) % 2)
    pixel = start + extra * size  # one shared byte of pixels
    chain = bytearray()
    for k in range(extra):
        at = start + k * size
        chain += struct.pack("<H", len(tags))
        for tag, kind, value in tags:
            value = pixel if tag == 273 else value
            chain += struct.pack("<HHI", tag, kind, 1) + struct.pack("<I" if kind == 4 else "<Hxx", value)
        chain += struct.pack("<I", at + size if k + 1 < extra else 0)
    struct.pack_into("<I", data, link, start)
    path.write_bytes(bytes(data) + bytes(start - len(data)) + bytes(chain) + b"\0")
    return path


def chat_request(op: str, source: dict) -> dict:
    """A `plan` or `georef` (by `op`) of a chat on `source`: both open the file."""
    return {"op": op, "task": "chat", "prompt": "what?", "answer": "x", "source": source}


def test_a_tiff_of_very_many_directories_is_refused_before_gdal_lists_them(
    server: str, tmp_path: Path
) -> None:
    """1 M 1 x 1 overview directories: `plan` froze the I/O loop 36 s (1.2 -> 3.8 GB), `ask` gave no reply
    in 300 s. Scaled: 100 000 directories (13 MB)."""
    tif = many_ifd_geotiff(tmp_path / "ifds.tif", 100_000)
    few = many_ifd_geotiff(tmp_path / "few.tif", 12)  # a COG's overviews and masks: read as before
    with StatusProbe(server), Client(server, timeout_s=60) as c:
        for op in ("plan", "georef"):
            with pytest.raises(EarthDialError) as err:
                c.request(chat_request(op, source_by_reference(str(tif))))
            assert err.value.code == "not_a_raster" and "directories" in err.value.message, err.value
        assert c.georef(source_by_reference(str(few)), "x")["ok"]
