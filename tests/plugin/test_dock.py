"""The EarthDial panel driven like a user, against a real backend on a tiny random model."""

from __future__ import annotations

from typing import Any

import pytest
from plugin_testing import ANSWER, EPSG, VIEW, VIEW_BOUNDS, expected_ring, free_port, same_corners, wait_until
from qgis.core import Qgis, QgsProject, QgsVectorLayer

from earthdial_qgis.contract.client import Client
from earthdial_qgis.contract.wire import source_by_reference
from earthdial_qgis.core.layers import ANSWER_PROPERTY
from earthdial_qgis.gui.dock import GEOREF


def new_layers(before: set[str]) -> list[QgsVectorLayer]:
    return [layer for lid, layer in QgsProject.instance().mapLayers().items() if lid not in before]


def pick(dock: Any, text: str) -> None:
    """Choose a task by the text shown in the list, as a user would."""
    index = dock.task_combo.findText(text)
    assert index >= 0, [dock.task_combo.itemText(i) for i in range(dock.task_combo.count())]
    dock.task_combo.setCurrentIndex(index)


def send_and_wait(dock: Any, timeout_s: float = 120.0) -> None:
    assert dock.send_button.isEnabled()
    dock.send_button.click()
    wait_until(lambda: not dock.is_busy(), timeout_s)
    assert dock.send_button.isEnabled() and not dock.cancel_button.isEnabled()


def test_import_answer_adds_georeferenced_layer(
    make_dock, raster_layer, show_view, geotiff, qgis_iface
) -> None:
    extent = show_view()
    dock = make_dock()
    assert dock.layer_combo.currentLayer() is raster_layer  # the active layer is the default
    before = set(QgsProject.instance().mapLayers())

    pick(dock, "Import answer (georef)")
    dock.prompt_edit.setPlainText(ANSWER)
    send_and_wait(dock)

    assert dock.last_error is None, dock.answer_view.toPlainText()
    (layer,) = new_layers(before)
    assert isinstance(layer, QgsVectorLayer) and layer.geometryType() == 2  # polygons
    assert layer.crs().authid() == f"EPSG:{EPSG}"
    assert layer.featureCount() == 1
    assert "georef" in layer.name() and "scene" in layer.name()
    (feature,) = list(layer.getFeatures())
    assert feature["label"] == "ship"
    assert feature["angle"] == 0
    assert feature["task"] == GEOREF
    assert not feature["prompt"] and feature["answer"] == ANSWER  # an imported answer takes no prompt
    assert feature["source"] == str(geotiff[0])
    assert feature["created"]
    ring = [(p.x(), p.y()) for p in feature.geometry().asPolygon()[0]]
    expected = expected_ring(extent, (20, 30, 40, 60))
    assert expected[0] == pytest.approx((500200.0, 3999550.0))  # the arithmetic itself, spelled out
    assert same_corners(ring, expected), (ring, expected)
    assert extent.contains(feature.geometry().boundingBox())
    assert layer.customProperty(ANSWER_PROPERTY) == ANSWER
    assert dock.answer_view.toPlainText() == ANSWER
    assert qgis_iface.messageBar().get_messages(Qgis.Critical) == []


def test_refer_ask_through_the_model(make_dock, raster_layer, show_view, geotiff, backend) -> None:
    show_view()
    dock = make_dock()
    dock.refresh_status()
    wait_until(lambda: dock.status_label.text().startswith("Connected"), 30)
    assert "EarthDial_4B_RGB" in dock.status_label.text()
    before = set(QgsProject.instance().mapLayers())

    pick(dock, "refer")
    dock.prompt_edit.setPlainText("ship")
    send_and_wait(dock)

    assert dock.last_error is None, dock.answer_view.toPlainText()
    reply = dock.last_reply
    assert reply["answer"] and dock.answer_view.toPlainText() == reply["answer"]
    # The same question straight through the protocol gives the same text (greedy decoding).
    with Client(backend.endpoint, timeout_s=60) as client:
        direct = client.ask(
            source_by_reference(str(geotiff[0]), None, VIEW_BOUNDS, f"EPSG:{EPSG}"), "ship", task="refer"
        )
    assert direct["answer"] == reply["answer"]
    boxes = len(reply["features"]["features"])
    added = new_layers(before)
    assert len(added) == (1 if boxes else 0)
    if boxes:
        assert added[0].featureCount() == boxes


def test_unreachable_backend_then_recovery(make_dock, raster_layer, show_view, backend, qgis_iface) -> None:
    show_view()
    dock = make_dock()
    dead = f"tcp://127.0.0.1:{free_port()}"
    dock.endpoint_edit.setText(dead)
    dock.timeout_spin.setValue(1)
    pick(dock, "Import answer (georef)")
    dock.prompt_edit.setPlainText(ANSWER)
    before = set(QgsProject.instance().mapLayers())
    send_and_wait(dock, 30)

    text = dock.answer_view.toPlainText()
    assert f"EarthDial backend not reachable at {dead}" in text
    assert any(dead in m for m in qgis_iface.messageBar().get_messages(Qgis.Critical))
    assert new_layers(before) == []

    # Fixing the endpoint is enough: the panel is still usable.
    dock.endpoint_edit.setText(backend.endpoint)
    dock.timeout_spin.setValue(30)
    send_and_wait(dock)
    assert dock.last_error is None, dock.answer_view.toPlainText()
    assert len(new_layers(before)) == 1


def test_server_errors_are_shown_in_plain_words(make_dock, raster_layer, show_view, qgis_iface) -> None:
    show_view()
    dock = make_dock()
    pick(dock, "refer")
    dock.prompt_edit.setPlainText("")  # refer needs to know what to find
    send_and_wait(dock)
    text = dock.answer_view.toPlainText()
    assert dock.last_error.code == "bad_request"
    assert "needs a prompt" in text and "refused" in text
    assert any("needs a prompt" in m for m in qgis_iface.messageBar().get_messages(Qgis.Critical))

    pick(dock, "Import answer (georef)")
    dock.prompt_edit.setPlainText(ANSWER)
    dock.bands_edit.setText("7")
    send_and_wait(dock)
    assert dock.last_error.code == "band_out_of_range"
    assert "band 7 does not exist" in dock.answer_view.toPlainText()

    dock.bands_edit.setText("")
    send_and_wait(dock)
    assert dock.last_error is None


def test_local_input_errors_and_cancel(make_dock, raster_layer, show_view) -> None:
    show_view()
    dock = make_dock()
    pick(dock, "Import answer (georef)")
    dock.prompt_edit.setPlainText(ANSWER)

    good = dock.endpoint_edit.text()
    dock.endpoint_edit.setText("localhost:5557")
    dock.send_button.click()
    assert not dock.is_busy() and "tcp://" in dock.answer_view.toPlainText()
    dock.endpoint_edit.setText(good)

    dock.bands_edit.setText("red")
    dock.send_button.click()
    assert not dock.is_busy() and "Bands must be numbers" in dock.answer_view.toPlainText()
    dock.bands_edit.setText("")

    # A request to an endpoint where nothing answers, cancelled by the user long before its timeout.
    dock.endpoint_edit.setText(f"tcp://127.0.0.1:{free_port()}")
    dock.timeout_spin.setValue(600)
    dock.send_button.click()
    wait_until(lambda: dock.cancel_button.isEnabled(), 5)
    dock.cancel_button.click()
    wait_until(lambda: not dock.is_busy(), 10)
    assert dock.last_error.code == "cancelled"
    assert dock.answer_view.toPlainText() == "Request cancelled."


def test_task_and_preset_lists_come_from_the_server(qgis_iface, qgis_new_project, backend) -> None:
    """The plugin keeps no list of the backend's: before any backend answered it offers only the import;
    then exactly the server's tasks and presets (kept for the next start, as the server said them)."""
    from qgis.core import QgsSettings

    from earthdial_qgis.gui.dock import SETTING_ENDPOINT, SETTING_LAST_TASKS, EarthDialDock

    def shown(combo: Any) -> list[str]:
        return [combo.itemData(i) for i in range(combo.count())]

    dead = f"tcp://127.0.0.1:{free_port()}"
    QgsSettings().setValue(SETTING_ENDPOINT, dead)
    QgsSettings().remove(SETTING_LAST_TASKS)
    dock = EarthDialDock(qgis_iface)
    try:
        assert dock.endpoint == dead  # the stored endpoint
        wait_until(lambda: "not reachable" in dock.status_label.text(), 15)
        assert shown(dock.task_combo) == [GEOREF] and shown(dock.preset_combo) == ["auto"]
        assert dock.task_combo.itemText(dock.task_combo.count() - 1) == "Import answer (georef)"

        dock.endpoint_edit.setText(backend.endpoint)
        dock.endpoint_edit.editingFinished.emit()  # as when the user leaves the field
        assert QgsSettings().value(SETTING_ENDPOINT) == backend.endpoint
        wait_until(lambda: dock.status_label.text().startswith("Connected"), 15)
        with Client(backend.endpoint, timeout_s=10) as client:
            status = client.status()
        assert len(status["tasks"]) >= 14 and len(status["presets"]) >= 10
        assert shown(dock.task_combo) == [t["name"] for t in status["tasks"]] + [GEOREF]
        assert shown(dock.preset_combo) == ["auto"] + [p["name"] for p in status["presets"]]
        tips = [dock.preset_combo.itemData(i, 3) for i in range(1, dock.preset_combo.count())]  # ToolTipRole
        assert tips == [p["description"] for p in status["presets"]]
        dock.preset_combo.setCurrentIndex(shown(dock.preset_combo).index("s2_rgb"))
        assert dock._bands() == ([4, 3, 2], {"preset": "s2_rgb"})  # the server's bands for its preset
    finally:
        dock.shutdown()
        dock.deleteLater()
    again = EarthDialDock(qgis_iface)  # a new panel shows the last server's tasks before it connects
    try:
        assert shown(again.task_combo)[:-1] == [t["name"] for t in status["tasks"]]
    finally:
        again.shutdown()
        again.deleteLater()


def test_area_is_carried_into_the_layer_crs(raster_layer) -> None:
    from qgis.core import QgsCoordinateReferenceSystem, QgsCoordinateTransform

    from earthdial_qgis.core.sources import area_in_layer_crs

    wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
    to_wgs84 = QgsCoordinateTransform(raster_layer.crs(), wgs84, QgsProject.instance())
    geographic_view = to_wgs84.transformBoundingBox(VIEW)
    area = area_in_layer_crs(geographic_view, wgs84, raster_layer)
    assert area.contains(VIEW)  # the bounding box of a reprojected box holds the original
    assert area.width() < VIEW.width() + 20 and area.height() < VIEW.height() + 20
    same = area_in_layer_crs(VIEW, raster_layer.crs(), raster_layer)
    assert same == VIEW
