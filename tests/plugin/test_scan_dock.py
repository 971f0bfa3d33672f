"""The dock's tiled scan in real QGIS against a real backend: a multi-tile layer scanned with progress
into one styled, merged layer; the same layer streamed by value (a file the backend may not read) gives
the same tiles and boxes; Cancel stops the backend, whose next request is answered at once."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from plugin_testing import EARTHDIAL, ROOT, free_port, wait_until
from qgis.core import QgsCategorizedSymbolRenderer, QgsProject, QgsRasterLayer, QgsSettings, QgsVectorLayer

from conftest import Backend, backend_env, running_backend
from earthdial_qgis.contract.client import Client
from earthdial_qgis.core.area import WHOLE_LAYER

MOSAIC = """
import sys, numpy as np
from earthdial.demo import synthetic
n, size = int(sys.argv[2]) if len(sys.argv) > 2 else 3, 112
rows = [np.concatenate([synthetic.render(synthetic.make_scene(7, r * n + c), size) for c in range(n)], axis=2)
        for r in range(n)]
synthetic.write_geotiff(sys.argv[1], np.concatenate(rows, axis=1))
"""


@pytest.fixture(scope="module")
def demo_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """The demo model (it finds the drawn objects), reading files only under the pytest temp root."""
    if not EARTHDIAL.exists():
        pytest.skip(f"the backend is not installed ({EARTHDIAL} is missing)")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    allowed = tmp_path_factory.getbasetemp()
    command = [
        str(EARTHDIAL),
        "serve",
        "--endpoint",
        endpoint,
        "--device",
        "cpu",
        "--allow-dir",
        str(allowed),
    ]
    with running_backend(command) as (process, log):
        yield Backend(endpoint, Path(), process, log, allowed)


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 x 3 demo scenes of 112 px side by side: 16 tiles of 112 px at 10 % overlap."""
    path = tmp_path_factory.mktemp("scan") / "mosaic.tif"
    python = ROOT / ".venv" / "bin" / "python"
    subprocess.run([str(python), "-c", MOSAIC, str(path)], check=True, timeout=120, env=backend_env())
    return path


@pytest.fixture(scope="module")
def big_mosaic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9 x 9 demo scenes of 112 px: 81 tiles of 112 px at 10 % overlap, ten batches."""
    path = tmp_path_factory.mktemp("scan") / "big-mosaic.tif"
    python = ROOT / ".venv" / "bin" / "python"
    subprocess.run([str(python), "-c", MOSAIC, str(path), "9"], check=True, timeout=120, env=backend_env())
    return path


def _dock(
    qgis_iface: Any,
    endpoint: str,
    layer: QgsRasterLayer,
    task: str = "refer",
    prompt: str = "ship",
    tile: int = 112,
    running: bool = True,
) -> Any:
    """A panel set up for a scan; `running`: its backend is up, and the task is chosen from its own list
    (before its status comes the list is the last backend's, from the settings, which another run may have
    left without this task). A test that starts the backend later chooses the task itself once it answers."""
    from earthdial_qgis.gui.dock import SETTING_ENDPOINT, EarthDialDock

    QgsSettings().setValue(SETTING_ENDPOINT, endpoint)
    dock = EarthDialDock(qgis_iface)
    if running:
        wait_until(lambda: dock.status_reply is not None, 60)
    dock.timeout_spin.setValue(120)
    dock.layer_combo.setLayer(layer)
    dock.task_combo.setCurrentIndex(dock.task_combo.findData(task))
    dock.prompt_edit.setPlainText(prompt)
    dock.set_area_mode(WHOLE_LAYER)
    dock.scan.check.setChecked(True)
    dock.scan.tile_spin.setValue(tile)
    return dock


def _cancelled_scan(qgis_iface: Any, endpoint: str, path: Path) -> Any:
    """The panel of a whole-layer scan of `path` cancelled once its first boxes have come."""
    layer = QgsRasterLayer(str(path), "big mosaic", "gdal")
    QgsProject.instance().addMapLayer(layer)
    dock = _dock(qgis_iface, endpoint, layer)
    dock.send_button.click()
    wait_until(lambda: dock.scan.live is not None or not dock.is_busy(), 120)
    assert dock.is_busy(), "the scan ended before its first boxes arrived"
    dock.cancel_button.click()
    wait_until(lambda: not dock.is_busy(), 60)
    return dock


def _scan(qgis_iface: Any, endpoint: str, path: Path) -> tuple[Any, list[float], list[QgsVectorLayer]]:
    layer = QgsRasterLayer(str(path), "mosaic", "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    before = set(QgsProject.instance().mapLayers())
    dock = _dock(qgis_iface, endpoint, layer)
    seen: list[float] = []
    counts: list[int] = []
    dock.send_button.click()
    task = dock.scan.task
    assert task is not None and dock.is_busy()
    task.progressChanged.connect(seen.append)
    task.boxes.connect(lambda feats: counts.append(len(feats)))
    wait_until(lambda: not dock.is_busy(), 300)
    assert dock.last_error is None, dock.answer_view.toPlainText()
    new = [lyr for lid, lyr in QgsProject.instance().mapLayers().items() if lid not in before]
    dock.shutdown()
    return dock, seen, new


def test_a_scan_of_a_multi_tile_layer_gives_one_styled_merged_layer_with_progress(
    demo_backend, mosaic, qgis_new_project, qgis_iface
) -> None:
    dock, seen, new = _scan(qgis_iface, demo_backend.endpoint, mosaic)
    assert len(seen) >= 2 and max(seen) == 100  # several progress steps, ending at the end
    (layer,) = new  # one layer, not one per tile
    assert isinstance(layer.renderer(), QgsCategorizedSymbolRenderer)
    assert layer.name().startswith("scan refer “ship”") and "mosaic" in layer.name()
    feats = list(layer.getFeatures())
    assert feats and all(0 < f["score"] <= 1 and f["label"] == "ship" for f in feats)
    # the backend's fields, whole: every box carries its tile's window, so a reviewed scan exports
    (raster,) = QgsProject.instance().mapLayersByName("mosaic")
    gsd = raster.rasterUnitsPerPixelX()
    assert gsd < 1  # 336 px over the synthetic scene's metres
    for f in feats:
        assert (f["task"], f["prompt"], f["source"]) == ("refer", "ship", str(mosaic))
        assert f["gsd_data"] == pytest.approx(gsd) and f["gsd_model"] == pytest.approx(
            gsd
        )  # 112 px seen at 112
        request = json.loads(f["request"])
        assert (request["window"]["width"], request["window"]["height"]) == (112, 112)
        assert request["sources"][0]["path"] == str(mosaic) and request["prompt"] == "ship"
    assert len({f["tile"] for f in feats}) == len(feats) or len(feats) < 16  # merged across tiles
    assert dock.last_reply["tiles"] == 16


def test_a_layer_the_backend_cannot_read_is_streamed_with_the_same_tiles_and_merge(
    demo_backend, mosaic, qgis_new_project, qgis_iface
) -> None:
    outside = Path(tempfile.mkdtemp(prefix="earthdial-outside-"))  # not under the backend's allowed folder
    try:
        copy = outside / "mosaic.tif"
        shutil.copy(mosaic, copy)
        _, _, (by_value,) = _scan(qgis_iface, demo_backend.endpoint, copy)
        _, _, (by_file,) = _scan(qgis_iface, demo_backend.endpoint, mosaic)
    finally:
        shutil.rmtree(outside, ignore_errors=True)
    assert by_value.name() != by_file.name()  # two scans of layers named alike: two names
    # streamed pixels still name the file they came from, so the scan exports like one by reference
    assert {json.loads(f["request"])["sources"][0]["path"] for f in by_value.getFeatures()} == {str(copy)}
    assert {f["source"] for f in by_value.getFeatures()} == {str(copy)}

    def boxes(layer: QgsVectorLayer) -> list[tuple]:
        return sorted(
            (f["tile"], f["label"], round(f["score"], 3), f.geometry().asWkt(1)) for f in layer.getFeatures()
        )

    assert boxes(by_file) and boxes(by_value) == boxes(by_file)


def test_cancel_stops_the_backend_and_its_next_request_is_answered_at_once(
    make_dock, backend, qgis_new_project, qgis_iface, tmp_path
) -> None:
    import numpy as np
    from osgeo import gdal

    # 1600 x 1600 px: 1 296 tiles of 50 px, so that Cancel comes long before the end
    path = tmp_path / "big.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(path), 1600, 1600, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((500000, 1.0, 0.0, 4000000, 0.0, -1.0))
    ds.SetProjection(QgsProject.instance().crs().fromEpsgId(32633).toWkt())
    data = np.random.default_rng(5).integers(0, 256, size=(3, 1600, 1600), dtype=np.uint8)
    for b in range(3):
        ds.GetRasterBand(b + 1).WriteArray(data[b])
    ds = None
    layer = QgsRasterLayer(str(path), "big", "gdal")
    QgsProject.instance().addMapLayer(layer)
    dock = _dock(qgis_iface, backend.endpoint, layer, prompt="ship", tile=50)
    dock.send_button.click()
    task = dock.scan.task
    steps: list[float] = []
    task.progressChanged.connect(steps.append)
    wait_until(lambda: bool(steps) or not dock.is_busy(), 120)
    assert dock.is_busy() and steps[-1] < 100, (steps[-1:], dock.last_error)
    dock.cancel_button.click()
    wait_until(lambda: not dock.is_busy(), 60)
    assert dock.last_error is not None and dock.last_error.code == "cancelled"
    with Client(backend.endpoint, timeout_s=30) as client:
        t = time.monotonic()
        assert client.ping(timeout_s=10)["pong"]
        wait_until(lambda: client.status()["running"] == 0, 30)  # the scan stopped within a batch
        assert time.monotonic() - t < 30
    dock.shutdown()


def test_a_cancelled_scan_keeps_its_finished_tiles_in_the_results_geopackage(
    demo_backend, big_mosaic, qgis_new_project, qgis_iface
) -> None:
    """What the tiles finished before Cancel found is not left in memory (lost with the project): it is a
    table of the results GeoPackage, marked unmerged."""
    from earthdial_qgis.core import geopackage

    dock = _cancelled_scan(qgis_iface, demo_backend.endpoint, big_mosaic)
    assert dock.last_error is not None and dock.last_error.code == "cancelled"
    stopped = dock.scan.live
    assert stopped is not None and "stopped: unmerged" in stopped.name()
    assert stopped.providerType() == "ogr"  # no longer a memory layer
    path, table = geopackage.split_source(stopped.source())
    assert Path(path) == Path(geopackage.project_results_path()) and table
    kept = QgsVectorLayer(f"{path}|layername={table}", "check", "ogr")
    assert kept.isValid() and 0 < kept.featureCount() == stopped.featureCount()
    dock.shutdown()


PAIR = """
import sys, numpy as np
from earthdial.demo import synthetic
pairs = [synthetic.make_pair(11, i) for i in range(4)]
for side, out in (("before", sys.argv[1]), ("after", sys.argv[2])):
    synthetic.write_geotiff(out, np.concatenate([synthetic.render(getattr(p, side), 112) for p in pairs], axis=2))
"""


def _change_scan(qgis_iface: Any, endpoint: str, before: Path, after: Path) -> list[QgsVectorLayer]:
    layers = [QgsRasterLayer(str(p), p.stem, "gdal") for p in (before, after)]
    for layer in layers:
        assert layer.isValid()
        QgsProject.instance().addMapLayer(layer)
    known = set(QgsProject.instance().mapLayers())
    dock = _dock(qgis_iface, endpoint, layers[0], task="change", prompt="ships")  # a stale prompt, unused
    dock.later_layers.set_layers([layers[1]])
    dock.send_button.click()
    wait_until(lambda: not dock.is_busy(), 300)
    assert dock.last_error is None, dock.answer_view.toPlainText()
    dock.shutdown()
    return [lyr for lid, lyr in QgsProject.instance().mapLayers().items() if lid not in known]


def test_a_change_scan_of_layers_the_backend_cannot_read_streams_them_with_the_same_result(
    demo_backend, qgis_new_project, qgis_iface, tmp_path_factory
) -> None:
    inside = tmp_path_factory.mktemp("pair")
    python = ROOT / ".venv" / "bin" / "python"
    subprocess.run(
        [str(python), "-c", PAIR, str(inside / "before.tif"), str(inside / "after.tif")],
        check=True,
        timeout=120,
        env=backend_env(),
    )
    outside = Path(tempfile.mkdtemp(prefix="earthdial-outside-"))  # not under the backend's allowed folder
    try:
        for name in ("before.tif", "after.tif"):
            shutil.copy(inside / name, outside / name)
        by_value = _change_scan(
            qgis_iface, demo_backend.endpoint, outside / "before.tif", outside / "after.tif"
        )
        by_file = _change_scan(qgis_iface, demo_backend.endpoint, inside / "before.tif", inside / "after.tif")
    finally:
        shutil.rmtree(outside, ignore_errors=True)

    def tile_map(layers: list[QgsVectorLayer]) -> list[tuple]:
        (tiles,) = [lyr for lyr in layers if "change tiles" in lyr.name()]
        return sorted((f["tile"], f["label"], f["answer"]) for f in tiles.getFeatures())

    # 448 px in tiles of 112 px at 10 % overlap: 5 tiles
    assert len(tile_map(by_file)) == 5 and tile_map(by_value) == tile_map(by_file)
    for layers in (by_file, by_value):
        assert not any("ships" in lyr.name() for lyr in layers)  # the stale prompt names nothing
        (tiles,) = [lyr for lyr in layers if "change tiles" in lyr.name()]
        assert {f["pair"] for f in tiles.getFeatures()} == {"before.tif -> after.tif"}
        boxes = [f for lyr in layers if lyr is not tiles for f in lyr.getFeatures()]
        assert boxes and all(f["change"] in ("appeared", "disappeared") and f["pair"] for f in boxes)
        assert all(f["prompt"] in ("", None) and f["task"] == "change" for f in boxes)
    assert {f[1] for f in tile_map(by_file)} == {"changed", "unchanged"}  # the map tells tiles apart


def test_boxes_wait_for_their_tiles_entry_before_they_reach_the_map() -> None:
    """Events are cut by size, so a tile's boxes can come an event before its entry (which carries the
    answer and request every box records): shown before it, a box would have neither, and a stopped scan
    would keep boxes that cannot be exported. Two events as the backend cuts them: tile 3's two boxes, then
    its entry with tile 4's box and entry."""
    from earthdial_qgis.core import scanning

    def box(tile: int, n: int) -> dict[str, Any]:
        return {"type": "Feature", "properties": {"tile": tile, "label": f"ship{n}"}, "geometry": None}

    finished: dict[int, Any] = {}
    ready, waiting = scanning.finished_boxes([box(3, 1), box(3, 2)], finished)
    assert ready == [] and len(waiting) == 2
    finished.update({3: {"index": 3, "request": "r3"}, 4: {"index": 4, "request": "r4"}})
    ready, waiting = scanning.finished_boxes(waiting + [box(4, 3)], finished)
    assert [b["properties"]["label"] for b in ready] == ["ship1", "ship2", "ship3"] and waiting == []
