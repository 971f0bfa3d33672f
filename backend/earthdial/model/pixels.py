"""Pixels for the vision tower: value scaling, InternVL dynamic tiling and ImageNet normalisation.

Input is a chip's (bands, rows, cols) array in the raster's own dtype; output is a float tensor of
tiles (n, 3, size, size) in the layout InternVL was trained on.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_unit_rgb(data: np.ndarray, nodata: float | None = None) -> np.ndarray:
    """(bands, rows, cols) in any dtype -> float32 (3, rows, cols) in [0, 1].

    8-bit data is divided by 255, as the model saw it in training. Other types (16-bit, float) are
    stretched per band between their 2nd and 98th percentiles of valid pixels, the usual display
    stretch an analyst would see. Nodata and NaN become 0. One band is repeated to grey RGB;
    two bands get their last one repeated; more than three keep the first three."""
    if data.ndim != 3 or data.shape[0] < 1:
        raise ValueError(f"expected (bands, rows, cols), got shape {data.shape}")
    bands = [data[min(i, data.shape[0] - 1)] for i in range(3)]
    out = np.zeros((3, *data.shape[1:]), dtype=np.float32)
    for i, band in enumerate(bands):
        valid = np.isfinite(band) if band.dtype.kind == "f" else np.ones(band.shape, dtype=bool)
        if nodata is not None and not (isinstance(nodata, float) and np.isnan(nodata)):
            valid &= band != nodata
        if not valid.any():
            continue
        if band.dtype == np.uint8:
            scaled = band.astype(np.float32) / 255.0
        else:
            lo, hi = np.percentile(band[valid].astype(np.float64), [2.0, 98.0])
            scale = (hi - lo) if hi > lo else 1.0
            scaled = ((band.astype(np.float64) - lo) / scale).astype(np.float32)
        out[i] = np.where(valid, np.clip(scaled, 0.0, 1.0), 0.0)
    return out


def choose_grid(
    width: int, height: int, size: int, min_tiles: int = 1, max_tiles: int = 6
) -> tuple[int, int]:
    """InternVL's tile grid (columns, rows) for an image: the candidate whose aspect ratio is closest to
    the image's; on a tie the larger grid wins when the image has more than half its pixel area."""
    aspect = width / height
    grids = sorted(
        {
            (i, j)
            for n in range(min_tiles, max_tiles + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_tiles <= i * j <= max_tiles
        },
        key=lambda g: g[0] * g[1],
    )
    best, best_diff = (1, 1), float("inf")
    area = width * height
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    return best


def resize(image: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Bicubic resize of (c, h, w) with antialiasing (close to PIL's bicubic, which InternVL used)."""
    if image.shape[-2:] == (rows, cols):
        return image
    out = F.interpolate(image[None], size=(rows, cols), mode="bicubic", align_corners=False, antialias=True)[
        0
    ]
    return out.clamp_(0.0, 1.0)


def resize_linear(image: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(c, h, w) float resized as OpenCV's `cv2.resize(..., interpolation=INTER_LINEAR)` resizes a float
    image, each band on its own: an output pixel x samples the input at (x + 0.5) * in / out - 0.5
    (pixel centres), clamped to the first and last pixel at the edges, as the weighted mean of its two
    neighbours per axis; no antialiasing when shrinking (OpenCV's exact 2x shrink takes the mean of each
    2 x 2 block, which is the same value). That is torch's bilinear with align_corners False and no
    antialias; values are not clipped."""
    if image.shape[-2:] == (rows, cols):
        return image
    return F.interpolate(
        image[None], size=(rows, cols), mode="bilinear", align_corners=False, antialias=False
    )[0]


def dynamic_tiles(
    rgb: np.ndarray, size: int, min_tiles: int = 1, max_tiles: int = 6, use_thumbnail: bool = True
) -> torch.Tensor:
    """Split a (3, rows, cols) [0, 1] image into InternVL tiles: resize to the chosen grid, crop row-major,
    and append a whole-image thumbnail when there is more than one tile. Returns (n, 3, size, size) in
    [0, 1] (normalise with `normalize`)."""
    image = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32))
    height, width = image.shape[-2:]
    cols, rows = choose_grid(width, height, size, min_tiles, max_tiles)
    big = resize(image, rows * size, cols * size)
    tiles = [
        big[:, r * size : (r + 1) * size, c * size : (c + 1) * size] for r in range(rows) for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(resize(image, size, size))
    return torch.stack(tiles)


def normalize(tiles: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=tiles.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=tiles.dtype).view(1, 3, 1, 1)
    return (tiles - mean) / std
