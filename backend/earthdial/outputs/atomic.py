"""Any file of ours (GeoJSON, the preview PNG, a new GeoPackage) written complete and then linked or moved
into place, and the scratch folders beside the target that such files are built in (docs/outputs.md).

- A new file is built complete in a hidden scratch folder beside the target and linked into place (a hard
  link, so that a file someone made meanwhile is never clobbered).
- An existing file of ours is replaced whole by ``os.replace``.

Scratch folders left by killed writes are removed by the next write into the same folder (a live writer
holds a lock on its own).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.outputs.write_errors import write_error

try:
    import fcntl
except ImportError:  # Windows: a live writer's open files cannot be deleted there anyway
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "appeared",
    "clean_scratch",
    "fsync",
    "install",
    "refuse_foreign",
    "replace_file",
    "scratch_folder",
    "user_path",
]

SCRATCH_PREFIX = ".earthdial-tmp-"
# ours: ".earthdial-tmp-XXXXXXXX"; earlier versions left ".earthdial-XXXXXXXX"
SCRATCH_NAME = re.compile(r"\.earthdial-(tmp-)?[a-z0-9_]{8}")
UNLOCKED_STALE_S = 24 * 3600.0  # where folders cannot be locked (Windows): abandoned once this old


# --------------------------------------------------------------------------------------------------
# A path, and a complete file linked or moved into place
# --------------------------------------------------------------------------------------------------


def user_path(path: Any) -> str:
    """An output path as given, checked to be one the file system can take (no NUL, encodable);
    never globbed or otherwise interpreted."""
    if not isinstance(path, (str, os.PathLike)):
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"output path must be a string, got {path!r}")
    path = os.fspath(path)
    if not isinstance(path, str) or not path or "\x00" in path:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"output path {path!r} is empty or holds a NUL character")
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"output path {path!r} is not valid text for this system"
        ) from None
    return path


def replace_file(
    path: str | os.PathLike[str], data: bytes, is_ours: Callable[[str], bool], what: str = "file"
) -> str:
    """Write ``data`` to ``path`` atomically; an existing file is replaced only when ``is_ours(path)``
    (``foreign_output`` otherwise). Returns the real path written."""
    path = os.path.realpath(user_path(path))
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise EarthDialError(ErrorCode.FILE_NOT_FOUND, f"folder {directory} does not exist (writing {path})")
    refuse_foreign(path, is_ours, what)
    with scratch_folder(directory) as scratch:
        tmp = os.path.join(scratch, "new" + os.path.splitext(path)[1])
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                install(tmp, path, replace=os.path.lexists(path))
            except FileExistsError:
                raise appeared(path) from None
        except EarthDialError:
            raise
        except Exception as exc:
            raise write_error(exc, path, f"writing the {what} {path}") from exc
    return path


def refuse_foreign(path: str, is_ours: Callable[[str], bool], what: str) -> None:
    """``foreign_output`` when something that is not ours is at ``path``."""
    if not os.path.lexists(path):
        return
    if not os.path.isfile(path) or not is_ours(path):
        raise EarthDialError(
            ErrorCode.FOREIGN_OUTPUT,
            f"{path} exists and is not an EarthDial {what}: it is never replaced; choose another name",
        )


def install(tmp: str, path: str, replace: bool) -> None:
    """Put the complete file ``tmp`` at ``path``: a hard link when nothing may be there (so that a file
    that appeared meanwhile is never clobbered: FileExistsError), else a rename over it."""
    if replace:
        with contextlib.suppress(OSError):
            shutil.copymode(path, tmp)  # the replaced file's permissions, not the scratch file's
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            if os.path.lexists(path):  # a file system without hard links: the rename's small race
                raise FileExistsError(errno.EEXIST, "exists", path) from None
            os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def appeared(path: str) -> EarthDialError:
    return EarthDialError(
        ErrorCode.OUTPUT_EXISTS,
        f"{path} was made by someone else while this was written; nothing was replaced; run again",
    )


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; the rename is durable enough there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# Scratch folders
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_folder(directory: str) -> Iterator[str]:
    """A hidden folder beside the target for this write, locked while it lives, removed after.

    The lock is an flock on the folder itself. A cleaner removes only folders it could lock, and holds
    the lock while removing, so a writer that finds its new folder gone once it holds the lock (a
    cleaner got there between mkdtemp and flock) just makes another."""
    clean_scratch(directory)
    for _ in range(5):
        try:
            scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=directory)
            fd = _lock_folder(scratch, wait=True)
        except FileNotFoundError:  # a concurrent writer's cleaner removed it before it was locked
            continue
        except OSError as exc:
            raise write_error(exc, directory, f"cannot write in {directory}") from None
        if fd is None or _same_folder(scratch, fd):
            break
        os.close(fd)
    else:
        raise EarthDialError(ErrorCode.INTERNAL, f"cannot keep a scratch folder in {directory}")
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def _lock_folder(folder: str, wait: bool) -> int | None:
    """An fd of ``folder`` holding its lock; None where folders cannot be locked (Windows), or when
    ``wait`` is false and another process holds it (raises BlockingIOError)."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _same_folder(folder: str, fd: int) -> bool:
    try:
        return os.stat(folder).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def clean_scratch(directory: str) -> list[str]:
    """Remove the scratch folders of writes that were killed (nobody holds their lock); returns them."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not SCRATCH_NAME.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        if fcntl is None:  # no locks: only what is surely abandoned
            with contextlib.suppress(OSError):
                if time.time() - entry.stat(follow_symlinks=False).st_mtime > UNLOCKED_STALE_S:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(entry.path)
            continue
        try:
            fd = _lock_folder(entry.path, wait=False)
        except OSError:  # a live writer holds it (or it is gone already)
            continue
        try:
            shutil.rmtree(entry.path, ignore_errors=True)  # with the lock held: see scratch_folder
            removed.append(entry.path)
        finally:
            if fd is not None:
                os.close(fd)
    return removed
