"""Proof that corrections teach the demo model a class it never saw (docs/demo-model.md).

    nice -n 10 python benchmarks/proof_lora.py --work /tmp/lora-proof --minutes 8

1. 40 scenes with a tree (`synthetic.make_scene_with`, a class the demo model was never trained on) are
   written as GeoTIFFs and asked about through the server's path: `refer` "tree" and `grounding`; each
   reply is written as a result layer of one GeoPackage (`output.write_features`, as `ask -o` does).
2. A simulated analyst reviews each layer from the generator's truth, as one would in QGIS: a box that
   matches an object (IoU >= 0.5, same label) is `accepted`, a wrong box of a present class is moved onto
   it (`corrected`), other boxes are `rejected`, a missed object is drawn (`added`). The layers are read
   back from the GeoPackage and written again with those edits.
3. `training_data.export` turns the GeoPackage into records and chips; `finetune.finetune` trains a LoRA
   adapter on them within the time budget.
4. Held-out scenes (other seeds): referring IoU >= 0.5 on the new class, and on the old classes
   (`train.evaluate`, the demo model's own eval), with the base model and with the adapter loaded by
   `Engine(..., adapter=...)` as `serve --adapter` loads it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))

from earthdial import training as train  # noqa: E402
from earthdial.cli.training import add_tuning_args, tuning_config  # noqa: E402
from earthdial.contract.wire import source_by_reference  # noqa: E402
from earthdial.demo import synthetic
from earthdial.geo.georef import box_to_polygon  # noqa: E402
from earthdial.model.answers import Box, parse_boxes  # noqa: E402
from earthdial.model.engine import Engine  # noqa: E402
from earthdial.outputs.files import write_features  # noqa: E402
from earthdial.serving import service  # noqa: E402
from earthdial.training import export as training_data  # noqa: E402
from earthdial.training import finetune  # noqa: E402

NEW = synthetic.NEW_CLASS
ANALYST_SEED, HELD_OUT_SEED = 4401, 4402


def ask(engine: Engine, headers: list[dict]) -> list[dict]:
    jobs = [service.prepare(h, [], engine) for h in headers]
    service.generate(jobs, engine)
    return [service.finish(j, engine) for j in jobs]


def scenes_with_new_class(seed: int, n: int, root: Path) -> list[tuple[synthetic.Scene, str]]:
    rng = np.random.default_rng([seed, 0xE7A1])
    out, i = [], 0
    while len(out) < n:
        scene = synthetic.make_scene_with(seed, i)
        size = train._render_size(rng)
        i += 1
        if not scene.of_class(NEW):
            continue
        path = synthetic.write_geotiff(root / f"scene_{seed}_{i:04d}.tif", synthetic.render(scene, size))
        out.append((scene, str(path)))
    return out


def truth_box(obj: synthetic.SceneObject) -> Box:
    x1, y1, x2, y2, a = obj.box100()
    return Box(x1, y1, x2, y2, a, obj.cls)


def review(reply: dict, scene: synthetic.Scene, task: str, cls: str) -> dict:
    """The analyst: the reply's layer, read back, with each box accepted, corrected or rejected and the
    missed objects added (the features' request copied, as the plugin does for a drawn feature)."""
    chip = reply["chip"]
    window = (chip["transform"], chip["width"], chip["height"])
    features = reply["features"]["features"]
    truth = scene.of_class(cls) if task == "refer" else list(scene.objects)
    boxes = [Box(*f["properties"]["box"], f["properties"]["label"]) for f in features]
    used: set[int] = set()
    for feat, box in zip(features, boxes, strict=True):
        props = feat["properties"]
        same = [o for o in truth if (task == "refer" or o.cls == box.label) and id(o) not in used]
        best = max(same, key=lambda o: train.box_iou(box, truth_box(o)), default=None)
        if best is None:
            props["review"] = training_data.REJECTED
            continue
        used.add(id(best))
        if train.box_iou(box, truth_box(best)) >= 0.5:
            props["review"] = training_data.ACCEPTED
        else:
            ring = box_to_polygon(truth_box(best), *window)
            feat["geometry"] = {"type": "Polygon", "coordinates": [[list(p) for p in ring]]}
            props["review"] = training_data.CORRECTED
    request = features[0]["properties"]["request"] if features else reply["request"]  # "There is no tree."
    for obj in truth:
        if id(obj) in used:
            continue
        ring = box_to_polygon(truth_box(obj), *window)
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in ring]]},
                "properties": {
                    "label": obj.cls,
                    "review": training_data.ADDED,
                    "request": request,
                    "task": task,
                },
            }
        )
    return reply["features"]


def read_back(gpkg: Path, layer: str) -> dict:
    """A layer of the GeoPackage as a FeatureCollection (what the analyst opens in QGIS)."""
    import pyogrio.raw
    import shapely

    meta, _, geometry, values = pyogrio.raw.read(str(gpkg), layer=layer)
    fields = list(meta["fields"])
    feats = []
    for k, wkb in enumerate(geometry):
        props = {name: values[i][k] for i, name in enumerate(fields)}
        props["box"] = json.loads(json.dumps([0, 0, 0, 0, 0]))
        geom = shapely.geometry.mapping(shapely.from_wkb(wkb))
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": geom["coordinates"]},
                "properties": props,
            }
        )
    return {"type": "FeatureCollection", "crs": meta["crs"], "features": feats}


def refer_share(engine: Engine, scenes: list[tuple[synthetic.Scene, str]]) -> tuple[float, float]:
    """Referring IoU >= 0.5 (and mean IoU) for the new class, asked by reference through `service`."""
    headers = [
        {"op": "ask", "task": "refer", "prompt": NEW, "source": source_by_reference(p)} for _, p in scenes
    ]
    ious = []
    for k in range(0, len(headers), 50):
        for reply, (scene, _) in zip(ask(engine, headers[k : k + 50]), scenes[k : k + 50], strict=True):
            boxes = parse_boxes(reply["answer"])
            ious.append(train.box_iou(boxes[0], truth_box(scene.of_class(NEW)[0])) if boxes else 0.0)
    return float(np.mean([v >= 0.5 for v in ious])), float(np.mean(ious))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/earthdial-lora-proof")
    ap.add_argument("--analyst-scenes", type=int, default=40)
    ap.add_argument("--held-out", type=int, default=100)
    ap.add_argument("--old-scenes", type=int, default=200)
    add_tuning_args(ap, minutes=8.0)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run = work / time.strftime("run-%H%M%S")
    (run / "scenes").mkdir(parents=True)
    base = str(train.DEMO_DIR)
    engine = Engine(base, device="cpu")
    gpkg = run / "results.gpkg"

    # 1-2: the model's layers, reviewed by the analyst in the GeoPackage
    analyst = scenes_with_new_class(ANALYST_SEED, args.analyst_scenes, run / "scenes")
    # per scene the analyst asks for the trees, for each other class there (in their own words: singular,
    # plural, synonyms) and for a grounded description, and reviews every layer
    asks: list[tuple[int, str, str, dict]] = []  # (scene, task, class, header)
    for n, (scene, path) in enumerate(analyst):
        src = source_by_reference(path)
        asks.append(
            (
                n,
                "refer",
                NEW,
                {"op": "ask", "task": "refer", "prompt": ("tree", "trees")[n % 2], "source": src},
            )
        )
        for j, cls in enumerate(sorted({o.cls for o in scene.objects} - {NEW})):
            said = train.SYNONYMS[cls][(n + j) % len(train.SYNONYMS[cls])]
            asks.append((n, "refer", cls, {"op": "ask", "task": "refer", "prompt": said, "source": src}))
        asks.append((n, "grounding", "", {"op": "ask", "task": "grounding", "source": src}))
    replies = []
    for k in range(0, len(asks), 50):
        replies += ask(engine, [h for *_, h in asks[k : k + 50]])
    counts = {r: 0 for r in training_data.REVIEWS}
    for k, ((n, task, cls, _), reply) in enumerate(zip(asks, replies, strict=True)):
        scene = analyst[n][0]
        layer = f"{task}_{k:03d}"
        write_features(str(gpkg), reply["features"], layer=layer)
        opened = read_back(gpkg, layer)
        for feat, orig in zip(opened["features"], reply["features"]["features"], strict=True):
            feat["properties"]["box"] = orig["properties"]["box"]  # the model's box, to compare with truth
        reply = dict(reply, features=opened)
        edited = review(reply, scene, task, cls)
        for f in edited["features"]:
            counts[f["properties"]["review"]] += 1
        write_features(str(gpkg), edited, layer=layer, overwrite=True)  # the analyst saves the edits
    print("analyst review:", ", ".join(f"{v} {k}" for k, v in counts.items()))

    # 3: export and fine-tune
    exported = training_data.export(str(gpkg), str(run / "records"))
    for line in exported.lines():
        print(line)
    cfg = tuning_config(args, threads=2)
    summary = finetune.finetune(run / "records", base, run / "adapter", cfg, progress=False)

    # 4: held-out scenes, before and after
    held = scenes_with_new_class(HELD_OUT_SEED, args.held_out, run / "scenes")
    tuned = Engine(base, device="cpu", adapter=str(run / "adapter"))
    out = {"config": {k: v for k, v in vars(args).items() if k != "work"}, "records": len(exported.records), "reviews": counts, "steps": summary["steps"],
           "minutes": round(summary["seconds"] / 60, 2), "cpu_minutes": round(summary["cpu_seconds"] / 60, 2), "loss": [round(summary["loss_start"], 3),
           round(summary["loss_end"], 3)]}  # fmt: skip
    for name, eng in (("before", engine), ("after", tuned)):
        share, mean = refer_share(eng, held)
        old = train.evaluate(eng, scenes=args.old_scenes, seed=train.EVAL_SEED)
        out[name] = {"new_class_iou50": round(share, 3), "new_class_mean_iou": round(mean, 3),
                     "old_classes_iou50": round(old.refer_iou50, 3), "old_by_class": old.by_class,
                     "change": round(old.change_accuracy, 3), "grounding_recall": round(old.grounding_recall, 3)}  # fmt: skip
        print(name, json.dumps(out[name]))
    (run / "proof.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"work folder: {run} (os.cpu_count {os.cpu_count()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
