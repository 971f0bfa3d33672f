"""The area a request is about, and region boxes in the model's own 0-100 window coordinates.

Areas come from the map view, the whole layer, a rectangle drawn on the map or the selected features; each
ends as a rectangle in the (first) layer's CRS, snapped outwards to the layer's pixels, so that the
window the backend reads is exactly that rectangle and a region box computed against it means the same
pixels to the model.
"""

from __future__ import annotations

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCsException,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)

from ..contract.wire import EarthDialError, ErrorCode
from .errors import BAD_INPUT, NO_AREA, tr
from .sources import area_in_layer_crs, native_resolution, pixel_edges

MAP_EXTENT = "map"
WHOLE_LAYER = "layer"
DRAWN = "drawn"
SELECTION = "selection"
MODES = (MAP_EXTENT, WHOLE_LAYER, DRAWN, SELECTION)


def snap_to_pixels(area: QgsRectangle, layer: QgsRasterLayer) -> QgsRectangle:
    """``area`` (layer CRS) clipped to the layer and widened to whole layer pixels; unchanged for layers
    without a native grid (web layers)."""
    extent = layer.extent()
    clip = area.intersect(extent)
    if clip.isEmpty() or clip.width() <= 0 or clip.height() <= 0:
        raise EarthDialError(
            ErrorCode.BOUNDS_OUTSIDE,
            tr("the area does not overlap layer '{layer}' (extent {extent})").format(
                layer=layer.name(), extent=extent.toString(2)
            ),
        )
    resolution = native_resolution(layer)
    if resolution is None:
        return clip
    (minx, miny, maxx, maxy), _ = pixel_edges(clip, extent, resolution)
    return QgsRectangle(minx, miny, maxx, maxy)


def selection_extent(crs: QgsCoordinateReferenceSystem, project: QgsProject | None = None) -> QgsRectangle:
    """The bounding box, in ``crs``, of the features selected in all vector layers of the project."""
    project = project or QgsProject.instance()
    total = QgsRectangle()
    if hasattr(total, "setNull"):  # QGIS >= 3.34, where setMinimal() is deprecated
        total.setNull()
    else:
        total.setMinimal()
    found = False
    for layer in project.mapLayers().values():
        if not isinstance(layer, QgsVectorLayer) or layer.selectedFeatureCount() == 0:
            continue
        box = layer.boundingBoxOfSelected()
        if box.isNull():  # a selected point: a box of no size
            continue
        if crs.isValid() and layer.crs().isValid() and layer.crs() != crs:
            try:
                box = QgsCoordinateTransform(layer.crs(), crs, project).transformBoundingBox(box)
            except QgsCsException:
                continue
        total.combineExtentWith(box)
        found = True
    if not found:
        raise EarthDialError(NO_AREA, tr("No features are selected: select some, or pick another area."))
    return total


def area_for(
    mode: str,
    layer: QgsRasterLayer,
    canvas_extent: QgsRectangle,
    canvas_crs: QgsCoordinateReferenceSystem,
    drawn: tuple[QgsRectangle, QgsCoordinateReferenceSystem] | None = None,
) -> QgsRectangle:
    """The rectangle (layer CRS, snapped to the layer's pixels) an area mode means for ``layer``."""
    if mode == WHOLE_LAYER:
        area = QgsRectangle(layer.extent())
    elif mode == DRAWN:
        if drawn is None:
            raise EarthDialError(NO_AREA, tr("No rectangle drawn yet: press Draw and drag one on the map."))
        area = area_in_layer_crs(drawn[0], drawn[1], layer)
    elif mode == SELECTION:
        area = selection_extent(layer.crs())
    elif mode == MAP_EXTENT:
        area = area_in_layer_crs(canvas_extent, canvas_crs, layer)
    else:
        raise EarthDialError(BAD_INPUT, tr("Unknown area {mode!r}").format(mode=mode))
    return snap_to_pixels(area, layer)


def region_box(region: QgsRectangle, window: QgsRectangle) -> list[list[int]]:
    """A region (rectangle in the window's CRS) as the model's box ``[[x1, y1, x2, y2, 0]]``: integers on
    0-100 of the window's width and height, y running down from the window's top edge."""
    if window.width() <= 0 or window.height() <= 0:
        raise EarthDialError(BAD_INPUT, tr("The area has no size."))
    left, right = max(region.xMinimum(), window.xMinimum()), min(region.xMaximum(), window.xMaximum())
    bottom, top = max(region.yMinimum(), window.yMinimum()), min(region.yMaximum(), window.yMaximum())
    if left > right or bottom > top:  # (a point region inside the window is fine)
        raise EarthDialError(
            NO_AREA, tr("The region lies outside the area being asked about: move the map or pick the area.")
        )

    def scale(v: float, lo: float, size: float) -> int:
        return max(0, min(100, round((v - lo) / size * 100)))

    x1 = scale(left, window.xMinimum(), window.width())
    x2 = scale(right, window.xMinimum(), window.width())
    y1 = scale(window.yMaximum() - top, 0.0, window.height())
    y2 = scale(window.yMaximum() - bottom, 0.0, window.height())
    if x2 == x1:
        x2 = min(100, x1 + 1) if x1 < 100 else x1
        x1 = x2 - 1
    if y2 == y1:
        y2 = min(100, y1 + 1) if y1 < 100 else y1
        y1 = y2 - 1
    return [[x1, y1, x2, y2, 0]]


def box_text(box: list[list[int]]) -> str:
    """The box as the model writes it: ``[[20, 30, 40, 60, 0]]``."""
    return "[" + ", ".join("[" + ", ".join(str(int(v)) for v in b) + "]" for b in box) + "]"
