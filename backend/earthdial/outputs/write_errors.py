"""A failed write as a typed error: ``disk_full``, ``read_only``, ``busy`` or ``internal``
(docs/outputs.md, "Disk full, read-only"), for every writer of result files and journals."""

from __future__ import annotations

import errno
import os
import sqlite3

from earthdial.contract.wire import EarthDialError, ErrorCode

__all__ = ["write_error"]

LOW_SPACE_BYTES = 1 << 20  # a write that failed with less free than this failed for want of space
DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
READ_ONLY_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}
SQLITE_READONLY, SQLITE_FULL = 8, 13


def write_error(exc: BaseException, path: str, what: str) -> EarthDialError:
    """A failed write as a typed error: ``disk_full``, ``read_only``, ``busy`` (a GeoPackage another
    program keeps locked) or ``internal``. GDAL's messages rarely name the cause, so the folder is
    looked at too: hardly any space left, or not writable."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    code = ErrorCode.INTERNAL
    number = getattr(exc, "errno", None)
    sqlite_code = getattr(exc, "sqlite_errorcode", None)
    if sqlite_code is not None:
        sqlite_code &= 0xFF  # the primary code of an extended one
    text = str(exc).lower()
    if (
        number in DISK_FULL_ERRNOS
        or sqlite_code == SQLITE_FULL
        or "no space left" in text
        or "disk is full" in text
    ):
        code = ErrorCode.DISK_FULL
    elif (
        number in READ_ONLY_ERRNOS
        or sqlite_code == SQLITE_READONLY
        or "read-only file system" in text
        or "readonly database" in text
    ):
        code = ErrorCode.READ_ONLY
    elif isinstance(exc, sqlite3.OperationalError) and "locked" in text:
        code = ErrorCode.BUSY
    elif number == errno.ENAMETOOLONG:  # the name the user gave, not a fault of ours
        code = ErrorCode.BAD_REQUEST
    elif _low_space(directory):
        code = ErrorCode.DISK_FULL
    elif not os.access(directory, os.W_OK):
        code = ErrorCode.READ_ONLY
    advice = {
        ErrorCode.DISK_FULL: f"the disk holding {directory} is full; free some space, or write elsewhere",
        ErrorCode.READ_ONLY: f"{directory} cannot be written (read-only or no permission); write elsewhere",
        ErrorCode.BUSY: "another program holds the GeoPackage locked; save or close its edits and run again",
        ErrorCode.BAD_REQUEST: "the file name is longer than the file system allows; pick a shorter one",
    }.get(code)
    message = f"{what} failed: {exc}" + (f" ({advice})" if advice else "") + "; nothing was changed"
    return EarthDialError(code, message)


def _low_space(directory: str) -> bool:
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):  # no statvfs on Windows
        return False
    return st.f_bavail * st.f_frsize < LOW_SPACE_BYTES or (st.f_files > 0 and st.f_favail == 0)
