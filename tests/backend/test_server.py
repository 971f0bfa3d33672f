"""A real `earthdial serve` process over real ZeroMQ on loopback: answers, georeferencing and typed errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from conftest import dealer, run_earthdial, write_geotiff
from earthdial.contract.client import Client
from earthdial.contract.wire import (
    PROTOCOL_VERSION,
    EarthDialError,
    decode,
    encode,
    source_by_reference,
    source_by_value,
)

ORIGIN_X, ORIGIN_Y, PIXEL = 500_000.0, 4_000_000.0, 10.0


@pytest.fixture(scope="module")
def utm_tif(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rasters") / "scene_32633.tif"
    data = (np.random.RandomState(3).rand(3, 100, 200) * 255).astype(np.uint8)
    return write_geotiff(path, data, transform=from_origin(ORIGIN_X, ORIGIN_Y, PIXEL, PIXEL))


@pytest.fixture()
def client(server: str):
    with Client(server, timeout_s=60) as c:
        yield c


def _ring(feature: dict) -> np.ndarray:
    return np.array(feature["geometry"]["coordinates"][0], dtype=float)


def test_status_reports_model_tasks_and_protocol(client: Client) -> None:
    status = client.status()
    assert status["protocol"] == PROTOCOL_VERSION
    assert status["model"]["variant"] == "EarthDial_4B_RGB"
    assert status["model"]["device"] == "cpu"
    assert {"caption", "refer", "grounding", "identify"} <= {t["name"] for t in status["tasks"]}
    assert status["queue"] == 0


def test_status_carries_the_contract_the_plugin_uses(client: Client) -> None:
    """Tasks, band presets and error codes come from the backend's own tables, all of them."""
    from earthdial.contract.wire import ErrorCode
    from earthdial.geo import presets
    from earthdial.model import prompts

    status = client.status()
    assert [t["name"] for t in status["tasks"]] == list(prompts.TASKS)
    assert status["presets"] == [
        {"name": p.name, "bands": list(p.bands) if p.bands else None, "description": p.description}
        for p in presets.PRESETS.values()
    ]
    assert status["presets"][1]["description"].startswith("16-bit or float RGB, 2-98 percentile")
    codes = {v for k, v in vars(ErrorCode).items() if k.isupper()}
    assert set(status["error_codes"]) == codes and len(status["error_codes"]) == len(codes)
    assert {"cancelled", "no_overlap", "missing_dependency", "timeout"} <= codes


def test_georef_of_a_known_answer_by_reference(client: Client, utm_tif: Path) -> None:
    # window: 1000 m wide x 500 m high in the middle of the raster
    bounds = (ORIGIN_X + 200, ORIGIN_Y - 700, ORIGIN_X + 1200, ORIGIN_Y - 200)
    reply = client.georef(
        source_by_reference(str(utm_tif), bounds=bounds), "<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box>"
    )
    (feat,) = reply["features"]["features"]
    assert feat["properties"]["label"] == "ship"
    minx, maxy = bounds[0], bounds[3]
    x1, x2 = minx + 0.2 * 1000, minx + 0.4 * 1000
    y1, y2 = maxy - 0.3 * 500, maxy - 0.6 * 500
    ring = _ring(feat)
    assert {(round(x, 6), round(y, 6)) for x, y in ring} == {(x1, y1), (x2, y1), (x2, y2), (x1, y2)}
    assert "32633" in reply["features"]["crs"]


def test_ask_by_reference_runs_the_model(client: Client, utm_tif: Path) -> None:
    reply = client.ask(source_by_reference(str(utm_tif), bands=[1, 2, 3]), "ships", task="refer")
    assert isinstance(reply["answer"], str)
    assert reply["model"]["variant"] == "EarthDial_4B_RGB"
    assert reply["chip"]["width"] == 200 and reply["chip"]["height"] == 100
    assert reply["tiles"] == 3  # a 2:1 window -> 2x1 grid + thumbnail
    assert reply["timings"]["generate_s"] > 0


def test_ask_by_value_matches_by_reference_georeferencing(client: Client, utm_tif: Path) -> None:
    with rasterio.open(utm_tif) as src:
        data = src.read()
        transform = list(src.transform)[:6]
    answer = "<ref>tank</ref><box>[[10, 10, 50, 90, 30]]</box>"
    by_value = client.georef(source_by_value(transform, "EPSG:32633"), answer, pixels=data)
    by_ref = client.georef(source_by_reference(str(utm_tif)), answer)
    np.testing.assert_allclose(
        _ring(by_value["features"]["features"][0]), _ring(by_ref["features"]["features"][0])
    )
    reply = client.ask(source_by_value(transform, "EPSG:32633"), "", task="caption", pixels=data)
    assert isinstance(reply["answer"], str)


def _raw(endpoint: str, frames: list) -> dict:
    sock = dealer(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(30_000), "server did not answer"
        return decode(sock.recv_multipart()).header
    finally:
        sock.close()


def _header(**fields) -> dict:
    return {"v": PROTOCOL_VERSION, "id": "r1", "op": "ask", "task": "caption", "prompt": "", **fields}


BAD_REQUESTS = {
    "unknown_task": lambda tif: encode(_header(task="segment", source=source_by_reference(str(tif)))),
    "file_not_found": lambda tif: encode(_header(source=source_by_reference(str(tif) + ".missing"))),
    "bounds_outside": lambda tif: encode(
        _header(source=source_by_reference(str(tif), bounds=(0, 0, 10, 10)))
    ),
    "band_out_of_range": lambda tif: encode(_header(source=source_by_reference(str(tif), bands=[1, 2, 7]))),
    "version_mismatch": lambda tif: [
        json.dumps({**_header(source=source_by_reference(str(tif))), "v": 99}).encode()
    ],
    "bad_header": lambda tif: [b"\x00not json{"],
    "missing_frames": lambda tif: encode(
        _header(source=source_by_value([1, 0, 0, 0, -1, 0], "EPSG:32633"))
    ),  # by value, but no array frame follows
    "bad_array": lambda tif: [
        json.dumps(
            {
                **_header(source=source_by_value([1, 0, 0, 0, -1, 0], "EPSG:32633")),
                "arrays": [{"dtype": "uint8", "shape": [3, 10, 10]}],
            }
        ).encode(),
        b"\x00" * 7,  # 300 bytes announced, 7 sent
    ],
    "bad_array_dtype": lambda tif: [
        json.dumps(
            {
                **_header(source=source_by_value([1, 0, 0, 0, -1, 0], "EPSG:32633")),
                "arrays": [{"dtype": "complex64", "shape": [1, 1]}],
            }
        ).encode(),
        b"\x00" * 8,
    ],
    "unknown_op": lambda tif: encode({"v": PROTOCOL_VERSION, "id": "r1", "op": "format_disk"}),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_a_typed_error_and_the_server_keeps_serving(
    server: str, utm_tif: Path, case: str
) -> None:
    reply = _raw(server, BAD_REQUESTS[case](utm_tif))
    assert reply["ok"] is False
    assert reply["error"]["code"] == case.removesuffix("_dtype")
    assert reply["error"]["message"]
    with Client(server, timeout_s=30) as c:  # the next request is served
        assert c.status()["protocol"] == PROTOCOL_VERSION


def test_client_raises_typed_errors(client: Client, utm_tif: Path) -> None:
    with pytest.raises(EarthDialError) as err:
        client.ask(source_by_reference(str(utm_tif)), "", task="refer")
    assert err.value.code == "bad_request" and "needs a prompt" in err.value.message


def test_client_times_out_when_nothing_listens() -> None:
    from conftest import free_port

    with Client(f"tcp://127.0.0.1:{free_port()}", timeout_s=0.5) as c, pytest.raises(EarthDialError) as err:
        c.status()
    assert err.value.code == "timeout"


def test_cli_ask_and_status_against_the_server(server: str, utm_tif: Path, tmp_path: Path) -> None:
    out = run_earthdial("status", "--endpoint", server, timeout=60)
    assert out.returncode == 0 and "EarthDial_4B_RGB" in out.stdout
    assert "presets   rgb8, rgb16, grey," in out.stdout  # the names Processing's PRESET takes
    gpkg = tmp_path / "ask.gpkg"
    out = run_earthdial(
        "ask",
        str(utm_tif),
        "--task",
        "refer",
        "--prompt",
        "ships",
        "--endpoint",
        server,
        "-o",
        str(gpkg),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "feature(s)" in out.stdout and gpkg.exists()


def test_cli_reports_typed_errors(server: str, tmp_path: Path) -> None:
    out = run_earthdial(
        "ask",
        str(tmp_path / "nope.tif"),
        "--prompt",
        "x",
        "--endpoint",
        server,
        timeout=60,
    )
    assert out.returncode == 1
    assert "file_not_found" in out.stderr


def test_serve_refuses_a_non_loopback_bind(tiny_checkpoint: Path) -> None:
    out = run_earthdial(
        "serve",
        "--model",
        str(tiny_checkpoint),
        "--endpoint",
        "tcp://0.0.0.0:5999",
        timeout=60,
    )
    assert out.returncode == 2 and "loopback" in out.stderr
