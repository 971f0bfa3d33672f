"""Writing results (FeatureCollections from ``georef.features_from_boxes``) to GeoPackage or GeoJSON files,
never destroying what is there (docs/outputs.md).

The format follows the extension: ``.gpkg`` -> GeoPackage, ``.geojson`` / ``.json`` -> GeoJSON. Every
feature gets the fields in ``FIELDS`` whatever its properties hold, so that layers written by different
tasks share one schema; other properties are not stored.

A result is marked as ours by a description starting with ``MARK`` (``gpkg_contents.description`` of a
GeoPackage layer, the ``description`` member of a GeoJSON file). Only our own layers and files are ever
replaced, and only when asked (``overwrite``); anything else at the path is refused with a typed error.

- A new file is built complete in a hidden scratch folder beside the target and linked into place.
- An existing GeoPackage gets the new layer inside ONE SQLite transaction on the file itself (built in a
  scratch GeoPackage by GDAL, then copied in by SQL): a kill at any moment leaves the file as it was or
  with the whole new layer, whoever else holds it open, in WAL mode or not. The other layers and tables
  are never touched.
- An existing GeoJSON result of ours is replaced whole by ``os.replace``.

Scratch folders left by killed writes are removed by the next write into the same folder (a live writer
holds a lock on its own). A full disk and a read-only folder have their own error codes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import numbers
import os
import re
import shutil
import sqlite3
import struct
import tempfile
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import numpy as np

from earthdial.contract import result_features
from earthdial.contract.wire import RESULT_MARK, EarthDialError, ErrorCode

try:
    import fcntl
except ImportError:  # Windows: a live writer's open files cannot be deleted there anyway
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FIELDS",
    "MARK",
    "check_target",
    "clean_scratch",
    "free_layer_name",
    "layer_name",
    "replace_file",
    "write_features",
]

# The attribute schema (docs/outputs.md), defined once in result_features.py for every writer
FIELDS = result_features.NAMES
REAL_FIELDS = result_features.REAL  # the others are text
DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}
MARK = RESULT_MARK  # how a layer or file says it is ours (shared with the plugin through wire.py)
GPKG_VERSION = "1.2"  # QGIS 3.22's GDAL 3.6 warns on 1.4 files; 1.2 has everything a result needs
GPKG_APPLICATION_IDS = (0x47504B47, 0x47503130, 0x47503131)  # "GPKG"; "GP10", "GP11" for 1.0 and 1.1
SCRATCH_PREFIX = ".earthdial-tmp-"
# ours: ".earthdial-tmp-XXXXXXXX"; earlier versions left ".earthdial-XXXXXXXX"
SCRATCH_NAME = re.compile(r"\.earthdial-(tmp-)?[a-z0-9_]{8}")
UNLOCKED_STALE_S = 24 * 3600.0  # where folders cannot be locked (Windows): abandoned once this old
LOW_SPACE_BYTES = 1 << 20  # a write that failed with less free than this failed for want of space
MAX_CHECK_BYTES = 256 << 20  # a larger JSON file is not parsed to see whether it is ours: refused
MAX_LAYER_CHARS = 200
BUSY_TIMEOUT_S = 30.0  # how long a GeoPackage another program keeps locked is waited for
RESERVED_PREFIXES = ("gpkg_", "rtree_", "sqlite_")


def write_features(
    path: str | os.PathLike[str],
    collection: dict[str, Any],
    layer: str | None = None,
    *,
    overwrite: bool = False,
    base_name: str | None = None,
) -> str:
    """Write ``collection`` (CRS in its ``"crs"`` key) to ``path``; returns the name of the layer written.

    ``layer`` names it exactly: an existing layer (GeoJSON: file) of that name is refused with
    ``output_exists`` unless ``overwrite``, and is never replaced when it is not ours
    (``foreign_output``). Without ``layer`` the name is ``base_name`` (default: made from the first
    feature's task, prompt, source and time), with ``_2``, ``_3``... added while it is taken in the
    GeoPackage; a GeoJSON file is one layer, so there it only fills the file's ``name``."""
    path, driver = _target(path)
    if layer is not None:
        _check_layer_name(layer)
    geometry, geometry_type, field_data = _columns(collection)
    crs = collection.get("crs") or None
    name = layer if layer is not None else (base_name or _default_base(collection))
    if layer is None:
        _check_layer_name(name)
    description = _description(collection)
    directory = os.path.dirname(path)
    with _scratch(directory) as scratch:
        try:
            if driver == "GeoJSON":
                _refuse_existing_json(path, overwrite)
                tmp = os.path.join(scratch, "new.geojson")
                _gdal_write(tmp, geometry, geometry_type, field_data, name, driver, crs, description)
                _fsync(tmp)
                try:
                    _install(tmp, path, replace=os.path.lexists(path))
                except FileExistsError:
                    raise _appeared(path) from None
                return name
            if not os.path.lexists(path):
                tmp = os.path.join(scratch, "new.gpkg")
                _gdal_write(tmp, geometry, geometry_type, field_data, name, driver, crs, description)
                _fsync(tmp)
                try:
                    _install(tmp, path, replace=False)
                    return name
                except FileExistsError:  # someone made it meanwhile: add to theirs like to any other
                    pass
            base = name
            for attempt in range(1, MAX_NAME_TRIES + 1):
                name = _layer_to_write(path, layer, base, overwrite)
                tmp = os.path.join(scratch, f"layer{attempt}.gpkg")
                _gdal_write(tmp, geometry, geometry_type, field_data, name, driver, crs, description)
                # a default name was picked free: nothing of that name is ever replaced, --overwrite or not
                try:
                    _merge_layer(
                        path, tmp, name, overwrite=overwrite and layer is not None, exact=layer is not None
                    )
                    return name
                except EarthDialError as exc:
                    # another writer took the free name between the pick and the merge's transaction, which
                    # checks it again: pick the next free one (the user's --layer is never changed)
                    if layer is not None or exc.code != ErrorCode.OUTPUT_EXISTS or attempt == MAX_NAME_TRIES:
                        raise
            raise AssertionError("unreachable")
        except EarthDialError:
            raise
        except Exception as exc:  # classified before the scratch folder (and its partial file) is gone
            raise write_error(exc, path, f"writing layer {name!r} to {path}") from exc


def check_target(path: str | os.PathLike[str], layer: str | None = None, overwrite: bool = False) -> None:
    """The refusals of ``write_features`` that need no result yet, for a command to fail before it runs a
    model: an unknown extension, a missing folder, a file there that is not ours or not a GeoPackage, a
    layer (GeoJSON: file) of that name without ``overwrite``. Also removes stale scratch folders."""
    path, driver = _target(path)
    if layer is not None:
        _check_layer_name(layer)
    clean_scratch(os.path.dirname(path))
    if driver == "GeoJSON":
        _refuse_existing_json(path, overwrite)
    elif os.path.lexists(path):
        try:
            _layer_to_write(path, layer, layer or "earthdial", overwrite)
        except (OSError, sqlite3.Error) as exc:
            raise write_error(exc, path, f"reading {path}") from None


def free_layer_name(path: str | os.PathLike[str], base: str) -> str:
    """``base``, else the first of ``base_2``, ``base_3``... that no layer or table of the GeoPackage at
    ``path`` takes (``base`` itself while there is no file), for a caller that records a layer's name
    before writing it by that exact name."""
    path, driver = _target(path)
    _check_layer_name(base)
    if driver != "GPKG" or not os.path.lexists(path):
        return base
    try:
        return _layer_to_write(path, None, base, False)
    except (OSError, sqlite3.Error) as exc:
        raise write_error(exc, path, f"reading {path}") from None


def layer_name(task: str | None, prompt: str | None, sources: list[str], when: datetime | None = None) -> str:
    """A readable layer name (result_features.layer_name) for a task, prompt and sources."""
    return result_features.layer_name(
        {"task": task, "prompt": prompt, "source": " | ".join(s for s in sources if s)},
        when or datetime.now(timezone.utc),
    )


# --------------------------------------------------------------------------------------------------
# Any file of ours (GeoJSON, the preview PNG): a complete file linked or moved into place
# --------------------------------------------------------------------------------------------------


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
    with _scratch(directory) as scratch:
        tmp = os.path.join(scratch, "new" + os.path.splitext(path)[1])
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                _install(tmp, path, replace=os.path.lexists(path))
            except FileExistsError:
                raise _appeared(path) from None
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


def _install(tmp: str, path: str, replace: bool) -> None:
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


def _appeared(path: str) -> EarthDialError:
    return EarthDialError(
        ErrorCode.OUTPUT_EXISTS,
        f"{path} was made by someone else while this was written; nothing was replaced; run again",
    )


def _fsync(path: str) -> None:
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
def _scratch(directory: str) -> Iterator[str]:
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
            shutil.rmtree(entry.path, ignore_errors=True)  # with the lock held: see _scratch
            removed.append(entry.path)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


# --------------------------------------------------------------------------------------------------
# Targets, names and refusals
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


def _target(path: str | os.PathLike[str]) -> tuple[str, str]:
    path = user_path(path)
    ext = os.path.splitext(path)[1].lower()
    driver = DRIVERS.get(ext)
    if driver is None:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"cannot tell the format of {path}: use one of {', '.join(sorted(DRIVERS))}",
        )
    path = os.path.realpath(path)  # a link's target is what is written, beside it the scratch folder
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise EarthDialError(ErrorCode.FILE_NOT_FOUND, f"folder {directory} does not exist (writing {path})")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise EarthDialError(
            ErrorCode.FOREIGN_OUTPUT, f"{path} exists and is not a file: it is never replaced"
        )
    return path, driver


def _check_layer_name(layer: Any) -> None:
    if not isinstance(layer, str) or not layer.strip():
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"layer name must be a non-empty string, got {layer!r}")
    if len(layer) > MAX_LAYER_CHARS:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"layer name of {len(layer)} characters; at most {MAX_LAYER_CHARS}"
        )
    try:
        layer.encode("utf-8")
    except UnicodeEncodeError:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"layer name {layer!r} is not valid text") from None
    if any(ord(c) < 32 or c == "\x7f" for c in layer):
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"layer name {layer!r} holds control characters")
    if not (layer[0].isalnum() or layer[0] == "_") or layer != layer.strip():
        raise EarthDialError(  # GDAL refuses a GeoPackage layer whose name starts with '*', '-', a quote...
            ErrorCode.BAD_REQUEST,
            f"layer name {layer!r} must start with a letter, digit or '_' and not end in a space",
        )
    if layer.lower().startswith(RESERVED_PREFIXES):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"layer name {layer!r} starts with one of {', '.join(RESERVED_PREFIXES)} (reserved by GeoPackage and SQLite)",
        )


def _default_base(collection: dict[str, Any]) -> str:
    features = collection.get("features") or []
    props = (features[0].get("properties") or {}) if features else {}
    scan = any((f.get("properties") or {}).get("tile") not in (None, "") for f in features)
    return result_features.layer_name(props, scan=scan)


def _description(collection: dict[str, Any]) -> str:
    features = collection.get("features") or []
    props = (features[0].get("properties") or {}) if features else {}
    what = ", ".join(
        f"{k} {_text(props[k])[:80]!r}" for k in ("task", "prompt", "source", "created") if props.get(k)
    )
    return f"{MARK} ({len(features)} feature(s){': ' + what if what else ''})"


def _refuse_existing_json(path: str, overwrite: bool) -> None:
    if not os.path.lexists(path):
        return
    refuse_foreign(path, _is_our_geojson, "GeoJSON result")
    if not overwrite:
        raise EarthDialError(
            ErrorCode.OUTPUT_EXISTS,
            f"{path} holds an earlier EarthDial result; pass --overwrite to replace it, or another name",
        )


def _is_our_geojson(path: str) -> bool:
    try:
        if os.path.getsize(path) > MAX_CHECK_BYTES:
            return False
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return (
        isinstance(data, dict)
        and data.get("type") == "FeatureCollection"
        and isinstance(data.get("description"), str)
        and data["description"].startswith(MARK)
    )


# --------------------------------------------------------------------------------------------------
# GeoPackage: one transaction on the user's file
# --------------------------------------------------------------------------------------------------


def _connect(path: str, mode: str) -> sqlite3.Connection:
    uri = "file:" + urllib.parse.quote(os.fsencode(path)) + f"?mode={mode}"
    return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)


def _geopackage_refusal(con: sqlite3.Connection, path: str) -> EarthDialError | None:
    app_id = con.execute("PRAGMA application_id").fetchone()[0]
    tables = {r[0].lower() for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if app_id not in GPKG_APPLICATION_IDS or not {"gpkg_contents", "gpkg_spatial_ref_sys"} <= tables:
        return EarthDialError(
            ErrorCode.FOREIGN_OUTPUT,
            f"{path} is an SQLite database but not a GeoPackage: it is never changed; choose another name",
        )
    return None


def _open_geopackage(path: str, mode: str) -> sqlite3.Connection:
    """A connection to an existing GeoPackage; ``foreign_output`` when the file is anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise write_error(exc, path, f"cannot read {path}") from None
    if head != b"SQLite format 3\x00":
        raise EarthDialError(
            ErrorCode.FOREIGN_OUTPUT,
            f"{path} exists and is not a GeoPackage: it is never replaced; choose another name",
        )
    con = _connect(path, mode)
    try:
        refusal = _geopackage_refusal(con, path)
    except sqlite3.DatabaseError as exc:
        con.close()
        if "not a database" in str(exc) or "malformed" in str(exc):
            raise EarthDialError(
                ErrorCode.FOREIGN_OUTPUT, f"{path} is not a readable GeoPackage: {exc}"
            ) from None
        raise
    if refusal is not None:
        con.close()
        raise refusal
    return con


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _layer_row(con: sqlite3.Connection, name: str, schema: str = "main") -> tuple[str, str] | None:
    row = con.execute(
        f"SELECT table_name, description FROM {schema}.gpkg_contents WHERE lower(table_name) = lower(?)",
        (name,),
    ).fetchone()
    return (row[0], row[1] or "") if row else None


def _name_taken(con: sqlite3.Connection, name: str) -> bool:
    """A table, view or index of that name (or of its spatial index), or a layer with it as identifier."""
    names = (name.lower(), f"rtree_{name}_geom".lower())
    if con.execute(
        "SELECT 1 FROM main.sqlite_master WHERE type IN ('table', 'view', 'index') AND lower(name) IN (?, ?)",
        names,
    ).fetchone():
        return True
    return (
        con.execute("SELECT 1 FROM main.gpkg_contents WHERE identifier = ?", (name,)).fetchone() is not None
    )


def _layer_decision(
    con: sqlite3.Connection, path: str, name: str, overwrite: bool, exact: bool
) -> str | None:
    """Raise unless ``name`` may be written; returns the existing layer's stored name when it is replaced."""
    row = _layer_row(con, name)
    if row is None:
        if _name_taken(con, name):
            raise EarthDialError(
                ErrorCode.FOREIGN_OUTPUT if exact else ErrorCode.OUTPUT_EXISTS,
                f"{path} already holds a table named like {name!r} that is not an EarthDial layer; "
                "pass another --layer",
            )
        return None
    if not row[1].startswith(MARK):
        raise EarthDialError(
            ErrorCode.FOREIGN_OUTPUT,
            f"layer {row[0]!r} of {path} is not an EarthDial result: it is never replaced; pass another --layer",
        )
    if not overwrite:
        raise EarthDialError(
            ErrorCode.OUTPUT_EXISTS,
            f"{path} already has a layer {row[0]!r}; pass --overwrite to replace it, or another --layer",
        )
    return row[0]


def _layer_to_write(path: str, layer: str | None, base: str, overwrite: bool) -> str:
    """Checks an existing GeoPackage and picks the name: ``layer`` as given, or ``base`` made unique.
    Opened read-write although only read: a read-only connection cannot roll back the journal a killed
    write left (SQLITE_READONLY_ROLLBACK), a read-write one does so first, restoring the old content."""
    con = _open_geopackage(path, "rw")
    try:
        if layer is not None:
            _layer_decision(con, path, layer, overwrite, exact=True)
            return layer
        name, n = base, 1
        while _layer_row(con, name) is not None or _name_taken(con, name):
            n += 1
            name = f"{base}_{n}"
        return name
    finally:
        con.close()


def _merge_layer(path: str, tmp: str, name: str, overwrite: bool, exact: bool) -> None:
    """Copy layer ``name`` from the scratch GeoPackage ``tmp`` into ``path`` in one transaction,
    replacing an older layer of ours of that name when ``overwrite``."""
    con = _open_geopackage(path, "rw")
    try:
        con.create_function("earthdial_srs", 2, _with_srs, deterministic=True)
        con.execute(
            "ATTACH DATABASE ? AS new", ("file:" + urllib.parse.quote(os.fsencode(tmp)) + "?mode=ro",)
        )
        con.execute("BEGIN IMMEDIATE")  # the write lock first: nothing changes between check and write
        try:
            refusal = _geopackage_refusal(con, path)
            if refusal is not None:
                raise refusal
            old = _layer_decision(con, path, name, overwrite, exact)
            if old is not None:
                _drop_layer(con, old)
            _copy_layer(con, name)
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        con.execute("DETACH DATABASE new")
    finally:
        con.close()


def _tables(con: sqlite3.Connection, schema: str) -> dict[str, str]:
    rows = con.execute(f"SELECT name, sql FROM {schema}.sqlite_master WHERE type = 'table'")
    return {r[0].lower(): r[1] for r in rows}


def _columns_of(con: sqlite3.Connection, schema: str, table: str) -> list[tuple[str, bool, Any]]:
    """(name, not null, default) of each column."""
    return [(r[1], bool(r[3]), r[4]) for r in con.execute(f"PRAGMA {schema}.table_info({_q(table)})")]


def _drop_layer(con: sqlite3.Connection, name: str) -> None:
    """Remove a layer of ours and what GeoPackage keeps about it (its triggers go with its table)."""
    tables = _tables(con, "main")
    geom = (
        con.execute(
            "SELECT column_name FROM main.gpkg_geometry_columns WHERE lower(table_name) = lower(?)", (name,)
        ).fetchone()
        if "gpkg_geometry_columns" in tables
        else None
    )
    con.execute(f"DROP TABLE main.{_q(name)}")
    if geom is not None and f"rtree_{name}_{geom[0]}".lower() in tables:
        con.execute(f"DROP TABLE main.{_q(f'rtree_{name}_{geom[0]}')}")
    if "gpkg_metadata_reference" in tables:
        ids = [
            r[0]
            for r in con.execute(
                "SELECT md_file_id FROM main.gpkg_metadata_reference WHERE lower(table_name) = lower(?)",
                (name,),
            )
        ]
        con.execute("DELETE FROM main.gpkg_metadata_reference WHERE lower(table_name) = lower(?)", (name,))
        for md in ids:  # metadata no other reference points at
            if not con.execute(
                "SELECT 1 FROM main.gpkg_metadata_reference WHERE md_file_id = ?", (md,)
            ).fetchone():
                con.execute("DELETE FROM main.gpkg_metadata WHERE id = ?", (md,))
    for table in (
        "gpkg_geometry_columns",
        "gpkg_extensions",
        "gpkg_ogr_contents",
        "gpkg_data_columns",
        "gpkg_contents",
    ):
        if table in tables:
            con.execute(f"DELETE FROM main.{table} WHERE lower(table_name) = lower(?)", (name,))
    if "sqlite_sequence" in tables:
        con.execute("DELETE FROM main.sqlite_sequence WHERE lower(name) = lower(?)", (name,))


def _copy_layer(con: sqlite3.Connection, name: str) -> None:
    """Layer ``name`` of the attached scratch GeoPackage ``new`` into main: the table, its rows, its
    spatial index, its rows in the GeoPackage tables, then its triggers (after the rows, since their
    GeoPackage SQL functions exist only in GDAL)."""
    main_tables = _tables(con, "main")
    new_master = con.execute("SELECT type, name, tbl_name, sql FROM new.sqlite_master").fetchall()
    geom_col, srs_id = con.execute(
        "SELECT column_name, srs_id FROM new.gpkg_geometry_columns WHERE table_name = ?", (name,)
    ).fetchone()
    srs = _srs_in_main(con, srs_id)

    con.execute(next(sql for kind, nm, _t, sql in new_master if kind == "table" and nm == name))
    cols = [c[0] for c in _columns_of(con, "new", name)]
    picks = [
        f"earthdial_srs({_q(c)}, {int(srs)})" if c == geom_col and srs != srs_id else _q(c) for c in cols
    ]
    con.execute(
        f"INSERT INTO main.{_q(name)} ({', '.join(map(_q, cols))}) "
        f"SELECT {', '.join(picks)} FROM new.{_q(name)}"
    )
    rtree = f"rtree_{name}_{geom_col}"
    rtree_sql = next((sql for kind, nm, _t, sql in new_master if kind == "table" and nm == rtree), None)
    if rtree_sql:
        con.execute(rtree_sql)
        con.execute(f"INSERT INTO main.{_q(rtree)} SELECT * FROM new.{_q(rtree)}")

    new_tables = _tables(con, "new")
    for table in ("gpkg_contents", "gpkg_geometry_columns", "gpkg_extensions", "gpkg_ogr_contents"):
        if table not in new_tables:
            continue
        if table not in main_tables:
            if table == "gpkg_ogr_contents":
                continue  # GDAL's own feature counts: a file without them is counted by GDAL itself
            con.execute(new_tables[table])
            main_tables[table] = new_tables[table]
        values: dict[str, Any] = (
            {"srs_id": srs} if table in ("gpkg_contents", "gpkg_geometry_columns") else {}
        )
        if (
            table == "gpkg_contents"
            and con.execute("SELECT 1 FROM main.gpkg_contents WHERE identifier = ?", (name,)).fetchone()
        ):
            values["identifier"] = None  # unique in GeoPackage; another layer of the user's has it
        _copy_rows(con, table, "table_name = ?", name, values)

    counts = "gpkg_ogr_contents" in main_tables
    for kind, _nm, tbl, sql in new_master:
        if kind == "trigger" and tbl == name and (counts or "gpkg_ogr_contents" not in sql):
            con.execute(sql)


def _copy_rows(con: sqlite3.Connection, table: str, where: str, key: Any, values: dict[str, Any]) -> None:
    """The rows of ``new.table`` matching ``where`` into ``main.table``, with ``values`` set, over the
    columns both have (a newer GeoPackage may have more; a NOT NULL one without default gets 'undefined')."""
    new_cols = {c[0] for c in _columns_of(con, "new", table)}
    cols, picks, params = [], [], []
    for col, notnull, default in _columns_of(con, "main", table):
        if col in values:
            cols.append(col)
            picks.append("?")
            params.append(values[col])
        elif col in new_cols:
            cols.append(col)
            picks.append(_q(col))
        elif notnull and default is None:
            cols.append(col)
            picks.append("'undefined'")
    con.execute(
        f"INSERT INTO main.{table} ({', '.join(map(_q, cols))}) SELECT {', '.join(picks)} "
        f"FROM new.{table} WHERE {where}",
        (*params, key),
    )


def _srs_in_main(con: sqlite3.Connection, srs_id: int) -> int:
    """The srs_id in main for the scratch file's ``srs_id``: the same CRS when main has it (by authority
    code, else by definition), else the row copied, under a free id."""
    new_cols = [c[0] for c in _columns_of(con, "new", "gpkg_spatial_ref_sys")]
    row = dict(
        zip(
            new_cols,
            con.execute("SELECT * FROM new.gpkg_spatial_ref_sys WHERE srs_id = ?", (srs_id,)).fetchone(),
            strict=True,
        )
    )
    if str(row["organization"]).upper() != "NONE" or srs_id in (-1, 0):
        found = con.execute(
            "SELECT srs_id FROM main.gpkg_spatial_ref_sys WHERE upper(organization) = upper(?) "
            "AND organization_coordsys_id = ?",
            (row["organization"], row["organization_coordsys_id"]),
        ).fetchone()
    else:
        found = con.execute(
            "SELECT srs_id FROM main.gpkg_spatial_ref_sys WHERE definition = ?", (row["definition"],)
        ).fetchone()
    if found:
        return int(found[0])
    target = srs_id
    if con.execute("SELECT 1 FROM main.gpkg_spatial_ref_sys WHERE srs_id = ?", (srs_id,)).fetchone():
        target = (
            max(100000, con.execute("SELECT max(srs_id) FROM main.gpkg_spatial_ref_sys").fetchone()[0]) + 1
        )
    _copy_rows(con, "gpkg_spatial_ref_sys", "srs_id = ?", srs_id, {"srs_id": target})
    return target


def _with_srs(blob: bytes | None, srs_id: int) -> bytes | None:
    """A GeoPackage geometry blob with another srs_id in its header (bytes 4-7, in the blob's byte order)."""
    if blob is None or len(blob) < 8 or blob[:2] != b"GP":
        return blob
    out = bytearray(blob)
    struct.pack_into("<i" if out[3] & 1 else ">i", out, 4, srs_id)
    return bytes(out)


# --------------------------------------------------------------------------------------------------
# GDAL writes and error classification
# --------------------------------------------------------------------------------------------------


def _gdal_write(path, geometry, geometry_type, field_data, layer, driver, crs, description) -> None:
    import pyogrio.raw

    options: dict[str, Any] = {"layer_options": {"DESCRIPTION": description}}
    if driver == "GPKG":
        options["dataset_options"] = {"VERSION": GPKG_VERSION}
    with warnings.catch_warnings():
        # a collection without CRS is written without one; pyogrio's warning about it is noise here
        warnings.filterwarnings("ignore", message="'crs' was not provided", category=UserWarning)
        pyogrio.raw.write(
            path,
            geometry,
            field_data,
            list(FIELDS),
            layer=layer,
            driver=driver,
            geometry_type=geometry_type,
            crs=crs,
            **options,
        )


MAX_NAME_TRIES = (
    64  # concurrent writers taking default names in one GeoPackage: each try loses to one of them
)
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


# --------------------------------------------------------------------------------------------------
# Features to columns
# --------------------------------------------------------------------------------------------------


def _columns(collection: Any) -> tuple[np.ndarray, str, list[np.ndarray]]:
    """WKB geometries, their common geometry type, and one array per field of FIELDS."""
    import shapely

    features = collection.get("features") if isinstance(collection, dict) else None
    if not isinstance(features, list):
        raise EarthDialError(ErrorCode.BAD_REQUEST, "collection must be a dict with a 'features' list")
    geoms = []
    columns: dict[str, list[Any]] = {name: [] for name in FIELDS}
    for i, feature in enumerate(features):
        if not isinstance(feature, dict):
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"feature {i} is not an object")
        geoms.append(_geometry(feature.get("geometry"), i))
        props = feature.get("properties") or {}
        if not isinstance(props, dict):
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"feature {i}: properties must be an object")
        for name in FIELDS:
            columns[name].append(_value(props.get(name), name, i))

    types = {g.geom_type for g in geoms if g is not None}
    geometry_type = types.pop() if len(types) == 1 else ("Polygon" if not types else "Unknown")
    geometry = np.array(shapely.to_wkb(np.array(geoms, dtype=object)), dtype=object)
    field_data = [
        np.array(columns[name], dtype=np.float64 if name in REAL_FIELDS else object) for name in FIELDS
    ]
    return geometry, geometry_type, field_data


def _geometry(geojson: Any, index: int) -> Any:
    import shapely.geometry

    if geojson is None:
        return None
    try:
        return shapely.geometry.shape(geojson)
    except Exception as exc:  # shapely raises several types for malformed input
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"feature {index}: geometry is not valid GeoJSON: {exc}"
        ) from None


def _text(value: Any) -> str:
    # lone surrogates (from undecodable bytes in a command line) cannot be stored as UTF-8
    return str(value).encode("utf-8", "replace").decode("utf-8")


def _value(value: Any, name: str, index: int) -> Any:
    if name in REAL_FIELDS:
        if value is None:
            return math.nan  # written as NULL
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise EarthDialError(
                ErrorCode.BAD_REQUEST, f"feature {index}: {name} must be a number, got {value!r}"
            )
        return float(value)
    if value is None:
        return value
    if isinstance(value, str):
        return _text(value)
    if hasattr(value, "isoformat"):  # datetime for "created"
        return value.isoformat()
    return _text(value)
