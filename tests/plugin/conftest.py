"""Fixtures for the plugin's tests: a real `earthdial serve` on a tiny random model, real GeoTIFFs, and
a map canvas showing a known extent. QGIS itself comes from pytest-qgis (qgis_app, qgis_iface, ...)."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from plugin_testing import EARTHDIAL, EPSG, VIEW, free_port, wait_until, write_geotiff
from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsLayerTreeModel,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsSettings,
)
from qgis.gui import QgsLayerTreeView
from qgis.PyQt.QtCore import QCoreApplication

START_TIMEOUT_S = 120


@dataclass
class Backend:
    endpoint: str
    model: Path
    process: subprocess.Popen
    log: list[str]
    allowed_dir: Path | None  # where by-reference files may be, when the backend restricts it


def backend_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def finetune_and_serve(dock: Any, records: Path, adapter: Path) -> subprocess.CompletedProcess[str]:
    """A two-step CPU fine-tune of `earthdial finetune` on `records` into `adapter`, then the dock's local
    backend restarted from the settings with that adapter (waits until its status names it)."""
    from earthdial_qgis.core import settings

    done = subprocess.run(
        [str(EARTHDIAL), "finetune", str(records), "-o", str(adapter)]
        + "--steps 2 --batch-size 2 --threads 1 --device cpu".split(),
        capture_output=True,
        text=True,
        timeout=300,
        env=backend_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    dock.stop_button.click()
    settings.set_value(settings.ADAPTER_DIR, str(adapter))
    dock.start_button.click()
    wait_until(lambda: f"adapter {adapter.name}" in dock.status_label.text(), 180)
    return done


@pytest.fixture(scope="session", autouse=True)
def layer_tree_view(qgis_iface: Any, qgis_parent: Any) -> QgsLayerTreeView:
    """A real layer tree view for the test iface, as QGIS's window has: pytest-qgis answers
    ``iface.layerTreeView()`` with a MagicMock, which Processing hands to C++ when it loads results on
    QGIS 3.44 (a TypeError, then a crash at exit; 3.40 only calls the mock from Python)."""
    view = QgsLayerTreeView(qgis_parent)
    view.setModel(QgsLayerTreeModel(QgsProject.instance().layerTreeRoot(), view))
    view.hide()  # a child of the main window: never drawn over it when tests show that window
    qgis_iface.layerTreeView = lambda: view
    return view


@pytest.fixture(scope="session")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """A real backend process serving a tiny random-weight checkpoint on a free loopback port."""
    if not EARTHDIAL.exists():
        pytest.skip(f"the backend is not installed ({EARTHDIAL} is missing; run scripts/install.sh)")
    model = tmp_path_factory.mktemp("model") / "tiny"
    subprocess.run(
        [str(EARTHDIAL), "make-tiny-checkpoint", str(model)],
        check=True,
        capture_output=True,
        timeout=180,
        env=backend_env(),
    )
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    command = [str(EARTHDIAL), "serve", "--model", str(model), "--endpoint", endpoint, "--device", "cpu"]
    help_text = subprocess.run(
        [str(EARTHDIAL), "serve", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    allowed = None
    if "--allow-dir" in help_text:  # backends that read only allowed directories: add the test rasters'
        allowed = tmp_path_factory.getbasetemp()
        command += ["--allow-dir", str(allowed)]
    with running_backend(command) as (process, log):
        yield Backend(endpoint, model, process, log, allowed)


@contextmanager
def running_backend(command: list[str]) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """Start `earthdial serve ...`, wait for its "serving" line, yield (process, its output lines so far and
    to come), and stop it afterwards."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=backend_env(),
    )
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def drain() -> None:  # keeps reading so that a chatty server never blocks on a full pipe
        assert process.stdout is not None
        for line in process.stdout:
            log.append(line)
            lines.put(line)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"earthdial serve exited with {process.returncode}:\n{''.join(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"earthdial serve did not start in {START_TIMEOUT_S} s:\n{''.join(log)}")
            try:
                if lines.get(timeout=0.2).startswith("earthdial: serving"):
                    break
            except queue.Empty:
                continue
        yield process, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def geotiff(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The test raster as a GeoTIFF file, and its pixels."""
    path = tmp_path_factory.mktemp("rasters") / "scene.tif"
    return path, write_geotiff(str(path))


@pytest.fixture
def raster_layer(qgis_new_project: Any, qgis_iface: Any, geotiff: tuple[Path, np.ndarray]) -> QgsRasterLayer:
    """The test GeoTIFF as the project's active raster layer."""
    layer = QgsRasterLayer(str(geotiff[0]), "scene", "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    qgis_iface.setActiveLayer(layer)
    return layer


@pytest.fixture
def show_view(qgis_iface: Any, qgis_parent: Any) -> Callable[..., QgsRectangle]:
    """Make the canvas show a rectangle (in EPSG:32633 unless told) exactly; returns the canvas extent."""

    def show(rect: QgsRectangle = VIEW, crs: str = f"EPSG:{EPSG}") -> QgsRectangle:
        canvas = qgis_iface.mapCanvas()
        canvas.setDestinationCrs(QgsCoordinateReferenceSystem(crs))
        size = canvas.mapSettings().outputSize()
        if size.width() != size.height():
            # A canvas never shown keeps an odd initial size; showing its window once makes it square,
            # so that a square view is shown as it is instead of being widened to another aspect.
            qgis_parent.show()
            QCoreApplication.processEvents()
            qgis_parent.hide()
        canvas.setExtent(rect)
        extent = canvas.extent()
        got = (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum())
        want = (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum())
        assert got == pytest.approx(want, abs=1e-6), (
            f"canvas shows {extent.toString()}, not {rect.toString()}"
        )
        return extent

    return show


@pytest.fixture
def make_dock(qgis_iface: Any, backend: Backend) -> Iterator[Callable[[], Any]]:
    """Builds EarthDial panels pointed at the test backend; cancels and deletes them afterwards."""
    from earthdial_qgis.gui.dock import SETTING_ENDPOINT, EarthDialDock

    docks: list[Any] = []

    def make() -> Any:
        QgsSettings().setValue(SETTING_ENDPOINT, backend.endpoint)
        dock = EarthDialDock(qgis_iface)
        dock.timeout_spin.setValue(60)
        docks.append(dock)
        # as a user sees it: the task and preset lists are the backend's, once its status has come
        wait_until(lambda: dock.status_reply is not None or bool(dock.status_error), 30)
        return dock

    yield make
    for dock in docks:
        dock.shutdown()
        dock.deleteLater()
    wait_until(lambda: QgsApplication.taskManager().countActiveTasks() == 0, timeout_s=15)


@contextmanager
def local_demo_plugin(qgis_iface: Any, allowed: Path, results_gpkg: str, timeout_s: int) -> Iterator[Any]:
    """The plugin as an analyst starts it: installed in QGIS, its panel open, its local backend (the built-in
    demo model, reading ``allowed``) started from the panel and connected. Yields the plugin; unloads it and
    forgets the settings it used afterwards."""
    import earthdial_qgis
    from earthdial_qgis.core import settings

    keys = (
        settings.ENDPOINT,
        settings.BACKEND_COMMAND,
        settings.MODEL_DIR,
        settings.DEVICE,
        settings.EXTRA_ARGS,
        settings.ADAPTER_DIR,
        settings.RESULTS_GPKG,
    )
    settings.set_value(settings.ENDPOINT, f"tcp://127.0.0.1:{free_port()}")
    settings.set_value(settings.BACKEND_COMMAND, str(EARTHDIAL.parent.parent))  # the backend's venv folder
    settings.set_value(settings.MODEL_DIR, "")  # the built-in demo model
    settings.set_value(settings.DEVICE, "cpu")
    settings.set_value(settings.EXTRA_ARGS, f"--allow-dir {allowed}")
    settings.set_value(settings.RESULTS_GPKG, results_gpkg)
    plugin = earthdial_qgis.classFactory(qgis_iface)
    plugin.initGui()
    try:
        plugin.action.trigger()
        plugin.dock.timeout_spin.setValue(timeout_s)
        plugin.dock.start_button.click()
        wait_until(lambda: plugin.dock.status_label.text().startswith("Connected"), 180)
        yield plugin
    finally:
        plugin.unload()
        for key in keys:
            QgsSettings().remove(key)
        wait_until(lambda: QgsApplication.taskManager().countActiveTasks() == 0, timeout_s=15)
