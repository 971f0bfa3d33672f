"""A small synthetic scene to try the tool on: water on the left, land on the right, one ship."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_sample_scene(path: str | Path, crs: str = "EPSG:32633", seed: int = 0, size: int = 448) -> Path:
    """Write a 3-band uint8 GeoTIFF of `size` x `size` pixels at 1 m (0.5 m-class imagery is what the
    RGB model's [hr_rgb_0.5] tag expects; 1 m is close). Returns the path."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    water = cols < size * 0.6 + 20 * np.sin(rows / 40.0)
    img = np.empty((3, size, size), dtype=np.float32)
    for band, (w, land) in enumerate(((30, 95), (70, 110), (110, 70))):
        img[band] = np.where(water, w, land) + rng.normal(0, 6, (size, size))
    # a ship: an elongated bright hull on the water, 40 x 10 px, at a slight angle
    cy, cx, angle = size * 0.4, size * 0.3, np.deg2rad(20)
    u = (cols - cx) * np.cos(angle) + (rows - cy) * np.sin(angle)
    v = -(cols - cx) * np.sin(angle) + (rows - cy) * np.cos(angle)
    hull = (np.abs(u) < 20) & (np.abs(v) < 5)
    img[:, hull] = 230
    data = np.clip(img, 0, 255).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    origin = (500_000.0, 4_000_000.0) if crs.upper() == "EPSG:32633" else (0.0, 0.0)
    transform = from_origin(origin[0], origin[1], 1.0, 1.0)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs=crs, transform=transform, photometric="RGB") as dst:  # fmt: skip
        dst.write(data)
    return path
