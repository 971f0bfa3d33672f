"""Access control: the directories by-reference requests may read, loopback-only binds without CURVE,
CURVE keys (right key answered, wrong key never), and `earthdial keygen`. Loopback only."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zmq
from rasterio.transform import from_origin

from conftest import free_port, start_server, stop_server
from earthdial import access, service
from earthdial.protocol import Client, EarthDialError, source_by_reference

ANSWER = "<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box>"
CLI = [sys.executable, "-m", "earthdial.cli"]


def _tif(path: Path) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500_000, 4_000_000, 10, 10)) as dst:  # fmt: skip
        dst.write(np.zeros((1, 8, 8), np.uint8))
    return path


@pytest.fixture()
def outside() -> Path:
    """A raster outside the pytest temp root (which test servers may read)."""
    where = Path(tempfile.mkdtemp(prefix="earthdial-outside-"))
    yield _tif(where / "secret.tif")
    shutil.rmtree(where)


@pytest.fixture()
def allowed(tmp_path: Path, outside: Path):
    """tmp_path/allowed is the one allowed directory; links and `..` inside it point elsewhere."""
    root = tmp_path / "allowed"
    root.mkdir()
    _tif(root / "ok.tif")
    (root / "link-out.tif").symlink_to(outside)
    (root / "link-in.tif").symlink_to(root / "ok.tif")
    previous = access.allowed_dirs()
    access.set_allowed_dirs([root])
    yield root
    access.set_allowed_dirs(previous)


def _read(path: str) -> object:
    return service.resolve_source(source_by_reference(path), [])


def test_reads_inside_the_allowed_directories(allowed: Path) -> None:
    assert _read(str(allowed / "ok.tif")).width == 8
    chip = _read(str(allowed / "link-in.tif"))  # a link that stays inside is fine
    assert chip.source == str(allowed / "link-in.tif")  # named as the client named it


@pytest.mark.parametrize("how", ["outside", "symlink", "dotdot", "missing_outside", "vsi", "relative"])
def test_paths_outside_are_refused_naming_the_allowed_directories(
    allowed: Path, outside: Path, how: str
) -> None:
    path = {
        "outside": str(outside),
        "symlink": str(allowed / "link-out.tif"),
        "dotdot": f"{allowed}/../../../../../../..{outside}",
        "missing_outside": str(outside.parent / "nothing.tif"),  # refused before existence is told
        "vsi": f"/vsizip/{allowed}/x.zip/ok.tif",
        "relative": "secret.tif",
    }[how]
    with pytest.raises(EarthDialError) as err:
        _read(path)
    assert err.value.code == "forbidden_path"
    if how != "vsi":
        assert str(allowed) in err.value.message


def test_no_restriction_without_an_allow_list(outside: Path) -> None:
    previous = access.allowed_dirs()
    access.set_allowed_dirs(None)  # the in-process CLI reads what its user names
    try:
        assert _read(str(outside)).width == 8
    finally:
        access.set_allowed_dirs(previous)


def test_the_server_refuses_paths_outside_its_directories(server: str, outside: Path, tmp_path: Path) -> None:
    link = tmp_path / "innocent.tif"
    link.symlink_to(outside)
    with Client(server, timeout_s=30) as c:
        for path in (str(outside), str(link), f"{tmp_path}/../../../../../../..{outside}"):
            for call in (lambda p: c.georef(source_by_reference(p), ANSWER),
                         lambda p: c.ask(source_by_reference(p), "ships", task="refer")):  # fmt: skip
                with pytest.raises(EarthDialError) as err:
                    call(path)
                assert err.value.code == "forbidden_path", (path, err.value)
        assert c.georef(source_by_reference(str(_tif(tmp_path / "inside.tif"))), ANSWER)["ok"]


# --------------------------------------------------------------------------------------------------
# Binds and CURVE
# --------------------------------------------------------------------------------------------------


def test_bind_rules() -> None:
    assert access.bind_refusal("tcp://127.0.0.1:5557", curve=False) is None
    assert access.bind_refusal("ipc:///tmp/earthdial.sock", curve=False) is None
    assert access.bind_refusal("tcp://0.0.0.0:5557", curve=True) is None  # allowed with CURVE only
    refusal = access.bind_refusal("tcp://192.0.2.10:5557", curve=False)
    assert refusal and "CURVE" in refusal and "loopback" in refusal


def test_serve_refuses_a_network_bind_without_curve() -> None:
    out = subprocess.run([*CLI, "serve", "--no-model", "--endpoint", "tcp://0.0.0.0:5999"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
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
        public = access.read_key(keys / f"{who}.public")
        assert access.public_key_of(access.read_key(keys / f"{who}.secret", secret=True)) == public
    again = subprocess.run([*CLI, "keygen", str(keys)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exist" in again.stderr


def test_a_secret_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    paths = access.keygen(tmp_path / "k")
    os.chmod(paths["server.secret"], 0o644)
    with pytest.raises(PermissionError):
        access.read_key(paths["server.secret"], secret=True)
    out = subprocess.run([*CLI, "serve", "--no-model", "--curve-secret-key", str(paths["server.secret"]),
                          "--endpoint", f"tcp://127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)  # fmt: skip
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
