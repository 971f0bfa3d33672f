"""`earthdial detect-many` on Ray workers vs one process, on the same scenes, measured in one run.

The baseline is the best a single process does: one engine loaded once (`--baseline-threads` torch
threads), the scenes run one after the other through the same one-scene op (`many.detect_scene`), each
scene's layer written into a GeoPackage (`output.write_features`), as `detect-many` writes them. The other side is the command itself, with
`--workers N --cpus-per-worker C` on a local Ray it starts (the default). Both run as fresh processes,
alternated `--repeat` times; medians are printed with the ratio baseline / Ray:

- whole run: the process's wall time, imports, Ray's start, model loads and writes included;
- scenes phase: from the start of the first scene's work to the last scene written, i.e. without the
  start-up costs (baseline: from the model loaded; Ray: from the first scene's line arriving, less the
  seconds that scene took in its worker, so a second worker that started later counts against Ray).

Scenes: demo scenes side by side (the built-in demo model knows their objects), tiles of 224 px without
overlap. The load average of the machine is printed before and after: the machine may be shared.

    python benchmarks/bench_many.py [--scenes 16] [--grid 10] [--workers 2] [--cpus-per-worker 1] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BASELINE = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[5]))
from earthdial.jobs import many
from earthdial.outputs import files as output
from earthdial.model.engine import Engine
paths, out, model, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
engine = Engine(model, device="cpu")
t0 = time.perf_counter()
boxes = 0
for k, path in enumerate(open(paths).read().split()):
    result = many.detect_scene(many.scene_header(path, "refer", "ships", options), engine)
    assert result["ok"], result
    output.write_features(out, {"type": "FeatureCollection", "crs": result["crs"], "features": result["features"]},
                          f"scene{k}")
    boxes += len(result["features"])
print(json.dumps({"scenes_s": time.perf_counter() - t0, "boxes": boxes}))
"""


def make_scenes(folder: Path, count: int, grid: int) -> list[Path]:
    """`count` scenes of grid x grid demo scenes (224 px each): grid^2 tiles of 224 px per scene."""
    from earthdial.demo import synthetic

    tiles = [synthetic.render(synthetic.make_scene(11, k), 224) for k in range(16)]
    rng = np.random.default_rng(0)
    paths = []
    for s in range(count):
        pick = rng.integers(0, len(tiles), (grid, grid))
        rows = [np.concatenate([tiles[pick[r, c]] for c in range(grid)], axis=2) for r in range(grid)]
        paths.append(synthetic.write_geotiff(folder / f"scene{s}.tif", np.concatenate(rows, axis=1)))
    return paths


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_baseline(
    listing: Path, out: Path, model: str, options: str, threads: int
) -> tuple[float, float, int]:
    import json

    t = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", BASELINE, str(listing), str(out), model, options, str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - t
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return wall, result["scenes_s"], result["boxes"]


def run_many(listing: Path, out: Path, model: str, args: argparse.Namespace) -> tuple[float, float, int]:
    """The command's wall time, and the scenes phase (module docstring; lines timed as they arrive)."""
    cmd = [sys.executable, "-m", "earthdial.cli.main", "detect-many", "--list", str(listing), "--prompt", "ships",
           "--tile-size", "224", "--overlap", "0", "--batch", str(args.batch), "--model", model,
           "--device", "cpu", "--workers", str(args.workers), "--cpus-per-worker", str(args.cpus_per_worker),
           "-o", str(out)]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = last = None
    for line in proc.stderr:
        now = time.perf_counter()
        if line.startswith("scene ") and " boxes in " in line:
            if first is None:
                first = now - float(line.split(" boxes in ")[1].split(" s ")[0])
            last = now
    out_text = proc.stdout.read()
    if proc.wait() != 0 or first is None or last is None:
        raise RuntimeError(f"detect-many failed: {out_text}")
    boxes = int(out_text.split(" boxes in ")[0].rsplit(" ", 1)[1])
    return time.perf_counter() - t, last - first, boxes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--grid", type=int, default=10, help="tiles per scene side (224 px each)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--baseline-threads",
        type=int,
        default=1,
        help="torch threads of the 1-process baseline (default 1: on a shared 2-core machine "
        "2 threads ran the demo model 100x slower)",
    )
    parser.add_argument("--model", help="checkpoint directory (default: the built-in demo model)")
    args = parser.parse_args()
    from earthdial.training import DEMO_DIR

    model = args.model or str(DEMO_DIR)
    options = f'{{"tile_size": 224, "overlap": 0.0, "batch": {args.batch}, "min_score": 0.0}}'
    with tempfile.TemporaryDirectory(prefix="bench-many-") as tmp:
        folder = Path(tmp)
        paths = make_scenes(folder, args.scenes, args.grid)
        listing = folder / "scenes.txt"
        listing.write_text("\n".join(map(str, paths)) + "\n")
        print(
            f"{args.scenes} scenes of {args.grid}x{args.grid} tiles of 224 px ({args.scenes * args.grid**2} "
            f"tiles), model {model}, {os.cpu_count()} CPUs; load average before: {load()}"
        )
        base: list[tuple[float, float, int]] = []
        ray: list[tuple[float, float, int]] = []
        for r in range(args.repeat):  # alternated, so that load from other work slows both alike
            base.append(
                run_baseline(listing, folder / f"base{r}.gpkg", model, options, args.baseline_threads)
            )
            ray.append(run_many(listing, folder / f"many{r}.gpkg", model, args))
            print(
                f"  run {r + 1}: 1 process {base[-1][0]:.1f} s (scenes {base[-1][1]:.1f} s), "
                f"detect-many {ray[-1][0]:.1f} s (scenes {ray[-1][1]:.1f} s); load {load()}"
            )
        if {b[2] for b in base} != {m[2] for m in ray}:
            print(
                f"WARNING: boxes differ: 1 process {[b[2] for b in base]}, detect-many {[m[2] for m in ray]}"
            )
        wall_b, wall_r = statistics.median(b[0] for b in base), statistics.median(m[0] for m in ray)
        scenes_b, scenes_r = statistics.median(b[1] for b in base), statistics.median(m[1] for m in ray)
        tiles = args.scenes * args.grid**2
        print(
            f"\n| measure | 1 process, {args.baseline_threads} torch thread(s) | detect-many, {args.workers} Ray workers x {args.cpus_per_worker:g} CPU | ratio |"
        )
        print("|---|---|---|---|")
        print(f"| whole run, s | {wall_b:.1f} | {wall_r:.1f} | {wall_b / wall_r:.2f}x |")
        print(f"| scenes phase, s | {scenes_b:.1f} | {scenes_r:.1f} | {scenes_b / scenes_r:.2f}x |")
        print(f"| tiles/s, scenes phase | {tiles / scenes_b:.1f} | {tiles / scenes_r:.1f} | |")
        print(f"\nboxes found: {base[0][2]} (both); load average after: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
