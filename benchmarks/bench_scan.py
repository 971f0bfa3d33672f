"""Whole-scene scan vs the per-tile `ask` loop, against the same server: the same scene, the same tiles.

The baseline is what a client without the scan op does (the old Processing detect): one `ask` by
reference per tile, with that tile's bounds, waiting for each reply before sending the next. The scan is
one streaming `detect`. Both run in this process's turn against one `earthdial serve` (the demo model on
the CPU unless --model says otherwise). Printed: seconds and tiles/s of each, the ratio, the scan at
batch 1, 8, 32 and 64, and the share of the model's time it waited for tiles to be read.

    python benchmarks/bench_scan.py [--model DIR] [--side 6000] [--tile 448] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_scene(path: Path, side: int) -> Path:
    """Demo scenes side by side (each 224 px), so the model has objects to find."""
    from earthdial.demo import synthetic

    n = -(-side // 224)
    rows = [
        np.concatenate([synthetic.render(synthetic.make_scene(3, r * n + c), 224) for c in range(n)], axis=2)
        for r in range(n)
    ]
    image = np.concatenate(rows, axis=1)[:, :side, :side]
    return synthetic.write_geotiff(path, np.ascontiguousarray(image))


def serve(model: str | None, endpoint: str, folder: str, threads: int | None = None) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "earthdial.cli.main",
        "serve",
        "--endpoint",
        endpoint,
        "--device",
        "cpu",
        "--allow-dir",
        folder,
    ]
    if model:
        cmd += ["--model", model]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("earthdial: serving"):
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("earthdial serve did not start")


def ask_loop(client, path: str, plan: dict, transform, prompt: str) -> float:
    """One `ask` per tile of the plan, by reference with the tile's bounds: the baseline."""
    from earthdial.contract.wire import plan_window, source_by_reference

    a, _, c, _, e, f = transform[:6]
    t = time.perf_counter()
    for i in range(plan["tiles"]):
        col, row, w, h = plan_window(plan, i)
        bounds = [c + col * a, f + (row + h) * e, c + (col + w) * a, f + row * e]
        client.ask(source_by_reference(path, bounds=bounds), prompt, task="refer")
    return time.perf_counter() - t


def scan(client, path: str, tile: int, batch: int, prompt: str) -> tuple[float, dict, dict]:
    from earthdial.contract.wire import source_by_reference

    events: list[dict] = []
    header = {
        "op": "detect",
        "task": "refer",
        "prompt": prompt,
        "source": source_by_reference(path),
        "options": {"tile_size": tile, "overlap": 0.1, "batch": batch},
    }
    t = time.perf_counter()
    reply = client.scan(header, on_event=events.append)
    return time.perf_counter() - t, reply, events[0]["plan"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory (default: the built-in demo model)")
    ap.add_argument(
        "--side",
        type=int,
        default=6000,
        help="scene side in pixels (6000: an analyst's layer, 225 tiles of 448 px)",
    )
    ap.add_argument("--tile", type=int, default=448)
    ap.add_argument("--prompt", default="ships")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64], help="scan batch sizes to run")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the server (`serve --threads`; default: serve's own, one fewer "
        "than the cores; 0: torch's default)",
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import rasterio

    from earthdial.contract.client import Client

    folder = tempfile.mkdtemp(prefix="bench-scan-")
    path = str(make_scene(Path(folder) / "scene.tif", args.side))
    with rasterio.open(path) as src:
        transform = src.transform
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = serve(args.model, endpoint, folder, args.threads)
    try:
        with Client(endpoint, timeout_s=600) as client:
            _, _, plan = scan(client, path, args.tile, 8, args.prompt)  # warm-up (first-call costs)
            loops: list[float] = []
            runs: dict[int, list[tuple[float, float]]] = {b: [] for b in args.batches}
            for _ in range(args.repeats):  # interleaved, so that a busy machine slows every variant alike
                loops.append(ask_loop(client, path, plan, transform, args.prompt))
                for batch in runs:
                    seconds, reply, _ = scan(client, path, args.tile, batch, args.prompt)
                    t = reply["timings"]
                    runs[batch].append(
                        (seconds, t["read_wait_s"] / max(t["model_s"] + t["read_wait_s"], 1e-9))
                    )
    finally:
        proc.terminate()
        proc.wait(10)
    tiles = plan["tiles"]
    loop = statistics.median(loops)
    print(
        f"scene {args.side} x {args.side} px, {tiles} tiles of {args.tile} px (10 % overlap), model "
        f"{args.model or 'demo'}, CPU, server threads {'serve default' if args.threads is None else args.threads}; medians of {args.repeats} "
        "interleaved runs"
    )
    print(f"per-tile ask loop   {loop:7.2f} s   {tiles / loop:6.2f} tiles/s   (baseline)")
    for batch, values in runs.items():
        seconds = statistics.median(v[0] for v in values)
        waited = statistics.median(v[1] for v in values)
        print(
            f"scan op, batch {batch:<3}  {seconds:7.2f} s   {tiles / seconds:6.2f} tiles/s   {loop / seconds:5.1f}x the loop   "
            f"model waited on reading {waited:.1%}"
        )


if __name__ == "__main__":
    main()
