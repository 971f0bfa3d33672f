"""A stopped dock scan, remembered on the layer that keeps its boxes, so that the dock can resume it.

What a resume needs is kept as one JSON record in the stopped layer's custom property `PROPERTY`: the
request (the source layer, its bands, the area, task, prompt and options) and the finished tiles and their
boxes exactly as the scan's progress events carried them (tiles that found nothing included; each box
with the fields the backend's merge orders and ranks by, which a layer's attribute table does not hold).
A custom property because it goes wherever the layer goes: into the project file when the project is
saved (the layer's features are in the results GeoPackage, so a reopened project has both), through the
move of an unsaved project's results into the project's GeoPackage (a new table, which a record kept in a
side table of the old file would lose), and for results kept in memory too.

The record is only read back and sent: the backend checks it (`detect`'s `earlier`, docs/protocol.md)
and merges it with the new tiles' boxes; the plugin has no merge of its own.
"""

from __future__ import annotations

import json
from typing import Any

from qgis.core import QgsProject, QgsRasterLayer, QgsRectangle

from ..contract.wire import EarthDialError
from .errors import NO_LAYER

PROPERTY = "earthdial/stopped_scan"
VERSION = 1


def remember(layer: Any, record: dict[str, Any]) -> None:
    layer.setCustomProperty(PROPERTY, json.dumps(record, separators=(",", ":"), allow_nan=False))


def forget(layer: Any) -> None:
    layer.removeCustomProperty(PROPERTY)


def recorded(layer: Any) -> dict[str, Any] | None:
    """The record of a stopped scan layer; None for any other layer (or a record this version cannot read)."""
    if layer is None or not hasattr(layer, "customProperty"):
        return None
    text = layer.customProperty(PROPERTY)
    if not text:
        return None
    try:
        record = json.loads(str(text))
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("v") == VERSION else None


def describe_source(layer: QgsRasterLayer) -> dict[str, Any]:
    """What identifies the scanned layer and what a resume must find unchanged in it."""
    extent = layer.extent()
    return {"id": layer.id(), "name": layer.name(), "source": layer.source(), "provider": layer.providerType(),
            "crs": layer.crs().toWkt(), "extent": [extent.xMinimum(), extent.yMinimum(), extent.xMaximum(),
                                                     extent.yMaximum()]}  # fmt: skip


def source_layer(record: dict[str, Any], project: QgsProject | None = None) -> QgsRasterLayer:
    """The layer the stopped scan read, as it was: the same layer (by id, else a layer of the same source,
    e.g. added again), its CRS and extent unchanged. A clear `no_layer` error otherwise."""
    project = project or QgsProject.instance()
    want = record["layer"]
    layer = project.mapLayer(want["id"])
    if not isinstance(layer, QgsRasterLayer):
        layer = next(
            (
                x
                for x in project.mapLayers().values()
                if isinstance(x, QgsRasterLayer) and x.source() == want["source"]
            ),
            None,
        )
    if layer is None or not layer.isValid():
        raise EarthDialError(
            NO_LAYER,
            f"The layer “{want['name']}” this scan read is not in the project (its "
            f"source: {want['source']}). Add it again to resume the scan.",
        )
    changed = []
    if layer.source() != want["source"]:
        changed.append("its source")
    if layer.crs().toWkt() != want["crs"]:
        changed.append("its CRS")
    if not _same_extent(layer.extent(), want["extent"]):
        changed.append("its extent")
    if changed:
        raise EarthDialError(
            NO_LAYER,
            f"The layer “{layer.name()}” changed since the scan stopped "
            f"({', '.join(changed)}): its finished tiles would not match. Start a new scan.",
        )
    return layer


def _same_extent(extent: QgsRectangle, want: list[float]) -> bool:
    got = [extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()]
    size = max(extent.width(), extent.height(), 1e-12)
    return all(abs(a - b) <= 1e-9 * size for a, b in zip(got, want, strict=True))


def earlier(record: dict[str, Any]) -> dict[str, Any]:
    """The stopped scan's finished tiles and their boxes, as `Client.scan(earlier=...)` sends them."""
    return {"tiles": list(record["tiles"]), "features": list(record["features"])}


def skip(record: dict[str, Any]) -> list[int]:
    return sorted(int(t["index"]) for t in record["tiles"])
