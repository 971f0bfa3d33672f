"""Shared fixtures: a tiny checkpoint in the published layout and a real `earthdial serve` process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EARTHDIAL = [sys.executable, "-m", "earthdial.cli"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from earthdial.checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "EarthDial_4B_RGB-tiny")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: Path, endpoint: str, timeout: float = 60.0, extra: tuple[str, ...] = ()
) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*EARTHDIAL, "serve", "--model", str(model), "--endpoint", endpoint, "--device", "cpu", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("earthdial: serving"):
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"earthdial serve did not start: {proc.stdout.read()}")


@pytest.fixture(scope="session")
def server(tiny_checkpoint: Path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(tiny_checkpoint, endpoint)
    yield endpoint
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
