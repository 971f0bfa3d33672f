"""The `plan` op (what an `ask` would send, from metadata), SAR recognition, the variant refusal, and a
cancel that stops a running job's decoding."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from conftest import write_geotiff
from earthdial.contract.client import Client
from earthdial.contract.wire import EarthDialError, source_by_reference, source_by_value
from earthdial.geo import presets
from earthdial.model.engine import Engine
from earthdial.serving import service

UTM = ("EPSG:32633", Affine(10, 0, 500_000, 0, -10, 4_000_000))


@pytest.fixture(scope="module")
def rgb_engine(tiny_checkpoint: Path) -> Engine:
    return Engine(str(tiny_checkpoint), device="cpu")


@pytest.fixture(scope="module")
def ms_engine(tiny_ms_checkpoint: Path) -> Engine:
    return Engine(str(tiny_ms_checkpoint), device="cpu")


def tif(path: Path, data: np.ndarray) -> Path:
    return write_geotiff(path, data, crs=UTM[0], transform=UTM[1])


def sar_linear(rows: int = 120, cols: int = 200) -> np.ndarray:
    """Speckled linear backscatter: exponential around a mean power of 0.05."""
    return np.random.default_rng(3).exponential(0.05, (1, rows, cols)).astype(np.float32)


def same(plan: dict, reply: dict) -> None:
    """The plan names what the reply says was sent."""
    info, chip = reply["input"], reply["chip"]
    assert (plan["preset"], plan["reason"], plan["sensor"]) == (
        info["preset"],
        info["reason"],
        info["sensor"],
    )
    assert plan["bands"] == chip["bands"]
    assert (plan["width"], plan["height"]) == (chip["width"], chip["height"])
    assert plan["gsd_m"] == pytest.approx(info["gsd_m"])
    assert plan["tiles"] == reply["tiles"]
    assert plan["warnings"] == info["warnings"]


@pytest.mark.parametrize(
    ("name", "data", "bounds", "options"),
    [
        ("rgb", np.random.default_rng(0).integers(0, 255, (3, 100, 300), dtype=np.uint8), None, {}),
        (
            "rgb_window",
            np.random.default_rng(0).integers(0, 255, (3, 100, 300), dtype=np.uint8),
            (500_100.0, 3_999_300.0, 500_900.0, 3_999_900.0),
            {"gsd": 20.0},
        ),
        ("rgb16", np.random.default_rng(1).integers(0, 4000, (4, 90, 90), dtype=np.uint16), None, {}),
    ],
)
def test_plan_matches_what_the_ask_reports_rgb(
    tmp_path: Path, rgb_engine: Engine, name, data, bounds, options
) -> None:
    path = tif(tmp_path / f"{name}.tif", data)
    header = {
        "op": "ask",
        "task": "caption",
        "source": source_by_reference(str(path), bounds=bounds),
        "options": {**options, "max_new_tokens": 2},
    }
    plan = service.plan(header, [], rgb_engine)["plan"]
    assert plan["by"] == "reference" and plan["model"]["variant"] == "EarthDial_4B_RGB"
    same(plan, service.run(header, [], rgb_engine))


def test_plan_matches_the_ask_for_12_bands_and_sar_on_the_ms_checkpoint(
    tmp_path: Path, ms_engine: Engine
) -> None:
    s2 = tif(tmp_path / "s2.tif", np.random.default_rng(0).integers(0, 6000, (12, 64, 64)).astype(np.uint16))
    s1 = tif(tmp_path / "s1.tif", sar_linear())
    for path, preset, sensor in ((s2, "s2_l2a", "[s2_ms_10]"), (s1, "s1_vh_linear", "[s1_vh_10]")):
        header = {
            "op": "ask",
            "task": "refer",
            "prompt": "ships",
            "source": source_by_reference(str(path)),
            "options": {"max_new_tokens": 2},
        }
        plan = service.plan(header, [], ms_engine)["plan"]
        assert (plan["preset"], plan["sensor"], plan["tiles"]) == (preset, sensor, 1)
        same(plan, service.run(header, [], ms_engine))


def test_plan_by_value_from_a_sample_matches_the_ask_with_all_pixels(rgb_engine: Engine) -> None:
    pixels = np.random.default_rng(4).integers(0, 255, (3, 150, 420), dtype=np.uint8)
    transform = [10.0, 0.0, 500_000.0, 0.0, -10.0, 4_000_000.0]
    source = source_by_value(transform, "EPSG:32633")
    ask = {"op": "ask", "task": "caption", "source": source, "options": {"max_new_tokens": 2}}
    planned = {**ask, "source": {**source, "shape": [150, 420]}}
    plan = service.plan(planned, [np.ascontiguousarray(pixels[:, ::8, ::8])], rgb_engine)["plan"]
    assert plan["by"] == "value" and (plan["width"], plan["height"]) == (420, 150)
    same(plan, service.run(ask, [pixels], rgb_engine))


def test_one_float_band_is_told_sar_linear_or_db_by_its_values() -> None:
    linear = sar_linear()[0]
    assert presets.choose(1, "float32", [], linear[::4, ::4])[0].name == "s1_vh_linear"
    db = (10 * np.log10(linear)).astype(np.float32)
    assert presets.choose(1, "float32", [], db[::4, ::4])[0].name == "s1_vh_db"
    kelvin = np.random.default_rng(0).uniform(280, 310, (30, 30)).astype(np.float32)
    ndvi = np.random.default_rng(0).uniform(0.2, 0.9, (30, 30)).astype(np.float32)
    for other in (kelvin, ndvi):  # thermal and vegetation indices are not SAR
        assert presets.choose(1, "float32", [], other)[0].name == "grey"
    assert presets.choose(1, "uint8", [], np.full((8, 8), 3, np.uint8))[0].name == "grey"


def test_multispectral_or_sar_to_the_rgb_checkpoint_is_refused_naming_the_ms_one(
    tmp_path: Path, rgb_engine: Engine
) -> None:
    s2 = tif(tmp_path / "s2.tif", np.random.default_rng(0).integers(0, 6000, (12, 40, 40)).astype(np.uint16))
    s1 = tif(tmp_path / "s1.tif", sar_linear(40, 40))
    for path in (s2, s1):
        header = {"op": "ask", "task": "caption", "source": source_by_reference(str(path))}
        for call in (service.plan, service.run):
            with pytest.raises(EarthDialError) as err:
                call(header, [], rgb_engine)
            assert err.value.code == "wrong_variant" and "serve EarthDial_4B_MS" in err.value.message
    rgb = tif(tmp_path / "rgb.tif", np.zeros((3, 40, 40), np.uint8) + 9)
    with pytest.raises(EarthDialError) as err:  # methane needs the tag only Methane_UHI's vocabulary has
        service.plan(
            {"op": "ask", "task": "methane", "source": source_by_reference(str(rgb))}, [], rgb_engine
        )
    assert err.value.code == "wrong_variant" and "EarthDial_4B_Methane_UHI" in err.value.message


def test_cancel_stops_a_running_decode_and_the_next_request_is_answered(server: str, tmp_path: Path) -> None:
    path = tif(tmp_path / "scene.tif", np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8))
    source = source_by_reference(str(path))
    with Client(server, timeout_s=60) as watcher:
        plan = watcher.plan({"task": "chat", "prompt": "hi", "source": source})
        assert plan["preset"] == "rgb8" and plan["by"] == "reference"
        stop = threading.Event()
        outcome: list[BaseException] = []

        def slow() -> None:  # 2048 tokens of a random model: far longer than this test waits
            with Client(server, timeout_s=120) as client:
                try:
                    client.ask(
                        source, "hi", task="chat", options={"max_new_tokens": 2048}, cancelled=stop.is_set
                    )
                except EarthDialError as exc:
                    outcome.append(exc)

        thread = threading.Thread(target=slow)
        thread.start()
        _wait(lambda: watcher.status()["running"] == 1)
        stop.set()  # the client sends `cancel` for its request and stops waiting
        _wait(lambda: watcher.status()["running"] == 0, timeout_s=20)
        thread.join(10)
        assert outcome and outcome[0].code == "cancelled"
        reply = watcher.ask(source, "hi", task="chat", options={"max_new_tokens": 3}, timeout_s=20)
        assert reply["ok"]


def _wait(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_the_plan_of_a_scan_counts_the_tiles_the_scan_runs_and_the_gsd_each_is_seen_at(
    tmp_path: Path, rgb_engine: Engine
) -> None:
    from earthdial.serving import scan

    path = tif(
        tmp_path / "wide.tif", np.random.default_rng(0).integers(0, 255, (3, 100, 300), dtype=np.uint8)
    )
    options = {"tile_size": 64, "overlap": 0.1, "batch": 4}
    header = {
        "op": "detect",
        "task": "refer",
        "prompt": "ship",
        "source": source_by_reference(str(path)),
        "options": {**options, "max_new_tokens": 2},
    }
    planned = service.plan({**header, "op": "plan", "scan": options}, [], rgb_engine)["plan"]
    events: list[dict] = []
    work = scan.steps(header, rgb_engine, lambda name, **fields: events.append({"event": name, **fields}))
    next(work)  # the plan event, then the first batch
    work.close()
    (event,) = [e for e in events if e["event"] == "plan"]
    size = rgb_engine.info.image_size
    assert planned["scan"]["tiles"] == event["total"] and planned["scan"]["batches"] == -(
        -event["total"] // 4
    )
    assert (planned["width"], planned["height"]) == (300, 100)  # the region at the layer's own resolution
    assert planned["gsd_m"] == pytest.approx(10.0)
    assert planned["scan"]["model_gsd_m"] == pytest.approx(10.0 * 64 / size)
    # one window: the model sees it at its tile grid's size, coarser than the data when that is smaller
    window = service.plan({**header, "op": "plan", "task": "caption"}, [], rgb_engine)["plan"]
    assert window["scan"] is None
    cols, rows = service._grid_for(rgb_engine, 300, 100, window["sensor"], "caption")
    assert window["model_gsd_m"] == pytest.approx(10.0 * max(300 / (cols * size), 100 / (rows * size)))


def _read_as_planned(plan: dict, reply: dict) -> None:
    """The window a plan names is the one the ask read: bands, size, grid, GSD, tiles, and the GSD the
    model sees it at."""
    same(plan, reply)
    chip = reply["chip"]
    assert plan["transform"] == pytest.approx(chip["transform"]) and plan["crs"] == chip["crs"]
    assert plan["model_gsd_m"] == pytest.approx(reply["properties"]["gsd_model"])


@pytest.mark.parametrize(
    ("name", "shape", "dtype", "source", "options"),
    [
        ("whole", (3, 100, 300), "uint8", {}, {}),
        (
            "bounds_gsd",
            (3, 100, 300),
            "uint8",
            {"bounds": [500_100.0, 3_999_300.0, 500_900.0, 3_999_900.0]},
            {"gsd": 25.0},
        ),
        (
            "bounds_4326",
            (3, 120, 200),
            "uint8",
            {"bounds": [15.0009, 36.1323, 15.0131, 36.1409], "crs": "EPSG:4326"},
            {},
        ),
        ("bands", (4, 90, 130), "uint16", {"bands": [3, 2, 1]}, {}),
        ("preset", (12, 70, 50), "uint16", {}, {"preset": "s2_rgb"}),
        ("large", (3, 600, 2500), "uint8", {}, {}),
        ("fine_gsd", (3, 40, 90), "uint8", {}, {"gsd": 4.0}),
    ],
)
def test_plan_promises_the_window_the_ask_reads(
    tmp_path: Path, rgb_engine: Engine, name, shape, dtype, source, options
) -> None:
    data = np.random.default_rng(5).integers(1, 250, shape).astype(dtype)
    path = tif(tmp_path / f"{name}.tif", data)
    header = {
        "op": "ask",
        "task": "caption",
        "source": {**source_by_reference(str(path)), **source},
        "options": {**options, "max_new_tokens": 2},
    }
    plan = service.plan(header, [], rgb_engine)["plan"]
    _read_as_planned(plan, service.run(header, [], rgb_engine))


@pytest.mark.parametrize("shape", [(3, 150, 420), (150, 60)])
def test_plan_by_value_promises_the_window_the_ask_reads(rgb_engine: Engine, shape) -> None:
    pixels = np.random.default_rng(6).integers(1, 250, shape, dtype=np.uint8)
    source = source_by_value([10.0, 0.0, 500_000.0, 0.0, -10.0, 4_000_000.0], "EPSG:32633")
    ask = {"op": "ask", "task": "caption", "source": source, "options": {"max_new_tokens": 2}}
    reply = service.run(ask, [pixels], rgb_engine)
    _read_as_planned(service.plan(ask, [pixels], rgb_engine)["plan"], reply)  # all the pixels
    sample = np.ascontiguousarray(pixels[..., ::8, ::8])
    planned = {**ask, "source": {**source, "shape": list(shape[-2:])}}
    _read_as_planned(service.plan(planned, [sample], rgb_engine)["plan"], reply)  # a sample and the shape
