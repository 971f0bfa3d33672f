"""The panel builds one typed request (core/request.py) from its controls and hands that very request to
the task that sends it: `RequestTask` for one window, `ScanTask` for a tiled scan."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from plugin_testing import wait_until
from qgis.core import QgsRasterLayer

from earthdial_qgis.contract.wire import EarthDialError
from earthdial_qgis.core import area as areas
from earthdial_qgis.core.request import GEOREF, Request


def _ask(dock: Any, task: str, prompt: str) -> None:
    dock.select_task(task)
    dock.prompt_edit.setPlainText(prompt)
    dock.set_area_mode(areas.WHOLE_LAYER)


def test_the_dock_builds_one_frozen_request_from_its_controls(
    make_dock, raster_layer: QgsRasterLayer
) -> None:
    dock = make_dock()
    _ask(dock, "refer", "  ship ")
    dock.bands_edit.setText("3,2,1")
    dock.gsd_spin.setValue(0.5)
    dock.timeout_spin.setValue(42)
    request = dock.request(scan=False)
    extent = raster_layer.extent()
    assert request == Request(
        dock.endpoint,
        42.0,
        "refer",
        "ship",
        (raster_layer.id(),),
        (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()),
        (3, 2, 1),
        {"gsd": 0.5},
        scan=False,
    )
    assert request.header() == {"op": "ask", "task": "refer", "prompt": "ship", "options": {"gsd": 0.5}}
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.prompt = "boats"  # type: ignore[misc]
    with pytest.raises(TypeError):  # nor can its options change under the task that holds it
        request.options["gsd"] = 2.0  # type: ignore[index]

    # a tiled scan's request: the preset and tile size are its options (a scan takes no GSD)
    dock.scan.tile_spin.setValue(224)
    scan = dock.request(scan=True)
    assert scan.scan and dict(scan.options) == {"tile_size": 224}
    assert scan.header() == {"op": "detect", "task": "refer", "prompt": "ship", "options": {"tile_size": 224}}
    assert scan.plan_header()["scan"] == {"tile_size": 224}


def test_bad_controls_are_a_typed_error_and_no_request(make_dock, raster_layer: QgsRasterLayer) -> None:
    dock = make_dock()
    _ask(dock, GEOREF, "")
    with pytest.raises(EarthDialError) as caught:
        dock.request(scan=False)
    assert caught.value.code == "bad_input"
    _ask(dock, "refer", "ship")
    dock.bands_edit.setText("3;2")
    with pytest.raises(EarthDialError) as caught:
        dock.request(scan=False)
    assert caught.value.code == "bad_input"


def test_send_hands_the_request_it_built_to_the_task(make_dock, raster_layer: QgsRasterLayer) -> None:
    dock = make_dock()
    _ask(dock, "caption", "")
    dock.scan.check.setChecked(False)
    expected = dock.request()
    dock.send_button.click()
    task = dock._task
    assert task is not None and task.request == expected
    assert task.header == expected.header()  # what goes on the wire is the request's header (and its sources)
    wait_until(lambda: not dock.is_busy(), 120)
    assert dock.last_error is None, dock.answer_view.toPlainText()

    _ask(dock, "refer", "ship")
    dock.scan.check.setChecked(True)
    dock.scan.tile_spin.setValue(112)
    expected = dock.request()
    assert expected.scan
    dock.send_button.click()
    scan = dock.scan.task
    assert scan is not None and scan.request == expected
    wait_until(lambda: not dock.is_busy(), 120)
    assert dock.last_error is None, dock.answer_view.toPlainText()
