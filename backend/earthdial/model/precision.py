"""Which dtype the model computes in, and why.

CUDA: bf16, the dtype the weights are published in. CPU: bf16 where the CPU has native bf16 instructions
(x86 AVX512_BF16 or AMX-BF16, Arm's BF16 extension) and a start-up probe finds bf16 matrix products at the
model's own widths faster than fp32 ones; fp32 otherwise (emulated bf16 is slower than fp32, and small
models gain nothing). On the 2-core AVX-512-BF16 development CPU, EarthDial-4B in bf16 answered a 448 px
window about twice as fast as in fp32, in half the memory (docs/performance.md). `--dtype` overrides.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16"}
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 /proc/cpuinfo flags; Arm's "Features" name it bf16
MIN_HIDDEN_FOR_BF16 = 1024  # narrower language models (the demo's is 192): fp32, bf16 cannot pay there
MIN_SPEEDUP = 1.15  # the probe must find bf16 at least this much faster (a busy CPU makes timings noisy)


@dataclass(frozen=True)
class Probe:
    """Best-of-N seconds of the same matrix products in fp32 and in bf16."""

    fp32_s: float
    bf16_s: float
    took_s: float = 0.0

    @property
    def speedup(self) -> float:
        return self.fp32_s / self.bf16_s if self.bf16_s > 0 else 0.0


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`) from /proc/cpuinfo; empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_bf16(flags: frozenset[str]) -> str | None:
    """The flag that says the CPU computes bf16 natively, if any."""
    return next((f for f in BF16_FLAGS if f in flags), None)


def probe(width: int, repeats: int = 5) -> Probe:
    """Time one decode-like (1 row) and one prefill-like (16 rows) product with a (width, width) weight in
    both dtypes, interleaved, best of `repeats`, on one thread: what is compared is the core's bf16 and
    fp32 arithmetic, and one thread is least disturbed by other processes on a busy machine. The weight
    (38 MB in fp32 at EarthDial-4B's width 3072) is larger than most CPUs' caches, as the model's are."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    w32 = torch.empty(width, width).uniform_(-0.05, 0.05)
    x32 = [torch.empty(rows, width).uniform_(-1, 1) for rows in (1, 16)]
    w16, x16 = w32.to(torch.bfloat16), [x.to(torch.bfloat16) for x in x32]
    best = {"fp32": float("inf"), "bf16": float("inf")}
    try:
        with torch.no_grad():
            for i in range(repeats + 1):  # the first round warms up
                for name, w, xs in (("fp32", w32, x32), ("bf16", w16, x16)):
                    t = time.perf_counter()
                    for x in xs:
                        torch.nn.functional.linear(x, w)
                    if i:
                        best[name] = min(best[name], time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return Probe(best["fp32"], best["bf16"], time.perf_counter() - start)


@functools.lru_cache(maxsize=8)
def _probe_once(width: int) -> Probe:
    return probe(width)


def llm_width(model_dir: str | Path) -> int | None:
    """The language model's hidden size from a checkpoint's config.json (None where it cannot be read)."""
    import json

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        return int(cfg["llm_config"]["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def parse(requested: str) -> str:
    """'auto', or a dtype name of DTYPES (fp32 and bf16 accepted); ValueError otherwise."""
    name = ALIASES.get(requested, requested)
    if name != "auto" and name not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)} (or fp32, bf16), not {requested!r}")
    return name


def choose(
    device: str,
    requested: str = "auto",
    width: int | None = None,
    flags: frozenset[str] | None = None,
    run_probe: Callable[[int], Probe] | None = None,
) -> Precision:
    """The dtype for `device` and why. `width`: the language model's hidden size (None: unknown, treated
    as large). `flags` and `run_probe` default to this machine's /proc/cpuinfo and a timed probe (once per
    width and process); tests pass their own to check both outcomes on any CPU."""
    name = parse(requested)
    if name != "auto":
        return Precision(DTYPES[name], f"{name}: asked for (--dtype)")
    if device.startswith("cuda"):
        return Precision(torch.bfloat16, "bfloat16: the published weights' dtype, native on the GPU")
    if device == "mps":
        return Precision(torch.bfloat16, "bfloat16: the published weights' dtype (MPS has it from macOS 14)")
    if width is not None and width < MIN_HIDDEN_FOR_BF16:
        return Precision(
            torch.float32,
            f"float32: a small model (language-model width {width} < {MIN_HIDDEN_FOR_BF16}): bf16 cannot pay",
        )
    flag = native_bf16(cpu_flags() if flags is None else flags)
    if flag is None:
        return Precision(
            torch.float32, "float32: this CPU has no native bf16 instructions (no avx512_bf16/amx_bf16/bf16)"
        )
    result = (run_probe or _probe_once)(width or 3072)
    measured = (
        f"a bf16 matrix-product probe ran {result.speedup:.2f}x the speed of fp32 "
        f"({result.bf16_s * 1000:.0f} vs {result.fp32_s * 1000:.0f} ms)"
    )
    if result.speedup >= MIN_SPEEDUP:
        return Precision(torch.bfloat16, f"bfloat16: the CPU has {flag} and {measured}")
    return Precision(
        torch.float32, f"float32: the CPU has {flag} but {measured}, under the {MIN_SPEEDUP}x needed"
    )
