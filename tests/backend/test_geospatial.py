"""Rasters in any CRS, band presets, ground resolution, nodata, pairs on different grids, whole scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.windows import Window

from conftest import write_geotiff
from earthdial.contract.wire import EarthDialError, source_by_reference
from earthdial.geo import tiling
from earthdial.model.engine import Engine
from earthdial.scenes import runner as scenes
from earthdial.serving import requests, service

ANSWER = "<ref>tank</ref><box>[[20, 30, 40, 60, 0]]</box>"


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Engine:
    return Engine(str(tiny_checkpoint), device="cpu")


@pytest.fixture(scope="module")
def ms_engine(tiny_ms_checkpoint: Path) -> Engine:
    return Engine(str(tiny_ms_checkpoint), device="cpu")  # multispectral and SAR need the MS variant


def write(path: Path, data: np.ndarray, crs: str, transform: Affine, nodata=None, descriptions=()) -> Path:
    return write_geotiff(path, data, crs=crs, transform=transform, nodata=nodata, descriptions=descriptions)


def georef(path: Path, **source) -> dict:
    header = {"op": "georef", "answer": ANSWER, "source": source_by_reference(str(path), **source)}
    return service.run(header, [], None)


def ring(reply: dict) -> list[tuple[float, float]]:
    return [tuple(p) for p in reply["features"]["features"][0]["geometry"]["coordinates"][0]]


def expected_corners(t: Affine, width: float, height: float) -> set[tuple[float, float]]:
    """The box [[20, 30, 40, 60, 0]] on a window of width x height pixels, mapped through t by hand."""
    a, b, c, d, e, f = t[:6]
    cols, rows = (0.2 * width, 0.4 * width), (0.3 * height, 0.6 * height)
    return {(round(a * x + b * y + c, 6), round(d * x + e * y + f, 6)) for x in cols for y in rows}


GRIDS = {
    "utm_32633": ("EPSG:32633", Affine(10, 0, 500_000, 0, -10, 4_000_000)),
    "web_mercator": ("EPSG:3857", Affine(4.5, 0, 1_000_000, 0, -4.5, 6_000_000)),
    "geographic_4326": ("EPSG:4326", Affine(0.0001, 0, 12.3, 0, -0.0001, 45.6)),
    "south_up": ("EPSG:32633", Affine(10, 0, 500_000, 0, 10, 3_999_000)),
    "rotated": ("EPSG:32633", Affine(8.66, -5.0, 500_000, -5.0, -8.66, 4_000_000)),
}


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_known_answer_lands_on_the_map_for_any_crs_and_geotransform(tmp_path: Path, grid: str) -> None:
    crs, t = GRIDS[grid]
    path = write(tmp_path / f"{grid}.tif", np.full((3, 80, 120), 100, np.uint8), crs, t)
    reply = georef(path)
    assert reply["features"]["crs"] == crs
    got = {(round(x, 6), round(y, 6)) for x, y in ring(reply)}
    assert got == expected_corners(t, 120, 80)


def test_bounds_in_the_project_crs_and_features_in_the_layer_crs(tmp_path: Path) -> None:
    crs, t = GRIDS["utm_32633"]
    path = write(tmp_path / "utm.tif", np.full((3, 100, 200), 100, np.uint8), crs, t)
    # a window of exactly 100 x 50 pixels, given in Web Mercator (the project CRS of many QGIS users)
    to_3857 = Transformer.from_crs(crs, "EPSG:3857", always_xy=True)
    x0, y0 = to_3857.transform(500_300, 3_999_400)
    x1, y1 = to_3857.transform(501_300, 3_999_900)
    reply = georef(path, bounds=(x0 + 0.01, y0 + 0.01, x1 - 0.01, y1 - 0.01), crs="EPSG:3857")
    chip = reply["chip"]
    # the transformed rectangle is slightly rotated in UTM: the window is its bounding pixel box
    assert reply["features"]["crs"] == crs
    assert 100 <= chip["width"] <= 104 and 50 <= chip["height"] <= 54
    xs, ys = zip(*ring(reply), strict=True)
    assert 500_280 < min(xs) and max(xs) < 501_320 and 3_999_380 < min(ys) and max(ys) < 3_999_920


def test_12_band_uint16_gets_the_sentinel2_preset(tmp_path: Path, ms_engine: Engine) -> None:
    engine = ms_engine
    data = np.random.default_rng(0).integers(0, 6000, (12, 64, 64)).astype(np.uint16)
    path = write(tmp_path / "s2.tif", data, "EPSG:32633", GRIDS["utm_32633"][1])
    reply = service.run(
        {"op": "ask", "task": "caption", "source": source_by_reference(str(path))}, [], engine
    )
    assert reply["input"]["preset"] == "s2_l2a" and reply["input"]["sensor"] == "[s2_ms_10]"
    assert "12 bands" in reply["input"]["reason"]
    assert reply["chip"]["bands"] == list(range(1, 13)) and reply["tiles"] == 1
    # an explicit preset overrides the choice
    reply = service.run(
        {
            "op": "ask",
            "task": "caption",
            "source": source_by_reference(str(path)),
            "options": {"preset": "s2_rgb"},
        },
        [],
        engine,
    )
    assert reply["chip"]["bands"] == [4, 3, 2] and reply["input"]["sensor"] == "[s2_rgb_10]"


def test_sar_float32_with_nans_in_linear_power_is_converted_to_db(tmp_path: Path, ms_engine: Engine) -> None:
    engine = ms_engine
    rng = np.random.default_rng(1)
    power = rng.uniform(0.001, 0.3, (1, 64, 64)).astype(np.float32)
    power[0, :8, :] = np.nan
    path = write(tmp_path / "s1.tif", power, "EPSG:32633", GRIDS["utm_32633"][1], descriptions=("VH",))
    header = {"op": "ask", "task": "refer", "prompt": "ships", "source": source_by_reference(str(path))}
    reply = service.run(header, [], engine)
    assert reply["input"]["preset"] == "s1_vh_linear" and reply["input"]["sensor"] == "[s1_vh_10]"
    job = service.prepare(header, [], engine)
    db = job.chips[0].data
    assert np.isnan(db[0, :8]).all()
    np.testing.assert_allclose(db[0, 8:], 10 * np.log10(power[0, 8:]), rtol=1e-5)
    assert np.isfinite(job.query.images[0].pixels.numpy()).all()  # NaNs filled before the model


def test_a_window_of_only_nodata_is_a_clear_error(tmp_path: Path, engine: Engine) -> None:
    data = np.zeros((3, 50, 50), np.uint8)
    path = write(tmp_path / "empty.tif", data, "EPSG:32633", GRIDS["utm_32633"][1], nodata=0)
    with pytest.raises(EarthDialError) as err:
        service.run({"op": "ask", "task": "caption", "source": source_by_reference(str(path))}, [], engine)
    assert err.value.code == "empty_window"


def test_gsd_choice_resamples_and_far_gsd_warns(tmp_path: Path, engine: Engine) -> None:
    path = write(
        tmp_path / "ten.tif", np.full((3, 200, 100), 90, np.uint8), "EPSG:32633", GRIDS["utm_32633"][1]
    )
    reply = service.run(
        {
            "op": "ask",
            "task": "caption",
            "source": source_by_reference(str(path)),
            "options": {"gsd": 20.0, "sensor": "[hr_rgb_0.5]"},
        },
        [],
        engine,
    )
    assert (reply["chip"]["width"], reply["chip"]["height"]) == (50, 100)
    assert reply["input"]["gsd_m"] == pytest.approx(20.0)
    assert any("far from [hr_rgb_0.5]" in w for w in reply["input"]["warnings"])
    auto = service.run({"op": "ask", "task": "caption", "source": source_by_reference(str(path))}, [], engine)
    assert auto["input"]["sensor"] == "[s2_rgb_10]" and not auto["input"]["warnings"]


def _square(grid_to_map, rows: int, cols: int, square: tuple[float, float, float, float]) -> np.ndarray:
    """A 3-band image: 255 where a pixel centre falls inside the UTM square, 40 elsewhere."""
    cc, rr = np.meshgrid(np.arange(cols) + 0.5, np.arange(rows) + 0.5)
    x, y = grid_to_map(cc, rr)
    inside = (x >= square[0]) & (x <= square[2]) & (y >= square[1]) & (y <= square[3])
    return np.repeat(np.where(inside, 255, 40).astype(np.uint8)[None], 3, axis=0)


def test_a_pair_in_different_crs_and_resolution_is_aligned_on_the_first_grid(tmp_path: Path) -> None:
    square = (500_300.0, 3_999_500.0, 500_400.0, 3_999_600.0)  # 100 m x 100 m on the ground, in UTM 33N
    t1 = Affine(10, 0, 500_000, 0, -10, 4_000_000)
    before = write(
        tmp_path / "before.tif",
        _square(lambda c, r: (t1.c + c * 10, t1.f - r * 10), 100, 100, square),
        "EPSG:32633",
        t1,
    )
    # after: Web Mercator, ~6.6 m pixels, starting 250 m further east (a known shift): only part overlaps
    fwd = Transformer.from_crs("EPSG:32633", "EPSG:3857", always_xy=True)
    back = Transformer.from_crs("EPSG:3857", "EPSG:32633", always_xy=True)
    ox, oy = fwd.transform(500_250, 4_000_000)
    t2 = Affine(8.0, 0, ox, 0, -8.0, oy)
    after = write(
        tmp_path / "after.tif",
        _square(lambda c, r: back.transform(t2.c + c * 8.0, t2.f - r * 8.0), 160, 160, square),
        "EPSG:3857",
        t2,
    )
    header = {
        "op": "georef",
        "answer": ANSWER,
        "sources": [source_by_reference(str(before)), source_by_reference(str(after))],
    }
    inputs = service.read_inputs(requests.sources(header), [], requests.Options())
    a, b = inputs.chips
    assert a.crs == b.crs == "EPSG:32633" and a.data.shape == b.data.shape
    # the common extent starts where `after` begins: 250 m east of `before`'s origin -> column 25
    assert a.transform.c == pytest.approx(500_250, abs=10)
    assert any("common extent" in w for w in inputs.warnings)
    bright_a, bright_b = a.data[0] > 128, b.data[0] > 128
    inter = (bright_a & bright_b).sum()
    union = (bright_a | bright_b).sum()
    assert bright_a.sum() == pytest.approx(100, abs=25) and inter / union > 0.7
    reply = service.run(header, [], None)
    assert reply["features"]["crs"] == "EPSG:32633" and len(reply["chips"]) == 2


def test_a_pair_that_does_not_overlap_is_a_clear_error(tmp_path: Path) -> None:
    t1 = Affine(10, 0, 500_000, 0, -10, 4_000_000)
    t2 = Affine(10, 0, 600_000, 0, -10, 4_000_000)
    a = write(tmp_path / "a.tif", np.full((3, 20, 20), 9, np.uint8), "EPSG:32633", t1)
    b = write(tmp_path / "b.tif", np.full((3, 20, 20), 9, np.uint8), "EPSG:32633", t2)
    header = {
        "op": "georef",
        "answer": "",
        "sources": [source_by_reference(str(a)), source_by_reference(str(b))],
    }
    with pytest.raises(EarthDialError) as err:
        service.run(header, [], None)
    assert err.value.code == "no_overlap"


def test_tiles_cover_the_region_with_the_overlap_asked_for() -> None:
    plan = tiling.plan_for_window(Window(100, 50, 2000, 1000), 448, 0.1)
    tiles = [plan.window(i) for i in range(len(plan))]
    assert len(plan) == len(plan.cols) * len(plan.rows) == len(tiles)
    covered = np.zeros((1000, 2000), bool)
    for w in tiles:
        assert w.width == 448 and w.height == 448
        covered[
            int(w.row_off) - 50 : int(w.row_off) - 50 + 448, int(w.col_off) - 100 : int(w.col_off) - 100 + 448
        ] = True
    assert covered.all()
    cols = sorted({int(w.col_off) for w in tiles})
    assert all(b - a <= 448 * 0.9 for a, b in zip(cols, cols[1:], strict=False))
    assert cols[-1] + 448 == 2100  # the last column ends at the region's edge
    assert len(tiling.plan_tiles(300, 200, 448, 0.1)) == 1


def test_scene_reads_keep_gdal_blocks_in_a_cache_of_the_size_meant(tmp_path: Path) -> None:
    """rasterio takes GDAL_CACHEMAX in bytes: a cache of SCENE_CACHE_MB "bytes" made every tile decode
    its rows again. While a scene's tiles are read, the cache must hold many rows of a wide raster."""
    path = tmp_path / "wide.tif"
    write(path, np.zeros((3, 64, 4000), np.uint8), "EPSG:32633", Affine(1, 0, 500_000, 0, -1, 4_000_000))
    tiles = scenes.file_tiles([str(path)], [1, 2, 3], tiling.plan_tiles(4000, 64, 64, 0.0), 32)
    next(tiles)
    try:
        cache = int(rasterio.env.getenv()["GDAL_CACHEMAX"])
    finally:
        tiles.close()
    assert cache == scenes.SCENE_CACHE_MB * 1024 * 1024  # bytes: rows of 4000 px x 3 bands fit many times


def test_a_scan_stopped_mid_way_closes_its_file_on_the_reader_thread(tmp_path: Path) -> None:
    """Ctrl-C in `earthdial detect` stops the reader with tiles left; the file's GDAL environment was
    opened on the reader thread and must be left there (garbage-collected elsewhere, rasterio raised
    `EnvError: No GDAL environment exists` at exit)."""
    import gc
    import sys

    path = tmp_path / "stop.tif"
    write(path, np.zeros((3, 64, 640), np.uint8), "EPSG:32633", Affine(1, 0, 500_000, 0, -1, 4_000_000))
    unraisable: list = []
    previous, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        # held here as a scan's job list holds it: it is not collected with the reader
        tiles = scenes.file_tiles([str(path)], [1, 2, 3], tiling.plan_tiles(640, 64, 32, 0.0), 32)
        reader = scenes.ReadAhead(tiles, 2)
        assert reader.next(10) is not None  # reading; 19 tiles left
        reader.close()
        del reader, tiles
        gc.collect()
    finally:
        sys.unraisablehook = previous
    assert unraisable == []


def _feature(x0: float, y0: float, size: float, label: str, edge: float) -> dict:
    ring = [[x0, y0], [x0 + size, y0], [x0 + size, y0 + size], [x0, y0 + size], [x0, y0]]
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"label": label, "edge_distance": edge},
    }


def test_merge_keeps_one_of_overlapping_boxes_per_label() -> None:
    feats = [
        _feature(0, 0, 10, "ship", 40.0),  # seen near its tile's edge
        _feature(1, 0, 10, "ship", 5.0),  # the same ship seen near the centre of the next tile: kept
        _feature(1, 0, 10, "tank", 5.0),  # same place, other label: kept
        _feature(50, 50, 10, "ship", 30.0),  # elsewhere: kept
    ]
    kept = scenes.merge_boxes(feats, {})  # no footprints: no tile borders to join across
    assert [f["properties"]["label"] for f in kept] == ["ship", "tank", "ship"]
    assert kept[0]["properties"]["edge_distance"] == 5.0


def test_a_scan_streams_tiles_reports_progress_and_can_be_cancelled(tmp_path: Path, engine: Engine) -> None:
    from earthdial.serving import scan

    data = (np.random.default_rng(4).random((3, 300, 500)) * 255).astype(np.uint8)
    path = write(tmp_path / "scene.tif", data, "EPSG:32633", GRIDS["utm_32633"][1])
    header = {
        "op": "detect",
        "task": "refer",
        "prompt": "ships",
        "source": source_by_reference(str(path)),
        "options": {"tile_size": 224, "overlap": 0.2, "batch": 4},
    }
    events: list[tuple[str, dict]] = []
    reply = scan.run(header, engine, lambda event, **f: events.append((event, f)))
    n = len(tiling.plan_tiles(500, 300, 224, 0.2))
    progress = [f for e, f in events if e == "progress"]
    assert events[0][0] == "plan" and events[0][1]["total"] == n
    assert reply["tiles"] == n == progress[-1]["done"] == progress[-1]["total"]
    assert sorted(t["index"] for f in progress for t in f["tiles"]) == list(range(n))
    assert reply["crs"] == "EPSG:32633"
    seen: list[int] = []  # cancel once the first batch is reported done

    def on_event(event: str, **fields: object) -> None:
        if event == "progress":
            seen.append(fields["done"])

    with pytest.raises(EarthDialError) as err:
        scan.run(header, engine, on_event, lambda: bool(seen))
    assert seen == [4]
    assert err.value.code == "cancelled" and "after 4 of" in err.value.message
