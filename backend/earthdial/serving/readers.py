"""Reader processes: where a server opens and reads its users' files.

GDAL and PROJ cannot be interrupted inside an open or a read: a file whose CRS names a grid FIFO blocks
the thread that opens it for good, and a crafted file can make GDAL allocate without bound. A server
therefore runs `imagery`'s file functions (metadata, `plan`'s sample, chip plans, windows, pair warps)
in reader processes it can kill. Each reader:

- opens files only by descriptor, walked from an allowed folder with O_NOFOLLOW
  (file_access.open_file);
- has PROJ's network and GDAL's HTTP off (file_access.harden_process), and nothing of a request reaches
  it that could name a URL (check_path refuses them before);
- has an address space (RLIMIT_AS) of what it holds when ready plus the pixel budget at 8 bytes a pixel
  and MEMORY_HEADROOM: an allocation past it fails in the reader (`too_large`), not in the server;
- answers one call at a time, each within the server's read timeout (`--read-timeout`), the request's
  deadline and its cancel flag: past any of them the reader is killed and replaced, and the call raises
  `timeout` (or `deadline`, `cancelled`).

Calls and replies are JSON headers and raw array bytes over a socket pair, never pickles: a reader that
a crafted file took over can send the server nothing but data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from affine import Affine
from rasterio.windows import Window

from earthdial import limits
from earthdial.contract.wire import EarthDialError, ErrorCode, error_codes
from earthdial.geo import file_access, imagery

log = logging.getLogger("earthdial.serving.readers")

MEMORY_HEADROOM = 1024 * limits.MIB  # GDAL's block cache, PROJ's database, decode buffers
BYTES_PER_PIXEL = 8  # the widest pixel (float64, complex64) one budgeted pixel may take
GDAL_CACHE_MB = 256  # GDAL's block cache in a reader (GDAL's default is 5 % of the machine's memory)
START_TIMEOUT_S = 120.0  # a reader imports numpy, rasterio and pyproj before it is ready
POLL_S = 0.05  # how often a waiting call checks its cancel flag and deadline
MAX_HEADER_BYTES = 1 << 20
ARRAY_KINDS = "biuf"  # dtypes a reader may send back


# --------------------------------------------------------------------------------------------------
# The server's side
# --------------------------------------------------------------------------------------------------


class _Reader:
    """One reader process and the server's end of its socket pair."""

    def __init__(self, config: dict[str, Any]) -> None:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "GDAL_NUM_THREADS": "1"}
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "earthdial.serving.readers", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a terminal's Ctrl-C reaches the server, which ends its readers
            )
        self.conn = Connection(ours.detach())
        self.conn.send_bytes(json.dumps(config).encode())
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        if not self.conn.poll(START_TIMEOUT_S):
            raise EarthDialError(
                ErrorCode.INTERNAL, f"a reader process did not start in {START_TIMEOUT_S:g} s"
            )
        try:
            json.loads(self.conn.recv_bytes(MAX_HEADER_BYTES))
        except (EOFError, OSError, ValueError):
            raise EarthDialError(ErrorCode.INTERNAL, "a reader process failed to start") from None
        self.ready = True

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.conn.close()


class ReaderPool:
    """`size` reader processes; `call` runs one of imagery's file functions in an idle one."""

    def __init__(self, size: int, budgets: limits.Limits) -> None:
        self.size = max(1, size)
        self.budgets = budgets
        self.timeout_s = budgets.read_timeout_s
        self.memory_bytes = MEMORY_HEADROOM + BYTES_PER_PIXEL * budgets.max_pixels
        policy = file_access.policy()
        self._config = {
            "allowed": None if policy is None else policy.as_named(),
            "limits": asdict(budgets),
            "memory_bytes": self.memory_bytes,
        }
        self._cond = threading.Condition()
        self._idle: list[_Reader] = []
        self._closed = False
        self.killed = 0  # readers killed past a timeout, deadline or cancel
        # readers are started by one thread that lives as long as the pool: the kernel kills a reader
        # when the thread that started it ends (PR_SET_PDEATHSIG), so none outlives a dead server
        self._spawns: queue.SimpleQueue[bool] = queue.SimpleQueue()
        for _ in range(self.size):
            self._spawns.put(True)
        self._spawner = threading.Thread(target=self._spawn_loop, name="earthdial-readers", daemon=True)
        self._spawner.start()

    def _spawn_loop(self) -> None:
        while self._spawns.get():
            try:
                reader = _Reader(self._config)
            except OSError as exc:  # no process could be made (out of descriptors or processes)
                log.error("cannot start a reader process: %s", exc)
                time.sleep(1)
                self._spawns.put(True)
                continue
            with self._cond:
                if self._closed:
                    reader.kill()
                    continue
                self._idle.append(reader)
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        self._spawns.put(False)
        for reader in idle:
            reader.kill()

    def _take(self, until: float) -> _Reader:
        with self._cond:
            while not self._idle:
                if self._closed:
                    raise EarthDialError(ErrorCode.CANCELLED, "the server is stopping")
                limits.checkpoint()
                left = until - time.monotonic()
                if left <= 0:
                    raise EarthDialError(
                        ErrorCode.TIMEOUT,
                        f"no reader process was free within {self.timeout_s:g} s (all {self.size} are busy "
                        "reading; `earthdial serve --readers` sets how many)",
                    )
                self._cond.wait(min(left, POLL_S * 4))
            return self._idle.pop()

    def _give_back(self, reader: _Reader | None) -> None:
        """Return an idle reader to the pool; None: one was killed, start another in its place."""
        with self._cond:
            if reader is None:
                self._spawns.put(True)
            elif self._closed:
                reader.kill()
            else:
                self._idle.append(reader)
                self._cond.notify()

    def call(
        self, fn: str, kwargs: dict[str, Any], arrays: tuple[np.ndarray, ...] = ()
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        """Run imagery.`fn`(**kwargs) in a reader: its reply header and arrays, or its typed error."""
        until = time.monotonic() + self.timeout_s
        reader = self._take(until)
        try:
            reader.wait_ready()
            until = time.monotonic() + self.timeout_s  # the read's own time, not a fresh reader's start
            reader.conn.send_bytes(json.dumps({"fn": fn, "kwargs": kwargs, "arrays": len(arrays)}).encode())
            for array in arrays:
                reader.conn.send_bytes(np.ascontiguousarray(array).data.cast("B"))
            while not reader.conn.poll(POLL_S):
                limits.checkpoint()  # cancelled, or past the request's deadline
                if reader.proc.poll() is not None or time.monotonic() > until:
                    break
            if not reader.conn.poll(0):
                if reader.proc.poll() is not None:
                    raise _died(reader.proc.returncode, kwargs)
                raise EarthDialError(
                    ErrorCode.TIMEOUT,
                    f"reading {kwargs.get('path', 'the file')} took more than {self.timeout_s:g} s; the reader "
                    "process was stopped (`earthdial serve --read-timeout` sets the limit)",
                )
            header, out = _receive(reader.conn)
        except BaseException:
            reader.kill()
            self.killed += 1
            self._give_back(None)  # a new reader in its place
            raise
        self._give_back(reader)
        if "error" in header:
            code = str(header["error"])
            raise EarthDialError(
                code if code in error_codes() else ErrorCode.INTERNAL, str(header.get("message", ""))
            )
        return header, out

    # imagery's file functions, through a reader ---------------------------------------------------
    def describe(self, path: str) -> imagery.RasterInfo:
        header, _ = self.call("describe", {"path": path})
        return imagery.RasterInfo(**header["info"])

    def sample_band(self, path: str, band: int, size: int) -> np.ndarray | None:
        _, arrays = self.call("sample_band", {"path": path, "band": band, "size": size})
        return arrays[0] if arrays else None

    def plan_chip(self, path: str, **kwargs: Any) -> imagery.ChipPlan:
        header, _ = self.call("plan_chip", {"path": path, **kwargs})
        p = header["plan"]
        return imagery.ChipPlan(p["band_indexes"], p["width"], p["height"], Affine(*p["transform"]), p["crs"])

    def read_chip(self, path: str, **kwargs: Any) -> imagery.Chip:
        return _chip(*self.call("read_chip", {"path": path, **kwargs}))

    def read_on_grid(self, path: str, bands: list[int] | None, grid: imagery.Chip) -> imagery.Chip:
        shape = {
            "crs": grid.crs,
            "transform": list(grid.transform)[:6],
            "width": grid.width,
            "height": grid.height,
        }
        return _chip(*self.call("read_on_grid", {"path": path, "bands": bands, "grid": shape}))

    def scan_grid(
        self, path: str, bands: list[int] | None, bounds: Any, bounds_crs: str | None
    ) -> imagery.ScanGrid:
        header, _ = self.call(
            "scan_grid", {"path": path, "bands": bands, "bounds": bounds, "bounds_crs": bounds_crs}
        )
        return _grid(header["grid"])

    def common_grid(self, paths: list[str], names: list[str]) -> imagery.ScanGrid:
        header, _ = self.call("common_grid", {"paths": paths, "names": names})
        return _grid(header["grid"])

    def read_tile(
        self, path: str, indexes: list[int], region: tuple[int, int, int, int], out_w: int, out_h: int
    ) -> imagery.Chip:
        kwargs = {"path": path, "indexes": indexes, "region": list(region), "out_w": out_w, "out_h": out_h}
        return _chip(*self.call("read_tile", kwargs))


def _grid(g: dict[str, Any]) -> imagery.ScanGrid:
    return imagery.ScanGrid(g["band_indexes"], tuple(g["region"]), g["crs"], Affine(*g["transform"]))


def _chip(header: dict[str, Any], arrays: list[np.ndarray]) -> imagery.Chip:
    c = header["chip"]
    valid = arrays[1] if len(arrays) > 1 else None
    return imagery.Chip(
        arrays[0],
        Affine(*c["transform"]),
        c["crs"],
        c["band_indexes"],
        c["nodata"],
        c["source"],
        None if valid is None else valid.astype(bool),
    )


def _died(code: int, kwargs: dict[str, Any]) -> EarthDialError:
    how = f"signal {-code}" if code < 0 else f"exit status {code}"
    return EarthDialError(
        ErrorCode.NOT_A_RASTER,
        f"the reader process ended ({how}) reading {kwargs.get('path', 'the file')}: the file is damaged, or "
        "reading it needs more memory than a reader may take (set by `earthdial serve --max-pixels`)",
    )


def _send(conn: Connection, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
    header = {**header, "arrays": [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays]}
    conn.send_bytes(json.dumps(header).encode())
    for array in arrays:
        conn.send_bytes(np.ascontiguousarray(array).data.cast("B"))


def _receive(conn: Connection) -> tuple[dict[str, Any], list[np.ndarray]]:
    """A reply: its JSON header, then one frame per array it lists, each checked against its dtype and
    shape (received into a fresh array: nothing is unpickled)."""
    header = json.loads(conn.recv_bytes(MAX_HEADER_BYTES))
    out = []
    for spec in header.pop("arrays", []):
        dtype = np.dtype(str(spec["dtype"]))
        if dtype.kind not in ARRAY_KINDS or dtype.hasobject:
            raise EarthDialError(ErrorCode.INTERNAL, f"a reader sent an array of dtype {dtype}")
        array = np.empty([int(n) for n in spec["shape"]], dtype)
        if conn.recv_bytes_into(array.data.cast("B")) != array.nbytes:
            raise EarthDialError(ErrorCode.INTERNAL, "a reader sent an array of the wrong size")
        out.append(array)
    return header, out


# --------------------------------------------------------------------------------------------------
# The reader's side
# --------------------------------------------------------------------------------------------------


def _run(fn: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[np.ndarray]]:
    if fn == "describe":
        return {"info": asdict(imagery.describe(kwargs["path"]))}, []
    if fn == "sample_band":
        sample = imagery.sample_band(kwargs["path"], kwargs["band"], kwargs["size"])
        return {}, [] if sample is None else [sample]
    if fn == "plan_chip":
        plan = imagery.plan_chip(**_bounds(kwargs))
        return {"plan": {**asdict(plan), "transform": list(plan.transform)[:6]}}, []
    if fn == "read_chip":
        return _chip_reply(imagery.read_chip(**_bounds(kwargs)))
    if fn == "read_on_grid":
        g = kwargs["grid"]
        grid = imagery.Chip(
            np.empty((0, g["height"], g["width"]), np.uint8),
            Affine(*g["transform"]),
            g["crs"],
            [],
            None,
            "<grid>",
        )
        return _chip_reply(imagery.read_on_grid(kwargs["path"], kwargs["bands"], grid))
    if fn == "scan_grid":
        area = imagery.scan_grid(kwargs["path"], kwargs["bands"], kwargs["bounds"], kwargs["bounds_crs"])
        return {"grid": {**asdict(area), "transform": list(area.transform)[:6]}}, []
    if fn == "common_grid":
        area = imagery.common_grid(kwargs["paths"], kwargs["names"])
        return {"grid": {**asdict(area), "transform": list(area.transform)[:6]}}, []
    if fn == "read_tile":
        src, crs = _kept_open(kwargs["path"])
        window = Window(*kwargs["region"])
        chip = imagery.tile_chip(
            src, kwargs["path"], kwargs["indexes"], window, kwargs["out_w"], kwargs["out_h"], crs
        )
        return _chip_reply(chip)
    raise EarthDialError(ErrorCode.INTERNAL, f"a reader has no function {fn!r}")


# the raster a scan reads tile after tile, kept open in the reader: (path, identity, stack, dataset, CRS)
_kept: tuple[str, tuple[int, ...], contextlib.ExitStack, Any, str] | None = None


def _kept_open(path: str) -> tuple[Any, str]:
    """The open dataset of `path` for a scan's next tile: the one kept from the last tile while the path
    still names that same file (walked and checked again, file_access.open_file, compared by device,
    inode, size and modification time), else the file opened anew."""
    global _kept
    fd = file_access.open_file(path)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if _kept is not None and _kept[:2] == (path, identity):
        return _kept[3], _kept[4]
    if _kept is not None:
        _kept[2].close()
        _kept = None
    stack = contextlib.ExitStack()
    try:
        src = stack.enter_context(imagery.open_raster(path))
        crs = imagery.crs_string(src.crs)
    except BaseException:
        stack.close()
        raise
    _kept = (path, identity, stack, src, crs)
    return src, crs


def _bounds(kwargs: dict[str, Any]) -> dict[str, Any]:
    bounds = kwargs.get("bounds")
    return {**kwargs, "bounds": tuple(bounds) if bounds is not None else None}


def _chip_reply(chip: imagery.Chip) -> tuple[dict[str, Any], list[np.ndarray]]:
    fields = {
        "transform": list(chip.transform)[:6],
        "crs": chip.crs,
        "band_indexes": chip.band_indexes,
        "nodata": chip.nodata,
        "source": chip.source,
    }
    arrays = [chip.data] + ([chip.valid.astype(np.uint8)] if chip.valid is not None else [])
    return {"chip": fields}, arrays


def _limit_memory(extra: int) -> None:
    """RLIMIT_AS: the address space this reader holds now (its libraries) plus `extra` bytes."""
    with open("/proc/self/status") as f:
        size = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:")), 0)
    if size:
        resource.setrlimit(resource.RLIMIT_AS, (size + extra, size + extra))


def _die_with_parent() -> None:
    """Linux: the kernel kills this reader when the server's thread that started it ends."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    conn = Connection(fd)
    config = json.loads(conn.recv_bytes(MAX_HEADER_BYTES))
    file_access.harden_process()
    os.environ["GDAL_CACHEMAX"] = str(GDAL_CACHE_MB)
    file_access.set_allowed_dirs(config["allowed"])
    limits.configure(limits.Limits(**config["limits"]))
    if sys.platform.startswith("linux"):
        _limit_memory(int(config["memory_bytes"]))
    conn.send_bytes(b'{"ready": true}')
    while True:
        try:
            request = json.loads(conn.recv_bytes(MAX_HEADER_BYTES))
            for _ in range(int(request.get("arrays", 0))):
                conn.recv_bytes()
        except (EOFError, OSError):
            return  # the server closed its end
        try:
            header, arrays = _run(str(request["fn"]), dict(request["kwargs"]))
        except EarthDialError as exc:
            header, arrays = {"error": exc.code, "message": exc.message}, []
        except MemoryError:
            header = {
                "error": ErrorCode.TOO_LARGE,
                "message": f"reading {request['kwargs'].get('path')} needs "
                f"more memory than a reader may take ({config['memory_bytes'] // limits.MIB} MiB, set by "
                "`earthdial serve --max-pixels`)",
            }
            arrays = []
        except Exception as exc:  # a bug: typed `internal`, and the reader goes on
            header, arrays = {"error": ErrorCode.INTERNAL, "message": f"{type(exc).__name__}: {exc}"}, []
        try:
            _send(conn, header, arrays)
        except (OSError, MemoryError):
            return


if __name__ == "__main__":
    main(int(sys.argv[1]))
