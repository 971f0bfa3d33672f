"""Whole-layer detection without help from the backend: cut an area into overlapping windows of the
layer's own pixels, and merge the boxes that neighbouring windows both found.

Two boxes are one object when they have the same label and overlap with an intersection over union of
at least 0.5 (QgsGeometry on the map polygons, so rotated boxes are compared exactly); the first found
is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qgis.core import QgsFeature, QgsRectangle, QgsSpatialIndex

IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class Tile:
    col: int  # pixel column of the tile's top-left corner in the layer
    row: int
    rect: QgsRectangle  # in the layer's CRS

    @property
    def name(self) -> str:
        return f"{self.col},{self.row}"


def _starts(first: int, last: int, size: int, step: int) -> list[int]:
    """Window starts covering pixels first..last (exclusive) with windows of ``size`` at most ``step``
    apart, spread evenly so that the first window starts on one edge and the last ends on the other."""
    span = last - first
    if span <= size:
        return [first]
    count = math.ceil((span - size) / step) + 1
    return sorted({first + round(i * (span - size) / (count - 1)) for i in range(count)})


def tiles(
    layer_extent: QgsRectangle,
    resolution: tuple[float, float],
    area: QgsRectangle,
    size: int,
    overlap: float = 0.1,
) -> list[Tile]:
    """Windows of ``size`` x ``size`` layer pixels over ``area`` (layer CRS), overlapping by ``overlap``."""
    if size < 1:
        raise ValueError("tile size must be at least 1 pixel")
    if not 0 <= overlap < 1:
        raise ValueError("overlap must be in [0, 1)")
    xres, yres = resolution
    x0, ytop = layer_extent.xMinimum(), layer_extent.yMaximum()
    cols = round(layer_extent.width() / xres)
    rows = round(layer_extent.height() / yres)
    clip = area.intersect(layer_extent)
    if clip.isEmpty() or clip.width() <= 0 or clip.height() <= 0:
        return []
    c0 = max(0, math.floor((clip.xMinimum() - x0) / xres + 1e-6))
    c1 = min(cols, math.ceil((clip.xMaximum() - x0) / xres - 1e-6))
    r0 = max(0, math.floor((ytop - clip.yMaximum()) / yres + 1e-6))
    r1 = min(rows, math.ceil((ytop - clip.yMinimum()) / yres - 1e-6))
    step = max(1, round(size * (1 - overlap)))
    out = []
    for row in _starts(r0, r1, size, step):
        for col in _starts(c0, c1, size, step):
            w, h = min(size, c1 - col), min(size, r1 - row)
            rect = QgsRectangle(
                x0 + col * xres, ytop - (row + h) * yres, x0 + (col + w) * xres, ytop - row * yres
            )
            out.append(Tile(col, row, rect))
    return out


def iou(a: QgsFeature, b: QgsFeature) -> float:
    ga, gb = a.geometry(), b.geometry()
    inter = ga.intersection(gb)
    if inter.isEmpty():
        return 0.0
    union = ga.area() + gb.area() - inter.area()
    return inter.area() / union if union > 0 else 0.0


def merge_boxes(
    features: list[QgsFeature], threshold: float = IOU_THRESHOLD, label_field: str = "label"
) -> list[QgsFeature]:
    """Drop every box that overlaps an earlier kept box of the same label with IoU >= ``threshold``."""
    kept: list[QgsFeature] = []
    index = QgsSpatialIndex()
    for feature in features:
        geometry = feature.geometry()
        if geometry is None or geometry.isEmpty():
            continue
        label = feature[label_field]
        duplicate = False
        for fid in index.intersects(geometry.boundingBox()):
            other = kept[fid]
            if other[label_field] == label and iou(feature, other) >= threshold:
                duplicate = True
                break
        if duplicate:
            continue
        copy = QgsFeature(feature)
        copy.setId(len(kept))
        index.addFeature(copy)
        kept.append(copy)
    return kept
