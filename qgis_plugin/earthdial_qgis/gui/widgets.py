"""Small widgets of the EarthDial panel: the later layers of a pair or sequence, and the chip preview."""

from __future__ import annotations

from typing import Any

from qgis.core import Qgis, QgsMapLayerProxyModel, QgsRasterLayer
from qgis.gui import QgsMapLayerComboBox

from ..core.qt import QtCore, QtGui, QtWidgets

MAX_LATER = 7  # the backend takes at most 8 images in one request


def raster_filter() -> Any:
    layer_filter = getattr(Qgis, "LayerFilter", None)  # QGIS >= 3.34 moved the flags here
    return layer_filter.RasterLayer if layer_filter is not None else QgsMapLayerProxyModel.RasterLayer


def raster_combo() -> QgsMapLayerComboBox:
    combo = QgsMapLayerComboBox()
    combo.setFilters(raster_filter())
    return combo


class LaterLayers(QtWidgets.QWidget):
    """The layers after the first one, in order (after; or a time series): one combo per layer."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.combos: list[QgsMapLayerComboBox] = []
        self.rows = QtWidgets.QVBoxLayout()
        self.rows.setContentsMargins(0, 0, 0, 0)
        self.add_button = QtWidgets.QToolButton()
        self.add_button.setText("+")
        self.add_button.setToolTip(self.tr("Add a later layer (a time series)"))
        self.add_button.clicked.connect(lambda: self.add())
        self.remove_button = QtWidgets.QToolButton()
        self.remove_button.setText("−")
        self.remove_button.setToolTip(self.tr("Remove the last layer"))
        self.remove_button.clicked.connect(self.remove_last)
        buttons = QtWidgets.QHBoxLayout()
        buttons.setContentsMargins(0, 0, 0, 0)
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.remove_button)
        buttons.addStretch(1)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(self.rows)
        layout.addLayout(buttons)
        self.add()

    def add(self, layer: QgsRasterLayer | None = None) -> QgsMapLayerComboBox:
        if len(self.combos) >= MAX_LATER:
            return self.combos[-1]
        combo = raster_combo()
        combo.setAllowEmptyLayer(True)
        combo.setLayer(layer)
        self.rows.addWidget(combo)
        self.combos.append(combo)
        self._update_buttons()
        return combo

    def remove_last(self) -> None:
        if len(self.combos) <= 1:
            return
        combo = self.combos.pop()
        self.rows.removeWidget(combo)
        combo.deleteLater()
        self._update_buttons()

    def set_layers(self, layers: list[QgsRasterLayer]) -> None:
        while len(self.combos) > max(1, len(layers)):
            self.remove_last()
        while len(self.combos) < len(layers):
            self.add()
        for combo, layer in zip(self.combos, layers or [None], strict=False):
            combo.setLayer(layer)

    def layers(self) -> list[QgsRasterLayer]:
        return [c.currentLayer() for c in self.combos if isinstance(c.currentLayer(), QgsRasterLayer)]

    def _update_buttons(self) -> None:
        self.add_button.setEnabled(len(self.combos) < MAX_LATER)
        self.remove_button.setEnabled(len(self.combos) > 1)


class PreviewLabel(QtWidgets.QLabel):
    """Shows the chip preview scaled to the panel's width, keeping its aspect."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.setAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
        self.setMinimumSize(120, 120)
        self.setSizePolicy(QtWidgets.QSizePolicy.Policy.Ignored, QtWidgets.QSizePolicy.Policy.Ignored)
        self.image: QtGui.QImage | None = None
        self.setText(self.tr("The picture the model saw appears here, with its boxes."))
        self.setWordWrap(True)

    def set_image(self, image: QtGui.QImage | None) -> None:
        self.image = image
        self._rescale()

    def resizeEvent(self, event: Any) -> None:
        super().resizeEvent(event)
        self._rescale()

    def _rescale(self) -> None:
        if self.image is None or self.image.isNull():
            return
        pixmap = QtGui.QPixmap.fromImage(self.image)
        self.setPixmap(
            pixmap.scaled(
                self.size(),
                QtCore.Qt.AspectRatioMode.KeepAspectRatio,
                QtCore.Qt.TransformationMode.SmoothTransformation,
            )
        )
