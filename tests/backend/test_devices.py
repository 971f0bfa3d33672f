"""engine.pick_device and the serve command's --device: cuda, then Apple silicon's GPU (mps), then the CPU.
This machine has neither GPU: the choice is checked with the availability passed in, and the real torch
query is checked to say what this machine has."""

from __future__ import annotations

import pytest
import torch

from earthdial.cli.main import build_parser
from earthdial.model.engine import pick_device
from earthdial.model.precision import choose


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_prefers_cuda_then_mps_then_cpu(cuda: bool, mps: bool, expected: str) -> None:
    assert pick_device("auto", cuda=cuda, mps=mps) == expected


def test_asking_for_a_gpu_torch_does_not_see_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="--device mps was asked for"):
        pick_device("mps", cuda=False, mps=False)
    with pytest.raises(RuntimeError, match="--device cuda was asked for"):
        pick_device("cuda", cuda=False, mps=True)
    assert pick_device("mps", cuda=False, mps=True) == "mps"
    assert pick_device("cpu", cuda=True, mps=True) == "cpu"


def test_this_machine_gets_what_torch_reports() -> None:
    has_mps = torch.backends.mps.is_available()
    expected = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    assert pick_device("auto") == expected


def test_serve_takes_device_mps() -> None:
    args = build_parser().parse_args(["serve", "--device", "mps"])
    assert args.device == "mps"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--device", "tpu"])


def test_mps_runs_the_published_bf16_without_a_cpu_probe() -> None:
    def no_probe(width: int) -> object:
        raise AssertionError("the CPU bf16 probe is for the CPU only")

    chosen = choose("mps", width=4096, flags=frozenset(), run_probe=no_probe)  # type: ignore[arg-type]
    assert chosen.dtype == torch.bfloat16
