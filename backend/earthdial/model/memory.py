"""A memory plan at start-up: what the weights, the KV cache and the activations need, against what the
device has free; the largest batch that fits, or a refusal that names what would fit.

All figures are estimates from the model's shapes (parameter counts by part, layers, heads), not
measurements; docs/performance.md compares them with measured peaks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from earthdial.model.checkpoint import native_config
from earthdial.model.quantize import BYTES_PER_WEIGHT

GIB = 1024**3
RESERVE_FRACTION = 0.10  # left free for the allocator's fragmentation and other processes
CUDA_OVERHEAD = 0.6 * GIB  # CUDA context, cuBLAS workspaces
PROMPT_TOKENS = 120  # system message + task prompt, in tokens
MAX_BATCH = 64

# One 448 px window's time on a CPU as a multiple of fp32's, by (computes in bf16, quantize). bf16 and int8:
# EarthDial-4B's shapes on the 2-core AVX-512-BF16 development CPU (benchmarks/bench_cpu.py,
# docs/performance.md). Estimated from one layer's products there (a whole window of nf4 would take
# most of an hour): int8 without bf16 (fp32 activations: 2.9x fp32's time per decode row) and nf4
# (7x bf16 in prefill, 70x in decode; without bf16 not measured, taken as the same).
# A CPU plan never advises a mode slower than another one that fits.
CPU_WINDOW_TIME = {
    (False, "none"): 1.0,
    (True, "none"): 0.55,
    (True, "int8"): 0.55,  # 0.76-0.98x bf16's window in two runs: taken as equal (int8 costs accuracy)
    (False, "int8"): 2.0,
    (True, "nf4"): 18.0,
    (False, "nf4"): 18.0,
}


@dataclass(frozen=True)
class Shapes:
    """What the plan needs to know about a model."""

    vision_params: int
    projector_params: int
    llm_params: int  # language model + lm_head
    llm_layers: int
    kv_heads: int
    head_dim: int
    vision_tokens_per_tile: int  # patches + CLS
    vision_hidden: int
    vision_mlp: int
    tokens_per_tile: int  # image tokens the LLM sees per tile
    llm_hidden: int
    llm_mlp: int

    @classmethod
    def of(cls, model: Any) -> Shapes:
        cfg = model.config
        vc, tc = cfg.vision_config, cfg.text_config
        count = lambda prefix: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))  # noqa: E731
        size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        return cls(
            vision_params=count("model.vision_tower"),
            projector_params=count("model.multi_modal_projector"),
            llm_params=count("model.language_model") + count("lm_head"),
            llm_layers=tc.num_hidden_layers,
            kv_heads=tc.num_key_value_heads,
            head_dim=tc.hidden_size // tc.num_attention_heads,
            vision_tokens_per_tile=(size // patch) ** 2 + 1,
            vision_hidden=vc.hidden_size,
            vision_mlp=vc.intermediate_size,
            tokens_per_tile=cfg.image_seq_length,
            llm_hidden=tc.hidden_size,
            llm_mlp=tc.intermediate_size,
        )


def shapes_of_checkpoint(directory: str) -> Shapes:
    """A checkpoint's shapes from its config alone (a model on the meta device: no weights read)."""
    from transformers import InternVLForConditionalGeneration  # transformers: only to build a model

    cfg = json.loads((Path(directory) / "config.json").read_text())
    with torch.device("meta"):
        model = InternVLForConditionalGeneration._from_config(native_config(cfg, image_token_id=0))
    return Shapes.of(model)


# EarthDial-4B at 448 px tiles (InternViT-300M + Phi-3-mini), counted from the published shapes.
EARTHDIAL_4B = Shapes(
    vision_params=304_012_288,
    projector_params=22_034_432,
    llm_params=3_821_079_552,
    llm_layers=32,
    kv_heads=32,
    head_dim=96,
    vision_tokens_per_tile=1025,
    vision_hidden=1024,
    vision_mlp=4096,
    tokens_per_tile=256,
    llm_hidden=3072,
    llm_mlp=8192,
)


@dataclass
class Plan:
    device: str
    dtype_bytes: int
    quantize: str
    weights: int  # bytes
    per_request: int  # KV cache + activations of one request at the planned sequence length
    free: int | None
    batch: int  # largest batch that fits (0: nothing fits)
    seq_len: int
    tiles: int
    message: str
    alternatives: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "quantize": self.quantize,
            "weights_gb": round(self.weights / GIB, 3),
            "per_request_gb": round(self.per_request / GIB, 3),
            "free_gb": None if self.free is None else round(self.free / GIB, 3),
            "batch": self.batch,
            "seq_len": self.seq_len,
            "tiles": self.tiles,
            "message": self.message,
        }


def weights_bytes(shapes: Shapes, dtype_bytes: int, quantize: str) -> int:
    llm = shapes.llm_params * (BYTES_PER_WEIGHT[quantize] if quantize != "none" else dtype_bytes)
    return int((shapes.vision_params + shapes.projector_params) * dtype_bytes + llm)


def request_bytes(shapes: Shapes, dtype_bytes: int, tiles: int, max_new_tokens: int) -> tuple[int, int]:
    """(bytes, sequence length) of one request: its KV cache at full length, plus the larger of the vision
    tower's and the prefill's transient activations."""
    seq = tiles * shapes.tokens_per_tile + PROMPT_TOKENS + max_new_tokens
    kv = 2 * shapes.llm_layers * shapes.kv_heads * shapes.head_dim * seq * dtype_bytes
    # vision: every tile's hidden states and MLP expansion live at once in one layer
    vision = (
        tiles * shapes.vision_tokens_per_tile * (3 * shapes.vision_hidden + shapes.vision_mlp) * dtype_bytes
    )
    # prefill: one layer's hidden, qkv and gate/up projections over the whole prompt (sdpa: no seq^2 matrix)
    prefill = seq * (4 * shapes.llm_hidden + 2 * shapes.llm_mlp) * dtype_bytes
    return int(kv + max(vision, prefill)), seq


def plan(
    shapes: Shapes,
    device: str,
    free: int | None,
    dtype_bytes: int,
    quantize: str = "none",
    tiles: int = 7,
    max_new_tokens: int = 300,
    want_batch: int = 8,
    cpu_bf16: bool = False,
) -> Plan:
    """The largest batch (up to `want_batch`) that fits in `free` bytes, or a refusal naming what fits.
    `cpu_bf16`: the CPU computes bf16 natively (precision.native_bf16), for a CPU plan's advice."""
    if not device.startswith("cuda"):
        return _cpu_plan(
            shapes, device, free, dtype_bytes, quantize, tiles, max_new_tokens, want_batch, cpu_bf16
        )
    weights = weights_bytes(shapes, dtype_bytes, quantize)
    per, seq = request_bytes(shapes, dtype_bytes, tiles, max_new_tokens)
    overhead = CUDA_OVERHEAD if device.startswith("cuda") else 0
    if free is None:  # unknown: plan the batch asked for
        return Plan(
            device, dtype_bytes, quantize, weights, per, None, want_batch, seq, tiles, "free memory unknown"
        )
    loads = _loads(shapes, free, dtype_bytes, device)
    batch = (
        _batch(shapes, device, free, dtype_bytes, quantize, tiles, max_new_tokens, want_batch) if loads else 0
    )
    need = max(weights + overhead + per, weights_bytes(shapes, dtype_bytes, "none") + overhead)
    if batch >= 1:
        message = (
            f"weights {weights / GIB:.1f} GiB + {batch} x {per / GIB:.2f} GiB per request fit in "
            f"{free / GIB:.1f} GiB free"
        )
        return Plan(device, dtype_bytes, quantize, weights, per, free, batch, seq, tiles, message)
    alternatives = []
    for q in ("int8", "nf4"):
        if q != quantize and loads and _fits(shapes, device, free, dtype_bytes, q, tiles, max_new_tokens):
            alternatives.append(f"--quantize {q}")
    if tiles > 1 and loads and _fits(shapes, device, free, dtype_bytes, quantize, 1, max_new_tokens):
        alternatives.append("--max-tiles 1 (fewer tiles)")
    if device.startswith("cuda"):
        alternatives.append("--device cpu")
    hint = "; try " + " or ".join(alternatives) if alternatives else "; nothing smaller would fit either"
    if not loads and quantize != "none":  # quantising happens after the load: it cannot lower this peak
        hint = f" (the weights load unquantised, {8 * dtype_bytes}-bit, before any quantising){hint}"
    message = (
        f"not enough memory on {device}: one request needs {need / GIB:.1f} GiB (weights {weights / GIB:.1f} GiB "
        f"{quantize if quantize != 'none' else f'{8 * dtype_bytes}-bit'}), {free / GIB:.1f} GiB is free{hint}"
    )
    return Plan(device, dtype_bytes, quantize, weights, per, free, 0, seq, tiles, message, alternatives)


def min_free(
    shapes: Shapes,
    device: str,
    dtype_bytes: int,
    quantize: str = "none",
    tiles: int = 7,
    max_new_tokens: int = 300,
) -> int:
    """The free bytes `plan` needs to fit one request (batch 1): the same sums as `_batch`, solved for free
    memory, and at least enough to load the unquantised weights (`_loads`)."""
    weights = weights_bytes(shapes, dtype_bytes, quantize)
    per, _ = request_bytes(shapes, dtype_bytes, tiles, max_new_tokens)
    overhead = CUDA_OVERHEAD if device.startswith("cuda") else 0
    need = max(weights + overhead + per, weights_bytes(shapes, dtype_bytes, "none") + overhead)
    return math.ceil(need / (1 - RESERVE_FRACTION)) + 1


def _batch(
    shapes: Shapes, device: str, free: int, dtype_bytes: int, quantize: str, tiles: int, new: int, want: int
) -> int:
    weights = weights_bytes(shapes, dtype_bytes, quantize)
    per, _ = request_bytes(shapes, dtype_bytes, tiles, new)
    overhead = CUDA_OVERHEAD if device.startswith("cuda") else 0
    budget = free * (1 - RESERVE_FRACTION) - overhead - weights
    return int(max(0, min(want, MAX_BATCH, budget // per))) if budget > 0 else 0


def _fits(
    shapes: Shapes, device: str, free: int, dtype_bytes: int, quantize: str, tiles: int, new: int
) -> bool:
    return _batch(shapes, device, free, dtype_bytes, quantize, tiles, new, 1) >= 1


def _cpu_plan(
    shapes: Shapes,
    device: str,
    free: int | None,
    dtype_bytes: int,
    quantize: str,
    tiles: int,
    new: int,
    want: int,
    cpu_bf16: bool,
) -> Plan:
    """A CPU plan: as `plan`, but its advice is by measured speed (CPU_WINDOW_TIME): the fastest setting
    that fits first; a quantised one only where it is as fast, or nothing faster fits, with its slow-down."""
    weights = weights_bytes(shapes, dtype_bytes, quantize)
    per, seq = request_bytes(shapes, dtype_bytes, tiles, new)
    if free is None:
        return Plan(
            device, dtype_bytes, quantize, weights, per, None, want, seq, tiles, "free memory unknown"
        )
    batch = (
        _batch(shapes, device, free, dtype_bytes, quantize, tiles, new, want)
        if _loads(shapes, free, dtype_bytes)
        else 0
    )
    bf16 = dtype_bytes == 2 or (quantize == "int8" and cpu_bf16)  # CPU int8 computes in bf16 where native
    now = CPU_WINDOW_TIME[(bf16, quantize)]
    fitting = [
        (CPU_WINDOW_TIME[(b == 2 or (q == "int8" and cpu_bf16), q)], flags)
        for b, q, flags in _cpu_settings(cpu_bf16)
        if (b, q) != (dtype_bytes, quantize)
        and _loads(shapes, free, b)
        and _fits(shapes, device, free, b, q, tiles, new)
    ]
    fitting.sort()
    if batch >= 1:
        message = (
            f"weights {weights / GIB:.1f} GiB + {batch} x {per / GIB:.2f} GiB per request fit in "
            f"{free / GIB:.1f} GiB free"
        )
        if fitting and fitting[0][0] < now:
            message += f"; {fitting[0][1]} would fit too and answer in ~{fitting[0][0] / now:.2g}x the time"
        return Plan(device, dtype_bytes, quantize, weights, per, free, batch, seq, tiles, message)
    alternatives = []
    if fitting:
        speed, flags = fitting[0]
        note = "faster" if speed < now else "as fast" if speed == now else f"~{speed / now:.2g}x slower"
        alternatives.append(f"{flags} ({note} than this setting on a CPU)")
    if (
        tiles > 1
        and _loads(shapes, free, dtype_bytes)
        and _fits(shapes, device, free, dtype_bytes, quantize, 1, new)
    ):
        alternatives.append("--max-tiles 1 (fewer tiles)")
    hint = "; try " + " or ".join(alternatives) if alternatives else "; nothing smaller would fit either"
    need = max(weights + per, weights_bytes(shapes, dtype_bytes, "none"))
    message = (
        f"not enough memory on {device}: one request needs {need / GIB:.1f} GiB (weights {weights / GIB:.1f} GiB "
        f"{quantize if quantize != 'none' else f'{8 * dtype_bytes}-bit'}), {free / GIB:.1f} GiB is free{hint}"
    )
    return Plan(device, dtype_bytes, quantize, weights, per, free, 0, seq, tiles, message, alternatives)


def _loads(shapes: Shapes, free: int, dtype_bytes: int, device: str = "cpu") -> bool:
    """Whether the weights load at all: checkpoint.load puts every tensor on the device in the model's
    dtype and quantize.quantize runs afterwards, so a quantised model's load peaks at its unquantised
    weights (measured on a CPU: docs/performance.md), on a GPU beside the CUDA context."""
    overhead = CUDA_OVERHEAD if device.startswith("cuda") else 0
    return weights_bytes(shapes, dtype_bytes, "none") + overhead <= free * (1 - RESERVE_FRACTION)


def _cpu_settings(cpu_bf16: bool) -> list[tuple[int, str, str]]:
    """(dtype bytes, quantize, serve flags) a CPU can run; bf16 ones only where the CPU has it natively."""
    out = [
        (4, "none", "--dtype float32"),
        (4, "int8", "--dtype float32 --quantize int8"),
        (4, "nf4", "--dtype float32 --quantize nf4"),
    ]
    if cpu_bf16:
        out += [
            (2, "none", "--dtype bfloat16"),
            (2, "int8", "--dtype bfloat16 --quantize int8"),
            (2, "nf4", "--dtype bfloat16 --quantize nf4"),
        ]
    return out
