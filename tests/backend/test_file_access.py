"""File access (geo/file_access.py): the directories by-reference requests may read, links, FIFOs and
hard links, formats that name other files, CRSs that name files. Loopback only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port, nobody_called, start_server, stop_server, write_geotiff
from earthdial.contract.client import Client
from earthdial.contract.wire import EarthDialError, source_by_reference, source_by_value
from earthdial.geo import file_access
from earthdial.serving import requests, service

ANSWER = "<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box>"


def _tif(path: Path) -> Path:
    return write_geotiff(path, np.zeros((1, 8, 8), np.uint8), px=10)


@pytest.fixture()
def outside() -> Path:
    """A raster outside the pytest temp root (which test servers may read)."""
    where = Path(tempfile.mkdtemp(prefix="earthdial-outside-"))
    yield _tif(where / "secret.tif")
    shutil.rmtree(where)


@pytest.fixture()
def allowed(tmp_path: Path, outside: Path):
    """tmp_path/allowed is the one allowed directory; links and `..` inside it point elsewhere."""
    root = tmp_path / "allowed"
    root.mkdir()
    _tif(root / "ok.tif")
    (root / "link-out.tif").symlink_to(outside)
    (root / "link-in.tif").symlink_to(root / "ok.tif")
    previous = file_access.allowed_dirs()
    file_access.set_allowed_dirs([root])
    yield root
    file_access.set_allowed_dirs(previous)


def _read(path: str) -> object:
    return service.resolve_source(requests.source(source_by_reference(path)), [])


def test_reads_inside_the_allowed_directories(allowed: Path) -> None:
    chip = _read(str(allowed / "ok.tif"))
    assert chip.width == 8 and chip.source == str(allowed / "ok.tif")  # named as the client named it
    with pytest.raises(EarthDialError) as err:  # no link is followed, even one that stays inside
        _read(str(allowed / "link-in.tif"))
    assert err.value.code == "forbidden_path"


@pytest.mark.parametrize("how", ["outside", "symlink", "dotdot", "missing_outside", "vsi", "relative"])
def test_paths_outside_are_refused_naming_the_allowed_directories(
    allowed: Path, outside: Path, how: str
) -> None:
    path = {
        "outside": str(outside),
        "symlink": str(allowed / "link-out.tif"),
        "dotdot": f"{allowed}/../../../../../../..{outside}",
        "missing_outside": str(outside.parent / "nothing.tif"),  # refused before existence is told
        "vsi": f"/vsizip/{allowed}/x.zip/ok.tif",
        "relative": "secret.tif",
    }[how]
    with pytest.raises(EarthDialError) as err:
        _read(path)
    assert err.value.code == "forbidden_path"
    if how != "vsi":
        assert str(allowed) in err.value.message


def test_no_restriction_without_an_allow_list(outside: Path) -> None:
    previous = file_access.allowed_dirs()
    file_access.set_allowed_dirs(None)  # the in-process CLI reads what its user names
    try:
        assert _read(str(outside)).width == 8
    finally:
        file_access.set_allowed_dirs(previous)


def test_the_server_refuses_paths_outside_its_directories(server: str, outside: Path, tmp_path: Path) -> None:
    link = tmp_path / "innocent.tif"
    link.symlink_to(outside)
    with Client(server, timeout_s=30) as c:
        for path in (str(outside), str(link), f"{tmp_path}/../../../../../../..{outside}"):
            for call in (
                lambda p: c.georef(source_by_reference(p), ANSWER),
                lambda p: c.ask(source_by_reference(p), "ships", task="refer"),
            ):
                with pytest.raises(EarthDialError) as err:
                    call(path)
                assert err.value.code == "forbidden_path", (path, err.value)
        assert c.georef(source_by_reference(str(_tif(tmp_path / "inside.tif"))), ANSWER)["ok"]


def test_reading_a_raster_does_not_import_zmq() -> None:
    """The file policy and the raster reader are no part of the server's transport: reading a file (the
    command line, training export, a reader process) loads no ZeroMQ."""
    import earthdial

    backend = str(Path(earthdial.__file__).resolve().parents[1])  # this checkout's code, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([backend, os.environ.get("PYTHONPATH", "")])}
    code = (
        "import sys, earthdial.geo.imagery, earthdial.geo.file_access; "
        "print(earthdial.geo.imagery.__name__, 'zmq' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["earthdial.geo.imagery", "False"]


# --------------------------------------------------------------------------------------------------
# Hostile input: CRSs that name files, formats that reference other files, files that are not files
# --------------------------------------------------------------------------------------------------

PROJ_STRING = "+proj=longlat +ellps=WGS84 +nadgrids=/dev/stdin +type=crs"  # the one that froze the server
WKT_PROJ4 = (
    'GEOGCS["x",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],PRIMEM["Greenwich",0],'
    'UNIT["degree",0.0174532925199433],EXTENSION["PROJ4","+proj=longlat +ellps=WGS84 +nadgrids={grid}"]]'
)
WKT2_GRID = (
    'BOUNDCRS[SOURCECRS[GEOGCRS["x",DATUM["d",ELLIPSOID["WGS 84",6378137,298.257223563]],CS[ellipsoidal,2],'
    'AXIS["lat",north],AXIS["lon",east],ANGLEUNIT["degree",0.0174532925199433]]],TARGETCRS[GEOGCRS["WGS 84",'
    'DATUM["World Geodetic System 1984",ELLIPSOID["WGS 84",6378137,298.257223563]],CS[ellipsoidal,2],'
    'AXIS["lat",north],AXIS["lon",east],ANGLEUNIT["degree",0.0174532925199433]]],ABRIDGEDTRANSFORMATION['
    '"t",METHOD["NTv2"],PARAMETERFILE["Latitude and longitude difference file","{grid}"]]]'
)


def _projjson_with_grid(grid: str) -> str:
    import pyproj

    tree = json.loads(pyproj.CRS.from_epsg(4326).to_json())
    tree = {"type": "BoundCRS", "source_crs": tree, "target_crs": tree,
            "transformation": {"name": "t", "method": {"name": "NTv2"},
                               "parameters": [{"name": "Latitude and longitude difference file", "value": grid}]}}  # fmt: skip
    return json.dumps(tree)


@pytest.fixture()
def fifo(tmp_path: Path) -> str:
    """A FIFO nobody writes to: opening it for reading blocks for good."""
    path = tmp_path / "grid.gsb"
    os.mkfifo(path)
    return str(path)


def _refusing_crs(fifo: str) -> list[str]:
    return [PROJ_STRING, PROJ_STRING.replace("/dev/stdin", fifo), "+init=epsg:4326", "proj=longlat +nadgrids=x",
            f"+proj=longlat +ellps=WGS84 +geoidgrids={fifo}", WKT_PROJ4.format(grid=fifo), WKT2_GRID.format(grid=fifo),
            _projjson_with_grid(fifo), fifo, "/dev/stdin", "WGS84 +towgs84=0"]  # fmt: skip


def test_crs_forms_that_name_files_are_refused_before_proj_sees_them(allowed: Path, fifo: str) -> None:
    for crs in _refusing_crs(fifo):
        with pytest.raises(EarthDialError) as err:  # bounds in that CRS
            service.resolve_source(
                requests.source(
                    {**source_by_reference(str(allowed / "ok.tif")), "bounds": [0, 0, 1, 1], "crs": crs}
                ),
                [],
            )
        assert err.value.code == "bad_crs" and "EPSG:" in err.value.message, (crs, err.value)
        with pytest.raises(EarthDialError) as err:  # pixels by value in that CRS
            service.resolve_source(
                requests.source(source_by_value((10, 0, 0, 0, -10, 0), crs)), [np.zeros((1, 4, 4), np.uint8)]
            )
        assert err.value.code == "bad_crs", (crs, err.value)


def test_crs_forms_that_name_no_file_are_accepted(allowed: Path) -> None:
    import pyproj

    utm = pyproj.CRS.from_epsg(32633)
    for crs in (
        "EPSG:32633",
        "epsg:32633",
        "urn:ogc:def:crs:EPSG::32633",
        utm.to_wkt(),
        utm.to_wkt("WKT1_GDAL"),
        utm.to_json(),
        "EPSG:4326",
        "OGC:CRS84",
    ):
        assert file_access.crs_refusal(crs) is None, crs
        chip = service.resolve_source(
            requests.source(source_by_value((10, 0, 500_000, 0, -10, 4_000_000), crs)),
            [np.zeros((1, 4, 4), np.uint8)],
        )
        assert chip.crs


def test_the_server_refuses_a_proj_string_crs_at_once_and_keeps_answering(
    server: str, tmp_path: Path, fifo: str
) -> None:
    """PROJ_STRING (a grid on /dev/stdin) froze the whole server (ping, status, cancel, SIGTERM) until
    SIGKILL."""
    tif = str(_tif(tmp_path / "a.tif"))
    with Client(server, timeout_s=10) as c:
        for crs in (PROJ_STRING, PROJ_STRING.replace("/dev/stdin", fifo)):
            t = time.monotonic()
            with pytest.raises(EarthDialError) as err:
                c.georef(source_by_reference(tif, bounds=(0, 0, 1, 1), crs=crs), ANSWER)
            assert err.value.code == "bad_crs"
            with pytest.raises(EarthDialError) as err:
                c.georef(
                    source_by_value((10, 0, 0, 0, -10, 0), crs), ANSWER, pixels=np.zeros((3, 8, 8), np.uint8)
                )
            assert err.value.code == "bad_crs"
            assert time.monotonic() - t < 3
            assert c.ping(timeout_s=2)["pong"] and c.status(timeout_s=2)["queue"] == 0


def _vrt(path: Path, source: str, relative: bool = False, raw: bool = False) -> Path:
    if raw:  # bytes of any file read as pixels: a VRTRawRasterBand
        band = (
            f'<VRTRasterBand dataType="Byte" band="1" subClass="VRTRawRasterBand"><SourceFilename relativeToVRT="0">'
            f"{source}</SourceFilename><ImageOffset>0</ImageOffset><PixelOffset>1</PixelOffset><LineOffset>8</LineOffset>"
            "</VRTRasterBand>"
        )
    else:
        band = (
            f'<VRTRasterBand dataType="Byte" band="1"><SimpleSource><SourceFilename relativeToVRT="{int(relative)}">'
            f"{source}</SourceFilename><SourceBand>1</SourceBand></SimpleSource></VRTRasterBand>"
        )
    path.write_text(
        f'<VRTDataset rasterXSize="8" rasterYSize="3"><SRS>EPSG:32633</SRS>'
        f"<GeoTransform>500000, 10, 0, 4000000, 0, -10</GeoTransform>{band}</VRTDataset>"
    )
    return path


def test_vrts_and_wms_xml_in_an_allowed_folder_cannot_reach_outside(
    allowed: Path, outside: Path, http_listener
) -> None:
    port, listener = http_listener
    secret = outside.parent / "secret.txt"
    secret.write_text("the 24-byte secret file!")
    (allowed / "sub").mkdir()
    inner = _vrt(allowed / "sub" / "inner.vrt", str(outside))
    url = f"http://127.0.0.1:{port}/x.tif"
    cases = {
        "absolute": _vrt(allowed / "abs.vrt", str(outside)),
        "relativeToVRT": _vrt(allowed / "rel.vrt", os.path.relpath(outside, allowed), relative=True),
        "nested": _vrt(allowed / "nested.vrt", str(inner)),
        "vsizip": _vrt(allowed / "zip.vrt", f"/vsizip/{outside.parent}/x.zip/a.tif"),
        "named .tif": _vrt(allowed / "looks-like.tif", str(outside)),
        "raw band": _vrt(allowed / "raw.tif", str(secret), raw=True),
        "vsicurl": _vrt(allowed / "curl.vrt", f"/vsicurl/{url}"),
    }
    wms = allowed / "wms.tif"  # a GDAL WMS service description saved as .tif
    wms.write_text(
        f'<GDAL_WMS><Service name="TMS"><ServerUrl>http://127.0.0.1:{port}/${{z}}/${{x}}/${{y}}.png</ServerUrl>'
        "</Service><DataWindow><UpperLeftX>-20037508.34</UpperLeftX><UpperLeftY>20037508.34</UpperLeftY>"
        "<LowerRightX>20037508.34</LowerRightX><LowerRightY>-20037508.34</LowerRightY><TileLevel>1</TileLevel>"
        "<TileCountX>1</TileCountX><TileCountY>1</TileCountY></DataWindow><Projection>EPSG:3857</Projection>"
        "<BlockSizeX>256</BlockSizeX><BlockSizeY>256</BlockSizeY><BandsCount>3</BandsCount></GDAL_WMS>"
    )
    cases["wms xml"] = wms
    previous = file_access.allowed_dirs()
    file_access.set_allowed_dirs(None)
    try:  # unrestricted (the in-process CLI), GDAL reads these: so they are real escapes
        assert _read(str(cases["raw band"])).data.tobytes()[:8] == b"the 24-b"
        assert _read(str(cases["absolute"])).width == 8
    finally:
        file_access.set_allowed_dirs(previous)
    for how, path in cases.items():
        with pytest.raises(EarthDialError) as err:
            _read(str(path))
        assert err.value.code == "not_a_raster" and "GTiff" in err.value.message, (how, err.value)
    assert nobody_called(listener)  # no HTTP request was sent


def test_fifos_directories_and_hard_links_are_refused_without_blocking(
    allowed: Path, outside: Path, tmp_path: Path
) -> None:
    os.mkfifo(allowed / "fifo.tif")
    (allowed / "dir.tif").mkdir()
    os.link(outside, allowed / "hard.tif")  # a hard link inside to a file outside
    for name, code in (
        ("fifo.tif", "not_a_raster"),
        ("dir.tif", "not_a_raster"),
        ("hard.tif", "forbidden_path"),
    ):
        with pytest.raises(EarthDialError) as err:
            _read(str(allowed / name))
        assert err.value.code == code, (name, err.value)
    assert "FIFO" in _message(str(allowed / "fifo.tif")) and "hard link" in _message(
        str(allowed / "hard.tif")
    )
    # FIFOs where GDAL looks for sidecars (overviews, masks, PAM, world files) are never opened
    for suffix in (".ovr", ".msk", ".aux.xml"):
        os.mkfifo(str(allowed / "ok.tif") + suffix)
    os.mkfifo(allowed / "ok.tfw")
    assert _read(str(allowed / "ok.tif")).width == 8


def _message(path: str) -> str:
    try:
        _read(path)
    except EarthDialError as exc:
        return exc.message
    return ""


def test_urls_and_gdal_names_and_surrogates_are_refused(allowed: Path) -> None:
    for path in (
        "http://127.0.0.1:1/x.tif",
        "/vsicurl/http://127.0.0.1:1/x.tif",
        "GTIFF_DIR:1:" + str(allowed / "ok.tif"),
        "WMS:http://127.0.0.1:1/",
    ):
        with pytest.raises(EarthDialError) as err:
            _read(path)
        assert err.value.code == "forbidden_path", (path, err.value)
    with pytest.raises(EarthDialError) as err:
        _read(str(allowed / "bad\ud800.tif"))
    assert err.value.code == "bad_request"


def test_the_server_refuses_a_fifo_at_once_and_answers_the_next_request(server: str, tmp_path: Path) -> None:
    """A FIFO named .tif in the allowed folder blocked the single worker for good."""
    os.mkfifo(tmp_path / "fifo.tif")
    with Client(server, timeout_s=10) as c:
        t = time.monotonic()
        for call in (
            lambda p: c.georef(source_by_reference(p), ANSWER),
            lambda p: c.ask(source_by_reference(p), "ships", task="refer"),
        ):
            with pytest.raises(EarthDialError) as err:
                call(str(tmp_path / "fifo.tif"))
            assert err.value.code == "not_a_raster"
        assert time.monotonic() - t < 5
        assert c.georef(source_by_reference(str(_tif(tmp_path / "next.tif"))), ANSWER)["ok"]


def test_the_working_directory_is_not_allowed_by_itself(tmp_path: Path, monkeypatch) -> None:
    """The server read its working directory (the plugin started it in the home folder); now only what
    --allow-dir names."""
    import conftest

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(conftest, "ALLOWED_DIRS", [])
    tif = _tif(tmp_path / "here.tif")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(None, endpoint)
    try:
        with Client(endpoint, timeout_s=10) as c, pytest.raises(EarthDialError) as err:
            c.georef(source_by_reference(str(tif)), ANSWER)
        assert err.value.code == "forbidden_path" and "--allow-dir" in err.value.message
    finally:
        stop_server(proc)
