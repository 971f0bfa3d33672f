"""Peak memory of loading a checkpoint: the meta-device path (tensor by tensor) against the former copying path.

Each load runs in a fresh subprocess that reports its peak RSS (ru_maxrss); a subprocess that only
imports torch and transformers gives the floor, subtracted in the "over imports" column.

    earthdial make-tiny-checkpoint --full-size /tmp/full      # published 4B shapes, bf16, ~8.3 GB
    python benchmarks/bench_load.py /tmp/full --dtype bf16 fp32
    python benchmarks/bench_load.py /tmp/full --skip-above-gb 20   # runs a path only if its estimate fits

The former path holds the whole published dict (file dtype), the model built on the device (load dtype)
and, when the dtypes differ, a converted copy of the dict (load dtype) at once: the estimate printed for
it is that sum. The meta path holds one copy in the load dtype plus one tensor in flight.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys, time
import torch
from earthdial.model import checkpoint
t = time.perf_counter()
if sys.argv[1] != "imports":
    model, _, _ = checkpoint.load(sys.argv[3], dtype=getattr(torch, sys.argv[2]), weights=sys.argv[1])
    params = sum(p.numel() for p in model.parameters())
else:
    import transformers  # noqa: F401
    params = 0
print(json.dumps({"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
                  "seconds": time.perf_counter() - t, "params": params}))
"""

DTYPES = {"bf16": ("bfloat16", 2), "fp32": ("float32", 4)}


def measure(path: str, weights: str, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, weights, dtype, path], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def file_dtype_bytes(path: Path) -> tuple[int, int]:
    """(number of weights, bytes per weight in the file) from the safetensors header."""
    import struct

    with open(path / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    count = sum(int(__import__("math").prod(e["shape"])) for e in header.values())
    size = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
    return count, size // max(count, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument(
        "--skip-above-gb", type=float, default=20.0, help="do not run a load estimated above this"
    )
    args = ap.parse_args()
    count, file_bytes = file_dtype_bytes(Path(args.checkpoint))
    floor = measure(args.checkpoint, "imports", "float32")["peak_gb"]
    gb = 1024**3
    print(
        f"{count / 1e9:.2f} B weights, {file_bytes} bytes each in the file; imports alone: {floor:.2f} GB RSS"
    )
    print(
        f"{'dtype':6} {'path':5} {'estimate GB':>11} {'peak RSS GB':>11} {'over imports':>12} {'load s':>7}"
    )
    for name in args.dtype:
        dtype, size = DTYPES[name]
        estimates = {
            "copy": count * (file_bytes + size + (size if size != file_bytes else 0)) / gb,
            "meta": count * size / gb,
        }
        peaks = {}
        for weights in ("copy", "meta"):
            if estimates[weights] > args.skip_above_gb:
                print(
                    f"{name:6} {weights:5} {estimates[weights]:11.1f} {'not run: estimate over ' + str(args.skip_above_gb) + ' GB':>32}"
                )
                continue
            r = measure(args.checkpoint, weights, dtype)
            peaks[weights] = r["peak_gb"]
            print(
                f"{name:6} {weights:5} {estimates[weights]:11.1f} {r['peak_gb']:11.2f} "
                f"{r['peak_gb'] - floor:12.2f} {r['seconds']:7.1f}"
            )
        if len(peaks) == 2:
            print(
                f"{name}: peak RSS copy / meta = {peaks['copy'] / peaks['meta']:.2f}x "
                f"(over imports: {(peaks['copy'] - floor) / (peaks['meta'] - floor):.2f}x)"
            )


if __name__ == "__main__":
    main()
