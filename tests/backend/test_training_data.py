"""Reviewed result layers -> training records (export-training), LoRA fine-tuning, --adapter."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from conftest import run_earthdial, write_geotiff
from earthdial.contract.wire import EarthDialError
from earthdial.demo import synthetic
from earthdial.geo.georef import box_to_polygon
from earthdial.model.answers import Box
from earthdial.outputs.files import write_features
from earthdial.training import export as training_data

# a 100 x 100 raster of 1 m pixels; the window asked about is 50 x 50 pixels at cols 20-70, rows 10-60
ORIGIN = (500_000.0, 4_000_100.0)
BOUNDS = (500_020.0, 4_000_040.0, 500_070.0, 4_000_090.0)
WINDOW = (1.0, 0.0, 500_020.0, 0.0, -1.0, 4_000_090.0)


@pytest.fixture
def raster(tmp_path: Path) -> tuple[Path, np.ndarray]:
    data = np.random.default_rng(3).integers(0, 256, (3, 100, 100), dtype=np.uint8)
    path = tmp_path / "scene.tif"
    return write_geotiff(path, data, transform=from_origin(*ORIGIN, 1.0, 1.0)), data


def request(path: Path, task: str, prompt: str = "") -> str:
    return json.dumps(
        {
            "task": task,
            "prompt": prompt,
            "sensor": "[hr_rgb_0.5]",
            "preset": None,
            "options": {},
            "sources": [{"path": str(path), "bands": None, "bounds": list(BOUNDS), "crs": "EPSG:32633"}],
            "window": {
                "bands": [1, 2, 3],
                "width": 50,
                "height": 50,
                "transform": list(WINDOW),
                "crs": "EPSG:32633",
            },
        }
    )


def feature(box: tuple[float, ...], label: str, review: str, req: str) -> dict:
    ring = box_to_polygon(Box(*box, label), WINDOW, 50, 50)
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in ring]]},
        "properties": {"label": label, "review": review, "request": req},
    }


def layer(features: list[dict]) -> dict:
    return {"type": "FeatureCollection", "crs": "EPSG:32633", "features": features}


def write_layer(gpkg: Path, name: str, *features: dict) -> None:
    write_features(str(gpkg), layer(list(features)), layer=name)


def test_polygon_to_box_inverts_georef_and_folds_the_angle() -> None:
    for box in ((10, 20, 50, 40, 0), (20, 30, 60, 50, 30), (5, 60, 45, 70, 75)):
        ring = box_to_polygon(Box(*box, ""), WINDOW, 50, 50)
        got = training_data.polygon_to_box(ring, WINDOW, 50, 50)
        assert (got.x1, got.y1, got.x2, got.y2, got.angle) == box
    # 120 degrees is the same rectangle as 30 degrees with its sides swapped
    got = training_data.polygon_to_box(
        box_to_polygon(Box(40, 40, 60, 50, 120, ""), WINDOW, 50, 50), WINDOW, 50, 50
    )
    assert (got.x1, got.y1, got.x2, got.y2, got.angle) == (45, 35, 55, 55, 30)


def test_a_corrected_layer_exports_the_expected_records(
    tmp_path: Path, raster: tuple[Path, np.ndarray]
) -> None:
    path, data = raster
    gpkg = tmp_path / "results.gpkg"
    refer = request(path, "refer", "ships")
    write_layer(
        gpkg,
        "refer ships",
        feature((10, 20, 50, 40, 0), "ship", "accepted", refer),
        feature((60, 60, 90, 80, 0), "ship", "corrected", refer),  # moved by the analyst onto the ship
        feature((0, 0, 10, 10, 0), "ship", "rejected", refer),
        feature((20, 30, 60, 50, 30), "", "added", ""),  # drawn in QGIS: no label, no request
    )
    ground = request(path, "grounding")
    write_layer(
        gpkg,
        "grounding",
        feature((70, 10, 90, 30, 0), "storage tank", "accepted", ground),
        feature((5, 50, 25, 90, 0), "building", "rejected", ground),
        feature((30, 5, 50, 15, 0), "airplane", "corrected", ground),
    )
    write_layer(gpkg, "not reviewed", feature((1, 1, 9, 9, 0), "ship", "", refer))

    result = training_data.export(str(gpkg), str(tmp_path / "out"))
    rows = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    sensor = "[hr_rgb_0.5]"
    assert [(r["layer"], r["conversations"]) for r in rows] == [
        (
            "refer ships",
            [
                {
                    "from": "human",
                    "value": f"[refer] {sensor} <image> \n Give me the location of <ref>ships</ref>",
                },
                {
                    "from": "gpt",
                    "value": "<ref>ships</ref><box>[[10, 20, 50, 40, 0]][[20, 30, 60, 50, 30]]"
                    "[[60, 60, 90, 80, 0]]</box>",
                },
            ],
        ),
        (
            "grounding",
            [
                {
                    "from": "human",
                    "value": f"[refer] {sensor} <image> \n Give me the location of <ref>storage tank</ref>",
                },
                {"from": "gpt", "value": "<ref>storage tank</ref><box>[[70, 10, 90, 30, 0]]</box>"},
            ],
        ),
        (
            "grounding",
            [
                {
                    "from": "human",
                    "value": f"[refer] {sensor} <image> \n Give me the location of <ref>building</ref>",
                },
                {"from": "gpt", "value": "There is no building."},
            ],
        ),
        (
            "grounding",
            [
                {
                    "from": "human",
                    "value": f"[refer] {sensor} <image> \n Give me the location of <ref>airplane</ref>",
                },
                {"from": "gpt", "value": "<ref>airplane</ref><box>[[30, 5, 50, 15, 0]]</box>"},
            ],
        ),
        (
            "grounding",
            [
                {
                    "from": "human",
                    "value": f"[grounding] {sensor} <image> \n Describe the image in detail. Detect objects "
                    "location. Describe objects size. Where objects are located?. Describe relation between objects.",
                },
                {
                    "from": "gpt",
                    "value": "<ref>airplane</ref><box>[[30, 5, 50, 15, 0]]</box> "
                    "<ref>storage tank</ref><box>[[70, 10, 90, 30, 0]]</box>",
                },
            ],
        ),
    ]
    assert [r["kind"] for r in rows] == ["refer", "refer", "negative", "refer", "grounding"]
    assert "layer 'not reviewed': not reviewed" in result.skipped
    # the chip is the window as inference reads it, beside the records
    assert rows[0]["image"] != rows[1]["image"] and rows[1]["image"] == rows[4]["image"]  # a chip per request
    with rasterio.open(tmp_path / "out" / rows[0]["image"]) as chip:
        assert chip.shape == (50, 50) and chip.transform[:6] == pytest.approx(WINDOW)
        assert np.array_equal(chip.read(), data[:, 10:60, 20:70])
    # a second export never overwrites the first
    before = (tmp_path / "out" / "records.jsonl").read_bytes()
    with pytest.raises(EarthDialError, match="exists"):
        training_data.export(str(gpkg), str(tmp_path / "out"))
    assert (tmp_path / "out" / "records.jsonl").read_bytes() == before


def test_a_class_with_unreviewed_boxes_gives_no_record(
    tmp_path: Path, raster: tuple[Path, np.ndarray]
) -> None:
    path, _ = raster
    gpkg = tmp_path / "r.gpkg"
    ground = request(path, "grounding")
    write_layer(
        gpkg,
        "g",
        feature((70, 10, 90, 30, 0), "storage tank", "accepted", ground),
        feature((5, 50, 25, 90, 0), "building", "accepted", ground),
        feature((30, 50, 45, 60, 0), "building", "", ground),
    )
    result = training_data.export(str(gpkg), str(tmp_path / "out"))
    assert [r["label"] for r in result.records] == ["storage tank"]  # no building record, no grounding record
    assert any("'building' has boxes nobody reviewed" in s for s in result.skipped)


def test_export_training_cli(tmp_path: Path, raster: tuple[Path, np.ndarray]) -> None:
    path, _ = raster
    gpkg = tmp_path / "r.gpkg"
    write_layer(gpkg, "a", feature((10, 20, 50, 40, 0), "ship", "accepted", request(path, "refer", "ship")))
    done = run_earthdial(
        "export-training",
        str(gpkg),
        "--layer",
        "a",
        "-o",
        str(tmp_path / "out"),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "1 record(s): 1 refer" in done.stdout
    missing = run_earthdial(
        "export-training",
        str(tmp_path / "no.gpkg"),
        "-o",
        str(tmp_path / "o2"),
        timeout=120,
    )
    assert missing.returncode == 1 and "file_not_found" in missing.stderr and not (tmp_path / "o2").exists()
    # nothing reviewed: nothing to export, and no empty records file that would pass for an export
    write_layer(gpkg, "unreviewed", feature((10, 20, 50, 40, 0), "ship", "", request(path, "refer", "ship")))
    empty = run_earthdial(
        "export-training",
        str(gpkg),
        "--layer",
        "unreviewed",
        "-o",
        str(tmp_path / "o3"),
        timeout=120,
    )
    assert empty.returncode == 1 and "not reviewed" in empty.stdout and "no file written" in empty.stdout
    assert not (tmp_path / "o3" / "records.jsonl").exists()


def test_the_new_class_leaves_the_old_scenes_as_they_were() -> None:
    # digests of the scenes as drawn before the tree class existed (the demo model's eval stays valid)
    want = ["e16ed34df985507e", "55128108eb675ad4", "a56140392a3874ca"]
    got = [
        hashlib.sha256(synthetic.render(synthetic.make_scene(20261127, i)).tobytes()).hexdigest()[:16]
        for i in range(3)
    ]
    assert got == want
    scene = synthetic.make_scene_with(20261127, 0)
    assert (
        scene.objects[: len(synthetic.make_scene(20261127, 0, max_objects=3).objects)]
        == synthetic.make_scene(20261127, 0, max_objects=3).objects
    )
    assert scene.of_class(synthetic.NEW_CLASS)


def test_a_short_finetune_lowers_the_loss_and_the_adapter_reloads_with_the_same_answers(
    tmp_path: Path, raster: tuple[Path, np.ndarray], tiny_checkpoint: Path
) -> None:
    pytest.importorskip("peft")
    import torch

    from earthdial import training as train
    from earthdial.model import adapters, prompts
    from earthdial.model.checkpoint import CheckpointError, load
    from earthdial.model.engine import Engine, Query
    from earthdial.training import finetune

    path, _ = raster
    gpkg = tmp_path / "r.gpkg"
    write_layer(
        gpkg,
        "g",
        feature((10, 20, 50, 40, 0), "ship", "corrected", request(path, "grounding")),
        feature((60, 55, 85, 90, 0), "building", "added", request(path, "grounding")),
    )
    training_data.export(str(gpkg), str(tmp_path / "records"))
    cfg = finetune.FinetuneConfig(steps=8, batch_size=3, lr=1e-2, warmup_steps=1, augment=False, threads=1)
    run = finetune.finetune(
        tmp_path / "records",
        str(train.DEMO_DIR),
        tmp_path / "adapter",
        cfg,
        log=lambda _: None,
        progress=False,
    )
    assert run["steps"] == 8 and run["losses"][-1] < run["losses"][0]
    meta = json.loads((tmp_path / "adapter" / "earthdial_adapter.json").read_text())
    assert meta["base"]["name"] == "demo" and meta["records"] == 3 and meta["training"]["steps"] == 8

    def answers(engine: Engine) -> list[str]:
        with rasterio.open(next((tmp_path / "records" / "chips").iterdir())) as src:
            image = engine.image(src.read(), "[hr_rgb_0.5]")
        asked = [prompts.build_question("refer", p, "[hr_rgb_0.5]") for p in ("ship", "building", "tree")]
        asked.append(prompts.build_question("grounding", "", "[hr_rgb_0.5]"))
        return engine.generate([Query(q, [image], 40) for q in asked])

    trained = answers(run["engine"])
    reloaded = Engine(str(train.DEMO_DIR), device="cpu", adapter=str(tmp_path / "adapter"))
    assert answers(reloaded) == trained
    assert reloaded.describe()["adapter"]["path"] == str((tmp_path / "adapter").resolve())
    base = Engine(str(train.DEMO_DIR), device="cpu")
    assert base.describe()["adapter"] is None
    name = "model.language_model.layers.0.self_attn.qkv_proj.weight"
    merged, original = reloaded.model.state_dict()[name], base.model.state_dict()[name]
    assert not torch.equal(merged, original)  # the adapter is in the weights
    # an adapter is refused on another base model, by name
    model, _, info = load(str(tiny_checkpoint), "cpu", torch.float32, "sdpa")
    with pytest.raises(CheckpointError, match="trained on demo"):
        adapters.apply(model, info, tmp_path / "adapter")
    # and a folder that is no adapter is refused with why
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        adapters.apply(model, info, tmp_path / "records")


def test_a_layer_whose_raster_is_gone_is_skipped_with_why(
    tmp_path: Path, raster: tuple[Path, np.ndarray]
) -> None:
    path, _ = raster
    gpkg = tmp_path / "r.gpkg"
    write_layer(
        gpkg,
        "gone",
        feature((10, 20, 50, 40, 0), "ship", "accepted", request(tmp_path / "moved.tif", "refer", "ship")),
    )
    write_layer(
        gpkg, "here", feature((10, 20, 50, 40, 0), "ship", "accepted", request(path, "refer", "ship"))
    )
    result = training_data.export(str(gpkg), str(tmp_path / "out"))
    assert [r["layer"] for r in result.records] == ["here"]
    assert any(s.startswith("layer 'gone': file_not_found") for s in result.skipped)
