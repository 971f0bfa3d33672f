"""The panel leads to the right action: a sensible first task, scan or one window as the first
choice beside the area, a *Sends* line that describes the scan that will run, and a one-window Send that
would shrink the layer past a factor offers the scan instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plugin_testing import random_raster_layer, wait_until
from qgis.core import QgsRasterLayer, QgsSettings
from qgis.PyQt.QtWidgets import QPushButton, QRadioButton
from test_scan_dock import demo_backend  # noqa: F401  (the demo model's server, a module fixture)

from earthdial_qgis.core.area import WHOLE_LAYER
from earthdial_qgis.gui.dock import SETTING_LAST_TASKS, SHRINK_WARN


def _plan(dock: Any) -> dict[str, Any]:
    """The summary the panel shows for its controls now (asked of the backend afresh)."""
    dock.last_plan = dock.plan_error = None
    dock.update_plan()
    wait_until(lambda: dock.last_plan is not None or dock.plan_error is not None, 30)
    assert dock.plan_error is None, dock.plan_label.text()
    return dock.last_plan


def test_the_first_task_on_first_open_finds_objects(make_dock: Any, raster_layer: Any) -> None:
    QgsSettings().remove(SETTING_LAST_TASKS)  # a first open: no backend has answered before
    dock = make_dock()
    wait_until(lambda: dock.task_combo.count() > 1, 30)
    assert dock.task_combo.currentData() == "refer"
    dock.select_task("caption")  # what the user picks stays picked when the backend answers again
    dock.status_reply = None
    dock.refresh_status()
    wait_until(lambda: dock.status_reply is not None, 30)
    assert dock.task_combo.currentData() == "caption"


def test_scan_or_one_window_is_a_choice_beside_the_area(make_dock: Any, raster_layer: Any) -> None:
    dock = make_dock()
    dock.select_task("refer")
    scan = dock.scan.check
    assert isinstance(scan, QRadioButton) and isinstance(dock.window_radio, QRadioButton)
    assert dock.window_radio.isChecked() and not scan.isChecked()
    assert scan.parentWidget() is dock.area_combo.parentWidget()  # in the Question box, with the area
    assert not dock.tile_spin.isEnabled()
    scan.setChecked(True)
    assert not dock.window_radio.isChecked() and dock.tile_spin.isEnabled() and dock.scan.wanted()
    dock.select_task("caption")  # a scan runs grounded tasks and change: for a caption, one window
    assert not scan.isEnabled() and dock.window_radio.isChecked() and not dock.scan.wanted()


def test_the_sends_line_describes_the_scan_that_runs(make_dock: Any, raster_layer: Any) -> None:
    dock = make_dock()
    dock.select_task("refer")
    dock.prompt_edit.setPlainText("ship")
    dock.set_area_mode(WHOLE_LAYER)
    window = _plan(dock)
    assert window["scan"] is None and "one window of 200 × 100 px" in dock.plan_label.text()
    assert "the model sees it at GSD" in dock.plan_label.text()

    dock.scan.check.setChecked(True)
    dock.tile_spin.setValue(64)
    planned = _plan(dock)["scan"]
    text = dock.plan_label.text()
    assert f"tiled scan of 200 × 100 px by reference: {planned['tiles']} tiles of 64 px" in text
    assert f"{planned['batches']} batch(es)" in text and "model tile" not in text
    assert "the model sees each tile at GSD" in text and "(the layer's 10 m)" in text

    dock.send_button.click()  # the scan then runs the tiles the line said
    wait_until(lambda: not dock.is_busy(), 120)
    assert dock.last_error is None, dock.answer_view.toPlainText()
    assert dock.last_reply["tiles"] == planned["tiles"] > 1


def _big_raster(path: Path, size: int = 3000) -> QgsRasterLayer:
    return random_raster_layer(path, size, seed=2)


def test_a_send_that_would_shrink_the_layer_offers_the_scan(
    make_dock: Any, qgis_new_project: Any, qgis_iface: Any, tmp_path: Path
) -> None:
    layer = _big_raster(tmp_path / "wide.tif")
    dock = make_dock()
    dock.layer_combo.setLayer(layer)
    dock.select_task("refer")
    dock.prompt_edit.setPlainText("ship")
    dock.set_area_mode(WHOLE_LAYER)
    plan = _plan(dock)
    assert plan["shrink"] > SHRINK_WARN and "coarser than the layer" in dock.plan_label.text()

    dock.send_button.click()
    assert not dock.is_busy()  # not sent: offered the scan first
    offer = dock.shrink_offer
    assert offer is not None and offer in qgis_iface.messageBar().items()
    buttons = {b.text(): b for b in offer.findChildren(QPushButton)}
    assert set(buttons) >= {"Tiled scan", "Send one window"}
    buttons["Tiled scan"].click()
    assert dock.scan.check.isChecked() and dock.is_busy() and dock.scan.task is not None
    dock.cancel_button.click()
    wait_until(lambda: not dock.is_busy(), 60)
    assert offer not in qgis_iface.messageBar().items()

    dock.window_radio.setChecked(True)  # asked again, the one window may still be sent as it is
    _plan(dock)
    dock.send_button.click()
    {b.text(): b for b in dock.shrink_offer.findChildren(QPushButton)}["Send one window"].click()
    assert dock.is_busy() and dock.scan.task is None
    wait_until(lambda: not dock.is_busy(), 120)


def test_a_note_when_the_demo_model_is_asked_a_task_it_was_not_trained_for(
    demo_backend: Any,  # noqa: F811  (the fixture imported above)
    make_dock: Any,
    raster_layer: Any,
    qgis_iface: Any,
) -> None:
    from earthdial_qgis.gui.dock import SETTING_ENDPOINT, EarthDialDock

    QgsSettings().setValue(SETTING_ENDPOINT, demo_backend.endpoint)
    dock = EarthDialDock(qgis_iface)
    try:
        wait_until(lambda: dock.status_reply is not None, 30)
        for task in ("chat", "vqa"):
            dock.select_task(task)
            assert not dock.model_note.isHidden(), task
            assert "demo model" in dock.model_note.text() and task in dock.model_note.text()
            assert "refer" in dock.model_note.text()  # what it was trained for, as its status says
        dock.select_task("refer")
        assert dock.model_note.isHidden()
    finally:
        dock.shutdown()
    other = make_dock()  # a model that is not the demo: no note, whatever the task
    other.select_task("chat")
    assert other.model_note.isHidden()


def test_the_scan_tile_follows_the_models_input_size_until_the_user_picks_one(
    make_dock: Any, backend: Any
) -> None:
    """A tile of the model's own image size reaches the model at the layer's GSD (448 px tiles on a
    112 px model were seen 4x coarser)."""
    from earthdial_qgis.contract.client import Client

    with Client(backend.endpoint, timeout_s=10) as client:
        size = client.status()["model"]["image_size"]
    assert size != 448  # the old fixed default, so the test tells the two apart
    dock = make_dock()
    wait_until(lambda: dock.tile_spin.value() == size, 30)
    dock.tile_spin.setValue(size * 2)  # the user's choice stays when the backend answers again
    dock.status_reply = None
    dock.refresh_status()
    wait_until(lambda: dock.status_reply is not None, 30)
    assert dock.tile_spin.value() == size * 2
