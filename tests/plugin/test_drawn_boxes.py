"""What the analyst draws on a result layer stays visible: the categorized style has a
catch-all category, and a drawn box takes the label the model gave most often on the layer."""

from __future__ import annotations

from typing import Any

from plugin_testing import wait_until
from qgis.core import QgsFeature, QgsGeometry, QgsProject, QgsRectangle, QgsRenderContext, QgsVectorLayer

from earthdial_qgis.gui.dock import GEOREF
from earthdial_qgis.gui.review import ADDED, Watcher

# two ships and a plane, imported through the backend's georef op
ANSWER = (
    "<ref>ship</ref><box>[[10, 10, 20, 20, 0]]</box><ref>ship</ref><box>[[30, 30, 40, 40, 0]]</box>"
    "<ref>airplane</ref><box>[[60, 60, 80, 80, 0]]</box>"
)


def _draw(layer: QgsVectorLayer, rect: QgsRectangle, label: str | None = None) -> int:
    """Add a rectangle as QGIS's Add Rectangle tool does (through the edit buffer); returns its id."""
    feature = QgsFeature(layer.fields())
    feature.setGeometry(QgsGeometry.fromRect(rect))
    if label is not None:
        feature.setAttribute("label", label)
    assert layer.addFeature(feature)
    return feature.id()


def _drawn(layer: QgsVectorLayer, feature: QgsFeature) -> bool:
    """Whether the layer's renderer gives ``feature`` a symbol (else it is not drawn at all)."""
    context = QgsRenderContext()
    renderer = layer.renderer().clone()
    renderer.startRender(context, layer.fields())
    try:
        return renderer.symbolForFeature(feature, context) is not None
    finally:
        renderer.stopRender(context)


def test_boxes_the_analyst_draws_are_drawn_and_take_the_models_label(
    make_dock: Any, raster_layer: Any, show_view: Any
) -> None:
    show_view()
    dock = make_dock()
    watcher = Watcher()  # what the plugin runs (ReviewActions): the review field follows the edits
    try:
        before = set(QgsProject.instance().mapLayers())
        dock.select_task(GEOREF)
        dock.prompt_edit.setPlainText(ANSWER)
        dock.send_button.click()
        wait_until(lambda: not dock.is_busy(), 60)
        assert dock.last_error is None, dock.answer_view.toPlainText()
        (layer,) = [x for k, x in QgsProject.instance().mapLayers().items() if k not in before]

        extent = layer.extent()
        assert layer.startEditing()
        plain = _draw(
            layer,
            QgsRectangle(
                extent.xMinimum(), extent.yMinimum(), extent.xMinimum() + 50, extent.yMinimum() + 50
            ),
        )
        crane = _draw(
            layer,
            QgsRectangle(
                extent.xMaximum() - 50, extent.yMaximum() - 50, extent.xMaximum(), extent.yMaximum()
            ),
            label="crane",
        )
        assert layer.commitChanges(), layer.commitErrors()

        added = [f for f in layer.getFeatures() if f["review"] == ADDED]
        assert len(added) == 2, [f.attributes() for f in layer.getFeatures()]
        by_label = {f["label"]: f for f in added}
        assert set(by_label) == {"ship", "crane"}  # the model's most common label, and the analyst's own
        assert plain != crane
        for feature in layer.getFeatures():  # every box, the model's and the drawn ones, has a symbol
            assert _drawn(layer, feature), feature.attributes()
        legend = [item.label() for item in layer.renderer().legendSymbolItems()]
        assert {"ship", "airplane"} <= set(legend) and len(legend) == 3  # + the catch-all entry
    finally:
        watcher.close()
