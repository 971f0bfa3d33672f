"""Quantised weights against full precision, in one run: weights memory, peak memory for one 448 px
tile, decode tokens/s, and how often the quantised greedy answer equals the full-precision one.

    python benchmarks/bench_quantize.py [--model DIR] [--device cpu|cuda] [--prompts 20]

Without --model it uses the shipped demo checkpoint when there is one, else a tiny random one (whose
answers are noise: agreement then only shows the path runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from earthdial.model.engine import Engine, Query
from earthdial.model.prompts import build_question


def default_model(tmp: str) -> str:
    demo = Path(__file__).resolve().parents[1] / "backend" / "earthdial" / "models" / "demo"
    if (demo / "config.json").exists():
        return str(demo)
    from earthdial.training.tiny import make_tiny_checkpoint

    return str(make_tiny_checkpoint(Path(tmp) / "tiny", image_size=448))


def peak_bytes(engine: Engine, fn) -> int:
    if engine.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated()
    import resource

    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_mode(model: str, device: str, mode: str, prompts: int, new_tokens: int) -> dict:
    """One mode in this process (the parent runs each mode in its own process, so peaks do not mix)."""
    rng = np.random.default_rng(0)
    scenes = [(rng.random((3, 448, 448)) * 255).astype(np.uint8) for _ in range(prompts)]
    asks = [("refer", "ships"), ("caption", ""), ("refer", "airplanes"), ("grounding", "")]
    engine = Engine(model, device=device, quantize=mode)
    queries = [
        Query(build_question(*asks[i % len(asks)]), [engine.image(s, "[hr_rgb_0.5]")], new_tokens)
        for i, s in enumerate(scenes)
    ]
    one = Query(build_question("caption", ""), [engine.image(scenes[0], "[hr_rgb_0.5]")], 1)
    peak = peak_bytes(engine, lambda: engine.generate([one]))
    t = time.perf_counter()
    answers = [engine.generate([q])[0] for q in queries]
    seconds = time.perf_counter() - t
    t = time.perf_counter()
    engine.generate([Query(queries[0].question, queries[0].images, 64)], min_new_tokens=64)
    tok_s = 64 / (time.perf_counter() - t)
    q = engine.quantization
    return {
        "mode": mode,
        "weights": q["bytes_after"],
        "quantised": q.get("quantised", 0),
        "kept": q.get("kept", 0),
        "peak": peak,
        "tok_s": tok_s,
        "answers_s": len(answers) / seconds,
        "answers": answers,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        print(json.dumps(run_mode(args.model, args.device, args.child, args.prompts, args.new_tokens)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or default_model(tmp)
        base = None
        for mode in ("none", "int8", "nf4"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--model",
                    model,
                    "--device",
                    args.device,
                    "--prompts",
                    str(args.prompts),
                    "--new-tokens",
                    str(args.new_tokens),
                    "--child",
                    mode,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            base = base or r
            agree = sum(a == b for a, b in zip(r["answers"], base["answers"], strict=True)) / len(
                r["answers"]
            )
            print(
                f"{mode:>5}: weights {r['weights'] / 2**20:8.1f} MiB (x{r['weights'] / base['weights']:.2f}; "
                f"{r['quantised']} layers quantised, {r['kept']} kept); peak for one 448 px tile "
                f"{r['peak'] / 2**20:7.1f} MiB (x{r['peak'] / base['peak']:.2f}); {r['tok_s']:6.1f} tokens/s "
                f"(x{r['tok_s'] / base['tok_s']:.2f}); same greedy answer as 'none' on {agree:.0%} "
                f"of {len(r['answers'])}"
            )
        print(f"model: {model}, device: {args.device}")


if __name__ == "__main__":
    main()
