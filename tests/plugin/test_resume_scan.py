"""A stopped dock scan resumed from the dock: the scan cancelled part-way keeps its boxes in a
stopped layer that remembers the scan (in the project file, its boxes in the results GeoPackage), so that
after the project is saved, closed and opened again "Resume scan" on that layer scans only the tiles not
finished (stopped again, one stopped layer holds every box so far) and ends with the same merged boxes as
an uninterrupted scan; the stopped layers leave the project, their GeoPackage tables stay. A scanned layer
that changed or is gone is a clear message, and nothing is lost."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from plugin_testing import wait_until
from qgis.core import QgsProject, QgsRasterLayer, QgsSettings, QgsVectorLayer
from test_scan_dock import _dock, big_mosaic, demo_backend  # noqa: F401  (module fixtures, reused)

from earthdial_qgis.contract.wire import ErrorCode
from earthdial_qgis.core import geopackage, resume, settings
from earthdial_qgis.gui import scan as dock_scan
from earthdial_qgis.tasks import scan as scan_task


def _boxes(layer: QgsVectorLayer) -> list[tuple[Any, ...]]:
    """What the merge decides of each box: its place, label, score and tile."""
    return sorted(
        (f.geometry().asWkt(6), f["label"], f["score"], str(f["tile"])) for f in layer.getFeatures()
    )


def _connected_dock(qgis_iface: Any, endpoint: str, layer: QgsRasterLayer) -> Any:
    """The panel set for a tiled scan of ``layer`` once it knows the backend's tasks."""
    dock = _dock(qgis_iface, endpoint, layer)
    wait_until(lambda: dock.status_reply is not None, 60)
    dock.task_combo.setCurrentIndex(dock.task_combo.findData("refer"))
    dock.prompt_edit.setPlainText("ship")
    dock.scan.check.setChecked(True)
    return dock


def _scan_to_the_end(dock: Any) -> None:
    dock.send_button.click()
    wait_until(lambda: not dock.is_busy(), 600)
    assert dock.last_error is None, dock.answer_view.toPlainText()


class _OneSecond(datetime):
    """A clock whose every reading is one second: scans started within a second of each other (a stop
    resumed at once, as a quick analyst or a fast machine does), which the layer names still tell apart."""

    @classmethod
    def now(cls, tz: Any = None) -> _OneSecond:
        return cls(2026, 1, 1, 12, 0, 0)


def test_a_stopped_scan_resumed_from_the_dock_equals_an_uninterrupted_scan(
    demo_backend,  # noqa: F811  (the fixtures imported above)
    big_mosaic,  # noqa: F811
    qgis_new_project,
    qgis_iface,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dock_scan, "datetime", _OneSecond)
    results = tmp_path / "results.gpkg"
    settings.set_value(settings.RESULTS_GPKG, str(results))
    try:
        layer = QgsRasterLayer(str(big_mosaic), "big mosaic", "gdal")
        QgsProject.instance().addMapLayer(layer)
        dock = _connected_dock(qgis_iface, demo_backend.endpoint, layer)
        _scan_to_the_end(dock)
        whole = _boxes(dock.last_layer)
        total = dock.last_reply["tiles"]
        assert whole and total > 20
        assert not dock.resume_button.isEnabled()  # a merged layer is not a stopped scan

        dock.send_button.click()
        wait_until(lambda: dock.scan.live is not None or not dock.is_busy(), 120)
        assert dock.is_busy(), "the scan ended before its first boxes arrived"
        dock.cancel_button.click()
        wait_until(lambda: not dock.is_busy(), 60)
        assert dock.last_error is not None and dock.last_error.code == ErrorCode.CANCELLED
        stopped = dock.last_layer
        assert "stopped: unmerged" in stopped.name() and stopped.providerType() == "ogr"
        assert dock.resume_button.isEnabled()
        done = len(resume.recorded(stopped)["tiles"])
        assert 0 < done < total
        _, table = geopackage.split_source(stopped.source())
        name = stopped.name()
        dock.shutdown()
        dock.deleteLater()

        # saved, closed, opened again: the stopped layer, selected in the Layers panel, can be resumed
        project_file = str(tmp_path / "scan.qgz")
        assert QgsProject.instance().write(project_file)
        QgsProject.instance().clear()
        assert QgsProject.instance().read(project_file)
        (stopped,) = QgsProject.instance().mapLayersByName(name)
        raster = QgsProject.instance().mapLayersByName("big mosaic")[0]
        dock = _connected_dock(qgis_iface, demo_backend.endpoint, raster)
        assert not dock.resume_button.isEnabled()  # nothing stopped is selected, nor the last result
        qgis_iface.setActiveLayer(stopped)
        dock._active_layer_changed(
            stopped
        )  # what QGIS's currentLayerChanged does (the test iface emits none)
        assert dock.resume_button.isEnabled()

        # resumed, and stopped again: one stopped layer with every box so far takes over from the first
        first_boxes = stopped.featureCount()
        dock.resume_button.click()
        assert dock.is_busy()
        wait_until(lambda: not dock.is_busy() or len(dock.scan.task.finished_tiles) > done, 120)
        assert dock.is_busy(), "the resumed scan ended before its first new tiles"
        dock.cancel_button.click()
        wait_until(lambda: not dock.is_busy(), 60)
        again = dock.last_layer
        assert again is not None and again is not stopped and again.name().endswith(" (stopped: unmerged)")
        # a name of its own, though the scan and its resume began within the same second
        assert again.name() != name and len(QgsProject.instance().mapLayersByName(again.name())) == 1
        more = len(resume.recorded(again)["tiles"])
        assert done < more < total and again.featureCount() >= first_boxes
        assert not QgsProject.instance().mapLayersByName(name)  # its role passed on
        assert dock.resume_button.isEnabled()

        dock.resume_button.click()
        wait_until(lambda: not dock.is_busy(), 600)
        assert dock.last_error is None, dock.answer_view.toPlainText()
        reply = dock.last_reply
        # only the tiles not finished before were scanned
        assert reply["tiles_skipped"] == more and reply["tiles_done"] == total - more
        merged = dock.last_layer
        assert _boxes(merged) == whole
        assert all(f["request"] for f in merged.getFeatures())  # earlier boxes too carry their tile's request
        # the merged layer took over: the stopped layers left the project, their tables stay in the GeoPackage
        assert not [x for x in QgsProject.instance().mapLayers().values() if "stopped" in x.name()]
        assert table is not None and table.lower() in geopackage.table_names(str(results))
        kept = QgsVectorLayer(geopackage.source_uri(str(results), table), "kept", "ogr")
        assert kept.isValid() and kept.featureCount() > 0
        assert not dock.resume_button.isEnabled()
        dock.shutdown()
    finally:
        QgsSettings().remove(settings.RESULTS_GPKG)


def test_resume_of_a_changed_or_missing_layer_says_so_and_keeps_the_stopped_layer(
    demo_backend,  # noqa: F811
    big_mosaic,  # noqa: F811
    qgis_new_project,
    qgis_iface,
) -> None:
    layer = QgsRasterLayer(str(big_mosaic), "big mosaic", "gdal")
    QgsProject.instance().addMapLayer(layer)
    dock = _connected_dock(qgis_iface, demo_backend.endpoint, layer)
    dock.send_button.click()
    wait_until(lambda: dock.scan.live is not None or not dock.is_busy(), 120)
    assert dock.is_busy(), "the scan ended before its first boxes arrived"
    dock.cancel_button.click()
    wait_until(lambda: not dock.is_busy(), 60)
    stopped = dock.last_layer
    record = resume.recorded(stopped)
    assert record is not None
    # the layer's extent is not what was scanned: a clear message, the scan is not sent
    moved = {**record, "layer": {**record["layer"], "extent": [v + 1000 for v in record["layer"]["extent"]]}}
    resume.remember(stopped, moved)
    dock.resume_button.click()
    assert not dock.is_busy() and dock.last_error is not None and dock.last_error.code == "no_layer"
    assert "changed since the scan stopped (its extent)" in dock.answer_view.toPlainText()
    resume.remember(stopped, record)
    # the layer is gone from the project
    QgsProject.instance().removeMapLayer(layer.id())
    dock.resume_button.click()
    assert not dock.is_busy()
    assert dock.last_error is not None and dock.last_error.code == "no_layer"
    assert (
        "big mosaic" in dock.answer_view.toPlainText()
        and "not in the project" in dock.answer_view.toPlainText()
    )
    assert QgsProject.instance().mapLayer(stopped.id()) is stopped and resume.recorded(stopped) is not None
    dock.shutdown()


def test_a_scan_stopped_between_a_tiles_boxes_and_its_entry_keeps_a_record_the_backend_resumes(
    raster_layer: QgsRasterLayer,
) -> None:
    """Events are cut by size, so a tile's boxes can come an event before its entry, and a cancel reads no
    further event. A stop right between them keeps only the boxes of the tiles its record lists: a box of
    a tile not listed makes the backend refuse the resume (`bad_request`), and the resume scans that tile
    again anyway. Tile 2 finished with its box; tile 3's two boxes came, its entry never did."""
    from earthdial_qgis.core.request import Request

    def box(tile: int, order: int) -> dict[str, Any]:
        ring = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
        return {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"tile": tile, "order": order, "edge_distance": 1.0, "score": 0.5, "label": "ship"},
        }

    def entry(index: int) -> dict[str, Any]:
        return {
            "index": index,
            "footprint": [[0.0, 0.0], [2.0, 0.0], [2.0, 2.0], [0.0, 0.0]],
            "request": f"r{index}",
        }

    extent = raster_layer.extent()
    area = (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum())
    request = Request("tcp://127.0.0.1:1", 1.0, "refer", "ship", (raster_layer.id(),), area, scan=True)
    task = scan_task.ScanTask("scan", request, lambda t: None)
    task.on_event({"event": "progress", "done": 1, "total": 9, "tiles": [entry(2)], "features": [box(2, 0)]})
    task.on_event(
        {"event": "progress", "done": 1, "total": 9, "tiles": [], "features": [box(3, 0), box(3, 1)]}
    )
    # what a stop now keeps (DockScan._done), sent back as a resume sends it
    record = {"tiles": list(task.finished_tiles.values()), "features": task.found}
    # the backend's rule for `earlier` (docs/protocol.md): every box is of one of the listed tiles
    assert resume.skip(record) == [2]
    assert [f["properties"]["tile"] for f in resume.earlier(record)["features"]] == [2]
    # tile 3's entry, had it come, brings its boxes with it
    task.on_event({"event": "progress", "done": 2, "total": 9, "tiles": [entry(3)], "features": []})
    assert sorted(f["properties"]["tile"] for f in task.found) == [2, 3, 3]
