"""`earthdial download` against a local stand-in for the hub (fake_hub, HF_ENDPOINT) serving a tiny
checkpoint in the published layout: never the network. The command runs as its own process, as users run
it (huggingface_hub reads HF_ENDPOINT when imported), and is killed for real in the resume test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_hub import FakeHub, serving

from conftest import EARTHDIAL
from earthdial.contract.wire import EarthDialError
from earthdial.install import download

REPO = "akshaydudhane/EarthDial_4B_RGB"
WEIGHTS = "model.safetensors"
STALL_AT = 400_000  # bytes of the weights sent before the hub stalls (the tiny file is ~1.2 MB)
# `earthdial download` with its Ctrl+C taken by another thread than the main one, as the kernel may deliver
# it: the main thread's blocking call is then not interrupted and CPython only sets a flag, looked at when
# that call returns. The same happens to a Ctrl+C landing just before a blocking socket read starts (seen
# on a loaded machine: the command then sat out the 60 s read timeout of the stalled hub).
SIGINT_ON_ANOTHER_THREAD = [sys.executable, "-c", "import runpy, signal, sys, threading\n"
                            "threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
                            "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # this thread and its own\n"
                            "sys.argv = ['earthdial', *sys.argv[1:]]\n"
                            "runpy.run_module('earthdial.cli.main', run_name='__main__')\n"]  # fmt: skip


def hub_env(hub: FakeHub, home: Path) -> dict[str, str]:
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home)}  # HF_HOME: its caches, not ~
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    return env


def run_download(hub: FakeHub, target: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*EARTHDIAL, "download", "EarthDial_4B_RGB", "--dir", str(target), *extra],
        env=hub_env(hub, target.parent / "hf-home"),
        capture_output=True,
        text=True,
        timeout=120,
    )


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


@pytest.fixture()
def hub(tiny_checkpoint: Path):
    with serving(FakeHub(REPO, tiny_checkpoint)) as h:
        yield h


def test_a_download_is_the_published_folder_and_the_model_answers(hub: FakeHub, tmp_path: Path) -> None:
    from earthdial.demo.samples import write_sample_scene

    target = tmp_path / "EarthDial_4B_RGB"
    result = run_download(hub, target, "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[0]["commit"] == hub.commit
    assert events[-1] == {"event": "done", "path": str(target), "commit": hub.commit, "already": False}
    assert any(e["event"] == "progress" and e["file"] == WEIGHTS for e in events)
    assert same_files(target, hub.folder) and not (target / download.PARTIAL).exists()
    record = json.loads((target / download.RECORD).read_text())
    assert record["repo_id"] == REPO and record["commit"] == hub.commit
    # the revision is resolved once; every file comes from that commit
    resolved = [p for p, _ in hub.resolve_requests() if "/resolve/" in p]
    assert resolved and all(f"/resolve/{hub.commit}/" in p for p in resolved)

    scene = write_sample_scene(tmp_path / "scene.tif")
    answer = subprocess.run(
        [
            *EARTHDIAL,
            "ask",
            str(scene),
            "--model",
            str(target),
            "--task",
            "caption",
            "--max-new-tokens",
            "2",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert answer.returncode == 0, answer.stderr

    hub.requests.clear()
    again = run_download(hub, target)
    assert again.returncode == 0 and "already downloaded and verified" in again.stderr
    assert hub.resolve_requests() == []


@pytest.mark.parametrize(
    ("sig", "command"),
    [(signal.SIGKILL, EARTHDIAL), (signal.SIGINT, EARTHDIAL), (signal.SIGINT, SIGINT_ON_ANOTHER_THREAD)],
    ids=["SIGKILL", "SIGINT", "SIGINT-on-another-thread"],
)
def test_a_killed_download_resumes_with_a_range_request(
    hub: FakeHub, tmp_path: Path, sig: int, command: list[str]
) -> None:
    target = tmp_path / "ckpt"
    size = (hub.folder / WEIGHTS).stat().st_size
    hub.stall_after[WEIGHTS] = STALL_AT
    incomplete = target / download.PARTIAL / (WEIGHTS + download.INCOMPLETE)
    # Ctrl+C as a terminal gives it, whatever this test runs under: a shell without job control starts
    # background commands (a CI script's `... &`) with SIGINT ignored, and a child inherits that
    proc = subprocess.Popen(
        [*command, "download", "EarthDial_4B_RGB", "--dir", str(target)],
        env=hub_env(hub, tmp_path / "hf-home"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while not (incomplete.is_file() and incomplete.stat().st_size == STALL_AT):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the partial file never reached the stall point"
            time.sleep(0.05)
        os.kill(proc.pid, sig)  # SIGKILL: nothing runs after it; SIGINT: Ctrl+C
        proc.wait(30)  # a Ctrl+C must end it promptly, not after the stalled read's timeout (60 s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130 and "run the same command again to continue" in proc.stderr.read()
    assert incomplete.stat().st_size == STALL_AT  # what was received is kept
    # killed mid-file: nothing in the folder looks like a model yet
    assert sorted(p.name for p in target.iterdir()) == [download.PARTIAL]

    hub.stall_after.clear()
    hub.release.set()  # the stalled handler finds its client gone
    hub.requests.clear()
    hub.served.clear()
    result = run_download(hub, target, "--json")
    assert result.returncode == 0, result.stderr
    progress = [e for e in map(json.loads, result.stdout.splitlines()) if e["event"] == "progress"]
    assert progress[0]["file"] == WEIGHTS and progress[0]["done"] > STALL_AT  # counted from the kept part
    assert all(e["all_done"] <= e["all_size"] for e in progress) and progress[-1]["all_done"] == size + sum(
        len(data) for name, data in hub.files().items() if name != WEIGHTS
    )
    before = sum(
        len(data) for name, data in hub.files().items() if name < WEIGHTS
    )  # verified before the kill
    assert f"({before + STALL_AT} already here)" in result.stderr
    weights_ranges = [rng for path, rng in hub.resolve_requests() if path.endswith(WEIGHTS)]
    assert weights_ranges and all(rng == f"bytes={STALL_AT}-" for rng in weights_ranges)
    assert hub.served[WEIGHTS] == size - STALL_AT < size
    assert "config.json" not in hub.served  # verified files are not fetched again
    assert same_files(target, hub.folder)


@pytest.mark.parametrize(("damaged", "checksum"), [(WEIGHTS, "sha256"), ("tokenizer.json", "git blob id")])
def test_a_damaged_file_is_refused_and_deleted(
    hub: FakeHub, tmp_path: Path, damaged: str, checksum: str
) -> None:
    target = tmp_path / "ckpt"
    hub.corrupt.add(damaged)
    result = run_download(hub, target)
    assert result.returncode == 1
    assert (
        f"bad_request: {damaged}: its {checksum}" in result.stderr
        and "does not match the published" in result.stderr
    )
    assert sorted(p.name for p in target.iterdir()) == [download.PARTIAL]  # not a model folder, no record
    partial = target / download.PARTIAL
    assert not (partial / damaged).exists() and not (partial / (damaged + download.INCOMPLETE)).exists()

    hub.corrupt.clear()  # served intact again: the next run completes
    assert run_download(hub, target).returncode == 0
    assert same_files(target, hub.folder)


def test_a_download_larger_than_the_free_space_is_refused_before_any_byte(
    hub: FakeHub, tmp_path: Path
) -> None:
    import shutil

    target = tmp_path / "ckpt"
    # the listing publishes a size larger than the whole disk: it cannot fit, whatever else is written meanwhile
    hub.published_size[WEIGHTS] = shutil.disk_usage(tmp_path).total + 1
    result = run_download(hub, target)
    assert result.returncode == 1
    assert "disk_full: the download needs" in result.stderr
    assert hub.resolve_requests() == [] and not target.exists()


def test_offline_mode_refuses_without_a_request(hub: FakeHub, tmp_path: Path) -> None:
    env = {**hub_env(hub, tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [*EARTHDIAL, "download", "EarthDial_4B_RGB", "--dir", str(tmp_path / "ckpt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "bad_request: HF_HUB_OFFLINE is set" in result.stderr
    assert hub.requests == [] and not (tmp_path / "ckpt").exists()


def test_a_folder_holding_other_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(EarthDialError) as caught:
        download.download("EarthDial_4B_RGB", tmp_path)
    assert caught.value.code == "output_exists" and "notes.txt" in caught.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(EarthDialError) as unknown:
        download.download("EarthDial_13B", tmp_path / "x")
    assert unknown.value.code == "bad_request"


@pytest.mark.parametrize(
    "name", ["../outside.json", "/etc/passwd", "a/../../b", ".partial/state.json", "a\\b"]
)
def test_a_file_name_leaving_the_folder_is_refused(name: str) -> None:
    with pytest.raises(EarthDialError):
        download._check_relative(name)
    download._check_relative("sub/model-00001-of-00002.safetensors")


def test_the_list_names_the_three_published_checkpoints() -> None:
    listed = subprocess.run(
        [*EARTHDIAL, "download", "--list", "--json"], capture_output=True, text=True, timeout=120, check=True
    )
    names = [c["name"] for c in json.loads(listed.stdout)]
    assert names == ["EarthDial_4B_RGB", "EarthDial_4B_MS", "EarthDial_4B_Methane_UHI"]
    assert all(c["repo_id"] == f"akshaydudhane/{c['name']}" for c in json.loads(listed.stdout))


def test_a_file_missing_at_the_commit_is_named(hub: FakeHub, tmp_path: Path) -> None:
    hub.missing.add("tokenizer.json")
    result = run_download(hub, tmp_path / "ckpt")
    assert result.returncode == 1
    assert (
        f"file_not_found: tokenizer.json: the hub answered HTTP 404 at commit {hub.commit}" in result.stderr
    )
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [download.PARTIAL]


def test_a_dropped_connection_is_named_and_the_next_run_continues(hub: FakeHub, tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    hub.stall_after[WEIGHTS] = STALL_AT
    hub.release.set()  # no wait: the hub drops the connection after STALL_AT bytes
    result = run_download(hub, target)
    assert result.returncode == 1
    assert f"disconnected: {WEIGHTS}: the download stopped at {STALL_AT} of" in result.stderr
    assert "run the same command again to continue it" in result.stderr
    assert sorted(p.name for p in target.iterdir()) == [download.PARTIAL]

    hub.stall_after.clear()
    hub.requests.clear()
    assert run_download(hub, target).returncode == 0
    ranges = [rng for path, rng in hub.resolve_requests() if path.endswith(WEIGHTS)]
    assert ranges and all(rng == f"bytes={STALL_AT}-" for rng in ranges)
    assert same_files(target, hub.folder)
