"""Which files a server may read, and which CRSs it may hand to PROJ.

- Files: by-reference requests may only name absolute paths under the allowed directories (`..` taken
  out by the letters); no GDAL virtual file systems or URLs. The file is opened by walking the path from
  the allowed folder's descriptor with O_NOFOLLOW at every component, so no link is followed and a name
  swapped for a link cannot lead out; GDAL then reads that descriptor, never the name. What is opened
  must be a regular file with one link (no FIFO, device, directory, or hard link to a file elsewhere),
  and only through the raster drivers in RASTER_DRIVERS, none of which can name other files (so no VRT,
  GDAL WMS XML, ...), with GDAL's sidecar probing, PAM and HTTP off.
- CRSs: a CRS from a request is accepted only as an authority code, WKT or PROJJSON that names no file
  (no PROJ strings, grids, `init` files, EXTENSION[PROJ4], PARAMETERFILE), checked before PROJ or GDAL
  parse it: PROJ opens the files a CRS names, and a FIFO there would block the server.

The allowed folders are one value, a `FilePolicy`, installed once by a server (or a reader process) with
`install` or `set_allowed_dirs`; the reading code asks `policy()` for it. None, the default, is the
in-process CLI, which reads what its own user names. Who may talk to the server is serving/auth.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.geo import geokeys

# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilePolicy:
    """The folders by-reference requests may read, resolved once (`of`)."""

    dirs: tuple[str, ...]  # their real paths, each once
    # (the folder as named, made absolute; its real path): a request's path is matched against either form
    # by its letters alone, and the walk starts from the real folder's descriptor
    roots: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, dirs: Iterable[str | os.PathLike[str]]) -> FilePolicy:
        """The policy for these directories, resolved now; NotADirectoryError for one that is not."""
        resolved: list[str] = []
        roots: list[tuple[str, str]] = []
        for d in dirs:
            real = os.path.realpath(os.fspath(d))
            if not os.path.isdir(real):
                raise NotADirectoryError(f"allowed directory {d} is not a directory")
            if real not in resolved:
                resolved.append(real)
            for named in (os.path.normpath(os.path.abspath(os.fspath(d))), real):
                if (named, real) not in roots:
                    roots.append((named, real))
        return cls(tuple(resolved), tuple(roots))

    def as_named(self) -> list[str]:
        """The allowed folders as they were named (for a reader process to make the same policy)."""
        return list(dict.fromkeys(named for named, _ in self.roots))

    def check_path(self, path: str) -> str:
        """`path` with `.` and `..` taken out by its letters when that lies under an allowed directory
        (named as given to the server or by its real path). Raises `forbidden_path` otherwise, before
        anything about the file is looked at: no file system call is made here (a name resolved now could
        be swapped for a link before it is opened; `open_file` walks the path from the folder's descriptor
        instead)."""
        _check_name(path)
        dirs = self.dirs
        check_local_path(path, "the path")
        if not os.path.isabs(path):  # relative to what? also keeps GDAL's `DRIVER:...` names out
            raise EarthDialError(
                ErrorCode.FORBIDDEN_PATH,
                f"{path:.200} is not an absolute path; the server reads files under {', '.join(dirs) or 'no directory'}",
            )
        norm = os.path.normpath(path)
        if self.root_of(norm) is not None:
            return norm
        where = ", ".join(dirs) if dirs else "no directory (it was started without --allow-dir)"
        raise EarthDialError(
            ErrorCode.FORBIDDEN_PATH,
            f"{path:.200} is outside the directories this server reads from: {where} "
            "(start it with --allow-dir DIR to add one)",
        )

    def root_of(self, norm: str) -> tuple[str, list[str]] | None:
        """(real allowed folder, the components below it) of a normalised absolute path, or None."""
        for named, real in self.roots:
            prefix = named.rstrip(os.sep) + os.sep
            if norm.startswith(prefix):
                return real, [part for part in norm[len(prefix) :].split(os.sep) if part]
        return None

    def open_file(self, path: str) -> int:
        """A read-only descriptor of the raster `path` names under an allowed folder, for GDAL to open as
        `fd_path(fd)` (the caller closes it once the dataset is closed). The path is walked one component
        at a time from the allowed folder's descriptor with O_NOFOLLOW (`openat`), so no symlink is followed
        anywhere in it and a name swapped for a link between a check and the open cannot lead out of the
        folder: a link is `forbidden_path`, even one to a file inside. The descriptor
        must be a regular file (a FIFO would block its reader for good, a device could be endless) with one
        hard link (a link inside an allowed folder to a file outside it cannot be told from the file itself),
        and a TIFF must pass the byte checks GDAL's open needs (geokeys.py), read through this descriptor."""
        norm = self.check_path(path)
        found = self.root_of(norm)
        if found is None:  # check_path refuses those
            raise EarthDialError(ErrorCode.FORBIDDEN_PATH, f"{path:.200} is outside the allowed directories")
        return _open_under(path, *found)


_policy: FilePolicy | None = None  # None: no restriction (the in-process CLI)


def policy() -> FilePolicy | None:
    """The file policy of this process: None when reads are unrestricted."""
    return _policy


def install(new: FilePolicy | None) -> FilePolicy | None:
    """Make `new` this process's file policy (None lifts the restriction); returns the previous one."""
    global _policy
    previous, _policy = _policy, new
    return previous


def set_allowed_dirs(dirs: Iterable[str | os.PathLike[str]] | None) -> tuple[str, ...] | None:
    """Restrict by-reference reads to these directories (resolved now); None lifts the restriction."""
    new = None if dirs is None else FilePolicy.of(dirs)
    install(new)
    return None if new is None else new.dirs


def allowed_dirs() -> tuple[str, ...] | None:
    current = _policy
    return None if current is None else current.dirs


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _check_name(path: str) -> None:
    """`bad_request` for a path no file can have: a NUL character or a lone surrogate."""
    if "\x00" in path:
        raise EarthDialError(ErrorCode.BAD_REQUEST, "the path holds a NUL character")
    try:
        os.fsencode(path)
    except UnicodeError:  # a lone surrogate: no file can have this name
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"the path {path!a:.200} is not valid Unicode") from None


def check_path(path: str) -> str:
    """The path to open for a by-reference request: `path` itself when reads are unrestricted, else
    what the installed policy's `FilePolicy.check_path` makes of it (`forbidden_path` outside)."""
    current = _policy
    if current is None:
        _check_name(path)
        return path
    return current.check_path(path)


# Tests only: the byte checks of a TIFF (geokeys.py) are skipped, so that a test can show what the reader
# process model alone does with a file they would have refused (tests/backend/test_readers.py). Never set
# it for a server that others use.
SKIP_PRECHECKS = "EARTHDIAL_UNSAFE_SKIP_FILE_PRECHECKS"


def open_file(path: str) -> int:
    """`FilePolicy.open_file` under the installed policy; `forbidden_path` when reads are unrestricted
    (such a process opens files by name: there is no folder to walk from)."""
    current = _policy
    if current is None:
        _check_name(path)
        raise EarthDialError(ErrorCode.FORBIDDEN_PATH, f"{path:.200} is outside the allowed directories")
    return current.open_file(path)


def _open_under(path: str, root: str, parts: list[str]) -> int:
    """The descriptor of `path`, the components `parts` below the real allowed folder `root`."""
    if not parts:
        raise EarthDialError(ErrorCode.NOT_A_RASTER, f"{path} is a directory, not a regular file")
    try:
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise EarthDialError(ErrorCode.NOT_A_RASTER, f"{path} cannot be read: {exc.strerror}") from None
    try:
        for part in parts[:-1]:
            try:
                below = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
                )
            except OSError as exc:
                raise _walk_error(path, part, dir_fd, exc) from None
            os.close(dir_fd)
            dir_fd = below
        last = parts[-1]
        try:  # lstat first: opening a device can have effects of its own
            st = os.stat(last, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            raise _walk_error(path, last, dir_fd, exc) from None
        if stat.S_ISLNK(st.st_mode):
            raise _walk_error(path, last, dir_fd, OSError(errno.ELOOP, os.strerror(errno.ELOOP)))
        _check_regular(path, st)
        try:
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
            fd = os.open(last, flags, dir_fd=dir_fd)
        except OSError as exc:
            raise _walk_error(path, last, dir_fd, exc) from None
    finally:
        os.close(dir_fd)
    try:
        _check_regular(path, os.fstat(fd))  # what was opened, whatever the name holds now
        if os.environ.get(SKIP_PRECHECKS) == "1":
            return fd
        # GDAL reads every directory and makes every band as it opens the file
        too_many = geokeys.ifd_count_refusal(fd) or geokeys.samples_refusal(fd)
        if too_many is not None:
            raise EarthDialError(ErrorCode.NOT_A_RASTER, f"{path} is refused: {too_many}")
        why = geokeys.refusal(fd)  # GDAL builds a GeoTIFF's CRS as it opens it: check its text first
        if why is not None:
            raise EarthDialError(ErrorCode.BAD_CRS, f"{path} is refused: {why}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def fd_path(fd: int) -> str:
    """The name under which GDAL opens descriptor `fd` of this process: the kernel reopens the file the
    descriptor holds (not whatever its old name holds now)."""
    return f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else f"/dev/fd/{fd}"


def _walk_error(path: str, part: str, dir_fd: int, exc: OSError) -> EarthDialError:
    """The typed error for a component of `path` that could not be opened during the walk."""
    try:
        is_link = stat.S_ISLNK(os.stat(part, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        is_link = False
    if exc.errno == errno.ELOOP or is_link:
        return EarthDialError(
            ErrorCode.FORBIDDEN_PATH,
            f"{path:.200} passes through the symbolic link {part!a:.100}: the server follows no link in "
            "the folders it reads (a link can be swapped to lead outside them); name the file itself",
        )
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return EarthDialError(ErrorCode.FILE_NOT_FOUND, f"no such file: {path}")
    return EarthDialError(ErrorCode.NOT_A_RASTER, f"{path} cannot be read: {exc.strerror}")


def remote_path_refusal(path: str) -> str | None:
    """Why `path` is no plain local file name, or None: a GDAL virtual file system (`/vsicurl/`,
    `/vsicurl?url=`, `/vsicurl_streaming/`, `/vsizip/`, `/vsis3/` ... any `/vsi` prefix, also behind
    repeated slashes) reaches URLs, archives and cloud stores; so do URLs themselves."""
    if path.lstrip("/").lower().startswith("vsi") and path.startswith("/"):
        return "a GDAL virtual file system (/vsi...) path"
    if _URL.match(path):
        return "a URL"
    return None


def check_local_path(path: str, what: str) -> str:
    """`path` when it names a local file; else `forbidden_path` (no network request is ever made for it)."""
    why = remote_path_refusal(path)
    if why is not None:
        raise EarthDialError(
            ErrorCode.FORBIDDEN_PATH,
            f"{what} {path!a:.200} is {why}: only local files are read (GDAL virtual file systems and URLs "
            "can reach the network)",
        )
    return path


def check_regular(path: str) -> None:
    """`not_a_raster` unless `path` is a regular file (a FIFO would block its reader for good), checked
    without opening it; `file_not_found` when there is nothing. For files whose reader is not restricted
    to the allowed folders (the CLI's own inputs that come from data files)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise EarthDialError(ErrorCode.FILE_NOT_FOUND, f"no such file: {path}") from None
    except OSError as exc:
        raise EarthDialError(ErrorCode.NOT_A_RASTER, f"{path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        _check_regular(path, st)


def _check_regular(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a socket"
        )
        raise EarthDialError(ErrorCode.NOT_A_RASTER, f"{path} is {kind}, not a regular file")
    if st.st_nlink > 1:
        raise EarthDialError(
            ErrorCode.FORBIDDEN_PATH,
            f"{path} has {st.st_nlink} hard links; the server reads only files with one (a hard link may "
            "lead to a file outside its directories): copy the file instead of linking it",
        )


# Raster formats the server opens for by-reference requests: none of them can name another file. VRT,
# GDAL's WMS/WMTS/TMS XML, and formats with external parts are left out on purpose.
RASTER_DRIVERS = ("GTiff", "PNG", "JPEG")
# GDAL settings for reads in a restricted server: read only the named file (no sibling listing, so no
# .ovr/.msk/.aux.xml/world file is probed, where a FIFO would block the read), write no .aux.xml, and no
# HTTP even if some path got through.
GDAL_READ_OPTIONS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_PAM_ENABLED": "NO",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".earthdial-no-http",
    "GDAL_HTTP_MAX_RETRY": "0",
    "GDAL_HTTP_TIMEOUT": "1",
}


def harden_process() -> None:
    """Process-wide settings of a server: PROJ's network (grid downloads) and GDAL's HTTP off, the GDAL
    read options for every thread. Call before any CRS is built."""
    os.environ.update(GDAL_READ_OPTIONS)
    os.environ["PROJ_NETWORK"] = "OFF"
    try:
        import pyproj.network

        pyproj.network.set_network_enabled(False)
    except ImportError:  # pyproj is a dependency of the backend; without it there is no PROJ to turn off
        pass


# --------------------------------------------------------------------------------------------------
# CRSs
# --------------------------------------------------------------------------------------------------

MAX_CRS_CHARS = 16 * 1024
_AUTHORITY = re.compile(
    r"[A-Za-z][A-Za-z0-9_]{0,31}:[A-Za-z0-9_.]{1,32}"
)  # EPSG:4326, OGC:CRS84, ESRI:102100
_URN = re.compile(r"urn:ogc:def:crs:[A-Za-z0-9_]{1,32}:[A-Za-z0-9_.]{0,16}:[A-Za-z0-9_.]{1,32}", re.I)
_WKT = re.compile(
    r"\s*(PROJCS|GEOGCS|GEOCCS|VERT_CS|COMPD_CS|LOCAL_CS|FITTED_CS|PROJCRS|PROJECTEDCRS|GEOGCRS|"
    r"GEOGRAPHICCRS|GEODCRS|GEODETICCRS|VERTCRS|VERTICALCRS|COMPOUNDCRS|ENGCRS|ENGINEERINGCRS|BOUNDCRS|"
    r"DERIVEDPROJCRS|TIMECRS|PARAMETRICCRS)\s*[\[(]",
    re.I,
)
# what can make PROJ or GDAL open a file: PROJ strings and their keys, WKT1's EXTENSION["PROJ4", ...],
# WKT2's PARAMETERFILE, methods written as PROJ pipelines
_NAMES_FILES = re.compile(
    r"\+\s*[A-Za-z_]|\b(nadgrids|geoidgrids|grids|init|file|proj)\s*=|EXTENSION\s*[\[(]|PARAMETERFILE\s*[\[(]|"
    r"PROJ-based",
    re.I,
)


def crs_refusal(text: str) -> str | None:
    """Why a CRS from a request must not be parsed, or None when it may: only authority codes, WKT and
    PROJJSON are accepted, and none that names a file (grids, init files, PROJ pipelines)."""
    if len(text) > MAX_CRS_CHARS:
        return f"a CRS of {len(text)} characters (at most {MAX_CRS_CHARS})"
    stripped = text.strip()
    if _AUTHORITY.fullmatch(stripped) or _URN.fullmatch(stripped):
        return None
    if stripped.startswith("{"):
        try:
            tree = json.loads(stripped)
        except (ValueError, RecursionError):
            return "PROJJSON that is not valid JSON"
        if _json_names_files(tree, 0):
            return "PROJJSON naming a file (a grid or a PROJ pipeline)"
        return None
    if _WKT.match(stripped):
        return (
            "WKT naming a file (EXTENSION, PARAMETERFILE or a PROJ string)"
            if _NAMES_FILES.search(stripped)
            else None
        )
    if _NAMES_FILES.search(stripped):
        return "a PROJ string (PROJ strings can name grid and init files)"
    return "a CRS that is not an authority code (EPSG:4326), WKT or PROJJSON"


def _json_names_files(node: Any, depth: int) -> bool:
    if depth > 64:
        return True
    if isinstance(node, str):
        return bool(_NAMES_FILES.search(node))
    if isinstance(node, list):
        return any(_json_names_files(n, depth + 1) for n in node)
    if isinstance(node, dict):
        if isinstance(node.get("value"), str):  # a parameter whose value is a file name
            return True
        return any(
            _json_names_files(k, depth + 1) or _json_names_files(v, depth + 1) for k, v in node.items()
        )
    return False


def check_crs(text: str, what: str) -> str:
    """`text` when it is a CRS form that names no file; else `bad_crs`, before PROJ sees it."""
    why = crs_refusal(text)
    if why is not None:
        raise EarthDialError(
            ErrorCode.BAD_CRS,
            f"the {what} CRS {text!a:.120} is refused: {why}. Send an authority code such as EPSG:32633, "
            "WKT or PROJJSON without grid files",
        )
    return text
