"""The `earthdial` Processing provider: algorithms run headless with processing.run against the real
backend and write GeoPackages; earthdial:detect and earthdial:detect_changes through the backend's streaming
scan, in-process and through qgis_process."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from plugin_testing import EPSG, ORIGIN, PIXEL, SIZE, write_geotiff
from qgis.core import (
    QgsApplication,
    QgsProcessingException,
    QgsRectangle,
    QgsVectorLayer,
)

from earthdial_qgis.core.layers import FIELDS

LAYER_EXTENT = QgsRectangle(ORIGIN[0], ORIGIN[1] - SIZE[1] * PIXEL, ORIGIN[0] + SIZE[0] * PIXEL, ORIGIN[1])


@pytest.fixture(scope="module")
def processing(qgis_app: Any) -> Iterator[Any]:
    """Processing initialised as in a headless script, with the EarthDial provider registered."""
    plugins = "/usr/share/qgis/python/plugins"
    if plugins not in sys.path:
        sys.path.append(plugins)
    from processing.core.Processing import Processing

    Processing.initialize()
    import processing as module

    from earthdial_qgis.processing.provider import EarthDialProvider

    registry = QgsApplication.processingRegistry()
    provider = EarthDialProvider()
    assert registry.addProvider(provider)
    try:
        yield module
    finally:
        registry.removeProvider(provider)


def read_gpkg(path: str) -> QgsVectorLayer:
    layer = QgsVectorLayer(path, "out", "ogr")
    assert layer.isValid(), path
    return layer


def test_algorithms_are_registered(processing) -> None:
    registry = QgsApplication.processingRegistry()
    for name in ("ask", "detect", "change", "detect_changes"):
        algorithm = registry.algorithmById(f"earthdial:{name}")
        assert algorithm is not None, name
        names = {p.name() for p in algorithm.parameterDefinitions()}
        assert {"INPUT", "ENDPOINT", "OUTPUT"} <= names
    export = registry.algorithmById("earthdial:export_training")
    assert {p.name() for p in export.parameterDefinitions()} == {"INPUT", "OUTPUT"}
    change = registry.algorithmById("earthdial:change")
    assert {"INPUT_2", "TASK", "PROMPT"} <= {p.name() for p in change.parameterDefinitions()}
    assert registry.providerById("earthdial").defaultVectorFileExtension() == "gpkg"


def ship_detect(layer: Any, endpoint: str, output: Any) -> dict[str, Any]:
    """earthdial:detect's parameters for ships in `layer`, in 100 px tiles, on the backend at `endpoint`."""
    return {
        "INPUT": layer,
        "PROMPT": "ship",
        "TILE_SIZE": 100,
        "ENDPOINT": endpoint,
        "TIMEOUT": 120,
        "OUTPUT": output,
    }


def test_detect_tiles_the_layer_and_writes_a_geopackage(processing, backend, geotiff, tmp_path: Path) -> None:
    out = tmp_path / "ships.gpkg"
    result = processing.run(
        "earthdial:detect",
        ship_detect(str(geotiff[0]), backend.endpoint, str(out)),
    )
    assert (
        result["TILES"] == 3
    )  # 200 x 100 pixels in tiles of 100 overlapping by at least 10: the backend's plan
    assert result["OUTPUT"] == str(out) and out.exists()
    layer = read_gpkg(str(out))
    assert [f.name() for f in layer.fields() if f.name() != "fid"] == [name for name, _ in FIELDS]
    assert layer.crs().authid() == f"EPSG:{EPSG}"
    for feature in layer.getFeatures():  # whatever the tiny model found: tagged with its tile and score
        assert feature["task"] == "refer" and feature["prompt"] == "ship"
        assert feature["tile"] in {"0", "1", "2"}


def test_change_on_a_pair_writes_a_geopackage(
    processing, backend, geotiff, tmp_path_factory, monkeypatch
) -> None:
    from earthdial_qgis.contract.client import Client

    asked: list[tuple[dict, dict]] = []  # (request header, reply header) of each ask the algorithm made
    request = Client.request

    def recording(self, header, *args, **kwargs):
        reply = request(self, header, *args, **kwargs)
        if header.get("op") == "ask":
            asked.append((dict(header), reply.header))
        return reply

    monkeypatch.setattr(Client, "request", recording)
    after = tmp_path_factory.getbasetemp() / "after_processing.tif"
    write_geotiff(str(after), seed=3)
    out = tmp_path_factory.mktemp("change") / "change.gpkg"
    result = processing.run(
        "earthdial:change",
        {
            "INPUT": str(geotiff[0]),
            "INPUT_2": str(after),
            "TASK": "change",
            "BANDS": [3, 2, 1],
            "EXTENT": "500100,500600,3999200,3999700 [EPSG:32633]",
            "ENDPOINT": backend.endpoint,
            "OUTPUT": str(out),
        },
    )
    # one ask, of the change task, about both images on one window, whose answer is the one returned
    ((header, reply),) = asked
    assert header["task"] == "change"
    chips = reply["chips"]
    assert len(chips) == 2 and chips[0]["source"] != chips[1]["source"]
    assert chips[0]["transform"] == chips[1]["transform"]  # the later image on the first one's grid
    assert (chips[0]["width"], chips[0]["height"]) == (chips[1]["width"], chips[1]["height"]) == (50, 50)
    assert result["ANSWER"] == reply["answer"]
    layer = read_gpkg(result["OUTPUT"])
    assert "variant" in layer.fields().names() and "gsd_model" in layer.fields().names()


def test_ask_reports_backend_errors_in_plain_words(processing, geotiff, tmp_path: Path) -> None:
    from plugin_testing import free_port

    dead = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(QgsProcessingException, match="not reachable"):
        processing.run(
            "earthdial:ask",
            {
                "INPUT": str(geotiff[0]),
                "PROMPT": "ship",
                "ENDPOINT": dead,
                "TIMEOUT": 1,
                "OUTPUT": str(tmp_path / "x.gpkg"),
            },
        )


@pytest.mark.parametrize("algorithm", ["ask", "detect", "change", "detect_changes"])
def test_each_algorithm_fails_fast_when_no_backend_answers(
    processing, geotiff, tmp_path: Path, algorithm: str
) -> None:
    """A ping first, as the panel does: no backend at the endpoint is an error naming it within seconds,
    not silence until the request timeout (300 s here), which would cost minutes per batch item."""
    import time

    from plugin_testing import free_port

    dead = f"tcp://127.0.0.1:{free_port()}"
    parameters: dict[str, Any] = {
        "INPUT": str(geotiff[0]),
        "PROMPT": "ship",
        "ENDPOINT": dead,
        "TIMEOUT": 300,
        "OUTPUT": str(tmp_path / "out.gpkg"),
    }
    if algorithm in ("change", "detect_changes"):
        parameters["INPUT_2"] = str(geotiff[0])
    if algorithm == "detect_changes":
        parameters["OUTPUT_TILES"] = str(tmp_path / "tiles.gpkg")
    started = time.monotonic()
    with pytest.raises(QgsProcessingException) as failure:
        processing.run(f"earthdial:{algorithm}", parameters)
    elapsed = time.monotonic() - started
    assert "not reachable" in str(failure.value) and dead in str(failure.value)
    assert elapsed < 15, f"{algorithm} took {elapsed:.1f} s to fail"


def test_qgis_process_runs_detect_from_the_installed_plugin(backend, geotiff, tmp_path: Path) -> None:
    """The plugin as a user installs it (the built zip in a profile), run by qgis_process without a GUI."""
    import os
    import shutil
    import subprocess
    import zipfile

    from plugin_testing import ROOT

    # Debian's qgis_process wrapper adds --noversioncheck, which qgis_process itself refuses: call the binary
    program = shutil.which("qgis_process.bin") or shutil.which("qgis_process")
    if program is None:
        pytest.skip("qgis_process is not installed")
    package = tmp_path / "earthdial_qgis.zip"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_plugin.py"), "-o", str(package)], check=True
    )
    plugins = tmp_path / "config" / "profiles" / "default" / "python" / "plugins"
    plugins.mkdir(parents=True)
    zipfile.ZipFile(package).extractall(plugins)
    env = {**os.environ, "QGIS_CUSTOM_CONFIG_PATH": str(tmp_path / "config"), "QT_QPA_PLATFORM": "offscreen"}
    subprocess.run(
        [program, "plugins", "enable", "earthdial_qgis"],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )

    def qgis_process(
        algorithm: str, *parameters: str, timeout: int = 300
    ) -> subprocess.CompletedProcess[str]:
        """`qgis_process run` of one of the plugin's algorithms, in the profile it is installed in."""
        command = [program, "run", algorithm, "--", *parameters]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)

    out = tmp_path / "detect.gpkg"
    run = qgis_process(
        "earthdial:detect",
        f"INPUT={geotiff[0]}",
        "PROMPT=ship",
        "TILE_SIZE=448",
        f"ENDPOINT={backend.endpoint}",
        f"OUTPUT={out}",
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "TILES" in run.stdout
    assert read_gpkg(str(out)).fields().indexFromName("score") >= 0
    after = tmp_path / "after.tif"
    write_geotiff(str(after), seed=4)
    changes, tiles = tmp_path / "changes.gpkg", tmp_path / "change_tiles.gpkg"
    run = qgis_process(
        "earthdial:detect_changes",
        f"INPUT={geotiff[0]}",
        f"INPUT_2={after}",
        "TILE_SIZE=100",
        f"ENDPOINT={backend.endpoint}",
        f"OUTPUT={changes}",
        f"OUTPUT_TILES={tiles}",
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    tile_map = read_gpkg(str(tiles))
    assert tile_map.featureCount() == 3  # one per tile pair, changed or not
    assert {f["label"] for f in tile_map.getFeatures()} <= {"changed", "unchanged"}
    assert read_gpkg(str(changes)).fields().indexFromName("score") >= 0
    # the reported command: no backend at the endpoint fails in seconds, naming it (was silent for 300 s)
    import time

    from plugin_testing import free_port

    dead = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    run = qgis_process(
        "earthdial:ask",
        f"INPUT={geotiff[0]}",
        "PROMPT=ships",
        f"ENDPOINT={dead}",
        f"OUTPUT={tmp_path / 'ask.gpkg'}",
        timeout=120,
    )
    assert run.returncode != 0 and time.monotonic() - started < 15
    assert f"not reachable at {dead}" in run.stdout + run.stderr


def test_detect_loads_one_styled_layer_named_for_the_request(processing, backend, geotiff) -> None:
    from qgis.core import QgsCategorizedSymbolRenderer, QgsProject

    result = processing.runAndLoadResults(
        "earthdial:detect",
        ship_detect(str(geotiff[0]), backend.endpoint, "TEMPORARY_OUTPUT"),
    )
    layer = QgsProject.instance().mapLayer(result["OUTPUT"]) or next(
        iter(QgsProject.instance().mapLayersByName(f"ship — {Path(geotiff[0]).stem}")), None
    )
    assert layer is not None and layer.name().startswith("ship — ") and layer.name() != "Boxes"
    assert isinstance(layer.renderer(), QgsCategorizedSymbolRenderer)
    QgsProject.instance().removeMapLayer(layer.id())


def _bounds(rect: QgsRectangle) -> tuple[float, float, float, float]:
    return rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()


def test_algorithms_work_in_the_context_project_not_the_current_one(
    processing, backend, geotiff, tmp_path_factory
) -> None:
    """An algorithm run for a project other than the current one (a model, a script, a second project)
    finds its layers, reprojects with that project's datum transformations and loads its output there."""
    from processing.gui.Postprocessing import handleAlgorithmResults
    from qgis.core import (
        QgsCategorizedSymbolRenderer,
        QgsProcessingContext,
        QgsProcessingFeedback,
        QgsProcessingOutputLayerDefinition,
        QgsProject,
        QgsRasterLayer,
    )

    # the later image: the same grid georeferenced in the next UTM zone. The current project carries
    # it 600 km east (no overlap); the other project's transformation between the zones is a no-op
    # (as a project with a grid shift file of its own would), so there the two coincide.
    later_path = tmp_path_factory.mktemp("context") / "later_34.tif"
    write_geotiff(str(later_path), seed=3, epsg=EPSG + 1)
    other = QgsProject()
    first = QgsRasterLayer(str(geotiff[0]), "before", "gdal")
    later = QgsRasterLayer(str(later_path), "later", "gdal")
    assert first.isValid() and later.isValid() and later.crs() != first.crs()
    other.addMapLayers([first, later])  # only there: the current project cannot find them by id
    transforms = other.transformContext()
    assert transforms.addCoordinateOperation(later.crs(), first.crs(), "+proj=noop")
    other.setTransformContext(transforms)
    assert QgsProject.instance().mapLayer(first.id()) is None
    context = QgsProcessingContext()
    context.setProject(other)
    feedback = QgsProcessingFeedback()

    change = QgsApplication.processingRegistry().createAlgorithmById("earthdial:change")
    parameters = {
        "INPUT": first.id(),
        "INPUT_2": later.id(),
        "TASK": "change",
        "ENDPOINT": backend.endpoint,
        "OUTPUT": "TEMPORARY_OUTPUT",
    }
    try:
        assert change.prepareAlgorithm(parameters, context, feedback)  # the layers overlap in `other`
        assert _bounds(change.rect) == pytest.approx(_bounds(LAYER_EXTENT), abs=1e-3)
        # the later layer's window (its by-value fallback) is read through `other`'s transformation:
        # the same pixels, where the current project's would be 600 km off the layer (no window at all)
        plan = change.readers[1].plan(change.rect, first.crs())
        assert plan.fallback is not None and plan.fallback.grid is not None
        assert _bounds(plan.fallback.grid.rectangle) == pytest.approx(_bounds(LAYER_EXTENT), abs=1e-3)
    finally:
        change.postProcessAlgorithm(context, feedback)

    # a whole run: its output is loaded into the context's project, named and styled, and not into the
    # current one
    before = set(QgsProject.instance().mapLayers())
    output = QgsProcessingOutputLayerDefinition("TEMPORARY_OUTPUT", other)
    result = processing.run(
        "earthdial:detect",
        ship_detect(first.id(), backend.endpoint, output),
        onFinish=handleAlgorithmResults,
        context=context,
        feedback=feedback,
    )
    loaded = [lyr for lyr in other.mapLayers().values() if lyr.id() not in (first.id(), later.id())]
    assert [lyr.name() for lyr in loaded] == ["ship — before"], result
    assert isinstance(loaded[0].renderer(), QgsCategorizedSymbolRenderer)
    assert set(QgsProject.instance().mapLayers()) == before
