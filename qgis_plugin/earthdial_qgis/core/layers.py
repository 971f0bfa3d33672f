"""A reply's features -> QGIS features and result layers in the project (in its results GeoPackage).

One polygon per box, in the source layer's CRS (the backend answers in the raster's CRS for a file and
in the sent CRS for pixels by value; the two differ only when the layer's CRS was overridden in QGIS,
and then the polygons are carried over). The fields are docs/outputs.md's schema. The answer text is
also kept on the layer as a custom property, so that it stays with the boxes when the project is saved.
"""

from __future__ import annotations

import re
from typing import Any

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsVectorLayer,
)

from ..contract import result_features
from . import geopackage, settings
from .qt import QtCore
from .styling import result_group, style_result_layer

ANSWER_PROPERTY = "earthdial/answer"
TASK_PROPERTY = "earthdial/task"
PROMPT_PROPERTY = "earthdial/prompt"
_AUTHORITY_ID = re.compile(r"^[A-Za-z]+:[\w.]+$")  # EPSG:32633, ESRI:102003

FIELDS = result_features.FIELDS  # docs/outputs.md: the backend's schema, run here as it is


def _field(name: str, kind: str) -> QgsField:
    # QGIS >= 3.38 takes QMetaType (the only kind Qt6 has); older QGIS takes QVariant.Type
    if Qgis.versionInt() >= 33800:
        meta = QtCore.QMetaType.Type.QString if kind == "text" else QtCore.QMetaType.Type.Double
        return QgsField(name, meta)
    variant = QtCore.QVariant.String if kind == "text" else QtCore.QVariant.Double
    return QgsField(name, variant)


def result_fields() -> QgsFields:
    fields = QgsFields()
    for name, kind in FIELDS:
        fields.append(_field(name, kind))
    return fields


def crs_from_text(text: str | None) -> QgsCoordinateReferenceSystem:
    """A CRS from the backend's "EPSG:n" or WKT (invalid when empty or not understood)."""
    if not text:
        return QgsCoordinateReferenceSystem()
    if _AUTHORITY_ID.match(text):
        return QgsCoordinateReferenceSystem(text)
    return QgsCoordinateReferenceSystem.fromWkt(text)


def reply_features(
    reply: dict[str, Any], fields: QgsFields, crs: QgsCoordinateReferenceSystem
) -> list[QgsFeature]:
    """The boxes of ``reply`` as features with ``fields`` (the output schema), in ``crs``. Every value is
    the backend's (result_features.py): the plugin composes no field of its own."""
    collection = reply.get("features") or {}
    transform = None
    reply_crs = crs_from_text(collection.get("crs"))
    if reply_crs.isValid() and crs.isValid() and reply_crs != crs:
        transform = QgsCoordinateTransform(reply_crs, crs, QgsProject.instance())
    out = []
    for feature in collection.get("features") or []:
        rings = _rings(feature)
        if not rings:
            continue
        geometry = QgsGeometry.fromPolygonXY(
            [[QgsPointXY(float(x), float(y)) for x, y in ring] for ring in rings]
        )
        if transform is not None:
            geometry.transform(transform)
        values = result_features.complete(feature.get("properties"))
        qfeature = QgsFeature(fields)
        qfeature.setGeometry(geometry)
        qfeature.setAttributes(
            [_value(values.get(fields.at(i).name()), fields.at(i).name()) for i in range(fields.count())]
        )
        out.append(qfeature)
    return out


def _value(value: Any, name: str) -> Any:
    if value is None:
        return None
    if name in result_features.REAL:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return str(value)


def result_layer(
    reply: dict[str, Any], crs: QgsCoordinateReferenceSystem, name: str
) -> QgsVectorLayer | None:
    """The boxes of ``reply`` as a memory layer named ``name`` in ``crs``; None when there are none."""
    fields = result_fields()
    features = reply_features(reply, fields, crs)
    if not features:
        return None
    layer = QgsVectorLayer("Polygon", name, "memory")
    layer.setCrs(crs)
    provider = layer.dataProvider()
    provider.addAttributes(fields.toList())
    layer.updateFields()
    provider.addFeatures(features)
    layer.updateExtents()
    shared = reply.get("properties") or (reply["features"]["features"][0].get("properties") or {})
    layer.setCustomProperty(ANSWER_PROPERTY, str(reply.get("answer", "")))
    layer.setCustomProperty(TASK_PROPERTY, str(shared.get("task") or ""))
    layer.setCustomProperty(PROMPT_PROPERTY, str(shared.get("prompt") or ""))
    return layer


def add_result_layer(
    reply: dict[str, Any],
    crs: QgsCoordinateReferenceSystem,
    name: str,
    group_name: str | None = None,
    *,
    in_memory: bool | None = None,
    problems: list[str] | None = None,
) -> QgsVectorLayer | None:
    """The one way results become a project layer (the panel, scans and algorithms call it): the boxes
    as a styled layer named ``name`` inside a new layer-tree group named ``group_name``, stored as a new
    table of the project's results GeoPackage, or kept in memory when ``in_memory`` (default: the
    plugin setting). A GeoPackage that cannot be written leaves a memory layer and says why in
    ``problems``. None when the reply has no boxes."""
    layer = result_layer(reply, crs, name)
    if layer is None:
        return None
    if in_memory is None:
        in_memory = settings.results_in_memory()
    if not in_memory:
        path = geopackage.project_results_path()
        try:
            geopackage.store_layer(layer, path, name)
        except OSError as exc:
            if problems is not None:
                problems.append(str(exc))
    style_result_layer(layer)
    project = QgsProject.instance()
    project.addMapLayer(layer, False)
    group = result_group(group_name or name, project)
    node = group.addLayer(layer)
    group.setExpanded(True)
    if node is not None:
        node.setExpanded(True)  # the legend: one outline colour per label
    return layer


def result_name(task: str, prompt: str, layer: str, stamp: str) -> str:
    """A result layer's name: what was asked, of which layer, when (names of two requests differ)."""
    asked = f"{task} “{prompt}”" if prompt else task
    return f"{asked} – {layer} ({stamp})"


def unique_layer_name(wanted: str, project: QgsProject | None = None, marks: tuple[str, ...] = ("",)) -> str:
    """``wanted``, or ``wanted (2)``, ... : a name that no layer of the project has with any of ``marks``
    appended (a layer renamed later, e.g. a scan's " (stopped: unmerged)", must not take a taken name then)."""
    taken = {lyr.name() for lyr in (project or QgsProject.instance()).mapLayers().values()}
    name, n = wanted, 2
    while any(name + mark in taken for mark in marks):
        name, n = f"{wanted} ({n})", n + 1
    return name


def is_in_memory(layer: QgsVectorLayer) -> bool:
    return layer.providerType() == "memory"


def save_to_geopackage(layer: QgsVectorLayer, path: str, layer_name: str | None = None) -> str:
    """Add ``layer`` to the GeoPackage ``path`` as a new table (named like ``layer_name``, default the
    layer's name; every other table of the file is kept as it was) and switch the layer over to it,
    keeping its name, style and place in the layer tree. Returns the table's name."""
    return geopackage.store_layer(layer, path, layer_name or layer.name())


def _rings(feature: dict[str, Any]) -> list[list[list[float]]]:
    geometry = feature.get("geometry") or {}
    if geometry.get("type") != "Polygon":
        return []
    return [ring for ring in geometry.get("coordinates") or [] if len(ring) >= 4]
