"""The dtype a CPU engine computes in (bf16 where native and measured faster, fp32 otherwise), its
override, and the CPU int8 layer that replaced torchao's there."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_earthdial
from earthdial.model import precision
from earthdial.model.engine import Engine, Query
from earthdial.model.precision import Probe, choose
from earthdial.model.prompts import build_question
from earthdial.model.quantize import PACK_MAX_ROWS, CpuInt8Linear

BF16_CPU = frozenset({"fpu", "avx512f", "avx512_bf16"})
PLAIN_CPU = frozenset({"fpu", "avx2", "fma"})
FULL_WIDTH = 3072  # EarthDial-4B's language model


class Recorded:
    """A probe outcome given by the test, remembering the widths it was asked for."""

    def __init__(self, fp32_s: float, bf16_s: float) -> None:
        self.outcome = Probe(fp32_s, bf16_s)
        self.widths: list[int] = []

    def __call__(self, width: int) -> Probe:
        self.widths.append(width)
        return self.outcome


def answer(engine: Engine) -> str:
    image = engine.image(
        (np.random.default_rng(0).random((3, 64, 64)) * 255).astype(np.uint8), "[hr_rgb_0.5]"
    )
    (text,) = engine.generate([Query(build_question("refer", "ships"), [image], 6)])
    return text


def test_a_bf16_cpu_whose_probe_finds_bf16_faster_loads_the_model_in_bf16(tiny_checkpoint: Path) -> None:
    probe = Recorded(fp32_s=0.020, bf16_s=0.010)
    chosen = choose("cpu", "auto", FULL_WIDTH, flags=BF16_CPU, run_probe=probe)
    assert chosen.dtype == torch.bfloat16 and probe.widths == [FULL_WIDTH]
    assert "avx512_bf16" in chosen.reason and "2.00x" in chosen.reason
    engine = Engine(str(tiny_checkpoint), device="cpu", dtype=chosen)
    assert {p.dtype for p in engine.model.parameters() if p.is_floating_point()} == {torch.bfloat16}
    assert engine.describe()["dtype"] == "bfloat16" and engine.describe()["dtype_reason"] == chosen.reason
    assert isinstance(answer(engine), str)


def test_a_bf16_cpu_whose_probe_finds_no_gain_stays_in_fp32(tiny_checkpoint: Path) -> None:
    probe = Recorded(fp32_s=0.010, bf16_s=0.0095)  # 1.05x: within a busy CPU's noise
    chosen = choose("cpu", "auto", FULL_WIDTH, flags=BF16_CPU, run_probe=probe)
    assert chosen.dtype == torch.float32 and probe.widths == [FULL_WIDTH]
    assert "1.05x" in chosen.reason and "under" in chosen.reason
    engine = Engine(str(tiny_checkpoint), device="cpu", dtype=chosen)
    assert engine.model.dtype == torch.float32 and engine.describe()["dtype_reason"] == chosen.reason


def test_a_cpu_without_bf16_is_not_probed_and_stays_in_fp32() -> None:
    probe = Recorded(fp32_s=0.020, bf16_s=0.010)
    chosen = choose("cpu", "auto", FULL_WIDTH, flags=PLAIN_CPU, run_probe=probe)
    assert chosen.dtype == torch.float32 and "no native bf16" in chosen.reason
    assert probe.widths == []


def test_small_models_stay_in_fp32_without_a_probe(tiny_checkpoint: Path) -> None:
    probe = Recorded(fp32_s=0.020, bf16_s=0.010)
    width = precision.llm_width(tiny_checkpoint)
    assert width is not None and width < precision.MIN_HIDDEN_FOR_BF16
    chosen = choose("cpu", "auto", width, flags=BF16_CPU, run_probe=probe)
    assert chosen.dtype == torch.float32 and "small model" in chosen.reason and probe.widths == []
    # the Engine's own default takes this path: tests and the demo model stay in fp32 on any CPU
    assert Engine(str(tiny_checkpoint), device="cpu").model.dtype == torch.float32


@pytest.mark.parametrize(
    ("asked", "dtype"),
    [
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float32", torch.float32),
        ("fp32", torch.float32),
    ],
)
def test_dtype_overrides_flags_and_probe(asked: str, dtype: torch.dtype) -> None:
    probe = Recorded(fp32_s=0.020, bf16_s=0.010)
    chosen = choose(
        "cpu", asked, FULL_WIDTH, flags=PLAIN_CPU if dtype == torch.bfloat16 else BF16_CPU, run_probe=probe
    )
    assert chosen.dtype == dtype and "--dtype" in chosen.reason and probe.widths == []


def test_cuda_is_bf16_and_unknown_dtypes_are_refused() -> None:
    assert choose("cuda", "auto").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float16"):
        choose("cpu", "float16")


def test_the_real_probe_times_both_dtypes_and_leaves_the_thread_count() -> None:
    threads = torch.get_num_threads()
    result = precision.probe(256, repeats=1)
    assert result.fp32_s > 0 and result.bf16_s > 0 and result.took_s >= result.fp32_s + result.bf16_s
    assert torch.get_num_threads() == threads


def test_cpu_flags_name_bf16_when_proc_cpuinfo_does() -> None:
    with open("/proc/cpuinfo") as fh:
        text = fh.read()
    flags = precision.cpu_flags()
    assert flags, "no flags read from /proc/cpuinfo"
    assert (precision.native_bf16(flags) is not None) == any(f" {f}" in text for f in precision.BF16_FLAGS)


@pytest.mark.parametrize("rows", [1, PACK_MAX_ROWS, PACK_MAX_ROWS + 1, 40])
@pytest.mark.parametrize(("k", "kernel"), [(64, True), (40, False)])  # 40: the kernel cannot take it
def test_cpu_int8_linear_matches_the_dense_product(rows: int, k: int, kernel: bool) -> None:
    torch.manual_seed(0)
    dense = torch.nn.Linear(k, 48)
    layer = CpuInt8Linear(dense, torch.bfloat16)
    assert layer.packed_kernel is kernel and layer.qweight.dtype == torch.int8
    x = torch.randn(2, rows, k)
    with torch.no_grad():
        want, got = dense(x), layer(x)
    assert got.dtype == x.dtype and got.shape == want.shape
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_cpu_int8_engine_reports_its_kernel(tiny_checkpoint: Path) -> None:
    engine = Engine(str(tiny_checkpoint), device="cpu", quantize="int8", dtype="bfloat16")
    assert engine.quantization["kernel"].startswith("aten._weight_int8pack_mm")
    layers = [m for m in engine.model.modules() if isinstance(m, CpuInt8Linear)]
    assert len(layers) == engine.quantization["quantised"] and layers
    assert not any(isinstance(m, torch.nn.Linear) for m in engine.model.model.language_model.modules())
    assert engine.describe()["quantize_kernel"] == engine.quantization["kernel"]
    assert isinstance(answer(engine), str)


def test_serve_dtype_option_and_status_say_which_and_why(tiny_checkpoint: Path) -> None:
    from conftest import free_port, start_server, stop_server

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(tiny_checkpoint, endpoint, extra=("--dtype", "bf16"))
    try:
        out = run_earthdial("status", "--endpoint", endpoint, "--json", timeout=60)
        model = json.loads(out.stdout)["model"]
        assert model["dtype"] == "bfloat16" and model["dtype_reason"] == "bfloat16: asked for (--dtype)"
        text = run_earthdial("status", "--endpoint", endpoint, timeout=60).stdout
        assert "dtype     bfloat16: asked for (--dtype)" in text
    finally:
        stop_server(proc)


def test_cpu_int8_frees_each_full_precision_weight_as_it_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    # the load peak of an int8 model is its bf16 weights, not bf16 + int8 (12.2 GiB for EarthDial-4B)
    from earthdial.model import quantize

    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 64)) for _ in range(4)])
    originals = [weakref.ref(block[0]) for block in model]
    alive: list[int] = []

    class Watched(quantize.CpuInt8Linear):
        def __init__(self, linear: torch.nn.Linear, compute_dtype: torch.dtype) -> None:
            alive.append(sum(ref() is not None for ref in originals))  # the one being quantised included
            super().__init__(linear, compute_dtype)

    monkeypatch.setattr(quantize, "CpuInt8Linear", Watched)
    _, count = quantize._to_cpu_int8(model, torch.bfloat16)
    assert count == 4 and alive == [4, 3, 2, 1]
    assert all(ref() is None for ref in originals)
