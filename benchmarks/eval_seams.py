"""How a whole-scene scan's merge treats objects cut by tile seams: boxes per true object, fragments and
duplicates, precision and recall, with the old merge (IoU suppression only) and the current one.

Two scenes with known objects, both at 0.25 m pixels (UTM 33N), scanned for `ships` with the demo model
in this process through the scan op (`scan.run`, default 448 px tiles, 10 % overlap) once; each merge is
then applied to the same per-tile boxes, so the figures differ by the merge alone:

* `seams N`: open sea over 4 x 5 tiles (1 657 x 2 060 px) with 10 ships, each across the seam of its own
  pair of neighbouring tiles (`synthetic.ships_across_seams(N)`: 100-150 px long, the centre within 20 px
  of the middle of the strip both tiles see, heading within 45 degrees of square to the seam), so no tile
  sees any ship whole; seeds 1-16 by default, and their totals;
* `mosaic`: 12 x 12 demo scenes of 448 px that hold a ship (5 376 px, 196 tiles, 144 ships); the tiles
  (stride 403 px) straddle the scenes' borders, so some ships are cut.

A box is matched to a true ship by rotated-polygon IoU >= 0.5 (shapely), one box per ship at most
(greedy, highest IoU first): precision = matched boxes / boxes, recall = matched ships / ships. The truth
is each ship's axis-aligned bounds (the demo model writes angle-0 boxes). A box lies *on* a ship when at
least half of its area is inside that ship's box; boxes on a ship beyond the matched one are fragments
or duplicates (or a single box too far off its ship to match); a box on no ship is on background.

    python benchmarks/eval_seams.py [--work DIR] [--model DIR] [--seeds 1-16] [--no-mosaic] [--dump DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PIXEL_M = 0.25
TILE, OVERLAP = 448, 0.1


@dataclass
class Truth:
    name: str
    path: Path
    boxes: list[tuple[float, float, float, float]]  # (x1, y1, x2, y2) in the raster's pixels


def _write(path: Path, image: np.ndarray) -> Path:
    from earthdial.demo import synthetic

    return synthetic.write_geotiff(path, image, pixel_m=PIXEL_M)


def seam_sea(path: Path, seed: int = 23) -> Truth:
    """`synthetic.ships_across_seams`: open sea over 4 x 5 tiles, 10 ships across their seams."""
    from earthdial.demo import synthetic

    sea = synthetic.ships_across_seams(seed, TILE, OVERLAP)
    return Truth(f"seams {seed}", _write(path, sea.image), sea.boxes())


def demo_mosaic(path: Path, n: int = 12, size: int = 448, seed: int = 7) -> Truth:
    """n x n demo scenes that hold a ship, side by side."""
    from earthdial.demo import synthetic

    scenes: list[Any] = []
    index = 0
    while len(scenes) < n * n:
        scene = synthetic.make_scene(seed, index)
        index += 1
        if scene.of_class("ship"):
            scenes.append(scene)
    rows = [
        np.concatenate([synthetic.render(scenes[r * n + c], size) for c in range(n)], axis=2)
        for r in range(n)
    ]
    boxes = []
    for k, scene in enumerate(scenes):
        r, c = divmod(k, n)
        for o in scene.of_class("ship"):
            x1, y1, x2, y2 = o.bounds()
            boxes.append(((c + x1) * size, (r + y1) * size, (c + x2) * size, (r + y2) * size))
    return Truth("mosaic", _write(path, np.concatenate(rows, axis=1)), boxes)


def scan(path: Path, engine: Any) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]], float]:
    """The scan's per-tile boxes and tile entries, unmerged (as a journal holds them)."""
    from earthdial.contract.wire import source_by_reference
    from earthdial.serving import scan as scan_op

    features: list[dict[str, Any]] = []
    tiles: dict[int, dict[str, Any]] = {}

    def emit(event: str, **fields: Any) -> None:
        if event == "progress":
            features.extend(fields["features"])
            tiles.update({t["index"]: t for t in fields["tiles"]})

    header = {
        "op": "detect",
        "task": "refer",
        "prompt": "ships",
        "source": source_by_reference(str(path)),
        "options": {"tile_size": TILE, "overlap": OVERLAP, "batch": 16, "merge": False},
    }
    t = time.perf_counter()
    scan_op.run(header, engine, emit)
    return features, tiles, time.perf_counter() - t


@dataclass
class Score:
    boxes: int
    objects: int
    matched: int
    one_box: int  # objects with exactly one box on them
    several: int  # objects with two or more boxes on them
    extra: int  # boxes on an object beyond its matched one: fragments and duplicates
    background: int

    @property
    def precision(self) -> float:
        return self.matched / self.boxes if self.boxes else float("nan")

    @property
    def recall(self) -> float:
        return self.matched / self.objects if self.objects else float("nan")


def score(features: list[dict[str, Any]], truth: Truth, transform: Any) -> Score:
    from shapely.geometry import Polygon, box

    inverse = ~transform
    preds = [Polygon([inverse @ tuple(xy) for xy in f["geometry"]["coordinates"][0]]) for f in features]
    true = [box(*b) for b in truth.boxes]

    def iou(a: Any, b: Any) -> float:
        inter = a.intersection(b).area
        return inter / max(a.area + b.area - inter, 1e-9)

    pairs = sorted(((iou(p, t), i, j) for i, p in enumerate(preds) for j, t in enumerate(true)), reverse=True)
    match: dict[int, int] = {}  # box -> ship
    for v, i, j in pairs:
        if v < 0.5:
            break
        if i not in match and j not in match.values():
            match[i] = j
    on = [0] * len(true)
    background = 0
    for i, p in enumerate(preds):
        if i in match:
            on[match[i]] += 1
            continue
        share = [p.intersection(t).area / max(p.area, 1e-9) for t in true]
        j = int(np.argmax(share)) if share else -1
        if j >= 0 and share[j] >= 0.5:
            on[j] += 1
        else:
            background += 1
    extra = len(preds) - len(match) - background
    return Score(
        len(preds), len(true), len(match), sum(n == 1 for n in on), sum(n >= 2 for n in on), extra, background
    )


def old_merge(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The earlier merge (scenes.merge_boxes then): rotated-polygon NMS by IoU >= 0.5 alone, the
    box seen nearest its tile's centre kept, then the higher score."""
    from shapely.geometry import shape

    features = sorted(features, key=lambda f: (f["properties"]["tile"], f["properties"]["order"]))
    polys = [shape(f["geometry"]) for f in features]

    def rank(i: int) -> tuple[float, float]:
        p = features[i]["properties"]
        score = p.get("score")
        return (p.get("edge_distance", 0.0), -(score if isinstance(score, (int, float)) else 0.0))

    removed: set[int] = set()
    kept: list[int] = []
    for i in sorted(range(len(features)), key=rank):
        if i in removed:
            continue
        kept.append(i)
        for j in range(len(features)):
            if (
                j == i
                or j in removed
                or features[j]["properties"].get("label") != features[i]["properties"].get("label")
            ):
                continue
            inter = polys[i].intersection(polys[j]).area
            union = polys[i].area + polys[j].area - inter
            if union > 0 and inter / union >= 0.5:
                removed.add(j)
    return [features[i] for i in sorted(kept)]


def row(scene: str, merge: str, s: Score) -> str:
    return (
        f"| {scene} | {merge} | {s.objects} | {s.boxes} | {s.one_box} | {s.several} | {s.extra} | "
        f"{s.background} | {s.precision:.1%} | {s.recall:.1%} |"
    )


def total(scores: list[Score]) -> Score:
    return Score(*(sum(getattr(s, f) for s in scores) for f in Score.__dataclass_fields__))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/eval-seams", help="folder for the scenes")
    parser.add_argument("--model", help="checkpoint (default: the demo model)")
    parser.add_argument("--seeds", default="1-16", help="seam seas to make: seeds FIRST-LAST or a,b,c")
    parser.add_argument("--no-mosaic", action="store_true", help="only the seam seas")
    parser.add_argument("--dump", help="write each scene's per-tile boxes, tiles and truth here (JSON)")
    args = parser.parse_args(argv)
    import rasterio

    from earthdial.model.engine import Engine
    from earthdial.scenes import runner as scenes
    from earthdial.training import DEMO_DIR

    if "-" in args.seeds:
        first, last = (int(v) for v in args.seeds.split("-"))
        seeds = list(range(first, last + 1))
    else:
        seeds = [int(v) for v in args.seeds.split(",") if v]
    engine = Engine(args.model or str(DEMO_DIR), device="cpu")
    work = Path(args.work)
    jobs: list[tuple[str, Any]] = [
        (f"seams {seed}", lambda p, seed=seed: seam_sea(p, seed)) for seed in seeds
    ]
    if not args.no_mosaic:
        jobs.append(("mosaic", demo_mosaic))
    lines = [
        "| scene | merge | ships | boxes | ships with one box | ships with 2+ boxes | other boxes on a ship "
        "| on background | precision | recall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    seas: dict[str, list[Score]] = {"before": [], "after": []}
    for name, make in jobs:
        truth = make(work / f"{name.replace(' ', '-')}.tif")
        features, tiles, seconds = scan(truth.path, engine)
        with rasterio.open(truth.path) as src:
            transform = src.transform
        print(
            f"{name}: {len(truth.boxes)} ships, {len(tiles)} tiles scanned in {seconds:.1f} s, "
            f"{len(features)} boxes before merging",
            file=sys.stderr,
        )
        before = score(old_merge(features), truth, transform)
        after = score(scenes.finished(features, tiles), truth, transform)
        lines += [row(name, "before", before), row(name, "**after**", after)]
        if name.startswith("seams"):
            seas["before"].append(before)
            seas["after"].append(after)
        if args.dump:
            Path(args.dump).mkdir(parents=True, exist_ok=True)
            (Path(args.dump) / f"{name.replace(' ', '-')}.json").write_text(
                json.dumps(
                    {
                        "features": features,
                        "tiles": tiles,
                        "truth": truth.boxes,
                        "transform": list(transform)[:6],
                    }
                )
            )
    if seas["after"]:
        name = f"{len(seas['after'])} seam seas"
        lines += [row(name, "before", total(seas["before"])), row(name, "**after**", total(seas["after"]))]
        for when, scores in seas.items():
            counts = sorted(s.one_box for s in scores)
            lines.append(f"\nships with exactly one box, per sea of 10, {when}: {counts}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
