"""Writing results (FeatureCollections from ``georef.features_from_boxes``) to GeoPackage or GeoJSON files,
never destroying what is there (docs/outputs.md): the entry point for every writer of result files.

The format follows the extension: ``.gpkg`` -> GeoPackage, ``.geojson`` / ``.json`` -> GeoJSON. Every
feature gets the fields in ``FIELDS`` whatever its properties hold, so that layers written by different
tasks share one schema; other properties are not stored.

A result is marked as ours by a description starting with ``MARK`` (``gpkg_contents.description`` of a
GeoPackage layer, the ``description`` member of a GeoJSON file). Only our own layers and files are ever
replaced, and only when asked (``overwrite``); anything else at the path is refused with a typed error.

- A new file is built complete in a hidden scratch folder beside the target and linked into place; an
  existing GeoJSON result of ours is replaced whole by ``os.replace`` (``atomic``).
- An existing GeoPackage gets the new layer inside ONE SQLite transaction on the file itself
  (``geopackage``).
- A full disk and a read-only folder have their own error codes (``write_errors``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sqlite3
import warnings
from datetime import datetime, timezone
from typing import Any

import numpy as np

from earthdial.contract import result_features
from earthdial.contract.wire import RESULT_MARK, EarthDialError, ErrorCode
from earthdial.outputs.atomic import (
    appeared,
    clean_scratch,
    fsync,
    install,
    refuse_foreign,
    scratch_folder,
    user_path,
)
from earthdial.outputs.geopackage import layer_to_write, merge_layer
from earthdial.outputs.write_errors import write_error

__all__ = [
    "FIELDS",
    "MARK",
    "check_target",
    "free_layer_name",
    "layer_name",
    "write_features",
]

# The attribute schema (docs/outputs.md), defined once in result_features.py for every writer
FIELDS = result_features.NAMES
REAL_FIELDS = result_features.REAL  # the others are text
DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}
MARK = RESULT_MARK  # how a layer or file says it is ours (shared with the plugin through wire.py)
GPKG_VERSION = "1.2"  # QGIS 3.22's GDAL 3.6 warns on 1.4 files; 1.2 has everything a result needs
MAX_CHECK_BYTES = 256 << 20  # a larger JSON file is not parsed to see whether it is ours: refused
MAX_LAYER_CHARS = 200
RESERVED_PREFIXES = ("gpkg_", "rtree_", "sqlite_")
MAX_NAME_TRIES = (
    64  # concurrent writers taking default names in one GeoPackage: each try loses to one of them
)


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
    with scratch_folder(directory) as scratch:
        try:
            if driver == "GeoJSON":
                _refuse_existing_json(path, overwrite)
                tmp = os.path.join(scratch, "new.geojson")
                _gdal_write(tmp, geometry, geometry_type, field_data, name, driver, crs, description)
                fsync(tmp)
                try:
                    install(tmp, path, replace=os.path.lexists(path))
                except FileExistsError:
                    raise appeared(path) from None
                return name
            if not os.path.lexists(path):
                tmp = os.path.join(scratch, "new.gpkg")
                _gdal_write(tmp, geometry, geometry_type, field_data, name, driver, crs, description)
                fsync(tmp)
                try:
                    install(tmp, path, replace=False)
                    return name
                except FileExistsError:  # someone made it meanwhile: add to theirs like to any other
                    pass
            base = name
            for attempt in range(1, MAX_NAME_TRIES + 1):
                name = layer_to_write(path, layer, base, overwrite)
                tmp = os.path.join(scratch, f"layer{attempt}.gpkg")
                _gdal_write(tmp, geometry, geometry_type, field_data, name, driver, crs, description)
                # a default name was picked free: nothing of that name is ever replaced, --overwrite or not
                try:
                    merge_layer(
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
            layer_to_write(path, layer, layer or "earthdial", overwrite)
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
        return layer_to_write(path, None, base, False)
    except (OSError, sqlite3.Error) as exc:
        raise write_error(exc, path, f"reading {path}") from None


def layer_name(task: str | None, prompt: str | None, sources: list[str], when: datetime | None = None) -> str:
    """A readable layer name (result_features.layer_name) for a task, prompt and sources."""
    return result_features.layer_name(
        {"task": task, "prompt": prompt, "source": " | ".join(s for s in sources if s)},
        when or datetime.now(timezone.utc),
    )


# --------------------------------------------------------------------------------------------------
# Targets, names and refusals
# --------------------------------------------------------------------------------------------------


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
# GDAL writes
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
