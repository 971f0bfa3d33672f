"""A request's own machinery against the bare library calls underneath it, in one run.

For 1, 4 and 12 band uint16 windows of 448 and 2048 px, each stage is timed twice: through our code,
and as the plain library calls that do the same work (medians of interleaved repeated calls, after a warm-up):

  protocol    protocol.encode + protocol.decode of a request carrying the window
              vs json.dumps/loads + np.frombuffer
  transport   Client.request (a `ping` carrying the window) to a real `earthdial serve --no-model` process
              vs a raw pyzmq DEALER -> ROUTER round trip of the same frames to a bare echo process
  read        imagery.read_chip of the window (by bounds)  vs rasterio open + read(window=...)
  preprocess  the engine's RGB input path (pixels: stretch, InternVL tiles, normalise)
              vs the same numpy/torch operations written out inline
  parse       answers.parse_boxes vs one regular expression and float()
  georef      service.features_for vs the affine of the rotated corners inline
  request     a by-reference `georef` through the server (read + parse + georeference + transport)
              vs the bare round trip + bare read + bare parse/georef

    python benchmarks/bench_overhead.py     # progress on stderr, then a markdown table on stdout
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
import zmq
from rasterio.transform import from_origin
from rasterio.windows import Window

from earthdial.contract.client import Client
from earthdial.contract.wire import decode, encode, source_by_reference
from earthdial.geo import imagery
from earthdial.model import answers, pixels
from earthdial.model.engine import Engine
from earthdial.serving import service

ORIGIN, PIXEL, PAD = (500_000.0, 4_000_000.0), 10.0, 32
ANSWER = "<ref>ship</ref><box>[[20, 30, 40, 60, 15]]</box><ref>tank</ref><box>[[50, 50, 70, 80, 0]]</box>"
TILE = 448

ECHO_SERVER = r"""
import sys, zmq
sock = zmq.Context().socket(zmq.ROUTER)
sock.bind(sys.argv[1])
print("ready", flush=True)
reply = b'{"v":1,"id":"x","ok":true,"pong":true,"arrays":[]}'
while True:
    frames = sock.recv_multipart(copy=False)
    sock.send_multipart([frames[0], reply])
"""


def compare(
    ours: Callable[[], object], bare: Callable[[], object], min_time: float = 1.0, min_reps: int = 7
) -> tuple[float, float]:
    """Median seconds of one call of each, the two interleaved call by call (after a warm-up of each)
    so that a busy machine slows both alike."""
    ours(), bare()
    t_ours: list[float] = []
    t_bare: list[float] = []
    start = time.perf_counter()
    while len(t_ours) < 3000 and (len(t_ours) < min_reps or time.perf_counter() - start < min_time):
        for fn, into in ((ours, t_ours), (bare, t_bare)):
            t = time.perf_counter()
            fn()
            into.append(time.perf_counter() - t)
    return statistics.median(t_ours), statistics.median(t_bare)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], ready: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(ready):
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not start")


def write_raster(path: Path, bands: int, size: int) -> Path:
    side = size + 2 * PAD
    data = np.random.default_rng(bands).integers(0, 4000, (bands, side, side)).astype(np.uint16)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=side,
        height=side,
        count=bands,
        dtype="uint16",
        crs="EPSG:32633",
        transform=from_origin(*ORIGIN, PIXEL, PIXEL),
        tiled=True,
    ) as dst:
        dst.write(data)
    return path


def window_bounds(size: int) -> tuple[float, float, float, float]:
    x0, y1 = ORIGIN[0] + PAD * PIXEL, ORIGIN[1] - PAD * PIXEL
    return (x0, y1 - size * PIXEL, x0 + size * PIXEL, y1)


# -- bare equivalents ---------------------------------------------------------------------------------


def bare_read(path: Path, bands: int, size: int) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(list(range(1, bands + 1)), window=Window(PAD, PAD, size, size))


_BOX = re.compile(r"<ref>([^<]*)</ref><box>\[\[([^\]]*)\]\]</box>")


def bare_parse(text: str) -> list[tuple[str, list[float]]]:
    return [(label, [float(v) for v in nums.split(",")]) for label, nums in _BOX.findall(text)]


def bare_georef(boxes: list[tuple[str, list[float]]], transform: list[float], w: int, h: int) -> list[dict]:
    a, b, c, d, e, f = transform
    out = []
    for label, (x1, y1, x2, y2, angle) in boxes:
        cx, cy, hw, hh = (x1 + x2) / 200 * w, (y1 + y2) / 200 * h, (x2 - x1) / 200 * w, (y2 - y1) / 200 * h
        cos_a, sin_a = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        ring = []
        for dx, dy in ((-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh), (-hw, -hh)):
            col, row = cx + dx * cos_a - dy * sin_a, cy + dx * sin_a + dy * cos_a
            ring.append([a * col + b * row + c, d * col + e * row + f])
        out.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"label": label},
            }
        )
    return out


MEAN = torch.tensor(pixels.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(pixels.IMAGENET_STD).view(1, 3, 1, 1)


def bare_preprocess(data: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """The engine's RGB path written out: 2-98 % stretch, bicubic to the tile grid, tiles, thumbnail."""
    rgb = np.empty((3, *data.shape[1:]), np.float32)
    for i in range(3):
        band = data[min(i, data.shape[0] - 1)]
        lo, hi = np.percentile(band, [2.0, 98.0])
        np.clip((band - np.float32(lo)) / np.float32(hi - lo if hi > lo else 1), 0, 1, out=rgb[i])
    image = torch.from_numpy(rgb)[None]
    cols, rows = grid
    big = F.interpolate(image, size=(rows * TILE, cols * TILE), mode="bicubic", antialias=True).clamp_(0, 1)
    tiles = (
        big.unfold(2, TILE, TILE).unfold(3, TILE, TILE).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, TILE, TILE)
    )
    if cols * rows > 1:
        thumb = F.interpolate(image, size=(TILE, TILE), mode="bicubic", antialias=True).clamp_(0, 1)
        tiles = torch.cat([tiles, thumb])
    return (tiles - MEAN) / STD


class _Info:  # what Engine.image reads from a loaded checkpoint
    image_size, min_tiles, max_tiles, use_thumbnail = TILE, 1, 6, True


class _EngineStub:
    info, max_tiles = _Info(), 6


# -- the run ------------------------------------------------------------------------------------------


def measure(
    work: Path, bands: int, size: int, client: Client, raw_round_trip: Callable[[list], bytes]
) -> list[dict]:
    """Both timings of every stage for one band count and window size."""
    path = write_raster(work / f"b{bands}_{size}.tif", bands, size)
    bounds = window_bounds(size)
    read_bands = list(range(1, bands + 1))
    chip = imagery.read_chip(str(path), bands=read_bands, bounds=bounds)
    full = chip.data
    assert full.shape == (bands, size, size)
    header = {"v": 1, "id": "bench", "op": "ping"}
    transform = list(chip.transform[:6])
    grid = pixels.choose_grid(size, size, TILE, 1, 6)

    def bare_codec(full: np.ndarray = full) -> None:
        h = json.dumps({**header, "arrays": [{"dtype": "uint16", "shape": list(full.shape)}]}).encode()
        frames = [h, memoryview(np.ascontiguousarray(full)).cast("B")]
        spec = json.loads(frames[0])["arrays"][0]
        np.frombuffer(frames[1], spec["dtype"]).reshape(spec["shape"])

    frames = [bytes(encode(header, [full])[0]), memoryview(full).cast("B")]
    ref = source_by_reference(str(path), read_bands, bounds)
    request = {"v": 1, "id": "bench", "op": "georef", "answer": ANSWER, "source": ref}
    stages = {
        "protocol": (lambda: decode(encode(header, [full])), bare_codec),
        "transport": (
            lambda: client.request(header, [full]),
            lambda: raw_round_trip(frames),
        ),
        "read": (
            lambda: imagery.read_chip(str(path), bands=read_bands, bounds=bounds),
            lambda: bare_read(path, bands, size),
        ),
        "preprocess": (
            lambda: Engine.image(_EngineStub(), chip.data, "[hr_rgb_0.5]", None),
            lambda: bare_preprocess(chip.data, grid),
        ),
        "parse": (lambda: answers.parse_boxes(ANSWER), lambda: bare_parse(ANSWER)),
        "georef": (
            lambda: service.features_for(ANSWER, chip, {"task": "georef"}),
            lambda: bare_georef(bare_parse(ANSWER), transform, size, size),
        ),
        "request": (
            lambda: client.request(request),
            lambda: (
                raw_round_trip([json.dumps(request).encode()]),
                bare_read(path, bands, size),
                bare_georef(bare_parse(ANSWER), transform, size, size),
            ),
        ),
    }
    rows = []
    for stage, (ours, bare) in stages.items():
        t_ours, t_bare = compare(ours, bare)
        rows.append(
            {
                "bands": bands,
                "size": size,
                "stage": stage,
                "ours_ms": t_ours * 1e3,
                "bare_ms": t_bare * 1e3,
                "ratio": t_ours / t_bare,
            }
        )
        print(
            f"{bands:>2} bands {size:>4} px  {stage:<10} ours {t_ours * 1e3:9.3f} ms  "
            f"bare {t_bare * 1e3:9.3f} ms  x{t_ours / t_bare:5.2f}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bands", type=int, nargs="+", default=[1, 4, 12])
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 2048])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    work = Path(tempfile.mkdtemp(prefix="earthdial-bench-"))
    ours_ep, bare_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    server = start(
        [
            sys.executable,
            "-m",
            "earthdial.cli.main",
            "serve",
            "--no-model",
            "--endpoint",
            ours_ep,
            "--allow-dir",
            str(work),
        ],
        "earthdial: serving",
    )
    echo = start([sys.executable, "-c", ECHO_SERVER, bare_ep], "ready")
    client = Client(ours_ep, timeout_s=120)
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(bare_ep)

    def raw_round_trip(frames: list) -> bytes:
        raw.send_multipart(frames, copy=False)
        return raw.recv_multipart()[-1]

    rows: list[dict] = []
    try:
        for bands in args.bands:
            for size in args.sizes:
                rows += measure(work, bands, size, client, raw_round_trip)
    finally:
        client.close()
        raw.close(0)
        for proc in (server, echo):
            proc.terminate()
            proc.wait(10)
        for p in work.iterdir():
            p.unlink()
        work.rmdir()

    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU; "
        f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
        f"rasterio {rasterio.__version__}, pyzmq {zmq.pyzmq_version()} (libzmq {zmq.zmq_version()})"
    )
    print(f"machine: {machine}\n")
    print("| bands | window | stage | ours (ms) | bare (ms) | ours / bare |")
    print("|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['bands']} | {r['size']} px | {r['stage']} | {r['ours_ms']:.3f} | {r['bare_ms']:.3f} | "
            f"{r['ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
