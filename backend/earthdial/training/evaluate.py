"""Scoring a checkpoint on held-out synthetic scenes through the server's own request path."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from earthdial.contract.wire import source_by_reference
from earthdial.demo import synthetic
from earthdial.demo.synthetic import CLASSES, Scene, SceneObject
from earthdial.geo.georef import box_pixel_corners
from earthdial.model import prompts
from earthdial.model.answers import Box, parse_boxes
from earthdial.model.engine import Query
from earthdial.serving import scan, service
from earthdial.training.data import _render_size
from earthdial.training.model import EVAL_SEED, IMAGE_SIZE, SYNONYMS

# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def box_iou(a: Any, b: Any) -> float:
    """IoU of two boxes (answers.Box-like: x1, y1, x2, y2, angle on 0-100) as rotated polygons."""
    from shapely.geometry import Polygon

    pa, pb = Polygon(box_pixel_corners(a, 100.0, 100.0)), Polygon(box_pixel_corners(b, 100.0, 100.0))
    if pa.area <= 0 or pb.area <= 0:
        return 0.0
    inter = pa.intersection(pb).area
    return float(inter / (pa.area + pb.area - inter))


def truth_box(obj: SceneObject) -> Any:
    x1, y1, x2, y2, angle = obj.box100()
    return Box(x1, y1, x2, y2, angle, obj.cls)


def refer_target(scene: Scene, i: int) -> SceneObject:
    """The object asked for in held-out scene i: classes take turns, so every class is tested."""
    for k in range(len(CLASSES)):
        found = scene.of_class(CLASSES[(i + k) % len(CLASSES)])
        if found:
            return found[0]
    return scene.objects[0]


def score_refer(answer: str, obj: SceneObject) -> tuple[bool, float]:
    boxes = parse_boxes(answer)
    if not boxes:
        return False, 0.0
    return True, box_iou(boxes[0], truth_box(obj))


def score_change(answer: str, pair: synthetic.Pair) -> tuple[bool, bool]:
    """(parsed, right): an answer parses when it starts with Yes or No (and a Yes names boxes)."""
    text = answer.strip().lower()
    said_yes, said_no = text.startswith("yes"), text.startswith("no")
    parsed = (said_yes and bool(parse_boxes(answer))) or said_no
    return parsed, (said_yes if pair.changed else said_no) and (said_yes or said_no)


@torch.inference_mode()
def quick_check(engine: Any, n: int, seed: int = EVAL_SEED) -> dict[str, float]:
    """Held-out referring and change on n in-memory scenes (no GeoTIFFs): for progress logs."""
    was_training = engine.model.training
    engine.model.eval()
    queries, objs = [], []
    for i in range(n):
        scene = synthetic.make_scene(seed, i)
        obj = refer_target(scene, i)
        im = engine.image(synthetic.render(scene, IMAGE_SIZE), "[hr_rgb_0.5]")
        queries.append(Query(prompts.build_question("refer", obj.cls, "[hr_rgb_0.5]"), [im], 40))
        objs.append(obj)
    answers_ = engine.generate(queries)
    ious = [score_refer(a, o)[1] for a, o in zip(answers_, objs, strict=True)]
    queries, pairs = [], []
    for i in range(n):
        pair = synthetic.make_pair(seed, i)
        ims = [
            engine.image(synthetic.render(s, IMAGE_SIZE), "[hr_rgb_temp_0.5]")
            for s in (pair.before, pair.after)
        ]
        queries.append(Query(prompts.build_question("change", "", "[hr_rgb_temp_0.5]"), ims, 40))
        pairs.append(pair)
    answers_ = engine.generate(queries)
    right = [score_change(a, p)[1] for a, p in zip(answers_, pairs, strict=True)]
    engine.model.train(was_training)
    return {
        "refer_iou50": round(float(np.mean([v >= 0.5 for v in ious])), 3),
        "mean_iou": round(float(np.mean(ious)), 3),
        "change_acc": round(float(np.mean(right)), 3),
    }


@dataclass
class EvalResult:
    scenes: int
    parse_rate: float
    refer_iou50: float
    mean_iou: float
    change_accuracy: float
    classify_accuracy: float
    grounding_recall: float
    by_class: dict[str, float]
    seconds: float
    absent_none: float = float("nan")  # share of questions about an absent class answered with no box
    scene_precision: float = float("nan")  # every class asked of every scene: boxes on a true object
    scene_recall: float = float("nan")  # ... and true objects found (IoU >= 0.5, same class)
    absent_questions: int = 0
    scan_precision: float = float("nan")  # a whole-scene scan (mosaic of scenes, overlapping tiles), merged
    scan_recall: float = float("nan")
    scan_tiles: int = 0

    def lines(self) -> list[str]:
        out = [
            f"held-out scenes      {self.scenes} referring + {self.scenes} change pairs (+ {self.scenes} classify/grounding)",
            f"parse rate           {self.parse_rate:.1%}   (all {4 * self.scenes} answers)",
            f"referring IoU>=0.5   {self.refer_iou50:.1%}   (mean IoU {self.mean_iou:.3f})",
            "  by class           " + ", ".join(f"{c} {v:.0%}" for c, v in self.by_class.items()),
            f"change yes/no        {self.change_accuracy:.1%}",
            f"classify main object {self.classify_accuracy:.1%}",
            f"grounding recall     {self.grounding_recall:.1%} (objects found at IoU>=0.5)",
            f"absent class: none   {self.absent_none:.1%}   ({self.absent_questions} questions about a class not in the scene)",
            f"scene precision      {self.scene_precision:.1%}   (every class asked of every scene: boxes on a true object)",
            f"scene recall         {self.scene_recall:.1%}   (true objects found at IoU>=0.5)",
            f"scan precision       {self.scan_precision:.1%}   (a {self.scan_tiles}-tile scan per class over a mosaic of scenes, merged boxes)",
            f"scan recall          {self.scan_recall:.1%}",
            f"time                 {self.seconds:.1f} s",
        ]
        return out


def evaluate(
    engine: Any,
    scenes: int = 200,
    seed: int = EVAL_SEED,
    workdir: str | Path | None = None,
    batch: int = 50,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Held-out evaluation through the server's own path: each scene is written as a GeoTIFF and asked
    about with `service` requests by reference (reading, band preset, sensor tag, pixels, prompt, model,
    answer parsing). Scenes are rendered at 112, 168 or 224 px like the training mix."""
    started = time.perf_counter()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="earthdial-eval-")
        workdir = tmp.name
    root = Path(workdir)
    rng = np.random.default_rng([seed, 0xE7A1])
    jobs: list[tuple[str, Any, Any]] = []  # (kind, truth, service job)
    for i in range(scenes):
        size = _render_size(rng)
        scene = synthetic.make_scene(seed, i)
        path = synthetic.write_geotiff(root / f"scene_{i:04d}.tif", synthetic.render(scene, size))
        src = source_by_reference(str(path))
        obj = refer_target(scene, i)
        asked = SYNONYMS[obj.cls][i % 2]  # singular and plural forms
        jobs.append(("refer", obj, {"op": "ask", "task": "refer", "prompt": asked, "source": src}))
        classes = ", ".join(CLASSES)
        jobs.append(("classify", scene, {"op": "ask", "task": "classify", "prompt": classes, "source": src}))
        jobs.append(("grounding", scene, {"op": "ask", "task": "grounding", "source": src}))
        for k, cls in enumerate(CLASSES):  # every class, present or not: absent-class answers and scene P/R
            asked_cls = SYNONYMS[cls][(i + k) % 2]
            jobs.append(
                ("scene", (scene, cls), {"op": "ask", "task": "refer", "prompt": asked_cls, "source": src})
            )
        pair = synthetic.make_pair(seed, i)
        pb = synthetic.write_geotiff(root / f"pair_{i:04d}_a.tif", synthetic.render(pair.before, size))
        pa = synthetic.write_geotiff(root / f"pair_{i:04d}_b.tif", synthetic.render(pair.after, size))
        sources = [source_by_reference(str(pb)), source_by_reference(str(pa))]
        jobs.append(("change", pair, {"op": "ask", "task": "change", "sources": sources}))
    replies: list[dict[str, Any]] = []
    for k in range(0, len(jobs), batch):
        part = [service.prepare(h, [], engine) for _, _, h in jobs[k : k + batch]]
        service.generate(part, engine)
        replies += [service.finish(j, engine) for j in part]
        if log:
            log(f"  {len(replies)}/{len(jobs)} requests answered")
    by_class: dict[str, list[bool]] = {c: [] for c in CLASSES}
    parsed, ious, right, cls_right, found, total_objs = [], [], [], [], 0, 0
    absent: list[bool] = []
    boxes_said = boxes_right = objs_true = objs_found = 0
    for (kind, truth, _), reply in zip(jobs, replies, strict=True):
        answer = reply["answer"]
        if kind == "refer":
            ok, iou = score_refer(answer, truth)
            parsed.append(ok)
            ious.append(iou)
            by_class[truth.cls].append(iou >= 0.5)
        elif kind == "change":
            ok, good = score_change(answer, truth)
            parsed.append(ok)
            right.append(good)
        elif kind == "scene":
            scene_, cls = truth
            boxes = parse_boxes(answer)
            true = scene_.of_class(cls)
            if not true:
                absent.append(not boxes)
            hits = [b for b in boxes if any(box_iou(b, truth_box(o)) >= 0.5 for o in true)]
            boxes_said += len(boxes)
            boxes_right += len(hits)
            objs_true += len(true)
            objs_found += sum(any(box_iou(b, truth_box(o)) >= 0.5 for b in boxes) for o in true)
        elif kind == "classify":
            said = answer.strip().lower().rstrip(".")
            parsed.append(said in CLASSES)
            cls_right.append(said == truth.main_object().cls)
        else:
            boxes = parse_boxes(answer)
            parsed.append(bool(boxes))
            for obj in truth.objects:
                total_objs += 1
                found += any(b.label == obj.cls and box_iou(b, truth_box(obj)) >= 0.5 for b in boxes)
    scan_p, scan_r, scan_tiles = scan_check(engine, seed, root)
    if tmp is not None:
        tmp.cleanup()
    return EvalResult(
        scenes=scenes,
        parse_rate=float(np.mean(parsed)),
        refer_iou50=float(np.mean([v >= 0.5 for v in ious])),
        mean_iou=float(np.mean(ious)),
        change_accuracy=float(np.mean(right)),
        classify_accuracy=float(np.mean(cls_right)),
        grounding_recall=found / max(total_objs, 1),
        by_class={c: float(np.mean(v)) if v else float("nan") for c, v in by_class.items()},
        seconds=time.perf_counter() - started,
        absent_none=float(np.mean(absent)) if absent else float("nan"),
        scene_precision=boxes_right / boxes_said if boxes_said else float("nan"),
        scene_recall=objs_found / max(objs_true, 1),
        absent_questions=len(absent),
        scan_precision=scan_p,
        scan_recall=scan_r,
        scan_tiles=scan_tiles,
    )


def scan_check(engine: Any, seed: int, root: Path, n: int = 4, side: int = 224) -> tuple[float, float, int]:
    """Scene-level precision and recall of whole-scene scans: n x n held-out scenes (0.5 m pixels) side by
    side, each class scanned with 224 px tiles at 10 % overlap (so tiles straddle the scenes' borders),
    merged boxes matched to the true objects of that class at IoU >= 0.5."""
    import rasterio
    from rasterio.transform import from_origin
    from shapely.geometry import Polygon

    layout = [[synthetic.make_scene(seed, 50_000 + r * n + c) for c in range(n)] for r in range(n)]
    image = np.concatenate(
        [np.concatenate([synthetic.render(sc, side) for sc in row], axis=2) for row in layout], axis=1
    )
    path = root / "scan_mosaic.tif"
    transform = from_origin(*synthetic.ORIGIN, synthetic.SCENE_METRES / side, synthetic.SCENE_METRES / side)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=image.shape[2],
        height=image.shape[1],
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=transform,
    ) as dst:
        dst.write(image)
    inverse = ~transform
    said = right = true_n = found_n = tiles = 0
    for cls in CLASSES:
        truth = []
        for r, row in enumerate(layout):
            for c, sc in enumerate(row):
                for o in sc.of_class(cls):
                    x1, y1, x2, y2, angle = o.box100()
                    corners = box_pixel_corners(Box(x1, y1, x2, y2, angle, cls), side, side)
                    truth.append(Polygon([(c * side + x, r * side + y) for x, y in corners]))
        found: list[dict[str, Any]] = []

        def keep(event: str, found: list[dict[str, Any]] = found, **fields: Any) -> None:
            if event == "merged":  # the scan's own merge, as `earthdial detect` writes it
                found.extend(fields["features"])

        header = {
            "op": "detect",
            "task": "refer",
            "prompt": SYNONYMS[cls][1],
            "source": source_by_reference(str(path)),
            "options": {"tile_size": side, "overlap": 0.1, "batch": 16},
        }
        tiles = scan.run(header, engine, keep)["tiles"]
        boxes = [Polygon([inverse * tuple(xy) for xy in f["geometry"]["coordinates"][0]]) for f in found]

        def iou(a: Any, b: Any) -> float:
            inter = a.intersection(b).area
            return inter / max(a.area + b.area - inter, 1e-9)

        said += len(boxes)
        right += sum(any(iou(b, t) >= 0.5 for t in truth) for b in boxes)
        true_n += len(truth)
        found_n += sum(any(iou(b, t) >= 0.5 for b in boxes) for t in truth)
    return (right / said if said else float("nan")), found_n / max(true_n, 1), tiles
