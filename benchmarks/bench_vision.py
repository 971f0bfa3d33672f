"""Vision-side time for a batch of 12-band (Sentinel-2) images: all band groups of all images in one
vision-tower call (the engine's way) against one call per image (the former way), in the same run.

    python benchmarks/bench_vision.py --size small --batch 8      # CPU
    python benchmarks/bench_vision.py --size full --device cuda --batch 16
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from bench_generation import build_engine, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["full", "small", "demo"], default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bands", type=int, default=12)
    args = ap.parse_args()
    engine = build_engine(args.size, args.device, args.image_size)
    rng = np.random.default_rng(0)
    images = [
        engine.image(rng.random((args.bands, 64, 64)).astype(np.float32), "[s2_ms_10]")
        for _ in range(args.batch)
    ]
    groups = sum(int(im.pixels.shape[0]) for im in images)
    print(
        f"{args.size} model on {args.device}, {engine.info.image_size} px: {args.batch} images x "
        f"{args.bands} bands = {groups} band groups"
    )
    with torch.inference_mode():
        one = timed(lambda: engine.image_features(images), args.device)
        looped = timed(lambda: engine.image_features(images, one_call=False), args.device)
    print(f"one vision call : {one * 1000:8.1f} ms ({groups / one:.1f} groups/s)")
    print(f"one per image   : {looped * 1000:8.1f} ms ({groups / looped:.1f} groups/s)")
    print(f"batched / looped speed: {looped / one:.2f}x")


if __name__ == "__main__":
    main()
