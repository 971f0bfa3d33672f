"""What this machine can run, found without loading a model: its GPUs and NVIDIA driver, the torch build,
the CPU and its RAM; for each published checkpoint and each dtype and quantisation the backend offers, the
memory one needs against what each device has free; and one recommended setting, with its reason.

Memory figures are `memory`'s (the plan `earthdial serve` makes at start-up): nothing here estimates memory
anew. `read_facts` looks at the machine; `plans` and `recommend` are pure functions of those facts (plain
data), so any machine can be described to them.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

from earthdial.model import memory, precision
from earthdial.model.quantize import MODES, device_memory

SCHEMA = 1  # bump when a key of the report changes meaning or goes away
NVIDIA_SMI_TIMEOUT_S = 5.0
TILES = 7  # the published checkpoints' 6 dynamic tiles + the thumbnail: serve's default plan
MAX_NEW_TOKENS = 300  # memory.plan's default
WANT_BATCH = 8  # serve's default --max-batch
BF16_TENSOR_CORES = 8.0  # the compute capability from which NVIDIA GPUs compute bf16 on tensor cores
QUANTIZE_EXTRA = "pip install 'earthdial-qgis[quantize]'"

# The three published checkpoints share InternVL2-4B's layout and shapes (InternViT-300M, the projector,
# Phi-3-mini), so memory.EARTHDIAL_4B (counted from the published shapes, checked against a meta-device model
# in tests/backend/test_memory_quantize.py) stands for each; their vocabularies differ by a few added tokens
# within the same embedding rows. What each is for comes from the published model cards.
CHECKPOINTS: dict[str, tuple[memory.Shapes, str]] = {
    "EarthDial_4B_RGB": (memory.EARTHDIAL_4B, "RGB imagery, temporal pairs and change"),
    "EarthDial_4B_MS": (memory.EARTHDIAL_4B, "multispectral and SAR imagery"),
    "EarthDial_4B_Methane_UHI": (memory.EARTHDIAL_4B, "methane plumes and urban heat islands"),
}


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total: int  # bytes
    free: int | None  # bytes; None: not measured
    capability: str = ""  # CUDA compute capability, e.g. "9.0"


@dataclass(frozen=True)
class Facts:
    """What the plan and the recommendation need to know about a machine."""

    gpus: tuple[Gpu, ...]
    mps: bool  # Apple's GPU is there (the backend does not use it)
    cpu_bf16: bool  # the CPU computes bf16 natively (precision.native_bf16)
    cpu_dtype: str  # what precision.choose picks for a 4B model on this CPU: "bfloat16" or "float32"
    cpu_dtype_reason: str
    ram_free: int | None  # bytes
    ram_total: int | None
    torchao: bool  # the `[quantize]` extra: int8 on CUDA and nf4 everywhere need it


def needs_torchao(device: str, quantize: str) -> bool:
    """Whether this setting needs torchao (quantize.quantize: int8 on a CPU uses PyTorch's own kernel)."""
    return quantize == "nf4" or (quantize == "int8" and device.startswith("cuda"))


def _dtypes(device: str, cpu_bf16: bool) -> list[str]:
    """The dtypes `serve --dtype` offers on a device (no float16: the backend computes in bf16 or fp32);
    bf16 on a CPU only where native, as memory's CPU advice."""
    if device.startswith("cuda") or cpu_bf16:
        return ["bfloat16", "float32"]
    return ["float32"]


def plans(
    facts: Facts, checkpoints: dict[str, tuple[memory.Shapes, str]] = CHECKPOINTS
) -> list[dict[str, Any]]:
    """One row per checkpoint x device x dtype x quantisation: memory.plan's figures against that device's
    free memory, and `needs_gb`, the free memory one request needs (memory.min_free)."""
    devices = [(f"cuda:{g.index}", g.name, g.free) for g in facts.gpus]
    devices.append(("cpu", "CPU", facts.ram_free))
    rows = []
    for name, (shapes, _) in checkpoints.items():
        for device, device_name, free in devices:
            for dtype in _dtypes(device, facts.cpu_bf16):
                size = 2 if dtype == "bfloat16" else 4
                for quantize in MODES:
                    p = memory.plan(
                        shapes,
                        device,
                        free,
                        size,
                        quantize,
                        tiles=TILES,
                        max_new_tokens=MAX_NEW_TOKENS,
                        want_batch=WANT_BATCH,
                        cpu_bf16=facts.cpu_bf16,
                    )
                    needs = memory.min_free(shapes, device, size, quantize, TILES, MAX_NEW_TOKENS)
                    missing = needs_torchao(device, quantize) and not facts.torchao
                    rows.append(
                        {
                            "checkpoint": name,
                            "device": device,
                            "device_name": device_name,
                            "dtype": dtype,
                            "quantize": quantize,
                            "weights_gb": round(p.weights / memory.GIB, 2),
                            "per_request_gb": round(p.per_request / memory.GIB, 2),
                            "needs_gb": round(needs / memory.GIB, 2),
                            "free_gb": None if free is None else round(free / memory.GIB, 2),
                            "fits": None if free is None else p.batch >= 1,
                            "batch": p.batch,
                            "needs_torchao": missing,
                            "message": p.message,
                        }
                    )
    return rows


def _setting(rows: list[dict[str, Any]], device: str, dtype: str, quantize: str) -> list[dict[str, Any]]:
    return [r for r in rows if (r["device"], r["dtype"], r["quantize"]) == (device, dtype, quantize)]


def _fits_all(rows: list[dict[str, Any]]) -> bool:
    """A setting fits when it fits every checkpoint. Unknown free memory counts as fitting on a CPU (RAM
    unreadable: the plan's batch is the one asked for), not on a GPU left unmeasured (read_facts)."""
    return bool(rows) and all(r["fits"] or (r["fits"] is None and r["device"] == "cpu") for r in rows)


def _serve_args(device: str, dtype: str, quantize: str) -> list[str]:
    args = ["--device", "cuda" if device.startswith("cuda") else "cpu", "--dtype", dtype]
    return args + (["--quantize", quantize] if quantize != "none" else [])


def recommend(facts: Facts, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One setting and why: a CUDA GPU first (bf16, the published weights' dtype, then int8, then nf4:
    the fewest bits lost that fit), the GPU with the most free memory on a tie; else the CPU in the dtype
    precision.choose picks, the fastest mode that fits by memory.CPU_WINDOW_TIME (unquantised on a tie:
    quantising costs accuracy); else nothing, with the smallest need. A setting fits when it fits every
    checkpoint in `rows`."""
    notes = []
    if facts.mps and not facts.gpus:
        notes.append("Apple's MPS GPU is available, but the backend runs on CUDA or the CPU only")
    gpus = sorted(facts.gpus, key=lambda g: -(g.free or 0))
    # every GPU at bf16 before any at int8: fewer bits lost beat more free memory
    candidates = [(f"cuda:{g.index}", "bfloat16", q) for q in MODES for g in gpus]
    bf16 = facts.cpu_dtype == "bfloat16"
    cpu_time = {q: memory.CPU_WINDOW_TIME[(bf16 or (q == "int8" and facts.cpu_bf16), q)] for q in MODES}
    candidates += [("cpu", facts.cpu_dtype, q) for q in sorted(MODES, key=cpu_time.__getitem__)]
    for device, dtype, quantize in candidates:
        chosen = _setting(rows, device, dtype, quantize)
        if not _fits_all(chosen):
            continue
        row = min(chosen, key=lambda r: r["batch"])
        why = []
        if device.startswith("cuda"):
            unquantised = _setting(rows, device, dtype, "none")
            if quantize != "none" and unquantised:
                u = max(unquantised, key=lambda r: r["needs_gb"])
                why.append(f"bfloat16 needs {u['needs_gb']:.1f} GiB free and {row['free_gb']:.1f} GiB is")
            why.append(f"{row['device_name']}: {row['message']}")
            capability = next((g.capability for g in facts.gpus if f"cuda:{g.index}" == device), "")
            if capability and float(capability) < BF16_TENSOR_CORES:
                why.append(
                    f"compute capability {capability} has no bf16 tensor cores (Ampere, 8.0, brought "
                    "them): expect it slow; the backend offers no float16"
                )
        else:
            for g in facts.gpus:  # why not there: its smallest-weight setting's refusal
                nf4 = _setting(rows, f"cuda:{g.index}", "bfloat16", "nf4")
                why.append(f"{g.name}: {nf4[0]['message'] if nf4 else 'not planned'}")
            if not facts.gpus:
                why.append("no CUDA GPU is usable")
            why.append(f"the CPU computes in {facts.cpu_dtype_reason}")
            why.append(f"RAM: {row['message']}")
            if cpu_time[quantize] > cpu_time["none"]:
                why.append(
                    f"{quantize} answers in ~{cpu_time[quantize] / cpu_time['none']:.2g}x the unquantised time"
                )
        install = needs_torchao(device, quantize) and not facts.torchao
        if install:
            why.append(f"{quantize} needs torchao, not installed: {QUANTIZE_EXTRA}")
        index = int(device.split(":")[1]) if device.startswith("cuda") else None
        env = {"CUDA_VISIBLE_DEVICES": str(index)} if index else {}  # the backend uses the first visible GPU
        return {
            "device": "cuda" if index is not None else "cpu",
            "gpu": row["device_name"] if index is not None else None,
            "dtype": dtype,
            "quantize": quantize,
            "serve_args": _serve_args(device, dtype, quantize),
            "env": env,
            "batch": row["batch"],
            "install": QUANTIZE_EXTRA if install else None,
            "reason": "; ".join(notes + why),
            "checkpoint": checkpoint_note(),
        }
    smallest = min(rows, key=lambda r: r["needs_gb"]) if rows else None
    reason = (
        f"nothing fits: the smallest setting ({smallest['device']}, {smallest['dtype']}, {smallest['quantize']})"
        f" needs {smallest['needs_gb']:.1f} GiB free, {smallest['free_gb']} GiB is"
        if smallest
        else "nothing to plan"
    )
    return {
        "device": None,
        "gpu": None,
        "dtype": None,
        "quantize": None,
        "serve_args": [],
        "env": {},
        "batch": 0,
        "install": None,
        "reason": "; ".join(notes + [reason]),
        "checkpoint": checkpoint_note(),
    }


def checkpoint_note() -> str:
    uses = "; ".join(f"{name} for {use}" for name, (_, use) in CHECKPOINTS.items())
    return f"{uses}. All three are the same size: the same setting runs each."


# -- reading the machine ---------------------------------------------------------------------------------
def nvidia_driver(timeout_s: float = NVIDIA_SMI_TIMEOUT_S) -> dict[str, Any]:
    """The NVIDIA driver and the CUDA version it supports, from `nvidia-smi`'s header; why not, where not."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"found": False, "driver": None, "cuda": None, "error": "nvidia-smi is not on PATH"}
    try:
        done = subprocess.run([exe], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {
            "found": True,
            "driver": None,
            "cuda": None,
            "error": f"nvidia-smi did not answer in {timeout_s:g} s",
        }
    except OSError as exc:
        return {"found": True, "driver": None, "cuda": None, "error": f"nvidia-smi could not run: {exc}"}
    parsed = parse_nvidia_smi(done.stdout)
    error = None
    if done.returncode != 0 or parsed["driver"] is None:
        lines = (done.stdout + done.stderr).strip().splitlines()
        error = f"nvidia-smi exited {done.returncode}: {lines[0] if lines else 'no output'}"
    return {"found": True, **parsed, "error": error}


def parse_nvidia_smi(text: str) -> dict[str, str | None]:
    """Driver and CUDA versions from nvidia-smi's header line ("Driver Version: 550.54.15  CUDA Version: 12.4")."""
    driver = re.search(r"Driver Version:\s*([0-9][\w.]*)", text)
    cuda = re.search(r"CUDA Version:\s*([0-9][\w.]*)", text)
    return {"driver": driver.group(1) if driver else None, "cuda": cuda.group(1) if cuda else None}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_facts(all_gpus: bool = True) -> tuple[Facts, dict[str, Any]]:
    """This machine's facts, and the details that go into the report beside them. `all_gpus` False measures
    free memory on the current CUDA device only (a server: a context on every GPU would hold memory there
    for the server's life); the others are listed with their total."""
    with warnings.catch_warnings(record=True) as caught:  # e.g. a driver too old for this torch build
        warnings.simplefilter("always")
        usable = torch.cuda.is_available()
        count = torch.cuda.device_count() if usable else 0
    cuda_warnings = sorted({str(w.message).strip() for w in caught if "cuda" in str(w.message).lower()})
    gpus = []
    current = torch.cuda.current_device() if count else None
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        free = None
        if all_gpus or i == current:
            try:
                free = int(torch.cuda.mem_get_info(i)[0])
            except RuntimeError as exc:  # e.g. a GPU in exclusive-process mode held by another process
                cuda_warnings.append(f"GPU {i}: free memory not readable: {exc}")
        gpus.append(Gpu(i, props.name, int(props.total_memory), free, f"{props.major}.{props.minor}"))
    flags = precision.cpu_flags()
    flag = precision.native_bf16(flags)
    chosen = precision.choose("cpu", "auto", memory.EARTHDIAL_4B.llm_hidden, flags)
    ram_free, ram_total = device_memory("cpu")
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    facts = Facts(
        tuple(gpus),
        mps,
        flag is not None,
        chosen.name,
        chosen.reason,
        ram_free,
        ram_total,
        importlib.util.find_spec("torchao") is not None,
    )
    details = {
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,  # the CUDA version torch was built for; None: a CPU build
            "hip": getattr(torch.version, "hip", None),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_usable": usable,
            "cuda_warnings": cuda_warnings,
            "mps_built": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_built()),
        },
        "nvidia_driver": nvidia_driver(),
        "cpu": {"name": _cpu_name(), "cores": os.cpu_count(), "arch": platform.machine(), "bf16": flag},
    }
    return facts, details


def report(facts: Facts, details: dict[str, Any], taken: str = "now") -> dict[str, Any]:
    """The whole report as plain JSON-able data, with `summary`: the lines `earthdial diagnose` prints and
    the plugin's Diagnostics shows."""
    rows = plans(facts)
    out = {
        "schema": SCHEMA,
        "taken": taken,
        "torch": details["torch"],
        "nvidia_driver": details["nvidia_driver"],
        "gpus": [
            {
                **asdict(g),
                "total_gb": round(g.total / memory.GIB, 2),
                "free_gb": None if g.free is None else round(g.free / memory.GIB, 2),
            }
            for g in facts.gpus
        ],
        "mps": {"available": facts.mps, "used": False},
        "cpu": {**details["cpu"], "dtype": facts.cpu_dtype, "dtype_reason": facts.cpu_dtype_reason},
        "ram": {
            "total_gb": None if facts.ram_total is None else round(facts.ram_total / memory.GIB, 2),
            "free_gb": None if facts.ram_free is None else round(facts.ram_free / memory.GIB, 2),
        },
        "torchao": facts.torchao,
        "plan_settings": {"tiles": TILES, "max_new_tokens": MAX_NEW_TOKENS, "want_batch": WANT_BATCH},
        "plans": rows,
        "recommendation": recommend(facts, rows),
    }
    out["summary"] = summary(out)
    return out


def collect(taken: str = "now", all_gpus: bool = True) -> dict[str, Any]:
    facts, details = read_facts(all_gpus)
    return report(facts, details, taken)


def at_start_up() -> dict[str, Any] | None:
    """The report a server keeps for its status, taken before its model loads (free memory then is what
    the machine has, not what is left beside the model); None, said on stderr, where it fails: a report
    must never keep a model from being served."""
    try:
        return collect("at start-up, before the model was loaded", all_gpus=False)
    except Exception as exc:
        print(f"earthdial: no machine report for status ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def _gb(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


def summary(r: dict[str, Any]) -> list[str]:
    """The report in lines of text. Plan rows with the same figures for every checkpoint are one line."""
    t, drv = r["torch"], r["nvidia_driver"]
    lines = [f"machine ({r['taken']}):"]
    for g in r["gpus"]:
        lines.append(
            f"GPU {g['index']}: {g['name']}, {_gb(g['total_gb'])} GiB, {_gb(g['free_gb'])} GiB free, "
            f"compute capability {g['capability']}"
        )
    if not r["gpus"]:
        why = (
            "a CPU-only torch build" if not t["cuda"] and not t["hip"] else "torch sees no usable CUDA device"
        )
        lines.append(f"GPU: none ({why})")
    for w in t["cuda_warnings"]:
        lines.append(f"CUDA warning: {w}")
    if drv["driver"]:
        lines.append(f"NVIDIA driver: {drv['driver']}, supports CUDA {drv['cuda'] or '?'} (nvidia-smi)")
    else:
        lines.append(f"NVIDIA driver: not found ({drv['error']})")
    mps = (
        "available, not used (the backend runs on CUDA or the CPU)"
        if r["mps"]["available"]
        else "not available"
    )
    lines.append(f"Apple MPS: {mps}")
    lines.append(f"torch: {t['version']}, built for CUDA {t['cuda'] or 'none'}, cuDNN {t['cudnn'] or 'none'}")
    c = r["cpu"]
    lines.append(
        f"CPU: {c['name']}, {c['cores']} cores, native bf16: {c['bf16'] or 'no'}; computes in {c['dtype_reason']}"
    )
    lines.append(f"RAM: {_gb(r['ram']['total_gb'])} GiB, {_gb(r['ram']['free_gb'])} GiB free")
    lines.append(
        f"torchao (int8 on CUDA, nf4): {'installed' if r['torchao'] else 'not installed (' + QUANTIZE_EXTRA + ')'}"
    )
    s = r["plan_settings"]
    lines.append(
        f"memory plan ({s['tiles']} tiles, {s['max_new_tokens']} new tokens; GiB; needs: free memory for one request):"
    )
    lines.append(
        f"  {'device':<8} {'dtype':<9} {'quantize':<8} {'weights':>7} {'needs':>6} {'free':>6} {'fits':<4} {'batch':>5}  checkpoints"
    )
    groups: dict[tuple[Any, ...], list[str]] = {}
    for row in r["plans"]:
        key = tuple(
            row[k]
            for k in (
                "device",
                "dtype",
                "quantize",
                "weights_gb",
                "needs_gb",
                "free_gb",
                "fits",
                "batch",
                "needs_torchao",
            )
        )
        groups.setdefault(key, []).append(row["checkpoint"])
    every = len({row["checkpoint"] for row in r["plans"]})
    for (device, dtype, quantize, weights, needs, free, fits, batch, torchao), names in groups.items():
        fit = "?" if fits is None else "yes" if fits else "no"
        who = "all" if len(names) == every else ", ".join(names)
        extra = " (needs torchao)" if torchao else ""
        lines.append(
            f"  {device:<8} {dtype:<9} {quantize:<8} {weights:>7.1f} {needs:>6.1f} {_gb(free):>6} {fit:<4} {batch:>5}  {who}{extra}"
        )
    rec = r["recommendation"]
    if rec["device"]:
        env = " ".join(f"{k}={v}" for k, v in rec["env"].items())
        lines.append(
            f"recommended: {(env + ' ') if env else ''}earthdial serve {' '.join(rec['serve_args'])}"
        )
    else:
        lines.append("recommended: none")
    lines.append(f"why: {rec['reason']}")
    lines.append(f"checkpoints: {rec['checkpoint']}")
    return lines
