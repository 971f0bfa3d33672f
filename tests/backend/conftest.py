"""Shared fixtures and helpers: a tiny checkpoint in the published layout, a real `earthdial serve` process,
GeoTIFF writers, the `earthdial` command line in a child process and the sockets tests talk through."""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EARTHDIAL = [sys.executable, "-m", "earthdial.cli.main"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from earthdial.training.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "EarthDial_4B_RGB-tiny")


@pytest.fixture(scope="session")
def tiny_ms_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The multispectral/SAR variant: the one trained on EarthDial's band-group path."""
    from earthdial.training.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "EarthDial_4B_MS-tiny", variant="EarthDial_4B_MS"
    )


def geotiff(
    path: Path,
    width: int,
    height: int,
    count: int,
    dtype: str = "uint8",
    *,
    crs: str | None = "EPSG:32633",
    transform: Any = None,
    px: float = 1.0,
    **profile: Any,
) -> Any:
    """Open `path` for writing as a GeoTIFF; without `transform`, square `px` pixels from the UTM 33N
    origin (500 000, 4 000 000). `profile` goes to rasterio as it is (nodata, tiling, compression, ...)."""
    import rasterio
    from rasterio.transform import from_origin

    return rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=width,
        height=height,
        count=count,
        dtype=dtype,
        crs=crs,
        transform=from_origin(500_000, 4_000_000, px, px) if transform is None else transform,
        **profile,
    )


def sparse_geotiff(path: Path, size: int, count: int, px: float = 1.0) -> Any:
    """Open a size x size tiled BigTIFF for writing in which GDAL leaves every tile not written sparse
    (no bytes on disk): a huge raster in about a megabyte."""
    return geotiff(
        path,
        size,
        size,
        count,
        px=px,
        tiled=True,
        blockxsize=1024,
        blockysize=1024,
        sparse_ok=True,
        BIGTIFF="YES",
    )


def write_geotiff(path: Path, data: Any, *, descriptions: tuple[str, ...] = (), **kwargs: Any) -> Path:
    """Write `data` (bands, rows, cols) as a GeoTIFF at `path`; `kwargs` as `geotiff` takes them."""
    count, rows, cols = data.shape
    with geotiff(path, cols, rows, count, data.dtype.name, **kwargs) as dst:
        dst.write(data)
        for i, description in enumerate(descriptions, start=1):
            dst.set_band_description(i, description)
    return path


def run_earthdial(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`earthdial ARGS` in a child process (this one's environment unless `env`), its output captured as text."""
    return subprocess.run([*EARTHDIAL, *args], capture_output=True, text=True, timeout=timeout, env=env)


TILES_224 = ("--tile-size", "224", "--overlap", "0")  # CLI flags: the model's 224 px tiles, side by side


def demo_model_args() -> tuple[str, ...]:
    """The flags that run a command on the built-in demo model, on the CPU."""
    from earthdial.training import DEMO_DIR

    return ("--model", str(DEMO_DIR), "--device", "cpu")


def dealer(endpoint: str, ctx: zmq.Context | None = None) -> zmq.Socket:
    """A DEALER socket connected to `endpoint` that drops what it has not sent when closed."""
    sock = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def python_child(code: str, *args: str) -> subprocess.Popen:
    """`python -c CODE ARGS` with pipes to its stdin and from its stdout (text): a process a test steers line
    by line."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ALLOWED_DIRS: list[str] = []  # what test servers may read: the pytest temp root (set below)


@pytest.fixture(scope="session", autouse=True)
def _servers_read_the_pytest_temp_root(tmp_path_factory: pytest.TempPathFactory) -> None:
    ALLOWED_DIRS[:] = [str(tmp_path_factory.getbasetemp())]


def start_server(
    model: Path | None,
    endpoint: str,
    timeout: float = 60.0,
    extra: tuple[str, ...] = (),
    command: list[str] | None = None,
) -> subprocess.Popen:
    """`earthdial serve` (`--no-model` when model is None) allowed to read the pytest temp root; returns
    once it serves. `command` replaces `python -m earthdial.cli.main` (a wrapper that patches something)."""
    which = ["--model", str(model), "--device", "cpu"] if model is not None else ["--no-model"]
    allow = [arg for d in ALLOWED_DIRS for arg in ("--allow-dir", d)]
    proc = subprocess.Popen(
        [*(command or EARTHDIAL), "serve", *which, "--endpoint", endpoint, *allow, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("earthdial: serving"):
            # keep reading its log, so that a full pipe never blocks the server
            proc.log = collections.deque(maxlen=200)
            threading.Thread(target=lambda: proc.log.extend(proc.stdout), daemon=True).start()
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"earthdial serve did not start: {proc.stdout.read()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture()
def http_listener() -> Iterator[tuple[int, socket.socket]]:
    """A loopback port (and its socket) that must receive no connection (an HTTP request by GDAL)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.3)
    yield listener.getsockname()[1], listener
    listener.close()


def nobody_called(listener: socket.socket) -> bool:
    """Whether no connection reached `http_listener`'s socket within its 0.3 s timeout."""
    try:
        listener.accept()[0].close()
        return False
    except TimeoutError:
        return True


def grid_outside(tmp_path: Path) -> tuple[Path, Path, float]:
    """(grid, inside, past): a PROJ grid file outside the new folder `inside`, its access time set to
    `past`, an hour ago (so that a read shows)."""
    grid = tmp_path / "outside" / "grid.gsb"
    grid.parent.mkdir()
    grid.write_bytes(b"NUM_OREC" + bytes(200))
    past = time.time() - 3600
    os.utime(grid, (past, past))
    inside = tmp_path / "inside"
    inside.mkdir()
    return grid, inside, past


@pytest.fixture(scope="session")
def server(tiny_checkpoint: Path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(tiny_checkpoint, endpoint)
    yield endpoint
    stop_server(proc)


@contextlib.contextmanager
def serving(server: Any) -> Iterator[str]:
    """Run an in-process earthdial.serving.server.Server on a thread; yields its bound endpoint."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.bound
    finally:
        server.stop_event.set()
        thread.join(10)
        server.close()
