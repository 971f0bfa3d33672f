"""8-bit and 4-bit weights for the language model: torchao on CUDA (and NF4 on a CPU), PyTorch's own int8
weight-only kernel for int8 on a CPU.

Why torchao: its int8 weight-only and NF4 tensors run on both CUDA and CPU with plain PyTorch kernels
(bitsandbytes is CUDA-first; optimum-quanto builds extensions at run time). The language model (Phi-3,
~92% of EarthDial's weights, lm_head included) is quantised; the vision tower and projector stay in the
model's dtype: they are small and the image features are sensitive to them.

Why not torchao's int8 on a CPU: run eagerly, its weight-only linear converts the whole int8 weight to the
activations' dtype on every call and multiplies by the transposed copy (it is written to be fused by
torch.compile). On the 2-core AVX-512-BF16 development CPU one 3072 -> 8192 product of one row took 104 ms
that way against 15 ms in fp32, and EarthDial-4B decoded at 0.2 tokens/s against fp32's 1.2. PyTorch's
`aten._weight_int8pack_mm` reads the int8 weight directly: 2.2 ms for the same row with bf16 activations
(44 ms with fp32 ones), so `CpuInt8Linear` computes in bf16. It loses to a dense bf16 product from about 16
rows on (prefill), where the weight is dequantised to bf16 once per call instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.model.precision import cpu_flags, native_bf16

MODES = ("none", "int8", "nf4")
# bytes per weight of each mode, scales included (int8: one scale per output row; nf4: 0.5 byte + block
# scales of 1 byte per 64 weights + a float per 256 blocks), for memory plans.
BYTES_PER_WEIGHT = {"int8": 1.0 + 1 / 1024, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256
PACK_MAX_ROWS = 12  # rows (tokens x batch) up to which the int8 kernel beats dequantise + bf16 product
PACK_K_MULTIPLE = 16  # the kernel's input width must be a multiple of 16 (other widths crash or go wrong)


class CpuInt8Linear(nn.Module):
    """A Linear with int8 weights (symmetric, one scale per output row) computed in `compute_dtype` on a
    CPU: few rows through `aten._weight_int8pack_mm`, many through a dequantised dense product."""

    qweight: torch.Tensor  # (out, in) int8
    scale: torch.Tensor  # (out,) in compute_dtype

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(compute_dtype))
        self.bias = linear.bias
        self.packed_kernel = self.in_features % PACK_K_MULTIPLE == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous()
        if self.packed_kernel and rows.shape[0] <= PACK_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scale)
        else:
            y = nn.functional.linear(rows, self.qweight.to(self.compute_dtype) * self.scale[:, None])
        if self.bias is not None:
            y = y + self.bias.to(self.compute_dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int8 -> {self.compute_dtype}"
        )


def cpu_int8_compute_dtype() -> torch.dtype:
    """bf16 where the CPU has it natively (the int8 kernel's fast path), else fp32."""
    return torch.bfloat16 if native_bf16(cpu_flags()) else torch.float32


def _to_cpu_int8(target: nn.Module, compute_dtype: torch.dtype) -> tuple[nn.Module, int]:
    """`target` with every nn.Linear in it (or itself) replaced by a CpuInt8Linear; (module, count)."""
    if isinstance(target, nn.Linear):
        return CpuInt8Linear(target, compute_dtype), 1
    # the parents only: a list of the Linears themselves would keep every full-precision weight alive
    # until the end (EarthDial-4B's load peak went from the bf16 weights' 8 GB to 12.8 GB that way)
    parents = [m for m in target.modules() if any(isinstance(c, nn.Linear) for c in m.children())]
    count = 0
    for parent in parents:
        for name in [n for n, c in parent.named_children() if isinstance(c, nn.Linear)]:
            setattr(parent, name, CpuInt8Linear(getattr(parent, name), compute_dtype))
            count += 1
    return target, count


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters take, counting the inner tensors of quantised ones."""
    total = sum(
        m.qweight.numel() + m.scale.numel() * m.scale.element_size()
        for m in module.modules()
        if isinstance(m, CpuInt8Linear)
    )
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
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise EarthDialError(
            ErrorCode.MISSING_DEPENDENCY,
            "--quantize needs torchao, which is not installed: pip install 'earthdial-qgis[quantize]' "
            "(or pip install 'torchao>=0.12' into the backend's environment)",
        ) from None


def quantize(model: Any, mode: str, cpu_compute_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Quantise the language model (and its lm_head) of an InternVLForConditionalGeneration in place.
    Returns a report: mode, bytes before/after, layers quantised and kept, and the int8 kernel used.
    `cpu_compute_dtype`: what int8 computes in on a CPU (default: bf16 where native, else fp32)."""
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {MODES}, got {mode!r}")
    if mode == "nf4":  # torchao's on every device; int8 on a CPU runs PyTorch's own kernel
        _require_torchao()
    on_cpu = model.device.type == "cpu"
    if mode == "int8" and not on_cpu:
        _require_torchao()
    before = weight_bytes(model)
    targets = [model.model.language_model, model.lm_head]
    kept = 0
    quantised = 0
    kernel = None
    if mode == "int8" and on_cpu:
        compute = cpu_compute_dtype or cpu_int8_compute_dtype()
        model.model.language_model, n_llm = _to_cpu_int8(model.model.language_model, compute)
        model.lm_head, n_head = _to_cpu_int8(model.lm_head, compute)
        quantised = n_llm + n_head
        kernel = f"aten._weight_int8pack_mm, {str(compute).removeprefix('torch.')} activations"
    elif mode == "int8":
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
        "kernel": kernel or ("torchao" if mode != "none" else None),
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
