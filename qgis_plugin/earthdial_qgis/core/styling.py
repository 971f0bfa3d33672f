"""How result layers look: an outline colour per label (a categorized renderer on `label`, the same
colours as the chip preview), the label text drawn on the map, and a layer-tree group per request."""

from __future__ import annotations

import zlib

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsFillSymbol,
    QgsLayerTreeGroup,
    QgsPalLayerSettings,
    QgsProject,
    QgsRendererCategory,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)

from .qt import QtCore, QtGui

# distinct, colour-blind-friendly outline colours (Okabe-Ito, then a few more)
PALETTE = (
    "#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7",
    "#ff4040", "#40ff80", "#b0b0ff",
)  # fmt: skip


def colour_for(label: str) -> QtGui.QColor:
    """The same colour for the same label everywhere (map, preview), whatever order labels come in."""
    return QtGui.QColor(PALETTE[zlib.crc32((label or "").encode("utf-8")) % len(PALETTE)])


def _outline_symbol(colour: QtGui.QColor) -> QgsFillSymbol:
    return QgsFillSymbol.createSimple(
        {
            "color": "0,0,0,0",
            "style": "no",
            "outline_color": f"{colour.red()},{colour.green()},{colour.blue()},255",
            "outline_width": "0.8",
            "outline_style": "solid",
        }
    )


def style_result_layer(layer: QgsVectorLayer, field: str = "label") -> None:
    """A categorized renderer on ``field`` (one outline colour per value) and the value as map label."""
    index = layer.fields().indexFromName(field)
    values = sorted(
        {str(v) for v in layer.uniqueValues(index) if v is not None and str(v) != "NULL"}
        if index >= 0
        else set()
    )
    categories = [
        QgsRendererCategory(value, _outline_symbol(colour_for(value)), value) for value in values if value
    ]
    # The empty value is QGIS's "all other values": a box the analyst draws with a label of their own (or
    # none) is drawn too, not left invisible for want of a category.
    categories.append(QgsRendererCategory("", _outline_symbol(colour_for("")), _other_labels()))
    renderer = QgsCategorizedSymbolRenderer(field, categories)
    renderer.setSourceSymbol(_outline_symbol(colour_for("")))
    layer.setRenderer(renderer)

    settings = QgsPalLayerSettings()
    settings.fieldName = field
    settings.isExpression = False
    text = QgsTextFormat()
    text.setSize(9)
    text.setColor(QtGui.QColor("white"))
    buffer = QgsTextBufferSettings()
    buffer.setEnabled(True)
    buffer.setSize(0.8)
    buffer.setColor(QtGui.QColor("black"))
    text.setBuffer(buffer)
    settings.setFormat(text)
    layer.setLabeling(QgsVectorLayerSimpleLabeling(settings))
    layer.setLabelsEnabled(True)
    layer.triggerRepaint()


def _other_labels() -> str:
    return QtCore.QCoreApplication.translate("EarthDial", "other labels")


def result_group(name: str, project: QgsProject | None = None) -> QgsLayerTreeGroup:
    """A new group at the top of the layer tree for one request's layers."""
    root = (project or QgsProject.instance()).layerTreeRoot()
    return root.insertGroup(0, name)
