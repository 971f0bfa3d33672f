"""The chip preview: pixels to an 8-bit picture, boxes drawn where the model put them."""

from __future__ import annotations

import numpy as np
from qgis.PyQt.QtGui import QColor

from earthdial_qgis.core.preview import chip_grid, draw_boxes, preview_image, shrink, to_qimage, to_rgb8
from earthdial_qgis.core.styling import colour_for


def test_pixels_to_rgb() -> None:
    grey = np.arange(12, dtype=np.uint16).reshape(1, 3, 4) * 1000
    rgb = to_rgb8(grey)
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == rgb[..., 2]).all() and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    colour = np.zeros((3, 2, 2), np.uint8)
    colour[0] = 200
    assert to_rgb8(colour)[0, 0].tolist() == [200, 0, 0]  # 8-bit data unstretched
    assert shrink(np.zeros((3, 2000, 1000))).shape == (3, 500, 250)
    image = to_qimage(to_rgb8(colour))
    assert QColor(image.pixel(1, 1)).getRgb()[:3] == (200, 0, 0)


def test_boxes_land_on_the_window_fraction() -> None:
    image = to_qimage(np.zeros((100, 200, 3), np.uint8))
    drawn = draw_boxes(image, [("ship", [20, 30, 40, 60, 0])])
    ship = colour_for("ship").name()
    assert QColor(drawn.pixel(40, 45)).name() == ship  # left edge at x = 20 % of 200
    assert QColor(drawn.pixel(60, 45)).name() == "#000000"  # inside: outline only
    rotated = draw_boxes(image, [("ship", [20, 30, 40, 60, 90])])  # a quarter turn about the centre
    assert QColor(rotated.pixel(40, 45)).name() == "#000000"


def test_grid_of_a_reply_chip() -> None:
    chip = {"width": 1000, "height": 500, "transform": [10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0]}
    grid = chip_grid(chip, 512)
    assert grid.bounds == (500000.0, 3995000.0, 510000.0, 4000000.0) and (grid.cols, grid.rows) == (512, 256)
    assert chip_grid({"width": 2, "height": 2, "transform": [1, 0.5, 0, 0, -1, 0]}) is None  # rotated
    reply = {"features": {"features": [{"properties": {"label": "a", "box": [0, 0, 50, 50, 0]}}]}}
    assert not preview_image(np.zeros((3, 10, 10), np.uint8), reply).isNull()


def test_a_positive_angle_turns_the_box_counter_clockwise_as_georef_does() -> None:
    # 120 x 20 px box about (100, 100) at 30 degrees (EarthDial's direction, docs/outputs.md): the middle of
    # its right end, offset (60, 0), goes to (60 cos 30, -60 sin 30) = (+52, -30), i.e. pixel (152, 70);
    # clockwise it would be at (152, 130)
    image = to_qimage(np.zeros((200, 200, 3), np.uint8))
    drawn = draw_boxes(image, [("", [20, 45, 80, 55, 30])])

    def inked(x: int, y: int) -> bool:
        return any(
            QColor(drawn.pixel(x + dx, y + dy)).name() != "#000000" for dx in (-1, 0, 1) for dy in (-1, 0, 1)
        )

    assert inked(152, 70) and not inked(152, 130)
