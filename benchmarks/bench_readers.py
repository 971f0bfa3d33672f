"""The cost of reading in a reader process: `plan` of a by-reference source, one `ask` window
read and one scan tile, in this process and through a reader process (readers.ReaderPool), in one run.

Both paths open the file by descriptor under an allowed folder (file_access.open_file); the reader path adds
the call's JSON, the pixels' copy over a socket pair and the two process switches; a scan tile in this
process reads from the raster the scan holds open, in a reader from the one it keeps open (after walking
and checking the path again, as it does for every tile). Each case is timed
`--repeat` times after a warm-up, alternating the two paths, and the median is reported with the ratio.

    python benchmarks/bench_readers.py                       # a 4096 px RGB COG-like GeoTIFF, 1024 px window
    python benchmarks/bench_readers.py --size 8192 --window 2048
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from earthdial import limits
from earthdial.contract.wire import source_by_reference
from earthdial.geo import file_access, imagery
from earthdial.serving import readers, service


def _raster(path: Path, size: int) -> Path:
    rng = np.random.default_rng(0)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=size,
        height=size,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(500_000, 4_000_000, 1, 1),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="DEFLATE",
    ) as dst:
        dst.write(rng.integers(0, 255, (3, size, size), dtype=np.uint8))
    return path


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="raster side, px")
    p.add_argument("--window", type=int, default=1024, help="side of the ask window read, px")
    p.add_argument("--repeat", type=int, default=30)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="earthdial-bench-readers-"))
    path = str(_raster(folder / "scene.tif", args.size))
    file_access.harden_process()
    file_access.set_allowed_dirs([folder])
    budgets = limits.Limits()
    limits.configure(budgets)
    pool = readers.ReaderPool(1, budgets)
    source = source_by_reference(path)
    w = args.window
    bounds = [500_000 + 100, 4_000_000 - 100 - w, 500_000 + 100 + w, 4_000_000 - 100]
    plan_header = {"task": "chat", "prompt": "what?", "source": source}

    def plan() -> None:
        service.plan(plan_header, [], None)

    def window() -> None:
        chip = imagery.read_chip(path, bands=[1, 2, 3], bounds=tuple(bounds), max_size=2048)
        assert chip.width == w

    from rasterio.windows import Window

    tiles = iter(range(10**9))

    def tile() -> None:  # a new 448 px tile each time, as a scan reads them (no block read twice)
        k = next(tiles)
        col, row = (k * 448) % (args.size - 448), ((k * 448) // (args.size - 448) * 448) % (args.size - 448)
        win = Window(col, row, 448, 448)
        if imagery.reads_elsewhere():
            chip = imagery.read_tile(path, [1, 2, 3], win, 448, 448)
        else:
            chip = imagery.tile_chip(held, path, [1, 2, 3], win, 448, 448)
        assert chip.width == 448

    results = {}
    held_open = imagery.open_raster(path)
    held = held_open.__enter__()
    try:
        for name, fn in (
            ("plan", plan),
            (f"ask window {w} px x 3 bands", window),
            ("scan tile 448 px x 3 bands", tile),
        ):
            for via in (None, pool):  # warm both (the reader's first call waits for it to start)
                imagery.use_readers(via)
                fn()
            inproc, hop = [], []
            for _ in range(args.repeat):  # alternate, so load changes hit both alike
                imagery.use_readers(None)
                inproc.append(_median_ms(fn, 1))
                imagery.use_readers(pool)
                hop.append(_median_ms(fn, 1))
            results[name] = (statistics.median(inproc), statistics.median(hop))
    finally:
        imagery.use_readers(None)
        pool.close()
        held_open.__exit__(None, None, None)
    load = os.getloadavg()
    print(
        f"raster {args.size} x {args.size} px, 3 bands uint8, 512 px DEFLATE tiles; {args.repeat} runs each, "
        f"medians; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs"
    )
    print(f"{'case':32} {'in-process ms':>14} {'reader ms':>10} {'ratio':>6} {'added ms':>9}")
    for name, (a, b) in results.items():
        print(f"{name:32} {a:14.2f} {b:10.2f} {b / a:6.2f} {b - a:9.2f}")


if __name__ == "__main__":
    main()
