"""The PNG preview: the chip with each returned box's outline drawn where the box is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from earthdial.geo import imagery
from earthdial.outputs import preview


def test_box_outline_is_drawn_on_the_box_edges_only(tmp_path: Path) -> None:
    chip = imagery.Chip(
        np.full((3, 100, 200), 60, np.uint8),
        Affine(2, 0, 1000, 0, -2, 5000),
        "EPSG:32633",
        [1, 2, 3],
        None,
        "x",
    )
    # a box from pixel (40, 20) to (80, 60): map x 1080..1160, y 4960..4880
    ring = [[1080, 4960], [1160, 4960], [1160, 4880], [1080, 4880], [1080, 4960]]
    fc = {
        "features": [
            {"geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {"label": "ship"}}
        ]
    }
    image = preview.draw(chip, fc)
    red = (image[0] == 255) & (image[1] == 40)
    assert red[40, 40] and red[20, 60] and red[59, 79]  # on the edges
    assert not red[40, 60] and not red[5, 5]  # inside and outside stay the picture
    path = preview.write_png(tmp_path / "p.png", image)
    with rasterio.open(path) as src:
        np.testing.assert_array_equal(src.read(), image)
    assert not list(tmp_path.glob("*.aux.xml"))
