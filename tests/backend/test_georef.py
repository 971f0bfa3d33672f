"""Boxes to map polygons; every expected coordinate below is worked out by hand from the convention in
earthdial.geo.georef's docstring."""

from __future__ import annotations

import json
import math

import pytest
from affine import Affine

from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.geo.georef import box_pixel_corners, box_to_polygon, features_from_boxes
from earthdial.model.answers import Box, parse_boxes

# 10 m pixels, north-up, upper-left corner at (500000, 4000000) in UTM
UTM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)
C30, S30 = math.sqrt(3) / 2, 0.5


def assert_points(actual, expected, tol=1e-9):
    assert len(actual) == len(expected)
    for (ax, ay), (ex, ey) in zip(actual, expected, strict=True):
        assert ax == pytest.approx(ex, abs=tol) and ay == pytest.approx(ey, abs=tol), (actual, expected)


def test_known_answer_on_north_up_raster():
    (box,) = parse_boxes("[[20, 30, 40, 60, 0]]")
    # 100 x 100 window: cols 20..40, rows 30..60; x = 500000 + 10 col, y = 4000000 - 10 row
    ring = box_to_polygon(box, UTM, 100, 100)
    assert_points(
        ring,
        [(500200, 3999700), (500400, 3999700), (500400, 3999400), (500200, 3999400), (500200, 3999700)],
    )


def test_corner_order_without_rotation():
    box = Box(20, 30, 40, 60, 0, None)
    assert_points(box_pixel_corners(box, 100, 100), [(20, 30), (40, 30), (40, 60), (20, 60)])


def test_rotation_by_90_degrees_is_counter_clockwise_on_screen():
    # Upstream's eval (rs_detection/eval.py): centred corners @ [[cos, -sin], [sin, cos]] as row vectors,
    # so at 90 degrees (dx, dy) -> (dy, -dx). Centre (30, 45), half sizes 10 x 15.
    box = Box(20, 30, 40, 60, 90, None)
    corners = box_pixel_corners(box, 100, 100)
    # top-left (-10, -15) -> (-15, 10): the top-left corner swings down to the bottom left
    assert_points(corners, [(15, 55), (15, 35), (45, 35), (45, 55)])


def test_rotation_by_30_degrees():
    # centre (50, 50), half sizes 10 x 5; (dx, dy) -> (dx cos + dy sin, -dx sin + dy cos)
    box = Box(40, 45, 60, 55, 30, None)
    corners = box_pixel_corners(box, 100, 100)
    expected = [
        (50 + (-10) * C30 + (-5) * S30, 50 - (-10) * S30 + (-5) * C30),
        (50 + 10 * C30 + (-5) * S30, 50 - 10 * S30 + (-5) * C30),
        (50 + 10 * C30 + 5 * S30, 50 - 10 * S30 + 5 * C30),
        (50 + (-10) * C30 + 5 * S30, 50 - (-10) * S30 + 5 * C30),
    ]
    assert_points(corners, expected)
    # the top edge now runs right and up on screen (rows grow downwards): counter-clockwise
    (x0, y0), (x1, y1) = corners[0], corners[1]
    assert x1 > x0 and y1 < y0
    assert math.hypot(x1 - x0, y1 - y0) == pytest.approx(20)


def test_rotated_box_on_the_map():
    # 90 degrees on the UTM grid: pixel corners (15,55),(15,35),(45,35),(45,55)
    ring = box_to_polygon(Box(20, 30, 40, 60, 90, None), UTM, 100, 100)
    assert_points(
        ring,
        [(500150, 3999450), (500150, 3999650), (500450, 3999650), (500450, 3999450), (500150, 3999450)],
    )


def test_full_turn_is_no_turn():
    box = Box(20, 30, 40, 60, 360, None)
    assert_points(box_pixel_corners(box, 100, 100), [(20, 30), (40, 30), (40, 60), (20, 60)])


def test_rotated_and_skewed_geotransform():
    # x = 2 col + 1 row + 1000, y = 0.5 col - 3 row + 2000; 10 x 20 window, box covers cols 0..5, rows 0..20
    transform = Affine(2.0, 1.0, 1000.0, 0.5, -3.0, 2000.0)
    ring = box_to_polygon(Box(0, 0, 50, 100, 0, None), transform, 10, 20)
    assert_points(ring, [(1000, 2000), (1010, 2002.5), (1030, 1942.5), (1020, 1940), (1000, 2000)])


def test_south_up_geotransform_given_as_six_numbers():
    ring = box_to_polygon(Box(20, 30, 40, 60, 0, None), (10.0, 0.0, 0.0, 0.0, 10.0, 0.0), 100, 100)
    assert_points(ring, [(200, 300), (400, 300), (400, 600), (200, 600), (200, 300)])


def test_non_square_window():
    # 200 x 50 window, 1 m pixels, y = 50 - row; box covers cols 20..60, rows 10..30
    transform = Affine(1.0, 0.0, 0.0, 0.0, -1.0, 50.0)
    ring = box_to_polygon(Box(10, 20, 30, 60, 0, None), transform, 200, 50)
    assert_points(ring, [(20, 40), (60, 40), (60, 20), (20, 20), (20, 40)])


def test_rotation_happens_in_square_pixel_space_of_a_non_square_window():
    # cols 80..120, rows 20..30: 40 x 10 pixels about (100, 25); turned 90 degrees it is 10 x 40 pixels.
    # Upstream's direction (counter-clockwise on screen): the top-left corner (-20, -5) from the centre
    # goes to (-5, +20), i.e. (95, 45); the top edge, which pointed right, points up.
    corners = box_pixel_corners(Box(40, 40, 60, 60, 90, None), 200, 50)
    assert_points(corners, [(95, 45), (95, 5), (105, 5), (105, 45)])


def test_fractional_window_size():
    corners = box_pixel_corners(Box(0, 0, 100, 100, 0, None), 50.5, 20.25)
    assert_points(corners, [(0, 0), (50.5, 0), (50.5, 20.25), (0, 20.25)])


def test_features_from_two_labelled_boxes():
    boxes = parse_boxes(
        "<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box> and <ref>pool</ref> [[0, 0, 10, 10, 90]]"
    )
    fc = features_from_boxes(
        boxes, UTM, 100, 100, "EPSG:32633", {"task": "grounding", "model": "EarthDial_4B_RGB"}
    )
    assert fc["type"] == "FeatureCollection"
    assert fc["crs"] == "EPSG:32633"
    assert len(fc["features"]) == 2
    first, second = fc["features"]
    assert first["type"] == "Feature"
    assert first["geometry"]["type"] == "Polygon"
    assert_points(
        first["geometry"]["coordinates"][0],
        [(500200, 3999700), (500400, 3999700), (500400, 3999400), (500200, 3999400), (500200, 3999700)],
    )
    assert first["properties"] == {
        "label": "ship",
        "angle": 0.0,
        "box": [20.0, 30.0, 40.0, 60.0, 0.0],
        "task": "grounding",
        "model": "EarthDial_4B_RGB",
    }
    # a 10 x 10 pixel square turned 90 degrees about (5, 5) covers the same square
    assert second["properties"]["label"] == "pool"
    assert second["properties"]["angle"] == 90.0
    assert_points(
        second["geometry"]["coordinates"][0],
        [(500000, 3999900), (500000, 4000000), (500100, 4000000), (500100, 3999900), (500000, 3999900)],
    )
    # plain JSON: lists and floats only
    text = json.dumps(fc, allow_nan=False)
    assert json.loads(text) == fc
    assert all(type(v) is float for point in first["geometry"]["coordinates"][0] for v in point)


def test_no_boxes_gives_an_empty_collection():
    assert features_from_boxes([], UTM, 10, 10, "EPSG:4326") == {
        "type": "FeatureCollection",
        "crs": "EPSG:4326",
        "features": [],
    }


@pytest.mark.parametrize(
    ("transform", "width", "height"),
    [
        (UTM, 0, 10),
        (UTM, 10, -1),
        (UTM, math.nan, 10),
        (UTM, 10, math.inf),
        ((1.0, 0.0, 0.0, 0.0, 1.0), 10, 10),  # five numbers
        ((1.0, 0.0, 0.0, 2.0, 0.0, 0.0), 10, 10),  # degenerate
        ((math.nan, 0.0, 0.0, 0.0, 1.0, 0.0), 10, 10),
        ("not a transform", 10, 10),
    ],
)
def test_bad_window_or_transform(transform, width, height):
    with pytest.raises(EarthDialError) as info:
        box_to_polygon(Box(0, 0, 1, 1, 0, None), transform, width, height)
    assert info.value.code == ErrorCode.BAD_REQUEST
