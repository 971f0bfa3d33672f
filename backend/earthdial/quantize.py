"""8-bit and 4-bit weights for the language model, through torchao.

Why torchao: its int8 weight-only and NF4 tensors run on both CUDA and CPU with plain PyTorch kernels
(bitsandbytes is CUDA-first; optimum-quanto builds extensions at run time). The language model (Phi-3,
~92% of EarthDial's weights, lm_head included) is quantised; the vision tower and projector stay in the
model's dtype: they are small and the image features are sensitive to them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MODES = ("none", "int8", "nf4")
# bytes per weight of each mode, scales included (int8: one scale per output row; nf4: 0.5 byte + block
# scales of 1 byte per 64 weights + a float per 256 blocks), for memory plans.
BYTES_PER_WEIGHT = {"int8": 1.0 + 1 / 1024, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters take, counting the inner tensors of quantised ones."""
    total = 0
    for p in module.parameters():
        inner = [
            getattr(p, name)
            for name in ("quantized_data", "scaler_blocks", "quantized_scalers")
            if hasattr(p, name)
        ]
        if inner:  # NF4
            total += sum(t.numel() * t.element_size() for t in inner)
            continue
        qdata, scale = getattr(p, "qdata", None), getattr(p, "scale", None)
        if qdata is not None and scale is not None:  # torchao int8: int8 data and a scale per row
            total += qdata.numel() * qdata.element_size() + scale.numel() * scale.element_size()
            continue
        total += p.numel() * p.element_size()
    return total


def _require_torchao() -> None:
    """torchao is an extra (`[quantize]`): say how to get it instead of failing on an import deep inside."""
    from .protocol import EarthDialError, ErrorCode

    try:
        import torchao  # noqa: F401
    except ImportError:
        raise EarthDialError(
            ErrorCode.MISSING_DEPENDENCY,
            "--quantize needs torchao, which is not installed: pip install 'earthdial-qgis[quantize]' "
            "(or pip install 'torchao>=0.12' into the backend's environment)",
        ) from None


def quantize(model: Any, mode: str) -> dict[str, Any]:
    """Quantise the language model (and its lm_head) of an InternVLForConditionalGeneration in place.
    Returns a report: mode, bytes before/after, layers quantised and kept."""
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {MODES}, got {mode!r}")
    if mode != "none":
        _require_torchao()
    before = weight_bytes(model)
    targets = [model.model.language_model, model.lm_head]
    kept = 0
    quantised = 0
    if mode == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        for target in targets:
            quantize_(target, Int8WeightOnlyConfig())
        quantised = sum(1 for t in targets for m in t.modules() if isinstance(m, nn.Linear))
    elif mode == "nf4":
        from torchao.quantization import to_nf4

        for target in targets:
            for module in [m for m in target.modules() if isinstance(m, nn.Linear)]:
                w = module.weight
                if w.numel() % (NF4_BLOCK * NF4_SCALER_BLOCK):
                    kept += 1  # too small to block-quantise (tiny test models only)
                    continue
                module.weight = nn.Parameter(
                    to_nf4(w.detach(), NF4_BLOCK, NF4_SCALER_BLOCK), requires_grad=False
                )
                quantised += 1
    return {
        "mode": mode,
        "bytes_before": before,
        "bytes_after": weight_bytes(model),
        "quantised": quantised,
        "kept": kept,
    }


def device_memory(device: str) -> tuple[int | None, int | None]:
    """(free, total) bytes of the device: CUDA's own figures, or available RAM on the CPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return int(free), int(total)
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        return info.get("MemAvailable"), info.get("MemTotal")
    except OSError:
        return None, None
