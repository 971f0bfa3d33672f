"""Review and fine-tuning in real QGIS: the demo model's result layer is reviewed with QGIS's own editing
(the review field follows), exported with earthdial:export_training, an adapter is fine-tuned on it, and
the local backend started from the plugin settings with that adapter answers through the panel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from plugin_testing import EARTHDIAL, ROOT, wait_until
from qgis.core import QgsFeature, QgsGeometry, QgsProject, QgsVectorLayer

from conftest import backend_env, finetune_and_serve, local_demo_plugin
from earthdial_qgis.core.area import WHOLE_LAYER
from earthdial_qgis.core.backend_process import serve_arguments
from earthdial_qgis.gui.review import ACCEPTED, ADDED, CORRECTED

DEMO = ROOT / "backend" / "earthdial" / "models" / "demo" / "model.safetensors"


def test_the_adapter_is_a_serve_argument() -> None:
    assert serve_arguments("", "tcp://127.0.0.1:1", "cpu", "", adapter="/a/lora") == [
        "serve",
        "--endpoint",
        "tcp://127.0.0.1:1",
        "--device",
        "cpu",
        "--adapter",
        "/a/lora",
    ]


def ask_ships(dock: Any, raster: Any) -> QgsVectorLayer:
    before = set(QgsProject.instance().mapLayers())
    dock.select_task("refer")
    dock.set_area_mode(WHOLE_LAYER)
    dock.prompt_edit.setPlainText("ship")
    dock.send_button.click()
    wait_until(lambda: not dock.is_busy(), 180)
    assert dock.last_error is None, dock.answer_view.toPlainText()
    (layer,) = [
        lyr
        for lid, lyr in QgsProject.instance().mapLayers().items()
        if lid not in before and isinstance(lyr, QgsVectorLayer)
    ]
    return layer


@pytest.mark.skipif(not DEMO.exists(), reason="no demo checkpoint is installed")
def test_review_export_finetune_and_serve_the_adapter(qgis_iface, qgis_new_project, tmp_path: Path) -> None:
    if not EARTHDIAL.exists():
        pytest.skip(f"the backend is not installed ({EARTHDIAL} is missing)")
    plugins = "/usr/share/qgis/python/plugins"
    if plugins not in sys.path:
        sys.path.append(plugins)
    from processing.core.Processing import Processing
    from qgis.core import QgsRasterLayer

    Processing.initialize()
    import processing

    scene = tmp_path / "harbour.tif"
    subprocess.run(
        [str(EARTHDIAL), "make-sample", str(scene)],
        check=True,
        capture_output=True,
        timeout=120,
        env=backend_env(),
    )
    raster = QgsRasterLayer(str(scene), "harbour", "gdal")
    QgsProject.instance().addMapLayer(raster)
    qgis_iface.setActiveLayer(raster)

    with local_demo_plugin(qgis_iface, tmp_path, str(tmp_path / "results.gpkg"), 120) as plugin:
        dock = plugin.dock
        assert "adapter" not in dock.status_label.text()
        layer = ask_ships(dock, raster)
        assert layer.providerType() == "ogr"  # in the results GeoPackage
        (model_box,) = list(layer.getFeatures())
        request = json.loads(model_box["request"])
        assert request["task"] == "refer" and request["prompt"] == "ship"
        assert request["sources"][0]["path"] == str(scene) and request["window"]["width"] > 0
        assert not model_box["review"]

        # the analyst: accepts the box with the action, then moves it, then draws a missed one
        layer.selectByIds([model_box.id()])
        qgis_iface.setActiveLayer(layer)
        accept = next(a for a in plugin.review.actions if a.objectName() == f"EarthDialReview_{ACCEPTED}")
        accept.trigger()
        assert QgsVectorLayer(layer.source(), "again", "ogr").getFeature(model_box.id())["review"] == ACCEPTED
        assert layer.startEditing()
        moved = QgsGeometry(model_box.geometry())
        moved.translate(2.0, -1.0)
        assert layer.changeGeometry(model_box.id(), moved)
        drawn = QgsFeature(layer.fields())
        box = layer.extent()
        drawn.setGeometry(QgsGeometry.fromRect(box.buffered(-box.width() * 0.45)))
        assert layer.addFeature(drawn)
        assert layer.commitChanges(), layer.commitErrors()
        saved = {f["review"]: f for f in QgsVectorLayer(layer.source(), "again", "ogr").getFeatures()}
        assert set(saved) == {CORRECTED, ADDED}
        assert saved[ADDED]["request"] == model_box["request"] and saved[ADDED]["label"] == "ship"

        # Processing exports it through the backend; the records are the layer's two boxes
        records = tmp_path / "records"
        processing.run("earthdial:export_training", {"INPUT": layer, "OUTPUT": str(records)})
        (row,) = [json.loads(line) for line in (records / "records.jsonl").read_text().splitlines()]
        assert row["conversations"][0]["value"].endswith("Give me the location of <ref>ship</ref>")
        assert row["conversations"][1]["value"].count("[[") == 2 and (records / row["image"]).is_file()

        # a short fine-tune, then the plugin's local backend serves the demo model with the adapter
        done = finetune_and_serve(dock, records, tmp_path / "lora-ships")
        assert "s a step" in done.stdout  # the time estimate before the run goes on
        assert any("LoRA adapter" in line for line in dock.local_backend.output)
        again = ask_ships(dock, raster)
        assert again.featureCount() >= 1 and next(again.getFeatures())["label"]
