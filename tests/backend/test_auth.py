"""Who may talk to the server (serving/auth.py): loopback-only binds without CURVE, CURVE keys (right
key answered, wrong key never), and `earthdial keygen`. Loopback only."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from conftest import free_port, start_server, stop_server
from earthdial.contract.client import Client
from earthdial.contract.wire import EarthDialError
from earthdial.serving import auth

CLI = [sys.executable, "-m", "earthdial.cli.main"]


def test_bind_rules() -> None:
    assert auth.bind_refusal("tcp://127.0.0.1:5557", curve=False) is None
    assert auth.bind_refusal("ipc:///tmp/earthdial.sock", curve=False) is None
    assert auth.bind_refusal("tcp://0.0.0.0:5557", curve=True) is None  # allowed with CURVE only
    refusal = auth.bind_refusal("tcp://192.0.2.10:5557", curve=False)
    assert refusal and "CURVE" in refusal and "loopback" in refusal


def test_serve_refuses_a_network_bind_without_curve() -> None:
    out = subprocess.run(
        [*CLI, "serve", "--no-model", "--endpoint", "tcp://0.0.0.0:5999"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "CURVE" in out.stderr and "--curve-secret-key" in out.stderr


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    out = subprocess.run([*CLI, "keygen", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return directory


def test_keygen_writes_private_secret_keys_and_never_overwrites(keys: Path) -> None:
    for who in ("server", "client"):
        assert stat.S_IMODE((keys / f"{who}.secret").stat().st_mode) == 0o600
        public = auth.read_key(keys / f"{who}.public")
        assert auth.public_key_of(auth.read_key(keys / f"{who}.secret", secret=True)) == public
    again = subprocess.run([*CLI, "keygen", str(keys)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exist" in again.stderr


def test_a_secret_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    paths = auth.keygen(tmp_path / "k")
    os.chmod(paths["server.secret"], 0o644)
    with pytest.raises(PermissionError):
        auth.read_key(paths["server.secret"], secret=True)
    out = subprocess.run(
        [
            *CLI,
            "serve",
            "--no-model",
            "--curve-secret-key",
            str(paths["server.secret"]),
            "--endpoint",
            f"tcp://127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "chmod 600" in out.stderr


def _ping(endpoint: str, **curve) -> str:
    try:
        with Client(endpoint, timeout_s=1.0, **curve) as c:
            return "pong" if c.ping(timeout_s=1.0)["pong"] else "?"
    except EarthDialError as exc:
        return exc.code


def test_curve_right_keys_are_answered_and_wrong_ones_never(keys: Path) -> None:
    server_public = (keys / "server.public").read_text().strip()
    client_keys = ((keys / "client.public").read_text(), (keys / "client.secret").read_text())
    wrong_server = zmq.curve_keypair()[0].decode()
    curve = ("--curve-secret-key", str(keys / "server.secret"))

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(None, endpoint, extra=curve)  # any client that knows the server key
    try:
        assert _ping(endpoint, server_public_key=server_public) == "pong"  # a fresh client key pair
        assert _ping(endpoint, server_public_key=wrong_server) == "timeout"
        assert _ping(endpoint) == "timeout"  # no CURVE at all
    finally:
        stop_server(proc)

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(None, endpoint, extra=(*curve, "--curve-clients", str(keys)))  # listed keys only
    try:
        assert _ping(endpoint, server_public_key=server_public, client_keys=client_keys) == "pong"
        assert _ping(endpoint, server_public_key=server_public) == "timeout"  # an unlisted client key
        assert _ping(endpoint, server_public_key=wrong_server, client_keys=client_keys) == "timeout"
        with (
            pytest.raises(EarthDialError) as err,
            Client(endpoint, timeout_s=1.0, server_public_key=server_public) as c,
        ):
            c.ping(timeout_s=1.0)
        assert "CURVE handshake failed" in err.value.message  # the timeout says why
    finally:
        stop_server(proc)
