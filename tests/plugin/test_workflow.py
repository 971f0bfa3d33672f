"""An analyst's session in the EarthDial panel, driven through its widgets and map tools against a real
backend: draw an area, pick a task, send, look at the preview and the styled result layer, save it,
chat about the layer, and find the chat again in a saved and reopened project."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from plugin_testing import (
    ANSWER,
    EPSG,
    drag,
    expected_ring,
    same_corners,
    snap_out,
    wait_until,
)
from qgis.core import (
    Qgis,
    QgsCategorizedSymbolRenderer,
    QgsLayerTreeGroup,
    QgsProject,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

from earthdial_qgis.core import history
from earthdial_qgis.core.area import DRAWN
from earthdial_qgis.core.layers import ANSWER_PROPERTY, FIELDS
from earthdial_qgis.core.styling import colour_for
from earthdial_qgis.gui.dock import GEOREF

TWO_SHIPS = (
    "<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box> and <ref>harbour</ref><box>[[60, 10, 90, 40, 0]]</box>"
)


def send_and_wait(dock: Any, timeout_s: float = 120.0) -> None:
    assert dock.send_button.isEnabled()
    dock.send_button.click()
    wait_until(lambda: not dock.is_busy(), timeout_s)


def test_draw_send_inspect_save(make_dock, raster_layer, show_view, geotiff, qgis_iface, tmp_path) -> None:
    show_view()
    dock = make_dock()
    canvas = qgis_iface.mapCanvas()

    # Draw the area with the map tool, as a user dragging on the map.
    dock.draw_button.click()
    assert canvas.mapTool() is dock.rectangle_tool
    drag(canvas, (500203.0, 3999596.0), (500497.0, 3999304.0))
    assert dock.area_combo.currentData() == DRAWN
    assert not dock.draw_button.isChecked() and canvas.mapTool() is not dock.rectangle_tool
    drawn = dock.drawn[0]
    assert drawn.width() == pytest.approx(294, abs=canvas.mapUnitsPerPixel() * 2)

    dock.select_task(GEOREF)  # a known answer: the tiny model's own text is noise
    dock.prompt_edit.setPlainText(TWO_SHIPS)
    before = set(QgsProject.instance().mapLayers())
    send_and_wait(dock)
    assert dock.last_error is None, dock.answer_view.toPlainText()

    # The window is the drawn rectangle widened to the raster's pixels.
    window = snap_out(drawn)
    chip = dock.last_reply["chip"]
    assert (chip["width"], chip["height"]) == (round(window.width() / 10), round(window.height() / 10))
    assert chip["transform"][2] == pytest.approx(window.xMinimum())
    assert chip["transform"][5] == pytest.approx(window.yMaximum())

    (layer,) = [lyr for lid, lyr in QgsProject.instance().mapLayers().items() if lid not in before]
    assert isinstance(layer, QgsVectorLayer) and layer.crs().authid() == f"EPSG:{EPSG}"
    assert layer.providerType() == "ogr"  # in the project's results GeoPackage, which adds its "fid"
    assert [f.name() for f in layer.fields() if f.name() != "fid"] == [name for name, _ in FIELDS]
    features = sorted(layer.getFeatures(), key=lambda f: f["label"])
    assert [f["label"] for f in features] == ["harbour", "ship"]
    ship = features[1]
    assert ship["task"] == GEOREF and ship["answer"] == TWO_SHIPS and ship["source"] == str(geotiff[0])
    assert ship["created"] and ship["angle"] == 0 and ship["tile"] == ""
    ring = [(p.x(), p.y()) for p in ship.geometry().asPolygon()[0]]
    assert same_corners(ring, expected_ring(window, (20, 30, 40, 60)))
    assert layer.customProperty(ANSWER_PROPERTY) == TWO_SHIPS

    # Styled: an outline colour per label, labels on, inside a group named for the request.
    renderer = layer.renderer()
    assert isinstance(renderer, QgsCategorizedSymbolRenderer) and renderer.classAttribute() == "label"
    colours = {c.value(): c.symbol().symbolLayer(0).strokeColor().name() for c in renderer.categories()}
    assert colours == {
        "harbour": colour_for("harbour").name(),
        "ship": colour_for("ship").name(),
        "": colour_for("").name(),
    }  # ("": QGIS's "all other values", for drawn boxes)
    assert layer.labelsEnabled() and layer.labeling().settings().fieldName == "label"
    node = QgsProject.instance().layerTreeRoot().findLayer(layer.id())
    group = node.parent()
    assert isinstance(group, QgsLayerTreeGroup) and group.name().startswith("EarthDial georef:")
    assert "scene" in group.name()

    # The preview is the window that was sent, with the boxes drawn in the labels' colours.
    image = dock.last_preview
    assert image is not None and (image.width(), image.height()) == (chip["width"], chip["height"])
    x = round(0.20 * image.width())  # left edge of the ship box
    column = {QColor(image.pixel(x + dx, round(0.45 * image.height()))).name() for dx in (-1, 0, 1)}
    assert colour_for("ship").name() in column
    assert "by reference" in dock.preview_caption.text()
    assert dock.preview_label.pixmap() is not None

    # Zoom to results, then one click to a GeoPackage: the layer now reads from the file, styled still.
    canvas.setExtent(QgsRectangle(0, 0, 10, 10))
    dock.zoom_button.click()
    assert canvas.extent().contains(layer.extent())
    out = tmp_path / "results.gpkg"
    assert dock.save_results(str(out)) == str(out)
    assert out.exists() and layer.providerType() == "ogr" and layer.featureCount() == 2
    assert isinstance(layer.renderer(), QgsCategorizedSymbolRenderer)
    assert any(str(out) in m for m in qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Success))


def test_send_then_cancel_keeps_the_panel_usable(make_dock, raster_layer, show_view) -> None:
    show_view()
    dock = make_dock()
    dock.select_task("chat")
    dock.prompt_edit.setPlainText("Describe everything you see in great detail.")
    dock.send_button.click()
    assert dock.cancel_button.isEnabled() and not dock.send_button.isEnabled()
    dock.cancel_button.click()
    wait_until(lambda: not dock.is_busy(), 30)
    assert dock.last_error is not None and dock.last_error.code == "cancelled"
    assert dock.answer_view.toPlainText() == "Request cancelled."
    assert history.load(raster_layer) == []  # a cancelled turn is not part of the conversation

    dock.select_task(GEOREF)
    dock.prompt_edit.setPlainText(ANSWER)
    send_and_wait(dock)
    assert dock.last_error is None


def test_chat_history_follows_up_and_survives_the_project_file(
    make_dock, raster_layer, show_view, qgis_iface, tmp_path: Path
) -> None:
    show_view()
    dock = make_dock()
    dock.select_task("chat")
    dock.prompt_edit.setPlainText("What is in this image?")
    send_and_wait(dock)
    assert dock.last_error is None, dock.answer_view.toPlainText()
    first_answer = dock.last_reply["answer"]
    sensor = dock.last_reply["input"]["sensor"]
    assert [t.question for t in history.load(raster_layer)] == ["What is in this image?"]
    assert "What is in this image?" in dock.chat_view.toPlainText()

    # A follow-up turn carries the conversation, its first question with the image marker.
    dock.prompt_edit.setPlainText("And where is the water?")
    dock.gsd_spin.setValue(0.5)  # and the model should see 0.5 m pixels
    dock.send_button.click()
    assert dock._task.header["options"]["gsd"] == 0.5
    sent = dock._task.header["options"]["history"]
    assert sent == [[f"{sensor} <image>\n What is in this image?", first_answer]]
    wait_until(lambda: not dock.is_busy(), 120)
    assert dock.last_error is None, dock.answer_view.toPlainText()
    turns = history.load(raster_layer)
    assert [t.question for t in turns] == ["What is in this image?", "And where is the water?"]

    # Saved with the project, gone with a new project, back when it is read again.
    path = tmp_path / "session.qgz"
    project = QgsProject.instance()
    assert project.write(str(path))
    layer_id = raster_layer.id()
    project.clear()
    assert project.mapLayer(layer_id) is None
    assert project.read(str(path))
    restored = project.mapLayer(layer_id)
    assert restored is not None
    assert [(t.question, t.answer) for t in history.load(restored)] == [(t.question, t.answer) for t in turns]
    dock.layer_combo.setLayer(restored)
    assert "And where is the water?" in dock.chat_view.toPlainText()

    dock.new_chat_button.click()
    assert history.load(restored) == [] and dock.chat_view.toPlainText() == ""
