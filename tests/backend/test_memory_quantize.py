"""Quantised weights on the CPU, and the start-up memory plan against synthetic budgets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_earthdial
from earthdial.model import checkpoint, memory
from earthdial.model.engine import Engine, Query
from earthdial.model.prompts import build_question
from earthdial.model.quantize import weight_bytes
from earthdial.training import tiny

GIB = 1024**3


def hand_counted_earthdial_4b() -> tuple[int, int, int]:
    """(vision, projector, language model + lm_head) parameters, counted from the published shapes."""
    d, mlp, layers, patches = 1024, 4096, 24, (448 // 14) ** 2
    vit_layer = 3 * (d * d + d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 4 * d + 2 * d
    vision = (3 * 14 * 14 * d + d) + (patches + 1) * d + d + layers * vit_layer
    projector = 2 * 4096 + (4096 * 3072 + 3072) + (3072 * 3072 + 3072)
    h, m, vocab = 3072, 8192, 32064
    llm_layer = 3 * h * h + h * h + 2 * m * h + h * m + 2 * h
    llm = vocab * h + 32 * llm_layer + h + vocab * h
    return vision, projector, llm


def test_the_4b_shapes_match_a_hand_count_and_the_real_config() -> None:
    vision, projector, llm = hand_counted_earthdial_4b()
    shapes = memory.EARTHDIAL_4B
    assert (shapes.vision_params, shapes.projector_params, shapes.llm_params) == (vision, projector, llm)
    from transformers import InternVLForConditionalGeneration

    cfg = tiny.full_size_config(32064, 448)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration._from_config(checkpoint.native_config(cfg, 32002))
    assert memory.Shapes.of(model) == shapes


@pytest.mark.parametrize(
    ("free_gb", "quantize", "batch"),
    [(12, "none", 2), (24, "none", 8), (80, "none", 8), (10, "int8", 4), (12, "int8", 6), (12, "nf4", 8)],
)
def test_largest_batch_that_fits(free_gb: int, quantize: str, batch: int) -> None:
    p = memory.plan(memory.EARTHDIAL_4B, "cuda", free_gb * GIB, 2, quantize, tiles=7, max_new_tokens=300)
    assert p.batch == batch
    # independent arithmetic: KV cache of one 7-tile request = 2 x 32 layers x 32 heads x 96 x seq x 2 bytes
    seq = 7 * 256 + memory.PROMPT_TOKENS + 300
    kv = 2 * 32 * 32 * 96 * seq * 2
    weights = sum(hand_counted_earthdial_4b()[:2]) * 2 + hand_counted_earthdial_4b()[2] * (
        2 if quantize == "none" else memory.BYTES_PER_WEIGHT[quantize]
    )
    assert p.per_request >= kv
    room = free_gb * GIB * 0.9 - memory.CUDA_OVERHEAD - weights
    assert p.batch == min(8, int(room // p.per_request))


def test_a_4gb_card_is_refused_with_what_would_fit() -> None:
    p = memory.plan(memory.EARTHDIAL_4B, "cuda", 4 * GIB, 2, "none")
    assert p.batch == 0
    assert "not enough memory" in p.message and "--device cpu" in p.message
    p = memory.plan(memory.EARTHDIAL_4B, "cuda", 4 * GIB, 2, "nf4")  # the bf16 load alone does not fit
    assert p.batch == 0 and p.alternatives == ["--device cpu"]


def test_a_10gb_card_in_bf16_is_told_to_quantise() -> None:
    p = memory.plan(memory.EARTHDIAL_4B, "cuda", 10 * GIB, 2, "none")
    assert p.batch == 0
    assert "--quantize int8" in p.message and "--quantize nf4" in p.message and "--max-tiles 1" in p.message


def test_an_8gb_card_is_not_told_to_quantise_since_the_weights_load_unquantised() -> None:
    # checkpoint.load puts every bf16 tensor on the GPU and quantize.quantize runs afterwards: 7.7 GiB of
    # weights + the CUDA context must fit first, whatever --quantize says
    p = memory.plan(memory.EARTHDIAL_4B, "cuda", 8 * GIB, 2, "none")
    assert p.batch == 0 and p.alternatives == ["--device cpu"]
    q = memory.plan(memory.EARTHDIAL_4B, "cuda", 8 * GIB, 2, "int8")
    assert q.batch == 0 and "the weights load unquantised, 16-bit, before any quantising" in q.message
    assert q.alternatives == ["--device cpu"]


def test_a_cpu_without_bf16_that_cannot_hold_fp32_is_told_int8_and_how_much_slower() -> None:
    assert memory.plan(memory.EARTHDIAL_4B, "cpu", 24 * GIB, 4, "none").batch >= 1
    # fp32's weights load but leave no room for a request: int8, the fastest that fits, with its slow-down
    tight = memory.plan(memory.EARTHDIAL_4B, "cpu", int(17.6 * GIB), 4, "none", cpu_bf16=False)
    assert tight.batch == 0 and "--device cpu" not in tight.message and "bfloat16" not in tight.message
    assert tight.alternatives[0] == "--dtype float32 --quantize int8 (~2x slower than this setting on a CPU)"
    assert "nf4" not in tight.message  # never nf4 where int8 fits
    # fp32's weights cannot be loaded to be quantised at all: int8 is not offered (it would not load)
    small = memory.plan(memory.EARTHDIAL_4B, "cpu", 12 * GIB, 4, "none", cpu_bf16=False)
    assert small.batch == 0 and "--quantize" not in small.message


def test_a_bf16_cpu_that_cannot_hold_fp32_is_told_bf16_not_quantisation() -> None:
    small = memory.plan(memory.EARTHDIAL_4B, "cpu", 12 * GIB, 4, "none", cpu_bf16=True)
    assert small.batch == 0
    assert small.alternatives[0] == "--dtype bfloat16 (faster than this setting on a CPU)"
    assert "--quantize" not in small.message


def test_a_cpu_plan_never_advises_a_slower_mode_than_one_that_fits() -> None:
    # nf4 was asked for and fits, but bf16 fits too and is measured far faster: the plan says so
    p = memory.plan(memory.EARTHDIAL_4B, "cpu", 24 * GIB, 2, "nf4", cpu_bf16=True)
    assert p.batch >= 1 and "--dtype bfloat16 would fit too" in p.message
    # bf16 asked for and fitting: nothing faster to name
    p = memory.plan(memory.EARTHDIAL_4B, "cpu", 24 * GIB, 2, "none", cpu_bf16=True)
    assert p.batch >= 1 and "would fit too" not in p.message
    # bf16's weights load but leave no room for a request: int8 (loaded in bf16, then quantised) is named,
    # with how its speed compares, and nf4 (slower still) is not
    tight = memory.plan(memory.EARTHDIAL_4B, "cpu", int(9.2 * GIB), 2, "none", cpu_bf16=True)
    assert tight.batch == 0 and tight.alternatives[0].startswith("--dtype bfloat16 --quantize int8 (")
    assert "than this setting on a CPU" in tight.alternatives[0] and "nf4" not in tight.message
    # the weights cannot even be loaded to be quantised: nothing is named
    small = memory.plan(memory.EARTHDIAL_4B, "cpu", 6 * GIB, 2, "none", cpu_bf16=True)
    assert small.batch == 0 and small.alternatives == [] and "nothing smaller would fit" in small.message


def test_unknown_free_memory_plans_the_batch_asked_for() -> None:
    assert memory.plan(memory.EARTHDIAL_4B, "cpu", None, 4, "none", want_batch=3).batch == 3


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantised_model_answers_on_the_cpu(tiny_checkpoint: Path, mode: str) -> None:
    engine = Engine(str(tiny_checkpoint), device="cpu", quantize=mode)
    report = engine.quantization
    assert report["mode"] == mode and report["quantised"] >= 1
    # int8 on a CPU: PyTorch's int8 weight-only kernel, not torchao's convert-the-weight-every-call path
    assert (
        report["kernel"] == "torchao"
        if mode == "nf4"
        else report["kernel"].startswith("aten._weight_int8pack_mm")
    )
    assert report["bytes_after"] < report["bytes_before"] == weight_bytes(checkpoint.load(tiny_checkpoint)[0])
    image = engine.image(
        (np.random.default_rng(0).random((3, 64, 64)) * 255).astype(np.uint8), "[hr_rgb_0.5]"
    )
    (answer,) = engine.generate([Query(build_question("refer", "ships"), [image], 8)])
    assert isinstance(answer, str)
    assert engine.describe()["quantize"] == mode


def test_serve_plans_memory_and_reports_it_in_status(tiny_checkpoint: Path) -> None:
    import json

    from conftest import free_port, start_server

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(tiny_checkpoint, endpoint, extra=("--quantize", "int8", "--max-batch", "3"))
    try:
        out = run_earthdial("status", "--endpoint", endpoint, "--json", timeout=60)
        model = json.loads(out.stdout)["model"]
        assert model["quantize"] == "int8" and model["plan"]["batch"] == 3
        assert model["memory"]["free_gb"] > 0
    finally:
        proc.terminate()
        proc.wait(10)
