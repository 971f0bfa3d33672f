"""Map tools: drag a rectangle for the area to ask about, or pick a region (a dragged box or a clicked
feature) to ask a region question about. Both report rectangles in the canvas's CRS; the dock carries them
into the layer's CRS."""

from __future__ import annotations

from typing import Any

from qgis.core import (
    Qgis,
    QgsCoordinateTransform,
    QgsCsException,
    QgsFeatureRequest,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.gui import QgsMapTool, QgsRubberBand

from ..core.qt import QtCore, QtGui

CLICK_PIXELS = 4  # a press and release closer than this is a click, not a drag
_Signal = QtCore.pyqtSignal if hasattr(QtCore, "pyqtSignal") else QtCore.Signal


def _polygon_type() -> Any:
    geometry_type = getattr(Qgis, "GeometryType", None)  # QGIS >= 3.30
    if geometry_type is not None:
        return geometry_type.Polygon
    from qgis.core import QgsWkbTypes

    return QgsWkbTypes.GeometryType.PolygonGeometry


class RectangleMapTool(QgsMapTool):
    """Press, drag and release the left button: emits ``rectangleDrawn(rect)`` in the canvas CRS."""

    rectangleDrawn = _Signal(QgsRectangle)

    def __init__(self, canvas: Any) -> None:
        super().__init__(canvas)
        self._start: QgsPointXY | None = None
        self._start_pixel: QtCore.QPoint | None = None
        self.band = QgsRubberBand(canvas, _polygon_type())
        self.band.setStrokeColor(QtGui.QColor(230, 120, 0))
        self.band.setFillColor(QtGui.QColor(230, 120, 0, 40))
        self.band.setWidth(2)
        self.setCursor(QtGui.QCursor(QtCore.Qt.CursorShape.CrossCursor))

    def canvasPressEvent(self, event: Any) -> None:
        if event.button() != QtCore.Qt.MouseButton.LeftButton:
            return
        self._start = event.mapPoint()
        self._start_pixel = event.originalPixelPoint()  # QMouseEvent.pos() is gone from PyQt6
        self.band.reset(_polygon_type())

    def canvasMoveEvent(self, event: Any) -> None:
        if self._start is None:
            return
        self._show(QgsRectangle(self._start, event.mapPoint()))

    def canvasReleaseEvent(self, event: Any) -> None:
        if self._start is None or event.button() != QtCore.Qt.MouseButton.LeftButton:
            return
        start, start_pixel = self._start, self._start_pixel
        self._start = self._start_pixel = None
        moved = (event.originalPixelPoint() - start_pixel).manhattanLength() if start_pixel is not None else 0
        if moved < CLICK_PIXELS:
            self.clicked(event.mapPoint())
            return
        rect = QgsRectangle(start, event.mapPoint())
        rect.normalize()
        self._show(rect)
        self.rectangleDrawn.emit(rect)

    def clicked(self, point: QgsPointXY) -> None:
        """A click without a drag: nothing for a plain rectangle."""
        self.band.reset(_polygon_type())

    def _show(self, rect: QgsRectangle) -> None:
        self.band.setToGeometry(QgsGeometry.fromRect(rect), None)

    def clear(self) -> None:
        self.band.reset(_polygon_type())

    def deactivate(self) -> None:
        self._start = None
        super().deactivate()


class RegionMapTool(RectangleMapTool):
    """A dragged box, or a click on a vector feature (its bounding box): emits ``rectangleDrawn``."""

    def clicked(self, point: QgsPointXY) -> None:
        rect = self.feature_box_at(point)
        if rect is None:
            self.band.reset(_polygon_type())
            return
        self._show(rect)
        self.rectangleDrawn.emit(rect)

    def feature_box_at(self, point: QgsPointXY) -> QgsRectangle | None:
        """The bounding box (canvas CRS) of the first feature of a visible vector layer under ``point``."""
        canvas = self.canvas()
        radius = self.searchRadiusMU(canvas)
        search = QgsRectangle(point.x() - radius, point.y() - radius, point.x() + radius, point.y() + radius)
        canvas_crs = canvas.mapSettings().destinationCrs()
        for layer in canvas.layers():
            if not isinstance(layer, QgsVectorLayer) or not layer.isValid():
                continue
            to_layer = QgsCoordinateTransform(canvas_crs, layer.crs(), QgsProject.instance())
            try:
                local = to_layer.transformBoundingBox(search)
            except QgsCsException:
                continue
            request = QgsFeatureRequest().setFilterRect(local).setLimit(20)
            probe = QgsGeometry.fromRect(local)
            for feature in layer.getFeatures(request):
                geometry = feature.geometry()
                if geometry is None or not geometry.intersects(probe):
                    continue
                box = geometry.boundingBox()
                try:
                    return to_layer.transformBoundingBox(box, Qgis.TransformDirection.Reverse)
                except (QgsCsException, AttributeError):
                    return box
        return None
