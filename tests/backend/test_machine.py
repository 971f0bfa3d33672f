"""What this machine can run (`earthdial.install.machine`, `earthdial diagnose`): the report read from this machine,
the recommendation given fixed machines, and the report in a running server's status."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from conftest import run_earthdial
from earthdial.cli.main import main
from earthdial.install import machine
from earthdial.install.machine import Facts, Gpu
from earthdial.model import memory, precision

GIB = 1024**3
TOP_KEYS = {
    "schema",
    "taken",
    "torch",
    "nvidia_driver",
    "gpus",
    "mps",
    "cpu",
    "ram",
    "torchao",
    "plan_settings",
    "plans",
    "recommendation",
    "summary",
}
ROW_KEYS = {
    "checkpoint",
    "device",
    "device_name",
    "dtype",
    "quantize",
    "weights_gb",
    "per_request_gb",
    "needs_gb",
    "free_gb",
    "fits",
    "batch",
    "needs_torchao",
    "message",
}
RECOMMENDATION_KEYS = {
    "device",
    "gpu",
    "dtype",
    "quantize",
    "serve_args",
    "env",
    "batch",
    "install",
    "reason",
    "checkpoint",
}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")


@no_cuda
def test_report_on_this_machine_without_a_gpu_recommends_the_cpu_in_precisions_dtype() -> None:
    report = json.loads(json.dumps(machine.collect()))  # plain JSON: survives a round trip
    assert set(report) == TOP_KEYS and report["schema"] == machine.SCHEMA
    assert report["gpus"] == []
    assert "GPU: none" in "\n".join(report["summary"])
    assert report["torch"]["version"] == torch.__version__
    assert report["nvidia_driver"]["driver"] is None and report["nvidia_driver"]["error"]
    assert report["cpu"]["cores"] == os.cpu_count()
    assert report["ram"]["total_gb"] > report["ram"]["free_gb"] > 0

    expected = precision.choose("cpu", "auto", memory.EARTHDIAL_4B.llm_hidden)
    rec = report["recommendation"]
    assert set(rec) == RECOMMENDATION_KEYS
    assert rec["device"] == "cpu" and rec["dtype"] == expected.name == report["cpu"]["dtype"]
    assert rec["serve_args"][:4] == ["--device", "cpu", "--dtype", expected.name]

    rows = report["plans"]
    assert all(set(r) == ROW_KEYS for r in rows)
    dtypes = ["bfloat16", "float32"] if report["cpu"]["bf16"] else ["float32"]
    assert sorted((r["checkpoint"], r["dtype"], r["quantize"]) for r in rows) == sorted(
        (c, d, q) for c in machine.CHECKPOINTS for d in dtypes for q in ("none", "int8", "nf4")
    )
    for r in rows:
        assert r["device"] == "cpu" and r["free_gb"] == report["ram"]["free_gb"]
        assert 2 < r["weights_gb"] < 16 and 0.5 < r["per_request_gb"] < 2  # a 4 B model, a 7-tile request
        assert r["needs_gb"] > r["weights_gb"] + r["per_request_gb"]  # + the allocator's reserve
        assert r["fits"] == (r["needs_gb"] <= r["free_gb"])
    by = {(r["dtype"], r["quantize"]): r["weights_gb"] for r in rows if r["checkpoint"] == "EarthDial_4B_RGB"}
    assert by[("float32", "none")] > by[("float32", "int8")] > by[("float32", "nf4")]


def facts(
    gpus: tuple[Gpu, ...] = (),
    ram_gb: float = 32,
    cpu_dtype: str = "float32",
    mps: bool = False,
    torchao: bool = True,
) -> Facts:
    return Facts(
        gpus=gpus,
        mps=mps,
        cpu_bf16=cpu_dtype == "bfloat16",
        cpu_dtype=cpu_dtype,
        cpu_dtype_reason=f"{cpu_dtype}: given",
        ram_free=int(ram_gb * GIB),
        ram_total=int(64 * GIB),
        torchao=torchao,
    )


def recommend(f: Facts) -> dict:
    return machine.recommend(f, machine.plans(f))


def test_a_24_gb_gpu_runs_bf16_at_full_batch() -> None:
    rec = recommend(facts((Gpu(0, "RTX 4090", 24 * GIB, 23 * GIB, "8.9"),)))
    assert (rec["device"], rec["dtype"], rec["quantize"]) == ("cuda", "bfloat16", "none")
    assert rec["serve_args"] == ["--device", "cuda", "--dtype", "bfloat16"] and rec["env"] == {}
    assert rec["batch"] == machine.WANT_BATCH and "RTX 4090" in rec["reason"]


def test_a_10_gb_gpu_runs_int8_and_says_what_bf16_needs() -> None:
    card = (Gpu(0, "RTX 3080", 10 * GIB, int(9.6 * GIB), "8.6"),)
    rec = recommend(facts(card))
    assert (rec["device"], rec["quantize"]) == ("cuda", "int8")
    assert rec["serve_args"] == ["--device", "cuda", "--dtype", "bfloat16", "--quantize", "int8"]
    assert "bfloat16 needs" in rec["reason"] and rec["install"] is None
    without = recommend(facts(card, torchao=False))
    assert without["quantize"] == "int8" and without["install"] == machine.QUANTIZE_EXTRA


def test_an_8_gb_gpu_cannot_load_the_weights_so_the_cpu_is_recommended_with_why() -> None:
    rec = recommend(facts((Gpu(0, "RTX 3070", 8 * GIB, int(7.5 * GIB), "8.6"),), ram_gb=32))
    assert (rec["device"], rec["dtype"], rec["quantize"]) == ("cpu", "float32", "none")
    assert "RTX 3070" in rec["reason"] and "the weights load unquantised" in rec["reason"]


def test_no_gpu_runs_on_the_cpu_in_the_given_dtype_or_nothing_fits() -> None:
    rec = recommend(facts(ram_gb=32, cpu_dtype="float32"))
    assert rec["serve_args"] == ["--device", "cpu", "--dtype", "float32"] and rec["quantize"] == "none"
    assert "no CUDA GPU" in rec["reason"]
    bf16 = recommend(facts(ram_gb=12, cpu_dtype="bfloat16"))
    assert (bf16["device"], bf16["dtype"], bf16["quantize"]) == ("cpu", "bfloat16", "none")
    small = recommend(facts(ram_gb=6, cpu_dtype="float32"))
    assert small["device"] is None and small["serve_args"] == [] and "nothing fits" in small["reason"]


def test_mps_is_named_but_the_cpu_is_recommended() -> None:
    rec = recommend(facts(ram_gb=32, mps=True))
    assert rec["device"] == "cpu" and "MPS" in rec["reason"]


def test_the_gpu_that_fits_unquantised_wins_over_the_first_one() -> None:
    gpus = (Gpu(0, "small", 8 * GIB, int(7.5 * GIB)), Gpu(1, "big", 24 * GIB, 23 * GIB))
    rec = recommend(facts(gpus))
    assert (rec["gpu"], rec["quantize"], rec["env"]) == ("big", "none", {"CUDA_VISIBLE_DEVICES": "1"})
    rows = machine.plans(facts(gpus))
    assert {r["device"] for r in rows} == {"cuda:0", "cuda:1", "cpu"}
    assert all(r["needs_torchao"] is False for r in rows)  # torchao given as installed


def test_an_unmeasured_gpu_is_listed_but_not_recommended_and_an_old_one_is_named_slow() -> None:
    gpus = (Gpu(0, "small", 10 * GIB, int(9.6 * GIB)), Gpu(1, "unmeasured", 80 * GIB, None))
    rec = recommend(facts(gpus))
    assert (rec["gpu"], rec["quantize"]) == ("small", "int8")
    unmeasured = [r for r in machine.plans(facts(gpus)) if r["device"] == "cuda:1"]
    assert unmeasured and all(r["fits"] is None and r["free_gb"] is None for r in unmeasured)
    old = recommend(facts((Gpu(0, "Tesla T4", 16 * GIB, 15 * GIB, "7.5"),)))
    assert old["quantize"] == "none" and "no bf16 tensor cores" in old["reason"]
    assert "tensor cores" not in recommend(facts((Gpu(0, "A10", 24 * GIB, 23 * GIB, "8.6"),)))["reason"]


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize(("dtype_bytes", "quantize"), [(2, "none"), (2, "int8"), (4, "nf4"), (4, "none")])
def test_min_free_is_where_the_plan_starts_to_fit(device: str, dtype_bytes: int, quantize: str) -> None:
    need = memory.min_free(memory.EARTHDIAL_4B, device, dtype_bytes, quantize)
    fits = memory.plan(memory.EARTHDIAL_4B, device, need, dtype_bytes, quantize, cpu_bf16=True)
    short = memory.plan(
        memory.EARTHDIAL_4B, device, need - 64 * 1024**2, dtype_bytes, quantize, cpu_bf16=True
    )
    assert fits.batch >= 1 and short.batch == 0


def test_nvidia_smi_is_read_when_present_and_said_absent_or_stuck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleep = shutil.which("sleep")
    monkeypatch.setenv("PATH", str(tmp_path))
    absent = machine.nvidia_driver()
    assert absent["found"] is False and "not on PATH" in absent["error"]
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\necho '| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4 |'\n"
    )
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    assert machine.nvidia_driver() == {"found": True, "driver": "550.54.15", "cuda": "12.4", "error": None}
    smi.write_text(
        '#!/bin/sh\necho "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."\nexit 9\n'
    )
    failed = machine.nvidia_driver()
    assert failed["driver"] is None and failed["error"].startswith(
        "nvidia-smi exited 9: NVIDIA-SMI has failed"
    )
    smi.write_text(f"#!/bin/sh\nexec {sleep} 30\n")
    stuck = machine.nvidia_driver(timeout_s=0.5)
    assert stuck["driver"] is None and "did not answer in 0.5 s" in stuck["error"]


def test_diagnose_command_prints_the_summary_or_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == TOP_KEYS
    assert main(["diagnose"]) == 0
    text = capsys.readouterr().out
    assert text.strip().splitlines() == report["summary"]
    assert "memory plan" in text and "recommended: " in text


def test_a_serving_backend_reports_the_machine_in_status(tiny_checkpoint: Path) -> None:
    from conftest import free_port, start_server, stop_server

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(tiny_checkpoint, endpoint)
    try:
        out = run_earthdial("status", "--endpoint", endpoint, "--json", timeout=60)
        report = json.loads(out.stdout)["machine"]
        assert set(report) == TOP_KEYS and report["taken"] == "at start-up, before the model was loaded"
        assert report["recommendation"]["device"] in ("cpu", "cuda")
        assert len(report["plans"]) >= 3 * 3
    finally:
        stop_server(proc)


def test_the_summary_of_a_two_gpu_machine_names_each_gpu_the_driver_and_the_flags_to_serve_with() -> None:
    details = {
        "torch": {"version": "2.13.0+cu128", "cuda": "12.8", "hip": None, "cudnn": 91002, "cuda_usable": True,
                  "cuda_warnings": [], "mps_built": False},
        "nvidia_driver": {"found": True, "driver": "570.86", "cuda": "12.8", "error": None},
        "cpu": {"name": "a CPU", "cores": 16, "arch": "x86_64", "bf16": None},
    }  # fmt: skip
    gpus = (Gpu(0, "RTX 3070", 8 * GIB, int(7.5 * GIB), "8.6"), Gpu(1, "RTX 4090", 24 * GIB, 23 * GIB, "8.9"))
    report = machine.report(facts(gpus), details)
    lines = report["summary"]
    assert "GPU 0: RTX 3070, 8.0 GiB, 7.5 GiB free, compute capability 8.6" in lines
    assert "NVIDIA driver: 570.86, supports CUDA 12.8 (nvidia-smi)" in lines
    assert "torch: 2.13.0+cu128, built for CUDA 12.8, cuDNN 91002" in lines
    assert "recommended: CUDA_VISIBLE_DEVICES=1 earthdial serve --device cuda --dtype bfloat16" in lines
    plan = [line.split() for line in lines if line.startswith("  cuda:0 ")]
    assert len(plan) == 6 and all(cols[-1] == "all" for cols in plan)  # 2 dtypes x 3 modes, same for each
    bf16 = next(cols for cols in plan if cols[1:3] == ["bfloat16", "none"])
    assert bf16[6] == "no" and float(bf16[4]) > 7.5  # bf16 does not fit 7.5 GiB free: it needs more


def test_a_failing_report_never_keeps_a_server_from_starting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(all_gpus: bool = True) -> None:
        raise OSError("no /proc here")

    monkeypatch.setattr(machine, "read_facts", broken)
    assert machine.at_start_up() is None
    assert "no machine report for status (OSError: no /proc here)" in capsys.readouterr().err
