"""The whole chain with the built-in demo model, which really looks at the pixels: a generated scene in
Web Mercator is the active layer, the panel asks for the ships, and the polygon that comes back lies on
the true ship's footprint on the map."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from plugin_testing import EARTHDIAL, ROOT, free_port, wait_until
from qgis.core import QgsApplication, QgsGeometry, QgsProject, QgsRasterLayer, QgsSettings, QgsVectorLayer

from conftest import Backend, backend_env, running_backend
from earthdial_qgis.core.area import WHOLE_LAYER

DEMO = ROOT / "backend" / "earthdial" / "models" / "demo" / "model.safetensors"

pytestmark = pytest.mark.skipif(
    not DEMO.exists(), reason="no demo checkpoint is installed (earthdial train-demo writes it)"
)


@pytest.fixture(scope="module")
def demo_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """`earthdial serve` with no --model: it falls back to the shipped demo checkpoint."""
    if not EARTHDIAL.exists():
        pytest.skip(f"the backend is not installed ({EARTHDIAL} is missing; run scripts/install.sh)")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with running_backend([str(EARTHDIAL), "serve", "--endpoint", endpoint, "--device", "cpu"]) as (
        process,
        log,
    ):
        assert any("demo model" in line for line in log), "".join(log)
        yield Backend(endpoint, DEMO.parent, process, log, None)


@pytest.fixture(scope="module")
def mercator_scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A generated scene written by `earthdial make-sample` in EPSG:3857, and its true outlines."""
    path = tmp_path_factory.mktemp("demo") / "harbour.tif"
    subprocess.run(
        [str(EARTHDIAL), "make-sample", str(path), "--crs", "EPSG:3857"],
        check=True,
        capture_output=True,
        timeout=120,
        env=backend_env(),
    )
    truth = json.loads(path.with_name("harbour.truth.geojson").read_text())
    return path, truth


def test_the_panel_finds_the_ship_on_the_map(
    demo_backend, mercator_scene, qgis_new_project, qgis_iface
) -> None:
    from earthdial_qgis.gui.dock import SETTING_ENDPOINT, EarthDialDock

    path, truth = mercator_scene
    layer = QgsRasterLayer(str(path), "harbour", "gdal")
    assert layer.isValid() and layer.crs().authid() == "EPSG:3857"
    QgsProject.instance().addMapLayer(layer)
    qgis_iface.setActiveLayer(layer)
    qgis_iface.mapCanvas().setDestinationCrs(layer.crs())
    qgis_iface.mapCanvas().setExtent(layer.extent())

    QgsSettings().setValue(SETTING_ENDPOINT, demo_backend.endpoint)
    dock = EarthDialDock(qgis_iface)
    try:
        dock.timeout_spin.setValue(120)
        # the task list comes from the backend's status, which the panel asks for in the background
        wait_until(lambda: dock.status_reply is not None or bool(dock.status_error), 30)
        dock.select_task("refer")
        dock.set_area_mode(WHOLE_LAYER)
        dock.prompt_edit.setPlainText("ships")
        before = set(QgsProject.instance().mapLayers())
        dock.send_button.click()
        wait_until(lambda: not dock.is_busy(), 180)
        assert dock.last_error is None, dock.answer_view.toPlainText()
        added = [lyr for lid, lyr in QgsProject.instance().mapLayers().items() if lid not in before]
        (result,) = [lyr for lyr in added if isinstance(lyr, QgsVectorLayer)]
        assert result.crs().authid() == "EPSG:3857"
        features = list(result.getFeatures())
        assert [f["label"] for f in features] == ["ship"], dock.answer_view.toPlainText()
        found = features[0].geometry()
        (ship,) = [f for f in truth["features"] if f["properties"]["class"] == "ship"]
        ring = ", ".join(f"{x} {y}" for x, y in ship["geometry"]["coordinates"][0])
        footprint = QgsGeometry.fromWkt(f"POLYGON(({ring}))")
        assert footprint.isGeosValid()
        overlap = found.intersection(footprint).area()
        # the returned box lies on the ship: most of the hull is inside it
        assert overlap > 0.5 * footprint.area(), (dock.last_reply.get("answer"), found.asWkt(1), ring)
        # and it is the ship's box, not the whole scene
        assert found.area() < 4 * footprint.boundingBox().area(), found.asWkt(1)
    finally:
        dock.shutdown()
        dock.deleteLater()
        wait_until(lambda: QgsApplication.taskManager().countActiveTasks() == 0, timeout_s=15)


def test_the_sample_truth_opens_in_the_scene_crs(mercator_scene) -> None:
    """`make-sample`'s truth GeoJSON says its CRS as GDAL reads it: QGIS opens it in the scene's CRS (the
    CRS a new project takes from its first layer), over the scene, not as EPSG:4326."""
    path, _ = mercator_scene
    truth = QgsVectorLayer(str(path.with_name("harbour.truth.geojson")), "truth", "ogr")
    assert truth.isValid() and truth.crs().authid() == "EPSG:3857"
    assert truth.extent().intersects(QgsRasterLayer(str(path), "harbour", "gdal").extent())
