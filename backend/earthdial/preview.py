"""A PNG of what the model saw with the boxes it returned drawn on it, for a quick look without QGIS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import imagery, pixels

COLOURS = ((255, 40, 40), (40, 220, 255), (255, 220, 0), (60, 255, 60), (255, 80, 255))


def draw(chip: imagery.Chip, features: dict[str, Any], line_px: int = 2) -> np.ndarray:
    """(3, rows, cols) uint8: the chip stretched for display, each box's outline in a colour per label."""
    from rasterio.features import rasterize
    from shapely.geometry import shape
    from shapely.ops import transform as shp_transform

    rgb = (pixels.to_unit_rgb(chip.data, chip.nodata) * 255).astype(np.uint8)
    inverse = ~chip.transform
    labels: dict[str, int] = {}
    for feat in features.get("features", []):
        label = str(feat.get("properties", {}).get("label") or "")
        colour = COLOURS[labels.setdefault(label, len(labels)) % len(COLOURS)]
        poly = shp_transform(lambda x, y, inv=inverse: inv * (x, y), shape(feat["geometry"]))
        outline = poly.exterior.buffer(line_px / 2)
        mask = rasterize([(outline, 1)], out_shape=rgb.shape[1:], fill=0, dtype="uint8").astype(bool)
        for band, value in enumerate(colour):
            rgb[band][mask] = value
    return rgb


def write_png(path: str | Path, image: np.ndarray) -> Path:

    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a preview is a picture, not a map
        _write(path, image)
    for extra in path.parent.glob(
        path.name + ".aux.xml"
    ):  # GDAL's side file for a PNG without georeferencing
        extra.unlink()
    return path


def _write(path: Path, image: np.ndarray) -> None:
    import rasterio

    with rasterio.open(path, "w", driver="PNG", width=image.shape[2], height=image.shape[1], count=3,
                       dtype="uint8") as dst:  # fmt: skip
        dst.write(image)
    for extra in path.parent.glob(
        path.name + ".aux.xml"
    ):  # GDAL's side file for a PNG without georeferencing
        extra.unlink()
    return path
