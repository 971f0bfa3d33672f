"""The static-cache (and compiled) greedy decode path gives the dynamic path's answers exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_earthdial
from earthdial import training as train
from earthdial.contract.wire import EarthDialError
from earthdial.model import prompts
from earthdial.model.engine import Engine, Query, cache_mode_for


def _task_queries(engine: Engine, max_new: int) -> list[Query]:
    """One query per task the checkpoint's vocabulary takes, shaped as the task builds it (pairs, band
    sets, multi-tile RGB), answers cut at `max_new` tokens to keep the test short."""
    rng = np.random.default_rng(3)
    out = []
    for name, spec in prompts.TASKS.items():
        bands = {"[hr_rgbi_0.5]": 4, "[l8_ms_30]": 8, "[hyper_rgb_3]": 4}.get(spec.sensor, 3)
        shapes = [(bands, 120 + 40 * i, 90) for i in range(spec.images)]
        images = [
            engine.image((rng.random(s) * 255).astype(np.float32), spec.sensor, task=name, images=spec.images)
            for s in shapes
        ]
        prompt = {"identify": "[[10, 10, 40, 40, 0]]", "damage": "[[6, 6, 12, 22, 0]]"}.get(name, "ships")
        q = Query(prompts.build_question(name, prompt), images, min(spec.max_new_tokens, max_new))
        try:
            engine.check_tags(q.question)
        except EarthDialError:
            continue  # a task of another variant (methane, uhi)
        out.append(q)
    return out


def _answers(engine: Engine, mode: str, queries: list[Query]) -> tuple[list[str], list[str]]:
    engine.cache_mode = mode
    try:
        return engine.generate(queries), [engine.generate([q])[0] for q in queries]
    finally:
        engine.cache_mode = "dynamic"


@pytest.mark.skipif(
    not (train.DEMO_DIR / "model.safetensors").exists(), reason="the demo checkpoint is not built"
)
def test_static_cache_answers_equal_dynamic_on_every_task_shape() -> None:
    engine = Engine(str(train.DEMO_DIR), device="cpu")
    assert engine.cache_mode == "dynamic"  # CPU default: compiling does not pay here (docs/performance.md)
    queries = _task_queries(engine, 24)
    assert len(queries) >= 10 and any(len(q.images) == 2 for q in queries)
    dynamic = _answers(engine, "dynamic", queries)
    assert len(set(dynamic[1])) > 1  # the answers differ between tasks: the comparison can tell rows apart
    assert _answers(engine, "static", queries) == dynamic
    assert dynamic[0] == dynamic[1]  # batched as alone


def test_compiled_decode_equals_dynamic(tiny_checkpoint: Path) -> None:
    """torch.compile on the CPU (inductor): one batch shape and one single query, a few tokens, so the
    compile stays within a CI budget; every task shape is checked eagerly above."""
    engine = Engine(str(tiny_checkpoint), device="cpu")
    queries = [q for q in _task_queries(engine, 6) if len(q.images) == 1][:3]
    queries += [q for q in _task_queries(engine, 6) if len(q.images) == 2][:1]
    batched, single = engine.generate(queries), engine.generate(queries[:1])
    engine.cache_mode = "compiled"
    assert engine.generate(queries) == batched
    assert engine.generate(queries[:1]) == single
    assert getattr(engine.model, "_compiled_call", None) is not None  # the decode step was compiled


def test_kv_cache_modes() -> None:
    assert cache_mode_for("cpu") == "dynamic" and cache_mode_for("cuda") == "compiled"
    assert cache_mode_for("cpu", "static") == "static"
    with pytest.raises(ValueError, match="KV cache mode must be"):
        cache_mode_for("cpu", "fast")


@pytest.mark.skipif(
    not (train.DEMO_DIR / "model.safetensors").exists(), reason="the demo checkpoint is not built"
)
def test_a_shared_prompt_prefix_gives_the_same_answers_and_scores() -> None:
    """A scan's batch: one question, one image each. Prefilling the common prefix once and copying its
    cache to every row must change nothing but the time."""
    from earthdial.demo import synthetic

    engine = Engine(str(train.DEMO_DIR), device="cpu")
    question = prompts.build_question("refer", "ships", "[hr_rgb_0.5]")
    queries = [
        Query(
            question, [engine.image(synthetic.render(synthetic.make_scene(11, i), 224), "[hr_rgb_0.5]")], 40
        )
        for i in range(6)
    ]
    ids, mask = engine.encode([engine.prompt_text(q) for q in queries])
    with torch.inference_mode():
        shared = engine.shared_prefix(ids, mask, engine.embed(ids, queries))
    assert shared and shared["cache"].get_seq_length() >= 8  # the prefix is really shared here
    engine.share_prefix = False
    plain = engine.generate(queries)
    engine.share_prefix = True
    fast = engine.generate(queries)
    assert len(set(plain)) > 1 and [str(a) for a in fast] == [str(a) for a in plain]
    for f, p in zip(fast, plain, strict=True):
        assert f.logprobs == pytest.approx(p.logprobs, abs=1e-5)
    one = [engine.generate([q])[0] for q in queries[:2]]  # a single row shares nothing: same answers
    assert [str(a) for a in one] == [str(a) for a in plain[:2]]


def test_a_cpu_engine_leaves_a_core_to_the_reader() -> None:
    from earthdial.model.engine import cpu_threads

    assert [cpu_threads(None, cores) for cores in (1, 2, 16)] == [1, 1, 15]
    assert cpu_threads(4, 2) == 4 and cpu_threads(0, 8) == 0  # asked for; 0: torch's own default


def test_serve_kv_cache_sets_the_cache_mode_and_the_old_decode_flag_still_does_with_a_warning(
    tiny_checkpoint: Path, capsys
) -> None:
    """`--kv-cache` is the cache mode (status says `cache_mode`), `--decoding` the search; the former
    `--decode` sets the cache mode as before and says on stderr that it is deprecated."""
    import json
    import subprocess

    from conftest import EARTHDIAL, free_port, start_server, stop_server
    from earthdial.cli.main import build_parser

    for flag in ("--kv-cache", "--decode"):
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        proc = start_server(tiny_checkpoint, endpoint, extra=(flag, "static", "--decoding", "beams"))
        try:
            status = run_earthdial("status", "--endpoint", endpoint, "--json", timeout=60)
            model = json.loads(status.stdout)["model"]
            assert (model["cache_mode"], model["decoding"]) == ("static", "beams")
            assert "decode" not in model
        finally:
            stop_server(proc)
        args = build_parser().parse_args(["serve", flag, "compiled"])
        assert args.cache_mode == "compiled"
        warned = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
        assert warned == (
            ["earthdial: warning: --decode is deprecated, use --kv-cache (the same values)"]
            if flag == "--decode"
            else []
        ), warned
    assert build_parser().parse_args(["serve"]).cache_mode == "auto"
    refused = subprocess.run(
        [*EARTHDIAL, "serve", "--decode", "fast"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "invalid choice: 'fast'" in refused.stderr
