"""Fetch a published EarthDial checkpoint from the Hugging Face hub into a folder: the one place the
project downloads anything, and only when the user asks (`earthdial download`, or the plugin's Settings).

What it guarantees:
- every file comes from one commit: the revision is resolved once and the commit is recorded, so a
  resumed download never mixes two versions of the repository;
- a killed or dropped download resumes where it stopped (an HTTP Range request continues the partial
  file);
- every file is checked against the checksum the hub publishes for it (sha256 for LFS files, the git
  blob id for the others) before it counts as downloaded; a file that does not match is deleted;
- files arrive in ``DIR/.partial`` and move into DIR only when all of them are verified, with a record
  (``.earthdial-download.json``) written last: DIR never looks like a model folder while incomplete;
- a download that does not fit on the disk is refused before the first byte;
- a Ctrl+C stops it within WAKE_S, keeping what was received: the transfer runs in a worker thread and
  the calling thread only waits, so a stalled read cannot hold the Ctrl+C back.

huggingface_hub lists the files (``model_info(files_metadata=True)``), builds the URLs and headers and
provides the HTTP client; the transfer itself is ours because ``hf_hub_download`` (2.x) writes each
attempt to a fresh temporary file, so a killed process starts that file over.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from earthdial.contract.wire import EarthDialError

PARTIAL = ".partial"  # where files are fetched and verified, inside the target folder
STATE = "state.json"  # in PARTIAL: the commit and file list being fetched (what a resume continues)
RECORD = ".earthdial-download.json"  # in the target folder, written last: every file is verified
INCOMPLETE = ".incomplete"  # suffix of a file still being received
CHUNK_LOG_S = 1.0  # at most one progress event a second per file (and one at each file's end)
READ_TIMEOUT_S = 60.0
# The transfer runs in a worker thread; the calling (main) thread only waits, waking this often. A Ctrl+C
# that lands while a thread is entering a blocking socket read does not interrupt that read (CPython only
# sets a flag that is looked at when the read returns, after up to READ_TIMEOUT_S of a stalled hub):
# waiting in short slices bounds how long such a Ctrl+C goes unnoticed.
WAKE_S = 0.2
STOP_WAIT_S = 5.0  # after a Ctrl+C, how long the worker is given to close the partial file


@dataclass(frozen=True)
class Checkpoint:
    name: str
    repo_id: str
    # A branch or a commit. "main" until a commit has been checked against the published files: see
    # README "Get the model" for how to pin one (the commit actually fetched is always recorded).
    revision: str
    use: str


CHECKPOINTS: dict[str, Checkpoint] = {
    c.name: c
    for c in (
        Checkpoint(
            "EarthDial_4B_RGB",
            "akshaydudhane/EarthDial_4B_RGB",
            "main",
            "RGB imagery and RGB time series (stage 2)",
        ),
        Checkpoint(
            "EarthDial_4B_MS",
            "akshaydudhane/EarthDial_4B_MS",
            "main",
            "multispectral and SAR imagery (stage 3)",
        ),
        Checkpoint(
            "EarthDial_4B_Methane_UHI",
            "akshaydudhane/EarthDial_4B_Methane_UHI",
            "main",
            "methane plumes and urban heat islands (further stage-3 tuning)",
        ),
    )
}


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the repository root, "/"-separated
    size: int
    sha256: str | None  # LFS files: the hub's sha256 of the content
    blob_id: str | None  # other files: the git blob id (sha1 of "blob <size>\0" + content)


Progress = Callable[[dict[str, Any]], None]


def checkpoints() -> list[dict[str, str]]:
    """The checkpoints `earthdial download` knows, for `--list` (and the plugin, which never lists them)."""
    return [asdict(c) for c in CHECKPOINTS.values()]


class _Transfer:
    """What the worker thread is receiving, so that the waiting thread can stop it on Ctrl+C."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._response: Any = None

    def receiving(self, response: Any) -> None:
        with self._lock:
            self._response = response
        if response is not None and self.stopped.is_set():
            self.stop()  # stopped while the request was being sent: end this response too

    def check(self) -> None:
        if self.stopped.is_set():
            raise KeyboardInterrupt  # the user's, raised again by the waiting thread: nothing is deleted

    def stop(self) -> None:
        """Shut the open response's socket: a read blocked on a stalled hub returns at once."""
        self.stopped.set()
        with self._lock:
            response = self._response
        stream = response.extensions.get("network_stream") if response is not None else None
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed


def download(
    name: str,
    directory: str | os.PathLike[str],
    revision: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Fetch checkpoint ``name`` into ``directory`` (created; it must be empty, or a download of the same
    checkpoint to continue). Returns the folder, complete and verified. Raises EarthDialError; a Ctrl+C
    (KeyboardInterrupt) stops it within WAKE_S, keeping what was received."""
    transfer = _Transfer()
    outcome: list[Any] = []

    def work() -> None:
        try:
            outcome.append(_download(name, directory, revision, progress, transfer))
        except BaseException as exc:  # handed to the waiting thread, which raises it
            outcome.append(exc)

    worker = threading.Thread(target=work, name="earthdial-download", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(WAKE_S)
    except BaseException:  # Ctrl+C: stop the transfer, let it close the partial file, then report
        transfer.stop()
        worker.join(STOP_WAIT_S)
        raise
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return Path(outcome[0])


def _download(
    name: str,
    directory: str | os.PathLike[str],
    revision: str | None,
    progress: Progress | None,
    transfer: _Transfer,
) -> Path:
    emit = progress or (lambda _event: None)
    checkpoint = CHECKPOINTS.get(name)
    if checkpoint is None:
        raise EarthDialError("bad_request", f"unknown checkpoint {name!r}: one of {', '.join(CHECKPOINTS)}")
    target = Path(directory).expanduser().absolute()
    wanted = revision or checkpoint.revision
    done = _finished_record(target)
    if done is not None:
        if done.get("repo_id") == checkpoint.repo_id and revision in (
            None,
            done.get("revision"),
            done.get("commit"),
        ):
            emit({"event": "done", "path": str(target), "commit": done.get("commit"), "already": True})
            return target
        raise EarthDialError(
            "output_exists",
            f"{target} already holds {done.get('repo_id')} at {done.get('commit')}: choose another folder",
        )
    if target.exists() and not target.is_dir():
        raise EarthDialError("output_exists", f"{target} is a file, not a folder")
    strangers = sorted(p.name for p in target.iterdir() if p.name != PARTIAL) if target.is_dir() else []
    if strangers:
        raise EarthDialError(
            "output_exists",
            f"{target} is not empty ({', '.join(strangers[:3])}"
            f"{', ...' if len(strangers) > 3 else ''}): choose a new or empty folder",
        )

    partial = target / PARTIAL
    state = _read_state(partial)
    if state is None or state["repo_id"] != checkpoint.repo_id or state["revision"] != wanted:
        if state is not None:  # another checkpoint or revision was being fetched here: not ours to mix
            raise EarthDialError(
                "output_exists",
                f"{partial} holds a partial download of {state['repo_id']} at "
                f"{state['revision']}: finish it or delete that folder",
            )
        commit, files = _listing(checkpoint.repo_id, wanted)
        transfer.check()
        state = {
            "repo_id": checkpoint.repo_id,
            "revision": wanted,
            "commit": commit,
            "files": [asdict(f) for f in files],
        }
    files = [RemoteFile(**f) for f in state["files"]]
    commit = state["commit"]

    have = {f.path: _bytes_there(partial, f) for f in files}
    total = sum(f.size for f in files)
    _check_space(target, total - sum(have.values()))
    emit(
        {
            "event": "start",
            "checkpoint": name,
            "repo_id": checkpoint.repo_id,
            "commit": commit,
            "files": len(files),
            "bytes": total,
            "have": sum(have.values()),
        }
    )
    try:
        partial.mkdir(parents=True, exist_ok=True)
        _write_json(partial / STATE, state)
    except OSError as exc:
        raise _os_error(exc, partial) from exc

    received = sum(have.values())
    for f in files:
        transfer.check()
        if (partial / f.path).is_file():
            continue  # verified by an earlier run (only verified files get their final name)
        others = received - have[f.path]  # the bytes of every other file already here
        _fetch(checkpoint.repo_id, commit, f, partial, others, total, emit, transfer)
        received = others + f.size
        emit({"event": "verified", "file": f.path})

    try:
        for f in files:
            dest = target / f.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial / f.path, dest)
        record = {
            "checkpoint": name,
            "repo_id": checkpoint.repo_id,
            "revision": wanted,
            "commit": commit,
            "files": state["files"],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _write_json(target / RECORD, record)
        shutil.rmtree(partial)
    except OSError as exc:
        raise _os_error(exc, target) from exc
    emit({"event": "done", "path": str(target), "commit": commit, "already": False})
    return target


def _finished_record(target: Path) -> dict[str, Any] | None:
    try:
        return json.loads((target / RECORD).read_text())
    except (OSError, ValueError):
        return None


def _read_state(partial: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((partial / STATE).read_text())
    except (OSError, ValueError):
        return None
    return (
        state
        if isinstance(state, dict) and {"repo_id", "revision", "commit", "files"} <= state.keys()
        else None
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _listing(repo_id: str, revision: str) -> tuple[str, list[RemoteFile]]:
    """The commit ``revision`` points at and its files with their published sizes and checksums."""
    if _offline():
        raise EarthDialError(
            "bad_request",
            "HF_HUB_OFFLINE is set, so nothing may be downloaded: "
            "unset it (and TRANSFORMERS_OFFLINE) to run earthdial download",
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, timeout=READ_TIMEOUT_S)
    except RevisionNotFoundError as exc:
        raise EarthDialError("file_not_found", f"{repo_id} has no revision {revision!r}") from exc
    except RepositoryNotFoundError as exc:
        raise EarthDialError("file_not_found", f"the hub has no repository {repo_id}") from exc
    except HfHubHTTPError as exc:
        raise EarthDialError("disconnected", f"the hub refused to list {repo_id}: {exc}") from exc
    except Exception as exc:  # httpx2's network errors: no stable base class to name across versions
        raise EarthDialError("disconnected", f"cannot reach the hub to list {repo_id}: {exc}") from exc
    if not info.sha or not info.siblings:
        raise EarthDialError("bad_request", f"the hub listed no commit or no files for {repo_id}@{revision}")
    files = []
    for s in info.siblings:
        _check_relative(s.rfilename)
        if s.lfs is not None:
            files.append(RemoteFile(s.rfilename, int(s.lfs.size), s.lfs.sha256.lower(), None))
        elif s.size is not None and s.blob_id:
            files.append(RemoteFile(s.rfilename, int(s.size), None, s.blob_id.lower()))
        else:
            raise EarthDialError("bad_request", f"the hub published no size or checksum for {s.rfilename}")
    return info.sha, files


def _check_relative(path: str) -> None:
    """A file name from the hub may not leave the target folder."""
    parts = PurePosixPath(path).parts
    if (
        not parts
        or path.startswith("/")
        or "\\" in path
        or any(p in ("..", ".", "") for p in parts)
        or parts[0] == PARTIAL
        or path == RECORD
    ):
        raise EarthDialError("bad_request", f"the hub listed a file name this folder cannot hold: {path!r}")


def _bytes_there(partial: Path, f: RemoteFile) -> int:
    """Bytes of ``f`` already on disk: all of a verified file, the received part of an incomplete one."""
    if (partial / f.path).is_file():
        return f.size
    try:
        return min((partial / (f.path + INCOMPLETE)).stat().st_size, f.size)
    except OSError:
        return 0


def _check_space(target: Path, needed: int) -> None:
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise EarthDialError(
            "disk_full",
            f"the download needs {_size(needed)} more and {probe} has "
            f"{_size(free)} free: free some space or choose another folder",
        )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"  # unreachable


def _hasher(f: RemoteFile) -> Any:
    if f.sha256 is not None:
        return hashlib.sha256()
    h = hashlib.sha1(usedforsecurity=False)  # git's blob id: what the hub publishes for non-LFS files
    h.update(f"blob {f.size}\0".encode())
    return h


def _fetch(
    repo_id: str,
    commit: str,
    f: RemoteFile,
    partial: Path,
    others: int,
    total: int,
    emit: Progress,
    transfer: _Transfer,
) -> None:
    """Receive ``f`` (continuing its incomplete part), verify it and give it its final name. ``others``:
    the bytes of the other files already here, for the overall progress."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    incomplete = partial / (f.path + INCOMPLETE)
    incomplete.parent.mkdir(parents=True, exist_ok=True)
    start = incomplete.stat().st_size if incomplete.is_file() else 0
    if start > f.size:  # longer than published: not a prefix of this file
        incomplete.unlink()
        start = 0
    digest = _hasher(f)
    if start:
        with open(incomplete, "rb") as part:
            for block in iter(lambda: part.read(1 << 20), b""):
                digest.update(block)
    got = start
    if got < f.size:
        if _offline():
            raise EarthDialError(
                "bad_request",
                "HF_HUB_OFFLINE is set, so nothing may be downloaded: "
                "unset it (and TRANSFORMERS_OFFLINE) to run earthdial download",
            )
        headers = build_hf_headers()
        headers["Accept-Encoding"] = "identity"  # byte ranges of the stored file, not of a compressed copy
        if start:
            headers["Range"] = f"bytes={start}-"
        url = hf_hub_url(repo_id, f.path, revision=commit)
        last = 0.0
        try:
            with get_session().stream("GET", url, headers=headers, timeout=READ_TIMEOUT_S) as response:
                transfer.receiving(response)
                hf_raise_for_status(response)
                if start and response.status_code != 206:  # the server sent the whole file: start over
                    got = start = 0
                    digest = _hasher(f)
                mode = "ab" if start else "wb"
                with open(incomplete, mode, buffering=0) as out:
                    for chunk in response.iter_bytes():
                        if got + len(chunk) > f.size:
                            raise EarthDialError(
                                "bad_request",
                                f"{f.path}: the hub sent more than its published {f.size} bytes",
                            )
                        out.write(chunk)
                        digest.update(chunk)
                        got += len(chunk)
                        now = time.monotonic()
                        if now - last >= CHUNK_LOG_S or got == f.size:
                            last = now
                            emit(
                                {
                                    "event": "progress",
                                    "file": f.path,
                                    "done": got,
                                    "size": f.size,
                                    "all_done": others + got,
                                    "all_size": total,
                                }
                            )
                        transfer.check()  # after the write: what was received is kept
        except EarthDialError:
            incomplete.unlink(missing_ok=True)
            raise
        except HfHubHTTPError as exc:  # an answer, not a dropped line (an OSError too: caught first)
            status = exc.response.status_code if exc.response is not None else "?"
            raise EarthDialError(
                "file_not_found" if status == 404 else "bad_request",
                f"{f.path}: the hub answered HTTP {status} at commit {commit}",
            ) from exc
        except OSError as exc:  # writing: the disk filled up or went read-only under us
            raise _os_error(exc, incomplete) from exc
        except Exception as exc:  # httpx2's network errors
            if transfer.stopped.is_set():  # the read was ended by stop(): a Ctrl+C, not a dropped line
                raise KeyboardInterrupt from None
            raise EarthDialError(
                "disconnected",
                f"{f.path}: the download stopped at {got} of {f.size} bytes "
                f"({exc}); run the same command again to continue it",
            ) from exc
        if got < f.size:
            raise EarthDialError(
                "disconnected",
                f"{f.path}: the hub closed the connection at {got} of {f.size} "
                "bytes; run the same command again to continue it",
            )
    published = f.sha256 or f.blob_id
    kind = "sha256" if f.sha256 else "git blob id"
    if digest.hexdigest() != published:
        incomplete.unlink(missing_ok=True)  # never kept: a corrupt prefix would poison a resume too
        raise EarthDialError(
            "bad_request",
            f"{f.path}: its {kind} {digest.hexdigest()} does not match the "
            f"published {published}; the file was deleted (run the command again to fetch "
            "it anew; if it happens again, the hub or a proxy serves damaged data)",
        )
    os.replace(incomplete, partial / f.path)


def _os_error(exc: OSError, where: Path) -> EarthDialError:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EarthDialError(
            "disk_full",
            f"{where}: the disk is full ({exc.strerror}); the downloaded part is "
            "kept: free some space and run the same command again",
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return EarthDialError("read_only", f"{where} cannot be written: {exc.strerror}")
    return EarthDialError("internal", f"{where}: {exc}")
