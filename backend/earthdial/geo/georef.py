"""Boxes from answers to polygons on the map.

Convention:

* The 0-100 scale of a box maps onto the pixel grid of the image window the model saw:
  ``col = x / 100 * width``, ``row = y / 100 * height``, with ``width`` and ``height`` in window pixels
  (they may be fractional, and the window need not be square). (0, 0) is the outer corner of the
  top-left pixel, (100, 100) the outer corner of the bottom-right one.
* The rotation by ``angle`` degrees is applied about the box centre in that pixel space, pixels being
  taken as square on the ground. It is the rotation of EarthDial's own evaluation (upstream
  ``eval/rs_detection/eval.py``, the only published reference for the direction): the centred corners
  as row vectors times R = [[cos a, -sin a], [sin a, cos a]], so a corner offset (dx, dy) from the
  centre becomes (dx*cos a + dy*sin a, -dx*sin a + dy*cos a). Image axes are x right, y down, so a
  positive angle turns the box counter-clockwise as seen on screen (and on a north-up map): at 90
  degrees the end that pointed right points up. docs/outputs.md works an example.
* Pixel (col, row) goes to the map through the window's affine ``transform``
  (x = a*col + b*row + c, y = d*col + e*row + f), which may be rotated, skewed or south-up.

Corners come in the order (x1, y1), (x2, y1), (x2, y2), (x1, y2) before rotation, i.e. top-left,
top-right, bottom-right, bottom-left on screen; rings keep that order and are closed by repeating
the first corner.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from affine import Affine

from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.model.answers import Box

__all__ = ["box_pixel_corners", "box_to_polygon", "features_from_boxes"]


def box_pixel_corners(box: Box, width: float, height: float) -> list[tuple[float, float]]:
    """The four (col, row) corners of ``box`` on a ``width`` x ``height`` pixel window, rotated."""
    _check_size(width, height)
    sx, sy = width / 100.0, height / 100.0
    cx, cy = (box.x1 + box.x2) / 2.0 * sx, (box.y1 + box.y2) / 2.0 * sy
    hw, hh = (box.x2 - box.x1) / 2.0 * sx, (box.y2 - box.y1) / 2.0 * sy
    a = math.radians(box.angle)
    cos_a, sin_a = math.cos(a), math.sin(a)
    corners = []
    for dx, dy in ((-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)):
        corners.append((cx + dx * cos_a + dy * sin_a, cy - dx * sin_a + dy * cos_a))
    return corners


def box_to_polygon(
    box: Box, transform: Affine | Sequence[float], width: float, height: float
) -> list[tuple[float, float]]:
    """A closed ring (5 points) of map coordinates for ``box`` on the window ``transform`` describes."""
    a, b, c, d, e, f = _as_affine(transform)[:6]
    ring = [
        (a * col + b * row + c, d * col + e * row + f) for col, row in box_pixel_corners(box, width, height)
    ]
    ring.append(ring[0])
    return [(float(x), float(y)) for x, y in ring]


def features_from_boxes(
    boxes: list[Box],
    transform: Affine | Sequence[float],
    width: float,
    height: float,
    crs: str,
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A GeoJSON-like FeatureCollection of one polygon per box, with its CRS under ``"crs"``.

    Each feature's properties are ``label``, ``angle``, ``box`` ([x1, y1, x2, y2, angle] on 0-100),
    then ``properties`` (shared by every feature, e.g. task, prompt, answer, model, source, created).
    """
    aff = _as_affine(transform)
    extra = dict(properties or {})
    features = []
    for box in boxes:
        ring = box_to_polygon(box, aff, width, height)
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[[x, y] for x, y in ring]]},
                "properties": {
                    "label": box.label,
                    "angle": float(box.angle),
                    "box": [float(v) for v in (box.x1, box.y1, box.x2, box.y2, box.angle)],
                    **extra,
                },
            }
        )
    return {"type": "FeatureCollection", "crs": crs, "features": features}


def _check_size(width: float, height: float) -> None:
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"window {name} must be a positive number, got {v!r}")


def _as_affine(transform: Affine | Sequence[float]) -> Affine:
    if isinstance(transform, Affine):
        aff = transform
    else:
        try:
            values = [float(v) for v in transform]
        except (TypeError, ValueError):
            values = []
        if len(values) != 6:
            raise EarthDialError(
                ErrorCode.BAD_REQUEST, f"transform must be 6 numbers (a, b, c, d, e, f), got {transform!r}"
            )
        aff = Affine(*values)
    if not all(math.isfinite(v) for v in aff[:6]) or aff.is_degenerate:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"transform {tuple(aff[:6])} is not finite and invertible"
        )
    return aff
