"""Dynamic tiling and value scaling, checked against grids and crops worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from earthdial.model import pixels


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (448, 448, (1, 1)),  # square and small: the tie between 1x1 and 2x2 goes to 1x1
        (896, 896, (2, 2)),  # square and large: more than half of 2x2's area, so 2x2
        (1000, 500, (2, 1)),
        (500, 1000, (1, 2)),
        (1344, 448, (3, 1)),
        (2000, 300, (6, 1)),  # aspect 6.7: 6x1 is the closest allowed
        (800, 600, (3, 2)),  # aspect 1.33: 3x2 (1.5) beats 1x1 (1.0) and 2x1 (2.0)
        (300, 700, (1, 2)),  # aspect 0.43: 1x2 (0.5) beats 1x3 (0.33)
    ],
)
def test_grid_choice(width: int, height: int, expected: tuple[int, int]) -> None:
    assert pixels.choose_grid(width, height, 448, 1, 6) == expected


def test_grid_respects_tile_limits() -> None:
    assert pixels.choose_grid(5000, 100, 224, 1, 2) == (2, 1)
    assert pixels.choose_grid(100, 100, 224, 2, 6) == (2, 2)  # at least two tiles: 2x2 keeps the aspect


def test_tiles_are_cropped_row_major_with_a_thumbnail() -> None:
    # 2 columns x 1 row: left half red, right half blue -> tile 0 red, tile 1 blue, then the thumbnail
    img = np.zeros((3, 50, 100), dtype=np.float32)
    img[0, :, :50] = 1.0
    img[2, :, 50:] = 1.0
    tiles = pixels.dynamic_tiles(img, 28, 1, 6, use_thumbnail=True)
    assert tiles.shape == (3, 3, 28, 28)
    assert tiles[0, 0].mean() > 0.95 and tiles[0, 2].mean() < 0.05
    assert tiles[1, 2].mean() > 0.95 and tiles[1, 0].mean() < 0.05
    thumb = tiles[2]
    assert thumb[0, :, :10].mean() > 0.95 and thumb[2, :, -10:].mean() > 0.95


def test_single_tile_has_no_thumbnail() -> None:
    tiles = pixels.dynamic_tiles(np.full((3, 20, 20), 0.5, np.float32), 28, 1, 6, use_thumbnail=True)
    assert tiles.shape == (1, 3, 28, 28)
    torch.testing.assert_close(tiles, torch.full_like(tiles, 0.5), atol=1e-5, rtol=0)


def test_normalize_uses_imagenet_statistics() -> None:
    out = pixels.normalize(torch.full((1, 3, 2, 2), 0.5))
    expected = [(0.5 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (0.5 - 0.406) / 0.225]
    for c in range(3):
        assert out[0, c, 0, 0].item() == pytest.approx(expected[c], rel=1e-5)


def test_uint8_is_divided_by_255_and_one_band_becomes_grey() -> None:
    band = np.array([[[0, 51, 255]]], dtype=np.uint8)
    out = pixels.to_unit_rgb(band)
    assert out.shape == (3, 1, 3)
    np.testing.assert_allclose(out[1, 0], [0.0, 0.2, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(out[0], out[2])


def test_16bit_is_stretched_between_percentiles_and_nodata_is_zero() -> None:
    data = np.arange(1, 101, dtype=np.uint16).reshape(1, 10, 10).repeat(3, axis=0)
    data[:, 0, 0] = 0  # nodata
    out = pixels.to_unit_rgb(data, nodata=0)
    valid = np.arange(2, 101, dtype=np.float64)
    lo, hi = np.percentile(valid, [2, 98])
    assert out[0, 0, 0] == 0.0
    assert out[0, 5, 5] == pytest.approx((56 - lo) / (hi - lo), rel=1e-5)
    assert out.max() == 1.0 and out.min() == 0.0


def test_nan_float_pixels_become_zero() -> None:
    data = np.ones((3, 4, 4), dtype=np.float32)
    data[:, 1, 1] = np.nan
    out = pixels.to_unit_rgb(data)
    assert np.isfinite(out).all() and out[0, 1, 1] == 0.0
