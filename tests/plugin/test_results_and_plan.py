"""Results and the plan in real QGIS against real backends: results live in GeoPackages and are never lost,
Cancel reaches the backend, and the panel says before sending what the reply then reports."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from osgeo import gdal
from plugin_testing import (
    ANSWER,
    EARTHDIAL,
    free_port,
    wait_until,
    write_geotiff,
    write_raster,
)
from qgis.core import QgsProject, QgsRasterLayer, QgsVectorFileWriter, QgsVectorLayer

from conftest import backend_env, running_backend
from earthdial_qgis.contract.client import Client
from earthdial_qgis.core import geopackage, settings
from earthdial_qgis.gui.dock import GEOREF

HARBOUR = "<ref>harbour</ref><box>[[60, 10, 90, 40, 0]]</box>"


def send_and_wait(dock: Any, timeout_s: float = 120.0) -> None:
    dock.send_button.click()
    wait_until(lambda: not dock.is_busy(), timeout_s)


def georef(dock: Any, answer: str) -> QgsVectorLayer:
    dock.select_task(GEOREF)
    dock.prompt_edit.setPlainText(answer)
    send_and_wait(dock)
    assert dock.last_error is None, dock.answer_view.toPlainText()
    return dock.last_layer


def labels(layer: QgsVectorLayer) -> list[str]:
    return sorted(f["label"] for f in layer.getFeatures())


def gpkg_tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT table_name FROM gpkg_contents")}


# -- results are never lost -----------------------------------------------------------------------------


def test_two_saves_to_one_geopackage_keep_both_results_and_the_users_own_layer(
    make_dock, raster_layer, show_view, tmp_path: Path
) -> None:
    show_view()
    mine = tmp_path / "mine.gpkg"  # the analyst's own GeoPackage, with a layer of their own in it
    own = QgsVectorLayer("Point?crs=EPSG:32633&field=note:string", "my notes", "memory")
    options = QgsVectorFileWriter.SaveVectorOptions()  # written by QGIS itself, as the analyst would
    options.driverName, options.layerName = "GPKG", "my notes"
    written = QgsVectorFileWriter.writeAsVectorFormatV3(
        own, str(mine), QgsProject.instance().transformContext(), options
    )
    assert written[0] == QgsVectorFileWriter.NoError
    dock = make_dock()
    ship, harbour = georef(dock, ANSWER), georef(dock, HARBOUR)
    assert ship.name() != harbour.name() and "georef" in ship.name() and "scene" in ship.name()

    assert dock.save_results(str(mine)) == str(mine)  # the last result: harbour
    dock.last_layer = ship
    assert dock.save_results(str(mine)) == str(mine)

    assert len(gpkg_tables(mine)) == 3 and "my notes" in gpkg_tables(mine)
    # each project layer reads its own table of the file and shows its own result
    assert labels(ship) == ["ship"] and labels(harbour) == ["harbour"]
    assert ship.source() != harbour.source() and all(str(mine) in lyr.source() for lyr in (ship, harbour))
    reopened = QgsVectorLayer(f"{mine}|layername=my notes", "check", "ogr")
    assert reopened.isValid()
    with sqlite3.connect(mine) as db:  # our tables carry the backend's mark, the analyst's own does not
        marks = dict(db.execute("SELECT table_name, description FROM gpkg_contents").fetchall())
    assert not (marks["my notes"] or "").startswith("EarthDial result")
    assert sum((d or "").startswith("EarthDial result") for d in marks.values()) == 2


def test_results_are_written_to_a_geopackage_that_moves_with_the_saved_project(
    make_dock, raster_layer, show_view, tmp_path: Path
) -> None:
    show_view()
    project = QgsProject.instance()
    assert project.fileName() == ""
    dock = make_dock()
    layer = georef(dock, ANSWER)
    path, _ = geopackage.split_source(layer.source())
    assert layer.providerType() == "ogr" and geopackage.is_temporary(path)
    assert "temporary GeoPackage" in dock.storage_label.text()
    with sqlite3.connect(path) as db:  # GeoPackage 1.2: QGIS 3.22's GDAL opens it without warnings
        assert db.execute("PRAGMA user_version").fetchone()[0] == 10200

    # the analyst edits the result, then saves the project for the first time
    assert layer.startEditing()
    feature = next(layer.getFeatures())
    layer.changeAttributeValue(feature.id(), layer.fields().indexFromName("label"), "tanker")
    assert layer.commitChanges()
    qgz = tmp_path / "survey.qgz"
    assert project.write(str(qgz))
    store = tmp_path / "survey_earthdial.gpkg"
    assert store.exists() and str(store) in layer.source()
    name = layer.name()

    project.clear()
    assert project.read(str(qgz))
    (back,) = project.mapLayersByName(name)
    assert back.isValid() and back.providerType() == "ogr" and str(store) in back.source()
    assert labels(back) == ["tanker"]  # the edit came back with the project


def test_memory_results_only_when_asked_and_the_panel_says_they_are_lost_unless_saved(
    make_dock, raster_layer, show_view
) -> None:
    show_view()
    settings.set_value(settings.RESULTS_IN_MEMORY, True)
    try:
        dock = make_dock()
        assert "lost when QGIS closes" in dock.storage_label.text()
        layer = georef(dock, ANSWER)
        assert layer.providerType() == "memory"
        assert "in memory" in dock.result_label.text() and "unless you save" in dock.result_label.text()
    finally:
        settings.set_value(settings.RESULTS_IN_MEMORY, False)


# -- cancel reaches the backend ---------------------------------------------------------------------------


def test_cancel_stops_the_backends_job_and_the_next_request_is_answered_at_once(
    make_dock, raster_layer, show_view, backend, monkeypatch
) -> None:
    show_view()
    dock = make_dock()
    dock.select_task("chat")
    dock.prompt_edit.setPlainText("Describe everything.")
    # a job of 2048 tokens: the tiny model on this machine needs tens of seconds for it
    monkeypatch.setattr(dock, "_bands", lambda: (None, {"max_new_tokens": 2048}))
    with Client(backend.endpoint, timeout_s=10) as watcher:
        dock.send_button.click()
        wait_until(lambda: watcher.status()["running"] == 1, 60)
        dock.cancel_button.click()
        wait_until(lambda: not dock.is_busy(), 10)
        assert dock.last_error.code == "cancelled" and "Cancelled" in dock.result_label.text()
        # the backend's worker lets go of the job within a token of decoding
        wait_until(lambda: watcher.status()["running"] == 0, 10)
        monkeypatch.undo()
        layer = georef(dock, ANSWER)  # the worker is free: this one is not queued behind the job
        assert labels(layer) == ["ship"]
        assert watcher.status()["queue"] == 0


# -- the summary before sending -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rasters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("kinds")
    rng = np.random.default_rng(5)
    paths = {
        "rgb": str(folder / "rgb.tif"),
        "s2": str(folder / "s2.tif"),
        "sar": str(folder / "sar.tif"),
        "value": "/vsimem/earthdial-plan/rgb.tif",
        "sar_value": "/vsimem/earthdial-plan/sar.tif",
    }
    write_geotiff(paths["rgb"])
    write_raster(paths["s2"], rng.integers(0, 6000, (12, 100, 200)).astype(np.uint16), gdal.GDT_UInt16)
    sar = rng.exponential(0.05, (1, 100, 200)).astype(np.float32)
    write_raster(paths["sar"], sar, gdal.GDT_Float32)
    # in GDAL's memory file system: layers the backend cannot open, sent by value
    write_geotiff(paths["value"], seed=2)
    write_raster(paths["sar_value"], sar, gdal.GDT_Float32)
    yield paths
    gdal.Unlink(paths["value"])
    gdal.Unlink(paths["sar_value"])


@pytest.fixture(scope="module")
def ms_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second real backend, on the multispectral/SAR variant of the tiny checkpoint."""
    model = tmp_path_factory.mktemp("ms") / "EarthDial_4B_MS-tiny"
    subprocess.run(
        [str(EARTHDIAL), "make-tiny-checkpoint", str(model), "--variant", "EarthDial_4B_MS"],
        check=True,
        capture_output=True,
        timeout=180,
        env=backend_env(),
    )
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    command = [
        str(EARTHDIAL),
        "serve",
        "--model",
        str(model),
        "--endpoint",
        endpoint,
        "--device",
        "cpu",
        "--allow-dir",
        str(tmp_path_factory.getbasetemp()),
    ]
    with running_backend(command):
        yield endpoint


def plan_then_send(dock: Any, layer: QgsRasterLayer) -> tuple[dict | None, Any]:
    """The panel's summary for ``layer`` (waited for), then what Send got: (plan or None, reply or error)."""
    dock.layer_combo.setLayer(layer)
    dock.last_plan = dock.plan_error = None
    dock.schedule_plan()
    wait_until(lambda: dock.last_plan is not None or dock.plan_error is not None, 30)
    plan = dock.last_plan
    send_and_wait(dock)
    return plan, dock.last_reply if dock.last_error is None else dock.last_error


@pytest.mark.parametrize(
    ("kind", "server", "preset", "sensor", "by"),
    [
        ("rgb", "rgb", "rgb8", "[s2_rgb_10]", "reference"),
        ("value", "rgb", "rgb8", "[s2_rgb_10]", "value"),
        ("s2", "ms", "s2_l2a", "[s2_ms_10]", "reference"),
        ("sar", "ms", "s1_vh_linear", "[s1_vh_10]", "reference"),
        ("sar_value", "ms", "s1_vh_linear", "[s1_vh_10]", "value"),
    ],
)
def test_the_summary_before_sending_is_what_the_reply_reports(
    make_dock,
    qgis_new_project,
    qgis_iface,
    show_view,
    rasters,
    backend,
    ms_backend,
    kind,
    server,
    preset,
    sensor,
    by,
) -> None:
    layer = QgsRasterLayer(rasters[kind], kind, "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    show_view()
    dock = make_dock()
    dock.endpoint_edit.setText(backend.endpoint if server == "rgb" else ms_backend)
    dock.endpoint_edit.editingFinished.emit()
    wait_until(lambda: dock.status_reply is not None, 30)
    dock.select_task("caption")
    plan, reply = plan_then_send(dock, layer)
    assert isinstance(reply, dict), reply
    info, chip = reply["input"], reply["chip"]
    assert (plan["preset"], plan["sensor"], plan["by"]) == (preset, sensor, by)
    assert (plan["preset"], plan["reason"], plan["sensor"]) == (
        info["preset"],
        info["reason"],
        info["sensor"],
    )
    assert (plan["width"], plan["height"], plan["bands"]) == (chip["width"], chip["height"], chip["bands"])
    assert plan["gsd_m"] == pytest.approx(info["gsd_m"]) and plan["tiles"] == reply["tiles"]
    assert plan["warnings"] == info["warnings"]
    assert f"preset {preset}" in dock.plan_label.text() and f"by {by}" in dock.plan_label.text()
    assert dock._pending["by_value"] == (by == "value")


@pytest.mark.parametrize("kind", ["s2", "sar"])
def test_multispectral_and_sar_to_the_rgb_checkpoint_are_refused_before_and_after_sending(
    make_dock, qgis_new_project, show_view, rasters, backend, kind
) -> None:
    layer = QgsRasterLayer(rasters[kind], kind, "gdal")
    QgsProject.instance().addMapLayer(layer)
    show_view()
    dock = make_dock()
    wait_until(lambda: dock.status_reply is not None, 30)
    dock.select_task("caption")
    plan, reply = plan_then_send(dock, layer)
    assert plan is None and dock.plan_error.code == "wrong_variant"
    assert "EarthDial_4B_MS" in dock.plan_label.text() and "refused" in dock.plan_label.text()
    assert reply.code == "wrong_variant" and "serve EarthDial_4B_MS" in reply.message
