"""One analyst session in real QGIS, end to end, as one person would run it: a tiled scan of a mosaic from
the panel (the plugin's own local backend, demo model) -> review (accept, reject, move, draw) -> project
saved, closed, reopened -> export-training on the project's GeoPackage -> a short fine-tune -> the local
backend serves the adapter -> ask again. Each step asserts what the analyst would check."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from plugin_testing import EARTHDIAL, ROOT, wait_until
from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsFeature,
    QgsGeometry,
    QgsProject,
    QgsRasterLayer,
    QgsRenderContext,
    QgsVectorLayer,
)

from conftest import backend_env, finetune_and_serve, local_demo_plugin
from earthdial_qgis.core.area import WHOLE_LAYER
from earthdial_qgis.gui.review import ACCEPTED, ADDED, CORRECTED, REJECTED

DEMO = ROOT / "backend" / "earthdial" / "models" / "demo" / "model.safetensors"
MOSAIC = """
import sys, numpy as np
from earthdial.demo import synthetic
n, size = 3, 112
rows = [np.concatenate([synthetic.render(synthetic.make_scene(7, r * n + c), size) for c in range(n)], axis=2)
        for r in range(n)]
synthetic.write_geotiff(sys.argv[1], np.concatenate(rows, axis=1))
"""


def _new_vector_layers(before: set[str]) -> list[QgsVectorLayer]:
    return [
        lyr
        for lid, lyr in QgsProject.instance().mapLayers().items()
        if lid not in before and isinstance(lyr, QgsVectorLayer)
    ]


def _visible(layer: QgsVectorLayer, feature: QgsFeature) -> bool:
    """Whether the layer's style draws the feature (a category, or the catch-all one, holds it)."""
    renderer = layer.renderer().clone()
    context = QgsRenderContext()
    renderer.startRender(context, layer.fields())
    try:
        return bool(renderer.symbolsForFeature(feature, context))
    finally:
        renderer.stopRender(context)


def _window(request: str) -> QgsGeometry:
    w = json.loads(request)["window"]
    a, b, c, d, e, f = w["transform"][:6]
    corners = [(c, f), (c + a * w["width"], f + d * w["width"]),
               (c + a * w["width"] + b * w["height"], f + d * w["width"] + e * w["height"]),
               (c + b * w["height"], f + e * w["height"])]  # fmt: skip
    return QgsGeometry.fromWkt("POLYGON((" + ", ".join(f"{x} {y}" for x, y in [*corners, corners[0]]) + "))")


def _members(layer: QgsVectorLayer, window: QgsGeometry) -> list[QgsFeature]:
    """The boxes export-training puts in a window's record: at least half of each inside it."""
    return [
        f
        for f in layer.getFeatures()
        if f.geometry().intersection(window).area() >= 0.5 * f.geometry().area()
    ]


@pytest.mark.skipif(not DEMO.exists(), reason="no demo checkpoint is installed")
def test_scan_review_reopen_export_finetune_and_ask_again(
    qgis_iface, qgis_new_project, tmp_path: Path
) -> None:
    if not EARTHDIAL.exists():
        pytest.skip(f"the backend is not installed ({EARTHDIAL} is missing)")
    scene = tmp_path / "harbour-mosaic.tif"
    subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-c", MOSAIC, str(scene)],
        check=True,
        timeout=120,
        env=backend_env(),
    )
    project_file = tmp_path / "session.qgz"
    project = QgsProject.instance()
    raster = QgsRasterLayer(str(scene), "harbour", "gdal")
    assert raster.isValid()
    project.addMapLayer(raster)
    assert project.write(str(project_file))  # results go beside it: session_earthdial.gpkg
    results = tmp_path / "session_earthdial.gpkg"

    with local_demo_plugin(qgis_iface, tmp_path, "", 180) as plugin:  # "": results beside the project
        dock = plugin.dock

        # 1. a tiled scan of the whole layer
        before = set(project.mapLayers())
        dock.layer_combo.setLayer(raster)
        dock.select_task("refer")
        dock.prompt_edit.setPlainText("ship")
        dock.set_area_mode(WHOLE_LAYER)
        dock.scan.check.setChecked(True)
        dock.scan.tile_spin.setValue(112)
        dock.send_button.click()
        wait_until(lambda: not dock.is_busy(), 300)
        assert dock.last_error is None, dock.answer_view.toPlainText()
        (layer,) = _new_vector_layers(before)
        assert layer.providerType() == "ogr" and Path(layer.source().split("|")[0]) == results
        assert isinstance(layer.renderer(), QgsCategorizedSymbolRenderer)
        assert layer.featureCount() >= 3 and all(_visible(layer, f) for f in layer.getFeatures())
        assert len({f["request"] for f in layer.getFeatures()}) >= 2  # boxes from several tiles, each its own

        # 2. review the busiest tile's window: accept its boxes, reject one, move one, draw a missed one
        requests = {f["request"] for f in layer.getFeatures()}
        busiest = max(requests, key=lambda r: len(_members(layer, _window(r))))
        window = _window(busiest)
        members = _members(layer, window)
        assert len(members) >= 2
        qgis_iface.setActiveLayer(layer)
        actions = {a.objectName(): a for a in plugin.review.actions}
        layer.selectByIds([f.id() for f in members])
        actions[f"EarthDialReview_{ACCEPTED}"].trigger()
        layer.selectByIds([members[0].id()])
        actions[f"EarthDialReview_{REJECTED}"].trigger()
        assert layer.startEditing()
        moved = QgsGeometry(members[1].geometry())
        moved.translate(0.2, -0.1)
        assert layer.changeGeometry(members[1].id(), moved)
        drawn = QgsFeature(layer.fields())
        centre = window.centroid().asPoint()
        drawn.setGeometry(
            QgsGeometry.fromWkt(
                f"POLYGON(({centre.x()} {centre.y()}, {centre.x() + 2} {centre.y()}, "
                f"{centre.x() + 2} {centre.y() + 1}, {centre.x()} {centre.y() + 1}, "
                f"{centre.x()} {centre.y()}))"
            )
        )
        assert layer.addFeature(drawn)
        assert layer.commitChanges(), layer.commitErrors()
        reviews = sorted(str(f["review"] or "") for f in _members(layer, window))
        assert reviews.count(REJECTED) == 1 and reviews.count(CORRECTED) == 1 and reviews.count(ADDED) == 1
        added = next(f for f in layer.getFeatures() if f["review"] == ADDED)
        assert added["label"] and added["request"] and _visible(layer, added)  # the drawn box shows

        # 3. the project is saved, closed and opened again: the reviewed layer comes back as it was
        name = layer.name()
        assert project.write(str(project_file))
        project.clear()
        assert project.read(str(project_file))
        (layer,) = project.mapLayersByName(name)
        assert layer.isValid() and layer.providerType() == "ogr"
        assert sorted(str(f["review"] or "") for f in _members(layer, window)) == reviews
        assert _visible(layer, next(f for f in layer.getFeatures() if f["review"] == ADDED))

        # 4. export-training on the project's GeoPackage: the reviewed window gives its record
        records = tmp_path / "train"
        done = subprocess.run(
            [str(EARTHDIAL), "export-training", str(results), "-o", str(records)],
            capture_output=True,
            text=True,
            timeout=300,
            env=backend_env(),
        )
        assert done.returncode == 0, done.stderr
        rows = [json.loads(line) for line in (records / "records.jsonl").read_text().splitlines()]
        kept = len(members) - 1 + 1  # accepted (one moved) less the rejected one, plus the drawn one
        boxes = [
            r["conversations"][1]["value"].count("[[") for r in rows
        ]  # the GeoPackage holds the one layer
        assert kept in boxes, (boxes, done.stdout)
        assert all((records / r["image"]).is_file() for r in rows)

        # 5. a short fine-tune; the plugin's local backend serves the demo model with the adapter
        finetune_and_serve(dock, records, tmp_path / "lora-ships")

        # 6. ask again, one window: the adapter's answer comes back as boxes on the map
        (raster,) = project.mapLayersByName("harbour")
        before = set(project.mapLayers())
        dock.layer_combo.setLayer(raster)
        dock.window_radio.setChecked(True)
        dock.select_task("refer")
        dock.prompt_edit.setPlainText("ship")
        dock.set_area_mode(WHOLE_LAYER)
        dock.send_button.click()
        wait_until(lambda: not dock.is_busy(), 180)
        assert dock.last_error is None, dock.answer_view.toPlainText()
        (again,) = _new_vector_layers(before)
        assert again.featureCount() >= 1 and next(again.getFeatures())["label"]
