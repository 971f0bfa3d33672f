"""Result layers in GeoPackages: the results GeoPackage that belongs with the project, and writing a layer
into any GeoPackage without touching the others in it.

Every write adds a table under a name no table of the file has yet (OGR's "create or overwrite layer"
on a fresh name, which leaves every other table as it was); a file is created only when there is none.
The project's results GeoPackage is the plugin setting's file, else ``<project>_earthdial.gpkg`` beside
the project file; an unsaved project's results go to a temporary one and move beside the project when
it is first saved (`move_temporary_results`, called while QGIS writes the project, so that the saved
file already names the new place).
"""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
from typing import Any

from qgis.core import (
    QgsCoordinateTransformContext,
    QgsProject,
    QgsVectorFileWriter,
    QgsVectorLayer,
)

from ..contract.wire import RESULT_MARK
from . import settings

SUFFIX = "_earthdial.gpkg"
MAX_TABLE_CHARS = 60
# GeoPackage 1.2: QGIS 3.22's GDAL 3.6 opens it without the "only partially supported" warning that
# newer GDALs' default (1.4) draws there.
CREATE_OPTIONS = ["VERSION=1.2"]
_UNSAFE = re.compile(r"[^\w\- ]+")
_temp_dir: str | None = None


def temporary_dir() -> str:
    """This QGIS session's folder for the results of a project that has not been saved yet."""
    global _temp_dir
    if _temp_dir is None or not os.path.isdir(_temp_dir):
        _temp_dir = tempfile.mkdtemp(prefix="earthdial-results-")
    return _temp_dir


def is_temporary(path: str) -> bool:
    return _temp_dir is not None and os.path.dirname(os.path.abspath(path)) == os.path.abspath(_temp_dir)


def project_results_path(project: QgsProject | None = None) -> str:
    """Where this project's results go: the setting's file, else beside the project file, else (an
    unsaved project) a temporary file that moves beside the project when it is saved."""
    configured = settings.text(settings.RESULTS_GPKG).strip()
    if configured:
        return os.path.abspath(os.path.expanduser(configured))
    project = project or QgsProject.instance()
    name = project.fileName()
    if name:
        return os.path.splitext(os.path.abspath(name))[0] + SUFFIX
    return os.path.join(temporary_dir(), "unsaved-project" + SUFFIX)


def table_names(path: str) -> set[str]:
    """The tables a GeoPackage lists (lower case: SQLite's names ignore case); empty when no file."""
    if not os.path.exists(path):
        return set()
    try:
        uri = "file:" + os.path.abspath(path) + "?mode=ro"
        with sqlite3.connect(uri, uri=True, timeout=5) as db:
            rows = db.execute("SELECT table_name FROM gpkg_contents").fetchall()
        return {str(r[0]).lower() for r in rows}
    except sqlite3.Error as exc:
        raise OSError(f"{path} is not a GeoPackage EarthDial can add a layer to: {exc}") from None


def unique_table(path: str, wanted: str) -> str:
    """A table name like ``wanted`` (unsafe characters replaced) that ``path`` does not hold yet."""
    base = _UNSAFE.sub("_", wanted).strip(" _")[:MAX_TABLE_CHARS] or "earthdial"
    taken = table_names(path)
    name, n = base, 2
    while name.lower() in taken:
        name, n = f"{base} {n}", n + 1
    return name


def write_layer(layer: QgsVectorLayer, path: str, table: str) -> None:
    """Add ``layer``'s features to the GeoPackage ``path`` as the new table ``table``. Refuses a table that
    exists: a write never replaces or changes another layer of the file."""
    if table.lower() in table_names(path):
        raise OSError(f"{path} already has a layer named {table!r}; EarthDial never overwrites one")
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = table
    options.fileEncoding = "UTF-8"
    # the backend's mark of a result of ours: `earthdial ... -o --overwrite` may then replace this table
    options.layerOptions = [f"DESCRIPTION={RESULT_MARK} (QGIS plugin)"]
    if os.path.exists(path):
        options.actionOnExistingFile = _writer_enum("ActionOnExistingFile", "CreateOrOverwriteLayer")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        options.actionOnExistingFile = _writer_enum("ActionOnExistingFile", "CreateOrOverwriteFile")
        options.datasourceOptions = list(CREATE_OPTIONS)
    context = QgsProject.instance().transformContext() or QgsCoordinateTransformContext()
    writer = getattr(QgsVectorFileWriter, "writeAsVectorFormatV3", None)
    if writer is not None:  # QGIS >= 3.20
        result = writer(layer, path, context, options)
    else:
        result = QgsVectorFileWriter.writeAsVectorFormatV2(layer, path, context, options)
    code, message = result[0], result[1] if len(result) > 1 else ""
    if code != _writer_enum("WriterError", "NoError"):
        raise OSError(f"cannot write layer {table!r} to {path}: {message or code}")


def store_layer(layer: QgsVectorLayer, path: str, wanted: str) -> str:
    """Write ``layer`` as a new table of ``path`` (a name like ``wanted``) and switch the layer over to
    it, keeping its name, style, properties and place in the layer tree. Returns the table's name."""
    table = unique_table(path, wanted)
    write_layer(layer, path, table)
    layer.setDataSource(source_uri(path, table), layer.name(), "ogr")
    return table


def source_uri(path: str, table: str) -> str:
    return f"{path}|layername={table}"


def split_source(source: str) -> tuple[str, str | None]:
    """(file, table) of an OGR layer source ``file|layername=table``."""
    parts = source.split("|")
    table = next((p.split("=", 1)[1] for p in parts[1:] if p.startswith("layername=")), None)
    return parts[0], table


def move_temporary_results(project: QgsProject | None = None) -> list[QgsVectorLayer]:
    """Copy the project's layers that read from the temporary results GeoPackage into the project's own
    one (each as a new table) and point them there. Called while QGIS writes the project file."""
    project = project or QgsProject.instance()
    if not project.fileName():
        return []
    target = project_results_path(project)
    moved = []
    for layer in project.mapLayers().values():
        if not isinstance(layer, QgsVectorLayer) or layer.providerType() != "ogr":
            continue
        path, table = split_source(layer.source())
        if table is None or not is_temporary(path) or is_temporary(target):
            continue
        store_layer(layer, target, table)
        moved.append(layer)
    return moved


def _writer_enum(kind: str, name: str) -> Any:
    scoped = getattr(QgsVectorFileWriter, kind, None)
    return (
        getattr(scoped, name)
        if scoped is not None and hasattr(scoped, name)
        else getattr(QgsVectorFileWriter, name)
    )
