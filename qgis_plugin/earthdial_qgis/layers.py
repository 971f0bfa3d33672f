"""A reply's features -> a memory vector layer in the project.

One polygon per box, in the source layer's CRS (the backend answers in the raster's CRS for a file and
in the sent CRS for pixels by value; the two differ only when the layer's CRS was overridden in QGIS,
and then the polygons are carried over). The answer text is kept on the layer as a custom property,
so that it stays with the boxes when the project is saved.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsField,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsVectorLayer,
)

from .qt import QtCore

ANSWER_PROPERTY = "earthdial/answer"
TASK_PROPERTY = "earthdial/task"
PROMPT_PROPERTY = "earthdial/prompt"
_AUTHORITY_ID = re.compile(r"^[A-Za-z]+:[\w.]+$")  # EPSG:32633, ESRI:102003

FIELDS: tuple[tuple[str, Any], ...] = (
    ("label", QtCore.QVariant.String),
    ("angle", QtCore.QVariant.Double),
    ("task", QtCore.QVariant.String),
    ("prompt", QtCore.QVariant.String),
    ("answer", QtCore.QVariant.String),
    ("model", QtCore.QVariant.String),
    ("source", QtCore.QVariant.String),
    ("created", QtCore.QVariant.String),
)


def crs_from_text(text: str | None) -> QgsCoordinateReferenceSystem:
    """A CRS from the backend's "EPSG:n" or WKT (invalid when empty or not understood)."""
    if not text:
        return QgsCoordinateReferenceSystem()
    if _AUTHORITY_ID.match(text):
        return QgsCoordinateReferenceSystem(text)
    return QgsCoordinateReferenceSystem.fromWkt(text)


def result_layer(
    reply: dict[str, Any],
    crs: QgsCoordinateReferenceSystem,
    name: str,
    task: str,
    prompt: str,
    source: str,
    created: str | None = None,
) -> QgsVectorLayer | None:
    """The boxes of ``reply`` as a memory layer named ``name`` in ``crs``; None when there are none."""
    collection = reply.get("features") or {}
    features = [f for f in collection.get("features") or [] if _rings(f)]
    if not features:
        return None
    answer = str(reply.get("answer", ""))
    created = created or datetime.now(timezone.utc).isoformat(timespec="seconds")
    layer = QgsVectorLayer("Polygon", name, "memory")
    layer.setCrs(crs)
    provider = layer.dataProvider()
    provider.addAttributes([QgsField(field, kind) for field, kind in FIELDS])
    layer.updateFields()

    transform = None
    reply_crs = crs_from_text(collection.get("crs"))
    if reply_crs.isValid() and crs.isValid() and reply_crs != crs:
        transform = QgsCoordinateTransform(reply_crs, crs, QgsProject.instance())

    out = []
    for feature in features:
        props = feature.get("properties") or {}
        geometry = QgsGeometry.fromPolygonXY(
            [[QgsPointXY(float(x), float(y)) for x, y in ring] for ring in _rings(feature)]
        )
        if transform is not None:
            geometry.transform(transform)
        qfeature = QgsFeature(layer.fields())
        qfeature.setGeometry(geometry)
        qfeature.setAttributes(
            [
                props.get("label"),
                float(props.get("angle") or 0.0),
                task,
                prompt,
                answer,
                props.get("model") or "",
                source,
                created,
            ]
        )
        out.append(qfeature)
    provider.addFeatures(out)
    layer.updateExtents()
    layer.setCustomProperty(ANSWER_PROPERTY, answer)
    layer.setCustomProperty(TASK_PROPERTY, task)
    layer.setCustomProperty(PROMPT_PROPERTY, prompt)
    return layer


def add_result_layer(
    reply: dict[str, Any], crs: QgsCoordinateReferenceSystem, name: str, task: str, prompt: str, source: str
) -> QgsVectorLayer | None:
    layer = result_layer(reply, crs, name, task, prompt, source)
    if layer is not None:
        QgsProject.instance().addMapLayer(layer)
    return layer


def _rings(feature: dict[str, Any]) -> list[list[list[float]]]:
    geometry = feature.get("geometry") or {}
    if geometry.get("type") != "Polygon":
        return []
    return [ring for ring in geometry.get("coordinates") or [] if len(ring) >= 4]
