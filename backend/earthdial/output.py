"""Writing a FeatureCollection (as made by ``georef.features_from_boxes``) to a GeoPackage or GeoJSON file.

The format follows the extension: ``.gpkg`` -> GeoPackage, ``.geojson`` / ``.json`` -> GeoJSON. Every
feature gets the fields in ``FIELDS`` whatever its properties hold, so that layers written by different
tasks share one schema; other properties are not stored.

Writes are atomic: the file is built in a private temporary folder beside the target and moved over it
with ``os.replace``, so a failed write leaves no partial file and any existing file as it was. For a
GeoPackage that already exists, the file is copied first and only ``layer`` is added or replaced in the
copy, so the user's other layers survive. (A GeoJSON file holds one layer and is replaced whole.)

One exception: a GeoPackage with a ``-wal`` file beside it is open in SQLite's write-ahead-log mode,
typically by QGIS. Replacing it would leave that log next to the new file, and the next reader would
replay the old database's pages into the new one and corrupt it. Such a file is updated in place through
SQLite's own locking instead; that cannot corrupt it or its other layers, but a write that fails part
way may leave ``layer`` itself missing or empty.
"""

from __future__ import annotations

import math
import numbers
import os
import shutil
import tempfile
import warnings
from typing import Any

import numpy as np
import pyogrio.raw
import shapely
import shapely.geometry

from .protocol import EarthDialError, ErrorCode

__all__ = ["FIELDS", "write_features"]

# The attribute schema (docs/outputs.md): one for every task, so layers from different tasks can be merged.
FIELDS = ("label", "angle", "task", "prompt", "answer", "model", "variant", "source", "tile", "gsd", "created",
          "score", "change", "pair")  # score, change, pair: whole-scene scans (scan.py)
REAL_FIELDS = ("angle", "gsd", "score")  # the others are text
DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}


def write_features(path: str, collection: dict[str, Any], layer: str = "earthdial") -> str:
    """Write ``collection`` to ``path`` as ``layer`` with the CRS in its ``"crs"`` key; returns ``path``."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    driver = DRIVERS.get(ext)
    if driver is None:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"cannot tell the format of {path}: use one of {', '.join(sorted(DRIVERS))}",
        )
    if not isinstance(layer, str) or not layer.strip():
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"layer name must be a non-empty string, got {layer!r}")
    geometry, geometry_type, field_data = _columns(collection)
    crs = collection.get("crs") or None

    if driver == "GPKG" and os.path.exists(path + "-wal"):
        try:
            _write(path, geometry, geometry_type, field_data, layer, driver, crs)
        except Exception as exc:
            raise EarthDialError(
                ErrorCode.INTERNAL, f"writing layer {layer!r} into {path} failed: {exc}"
            ) from exc
        return path

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise EarthDialError(ErrorCode.FILE_NOT_FOUND, f"folder {directory} does not exist (writing {path})")
    try:
        tmpdir = tempfile.mkdtemp(prefix=".earthdial-", dir=directory)
    except OSError as exc:
        raise EarthDialError(ErrorCode.INTERNAL, f"cannot write in {directory}: {exc}") from None
    tmp = os.path.join(tmpdir, os.path.basename(path))
    try:
        if driver == "GPKG" and os.path.exists(path):
            shutil.copy2(path, tmp)
        _write(tmp, geometry, geometry_type, field_data, layer, driver, crs)
        os.replace(tmp, path)
    except Exception as exc:
        raise EarthDialError(ErrorCode.INTERNAL, f"writing layer {layer!r} to {path} failed: {exc}") from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def _write(path, geometry, geometry_type, field_data, layer, driver, crs) -> None:
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
        )


def _columns(collection: Any) -> tuple[np.ndarray, str, list[np.ndarray]]:
    """WKB geometries, their common geometry type, and one array per field of FIELDS."""
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


def _geometry(geojson: Any, index: int) -> shapely.Geometry | None:
    if geojson is None:
        return None
    try:
        return shapely.geometry.shape(geojson)
    except Exception as exc:  # shapely raises several types for malformed input
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"feature {index}: geometry is not valid GeoJSON: {exc}"
        ) from None


def _value(value: Any, name: str, index: int) -> Any:
    if name in REAL_FIELDS:
        if value is None:
            return math.nan  # written as NULL
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise EarthDialError(
                ErrorCode.BAD_REQUEST, f"feature {index}: {name} must be a number, got {value!r}"
            )
        return float(value)
    if value is None or isinstance(value, str):
        return value
    if hasattr(value, "isoformat"):  # datetime for "created"
        return value.isoformat()
    return str(value)
