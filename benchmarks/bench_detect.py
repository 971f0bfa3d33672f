"""Whole-scene detect: tiles/s and peak memory on a 2 000^2 and a 20 000^2 raster, each in its own process.

The rasters are sparse tiled GeoTIFFs (only some blocks hold pixels; GDAL reads the rest as nodata-free
zeros without storing them), so the big one takes seconds to make. Peak memory must not grow with the
scene: detect streams one batch of windows at a time.

    python benchmarks/bench_detect.py [--model DIR] [--tile-size 1024] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_scene(path: Path, size: int) -> None:
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    profile = dict(
        driver="GTiff",
        width=size,
        height=size,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(500_000, 4_000_000, 0.5, 0.5),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        SPARSE_OK=True,
    )
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, size, 2048):  # one textured block in every 2048 x 2048 cell
            for c in range(0, size, 2048):
                dst.write((rng.random((3, 512, 512)) * 255).astype(np.uint8), window=Window(c, r, 512, 512))


def run_one(model: str, raster: str, tile: int, batch: int) -> None:
    """Child process: one detect, then print its figures as JSON."""
    from earthdial.contract.wire import source_by_reference
    from earthdial.model.engine import Engine
    from earthdial.serving import scan

    engine = Engine(model, device="cpu")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    header = {
        "op": "detect",
        "task": "refer",
        "prompt": "ships",
        "source": source_by_reference(raster),
        "options": {"tile_size": tile, "overlap": 0.1, "batch": batch},
    }
    result = scan.run(header, engine, lambda *a, **k: None)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    print(
        json.dumps(
            {
                "tiles": result["tiles"],
                "seconds": seconds,
                "tiles_s": result["tiles"] / seconds,
                "peak_rss_mb": peak / 1024,
                "rss_after_load_mb": rss_before / 1024,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint (default: a tiny random one made here)")
    ap.add_argument("--tile-size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_one(args.child[0], args.child[1], args.tile_size, args.batch)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if not model:
            from earthdial.training.tiny import make_tiny_checkpoint

            model = str(make_tiny_checkpoint(Path(tmp) / "tiny"))
        rows = []
        for size in args.sizes:
            raster = Path(tmp) / f"scene_{size}.tif"
            make_scene(raster, size)
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--tile-size",
                    str(args.tile_size),
                    "--batch",
                    str(args.batch),
                    "--child",
                    model,
                    str(raster),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((size, figures))
            print(
                f"{size:>6}^2 px: {figures['tiles']:>4} tiles in {figures['seconds']:.1f} s = "
                f"{figures['tiles_s']:.2f} tiles/s; peak RSS {figures['peak_rss_mb']:.0f} MB "
                f"(after loading the model {figures['rss_after_load_mb']:.0f} MB)"
            )
        (s0, f0), (s1, f1) = rows[0], rows[-1]
        print(
            f"ratio {s1}^2 / {s0}^2: scene area x{(s1 / s0) ** 2:.0f}, tiles x{f1['tiles'] / f0['tiles']:.0f}, "
            f"peak memory x{f1['peak_rss_mb'] / f0['peak_rss_mb']:.2f}, tiles/s x{f1['tiles_s'] / f0['tiles_s']:.2f}"
        )


if __name__ == "__main__":
    main()
