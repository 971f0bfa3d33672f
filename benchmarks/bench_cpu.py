"""The real model on a CPU, per setting, in one run: load peak, time to first token, decode tokens/s and one
whole window, for fp32, bf16 and int8, with ratios to fp32.

Each setting loads the checkpoint in its own process (peak RSS does not mix) through the same Engine the
server uses, with serve's thread default, and answers one 448 px refer window (one tile: 438 prompt tokens
with the 256 image tokens) greedily:
  - load peak: the process's peak RSS once the model is loaded (and quantised);
  - time to first token: best of two one-token answers (vision + prefill);
  - one window: a whole answer of --new-tokens tokens (20: about a refer box);
  - decode tokens/s: (new tokens - 1) / (window - first token).

    earthdial make-tiny-checkpoint --full-size /tmp/full        # EarthDial-4B's shapes, random weights
    flock /tmp/earthdial-heavy.lock python benchmarks/bench_cpu.py --model /tmp/full
    python benchmarks/bench_cpu.py --model /tmp/tiny --settings fp32 bf16   # anything small, quickly

A setting whose estimated peak exceeds the memory available now is not run, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3
SETTINGS = {  # name -> (--dtype, --quantize)
    "fp32": ("float32", "none"),
    "bf16": ("bfloat16", "none"),
    "int8": ("bfloat16", "int8"),
    "int8-fp32": ("float32", "int8"),  # int8 loaded from an fp32 model (how int8 was run before)
    "nf4": ("bfloat16", "nf4"),
}


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports kB


def one(model: str, setting: str, new_tokens: int, threads: int | None) -> dict:
    """One setting, in this process."""
    import numpy as np
    import torch

    from earthdial.model.engine import Engine, Query, cpu_threads
    from earthdial.model.prompts import build_question

    torch.set_num_threads(cpu_threads(threads) or torch.get_num_threads())
    load_before = os.getloadavg()[0]
    dtype, quantize = SETTINGS[setting]
    t = time.perf_counter()
    engine = Engine(model, device="cpu", dtype=dtype, quantize=quantize)
    load_s = time.perf_counter() - t
    load_peak = peak_gib()
    size = engine.info.image_size
    tile = np.random.default_rng(0).integers(0, 255, (3, size, size), dtype=np.uint8)
    image = engine.image(tile, "[hr_rgb_0.5]")
    question = build_question("refer", "ships")
    prompt_tokens = len(engine.tokenizer(engine.prompt_text(Query(question, [image])))["input_ids"])

    def answer(new: int) -> float:
        t = time.perf_counter()
        engine.generate([Query(question, [image], new)], min_new_tokens=new)
        return time.perf_counter() - t

    first = min(answer(1), answer(1))
    window = answer(new_tokens)
    return {
        "setting": setting,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "quantize": quantize,
        "kernel": engine.quantization.get("kernel"),
        "threads": torch.get_num_threads(),
        "weights_gib": engine.quantization["bytes_after"] / GIB,
        "load_s": load_s,
        "load_peak_gib": load_peak,
        "run_peak_gib": peak_gib(),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "ttft_s": first,
        "window_s": window,
        # a busy CPU can make the whole answer take no longer than one token: no rate then, not a wrong one
        "decode_tok_s": (new_tokens - 1) / (window - first) if window > first else None,
        "load_average": (load_before, os.getloadavg()[0]),
    }


def estimated_peak_gib(model: str, setting: str) -> float:
    """Weights in the setting's load dtype, plus the measured ~0.5 GiB of runtime and activations."""
    from earthdial.model import memory

    shapes = memory.shapes_of_checkpoint(model)
    total = shapes.vision_params + shapes.projector_params + shapes.llm_params
    return total * (4 if SETTINGS[setting][0] == "float32" else 2) / GIB + 0.5


def available_gib() -> float:
    with open("/proc/meminfo") as fh:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
    return info["MemAvailable"] / GIB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", required=True, help="checkpoint directory (e.g. make-tiny-checkpoint --full-size)"
    )
    ap.add_argument(
        "--settings",
        nargs="+",
        default=["fp32", "bf16", "int8"],
        choices=list(SETTINGS),
        help="the first is the baseline of the ratios",
    )
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: serve's)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--one", choices=list(SETTINGS), help=argparse.SUPPRESS)  # a child process's setting
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.one, args.new_tokens, args.threads)))
        return

    from earthdial.model.precision import choose, cpu_flags, llm_width, native_bf16

    auto = choose("cpu", "auto", llm_width(args.model))
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, native bf16: "
        f"{native_bf16(cpu_flags()) or 'no'}; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"--dtype auto here: {auto.reason}")
    results: dict[str, dict] = {}
    for setting in args.settings:
        need, have = estimated_peak_gib(args.model, setting), available_gib()
        if need > have:
            print(f"{setting}: not run, needs about {need:.1f} GiB, {have:.1f} GiB available now", flush=True)
            continue
        cmd = [
            sys.executable,
            __file__,
            "--model",
            args.model,
            "--one",
            setting,
            "--new-tokens",
            str(args.new_tokens),
        ] + (["--threads", str(args.threads)] if args.threads is not None else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{setting}: failed ({out.returncode}): {out.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        results[setting] = r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{setting}: done, load average {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f}",
            flush=True,
        )
    if not results:
        return
    base = results.get(args.settings[0])
    first = next(iter(results.values()))
    print(
        f"\n{first['prompt_tokens']} prompt tokens, {args.new_tokens}-token answers, {first['threads']} thread(s)"
    )
    print("| setting | weights | load peak | time to first token | decode | one window | load average |")
    print("|---|---|---|---|---|---|---|")

    def ratio(key: str, r: dict) -> str:
        if base is None or r is base or not base[key] or not r[key]:
            return ""
        return f" ({r[key] / base[key]:.2f}x)"

    def rate(r: dict) -> str:
        return "n/a (busy CPU)" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.2f} tok/s"

    for name, r in results.items():
        label = f"{name} ({r['dtype']}{', ' + r['kernel'] if r['kernel'] else ''})"
        print(
            f"| {label} | {r['weights_gib']:.1f} GiB | {r['load_peak_gib']:.1f} GiB{ratio('load_peak_gib', r)} "
            f"| {r['ttft_s']:.1f} s{ratio('ttft_s', r)} | {rate(r)}{ratio('decode_tok_s', r)} "
            f"| {r['window_s']:.1f} s{ratio('window_s', r)} | {r['load_average'][0]:.1f}-{r['load_average'][1]:.1f} |"
        )
    if base is not None:
        print(
            f"(ratios: to {args.settings[0]} in this run; times and peaks as a share of its, decode as a multiple)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
