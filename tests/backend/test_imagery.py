"""Reading request pixels: windows from bounds (also across CRSs and on rotated grids), bands,
resampling to max_size, arrays sent by value, and every error code."""

from __future__ import annotations

import math

import numpy as np
import pytest
from affine import Affine
from rasterio.crs import CRS

from conftest import write_geotiff
from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.geo.imagery import Chip, chip_from_array, read_chip


def make_tif(path, data, transform, crs="EPSG:32633", nodata=None):
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[np.newaxis]
    return str(write_geotiff(path, data, crs=crs, transform=transform, nodata=nodata))


def grid(count, height, width, dtype="uint16"):
    """Band 1 holds the column, band 2 the row, band k (k >= 3) k * 1000 + column."""
    rows, cols = np.mgrid[0:height, 0:width]
    bands = [cols, rows] + [k * 1000 + cols for k in range(3, count + 1)]
    return np.stack(bands[:count]).astype(dtype)


def apply(transform, col, row):
    a, b, c, d, e, f = transform[:6]
    return a * col + b * row + c, d * col + e * row + f


def corners(transform, width, height):
    return [apply(transform, c, r) for c, r in ((0, 0), (width, 0), (width, height), (0, height))]


def expect_error(code, fn, *args, **kwargs):
    with pytest.raises(EarthDialError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value.message


# UTM 33N around (15 E, 0 N), which is exactly (500000, 0): 10 m pixels, x 499000..501000, y -1000..1000
EQUATOR = Affine(10.0, 0.0, 499000.0, 0.0, -10.0, 1000.0)


@pytest.fixture
def utm_tif(tmp_path):
    return make_tif(tmp_path / "utm.tif", grid(4, 200, 200), EQUATOR, nodata=0)


def test_whole_raster_and_default_bands(utm_tif):
    chip = read_chip(utm_tif)
    assert isinstance(chip, Chip)
    assert chip.band_indexes == [1, 2, 3]
    assert chip.data.shape == (3, 200, 200)
    assert chip.data.dtype == np.uint16
    assert (chip.width, chip.height) == (200, 200)
    assert chip.transform == EQUATOR
    assert chip.crs == "EPSG:32633"
    assert chip.nodata == 0.0
    assert chip.source == utm_tif


def test_bounds_in_geographic_crs(utm_tif):
    # 0.001 degree at the equator on the central meridian, in UTM (scale factor 0.9996):
    #   east-west:   0.9996 * a * 0.001 * pi / 180            = 111.28 m (a = 6378137)
    #   north-south: 0.9996 * a * (1 - e^2) * 0.001 * pi / 180 = 110.53 m (e^2 = 0.00669438)
    # so x spans 499888.7..500111.3 -> cols 88.87..111.13, and y spans -110.5..110.5 -> rows 88.95..111.05;
    # snapped outwards: cols 88..112, rows 88..112.
    d = 0.001
    chip = read_chip(utm_tif, bounds=(15 - d, -d, 15 + d, d), bounds_crs="EPSG:4326")
    assert chip.data.shape == (3, 24, 24)
    assert chip.transform == Affine(10.0, 0.0, 499000.0 + 880, 0.0, -10.0, 1000.0 - 880)
    assert (chip.data[0] == np.arange(88, 112)[np.newaxis, :]).all()  # band 1 = column
    assert (chip.data[1] == np.arange(88, 112)[:, np.newaxis]).all()  # band 2 = row


def test_bounds_in_the_raster_crs(utm_tif):
    # x 499105..499195 -> cols 10.5..19.5 -> 10..20; y 805..895 -> rows 10.5..19.5 -> 10..20
    chip = read_chip(utm_tif, bands=[1], bounds=(499105, 805, 499195, 895))
    assert chip.data.shape == (1, 10, 10)
    assert chip.transform == Affine(10.0, 0.0, 499100.0, 0.0, -10.0, 900.0)
    # the same with the CRS named explicitly
    again = read_chip(utm_tif, bands=[1], bounds=(499105, 805, 499195, 895), bounds_crs="EPSG:32633")
    assert again.transform == chip.transform


def test_bounds_on_pixel_edges_do_not_grow_the_window(utm_tif):
    chip = read_chip(utm_tif, bands=[1], bounds=(499100, 800, 499200, 900))
    assert chip.data.shape == (1, 10, 10)


def test_bounds_partly_outside_are_clipped(utm_tif):
    # x 498000..499050 -> cols -100..5 -> 0..5; y 950..3000 -> rows -200..5 -> 0..5
    chip = read_chip(utm_tif, bands=[1], bounds=(498000, 950, 499050, 3000))
    assert chip.data.shape == (1, 5, 5)
    assert chip.transform == EQUATOR


def test_band_selection(utm_tif):
    chip = read_chip(utm_tif, bands=[4, 1], bounds=(499105, 805, 499195, 895))
    assert chip.band_indexes == [4, 1]
    assert (chip.data[0] == 4000 + np.arange(10, 20)[np.newaxis, :]).all()
    assert (chip.data[1] == np.arange(10, 20)[np.newaxis, :]).all()


@pytest.mark.parametrize(("count", "expected"), [(1, [1]), (2, [1, 2]), (3, [1, 2, 3])])
def test_default_bands_for_few_bands(tmp_path, count, expected):
    path = make_tif(tmp_path / "few.tif", grid(count, 4, 4), EQUATOR)
    assert read_chip(path).band_indexes == expected


def test_rotated_geotransform_90_degrees(tmp_path):
    # x = 10 row + 1000, y = 2000 - 10 col: col = (2000 - y) / 10, row = (x - 1000) / 10
    transform = Affine(0.0, 10.0, 1000.0, -10.0, 0.0, 2000.0)
    path = make_tif(tmp_path / "rot90.tif", grid(2, 40, 50), transform)
    # x 1105..1195 -> rows 10.5..19.5 -> 10..20; y 1655..1895 -> cols 10.5..34.5 -> 10..35
    chip = read_chip(path, bounds=(1105, 1655, 1195, 1895))
    assert chip.data.shape == (2, 10, 25)
    assert (chip.data[0] == np.arange(10, 35)[np.newaxis, :]).all()
    assert (chip.data[1] == np.arange(10, 20)[:, np.newaxis]).all()
    # window origin (col 10, row 10) lies at x = 1100, y = 1900
    assert chip.transform == Affine(0.0, 10.0, 1100.0, -10.0, 0.0, 1900.0)


def test_rotated_geotransform_45_degrees(tmp_path):
    # x = col + row, y = col - row: col = (x + y) / 2, row = (x - y) / 2
    transform = Affine(1.0, 1.0, 0.0, 1.0, -1.0, 0.0)
    path = make_tif(tmp_path / "rot45.tif", grid(2, 100, 100), transform)
    # corners (90.5, -9.5) (109.5, -9.5) (109.5, 9.5) (90.5, 9.5) -> (col, row)
    # (40.5, 50) (50, 59.5) (59.5, 50) (50, 40.5) -> cols 40..60, rows 40..60
    chip = read_chip(path, bounds=(90.5, -9.5, 109.5, 9.5))
    assert chip.data.shape == (2, 20, 20)
    assert (chip.data[0] == np.arange(40, 60)[np.newaxis, :]).all()
    assert (chip.data[1] == np.arange(40, 60)[:, np.newaxis]).all()
    assert chip.transform == Affine(1.0, 1.0, 80.0, 1.0, -1.0, 0.0)


def test_max_size_resamples_and_scales_the_transform(tmp_path):
    # 300 x 120 pixels of 3 x 3 blocks; block (i, j) holds i + 1000 j
    rows, cols = np.mgrid[0:120, 0:300]
    data = (cols // 3 + 1000 * (rows // 3)).astype("uint16")
    path = make_tif(tmp_path / "big.tif", data, EQUATOR)
    chip = read_chip(path, max_size=100)
    assert chip.data.shape == (1, 40, 100)
    # averaging each 3 x 3 block gives the block's value
    assert (chip.data[0] == np.arange(100)[np.newaxis, :] + 1000 * np.arange(40)[:, np.newaxis]).all()
    assert chip.transform == Affine(30.0, 0.0, 499000.0, 0.0, -30.0, 1000.0)
    for got, want in zip(corners(chip.transform, 100, 40), corners(EQUATOR, 300, 120), strict=True):
        assert got == pytest.approx(want)


def test_shrinking_averages_instead_of_picking_pixels(tmp_path):
    # a 0/100 checkerboard halved: every 2 x 2 block holds two of each, so its mean is 50
    rows, cols = np.mgrid[0:40, 0:40]
    path = make_tif(tmp_path / "checker.tif", (((rows + cols) % 2) * 100).astype("uint8"), EQUATOR)
    chip = read_chip(path, max_size=20)
    assert chip.data.shape == (1, 20, 20)
    assert (chip.data == 50).all()


def test_max_size_on_a_rotated_window(tmp_path):
    transform = Affine(1.0, 1.0, 0.0, 1.0, -1.0, 0.0)
    path = make_tif(tmp_path / "rot45.tif", grid(1, 100, 100, "float32"), transform)
    chip = read_chip(path, bounds=(90.5, -9.5, 109.5, 9.5), max_size=8)  # 20 x 20 window -> 8 x 8
    assert chip.data.shape == (1, 8, 8)
    assert chip.data.dtype == np.float32
    # the window (cols 40..60, rows 40..60) and the chip cover the same ground
    window_transform = Affine(1.0, 1.0, 80.0, 1.0, -1.0, 0.0)
    for got, want in zip(corners(chip.transform, 8, 8), corners(window_transform, 20, 20), strict=True):
        assert got == pytest.approx(want)


def test_max_size_keeps_aspect_of_a_tall_window(tmp_path):
    path = make_tif(tmp_path / "tall.tif", grid(1, 250, 100), EQUATOR)
    chip = read_chip(path, max_size=50)
    assert chip.data.shape == (1, 50, 20)
    assert chip.transform.a == pytest.approx(50.0) and chip.transform.e == pytest.approx(-50.0)


def test_max_size_none_reads_full_resolution(tmp_path):
    path = make_tif(tmp_path / "big.tif", grid(1, 30, 300), EQUATOR)
    assert read_chip(path, max_size=None).data.shape == (1, 30, 300)


# --- errors -------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    message = expect_error(ErrorCode.FILE_NOT_FOUND, read_chip, str(tmp_path / "nope.tif"))
    assert "nope.tif" in message


def test_not_a_raster(tmp_path):
    text = tmp_path / "notes.tif"
    text.write_text("this is not an image\n")
    expect_error(ErrorCode.NOT_A_RASTER, read_chip, str(text))
    expect_error(ErrorCode.NOT_A_RASTER, read_chip, str(tmp_path))  # a folder


@pytest.mark.parametrize("band", [0, -1, 5])
def test_band_out_of_range(utm_tif, band):
    message = expect_error(ErrorCode.BAND_OUT_OF_RANGE, read_chip, utm_tif, bands=[1, band])
    assert "1..4" in message


@pytest.mark.parametrize("bounds_crs", ["EPSG:999999", "not a crs"])
def test_unparseable_bounds_crs(utm_tif, bounds_crs):
    expect_error(ErrorCode.BAD_CRS, read_chip, utm_tif, bounds=(0, 0, 1, 1), bounds_crs=bounds_crs)


def test_bounds_crs_for_a_raster_without_crs(tmp_path):
    path = make_tif(tmp_path / "nocrs.tif", grid(1, 10, 10), EQUATOR, crs=None)
    expect_error(
        ErrorCode.BAD_CRS, read_chip, path, bounds=(499000, 900, 499050, 950), bounds_crs="EPSG:4326"
    )
    chip = read_chip(path, bounds=(499000, 900, 499050, 950))  # no bounds CRS: taken as the raster's
    assert chip.data.shape == (1, 5, 5)
    assert chip.crs == ""


@pytest.mark.parametrize(
    "bounds",
    [
        (10, 0, 10, 1),
        (11, 0, 10, 1),
        (0, 5, 1, 5),
        (math.nan, 0, 1, 1),
        (0, 0, math.inf, 1),
        (0, 0, 1),
        "abcd",
    ],
)
def test_bad_bounds(utm_tif, bounds):
    expect_error(ErrorCode.BAD_REQUEST, read_chip, utm_tif, bounds=bounds)


def test_bounds_outside(utm_tif):
    message = expect_error(ErrorCode.BOUNDS_OUTSIDE, read_chip, utm_tif, bounds=(0, 0, 10, 10))
    assert "(0.0, 0.0, 10.0, 10.0)" in message  # the request
    assert "(499000.0, -1000.0, 501000.0, 1000.0)" in message  # the raster's extent
    # touching the raster's edge is not overlapping it
    expect_error(ErrorCode.BOUNDS_OUTSIDE, read_chip, utm_tif, bounds=(501000, 0, 501100, 10))
    # far away in another CRS
    expect_error(
        ErrorCode.BOUNDS_OUTSIDE, read_chip, utm_tif, bounds=(20, 40, 21, 41), bounds_crs="EPSG:4326"
    )


def test_bad_max_size(utm_tif):
    expect_error(ErrorCode.BAD_REQUEST, read_chip, utm_tif, max_size=0)


# --- arrays sent by value -----------------------------------------------------------------------------


def test_chip_from_2d_array():
    array = np.arange(12, dtype="float32").reshape(3, 4)
    chip = chip_from_array(array, (10, 0, 100, 0, -10, 200), "EPSG:4326", nodata=-9999)
    assert chip.data.shape == (1, 3, 4)
    assert (chip.data[0] == array).all()
    assert (chip.width, chip.height) == (4, 3)
    assert chip.transform == Affine(10, 0, 100, 0, -10, 200)
    assert chip.crs == "EPSG:4326"
    assert chip.band_indexes == [1]
    assert chip.nodata == -9999.0
    assert chip.source == "<array>"


def test_chip_from_3d_array_keeps_dtype_and_bands():
    array = np.zeros((5, 2, 3), dtype="uint8")
    chip = chip_from_array(array, Affine(1, 0, 0, 0, -1, 0), None)
    assert chip.data.dtype == np.uint8
    assert chip.band_indexes == [1, 2, 3, 4, 5]
    assert chip.crs == ""
    assert chip.nodata is None


def test_chip_from_array_keeps_a_custom_crs_as_wkt():
    wkt = CRS.from_proj4("+proj=aeqd +lat_0=10 +lon_0=20 +datum=WGS84 +units=m").to_wkt()
    chip = chip_from_array(np.zeros((2, 2)), (1, 0, 0, 0, -1, 0), wkt)
    assert chip.crs.startswith(("PROJCS", "PROJCRS"))
    assert CRS.from_wkt(chip.crs) == CRS.from_wkt(wkt)


@pytest.mark.parametrize(
    "array",
    [np.zeros(4), np.zeros((1, 2, 3, 4)), np.zeros((0, 3)), np.zeros((2, 0, 3)), np.array([["a"]]), [[1, 2]]],
)
def test_bad_arrays(array):
    expect_error(ErrorCode.BAD_ARRAY, chip_from_array, array, (1, 0, 0, 0, -1, 0), None)


@pytest.mark.parametrize(
    "transform",
    [
        (1, 0, 0, 0, -1),
        (1, 0, 0, 0, -1, 0, 0),
        (math.nan, 0, 0, 0, -1, 0),
        (1, 2, 0, 2, 4, 0),
        (0, 0, 0, 0, 0, 0),
        "x",
    ],
)
def test_bad_transforms(transform):
    expect_error(ErrorCode.BAD_REQUEST, chip_from_array, np.zeros((2, 2)), transform, None)


def test_bad_array_crs():
    expect_error(ErrorCode.BAD_CRS, chip_from_array, np.zeros((2, 2)), (1, 0, 0, 0, -1, 0), "EPSG:999999")
