"""Reviewing result layers in QGIS, so that corrections become training data (`earthdial export-training`).

Analysts edit result layers with QGIS's own tools; this module only keeps the ``review`` field in step:

* a box whose geometry is edited becomes ``corrected`` (unless it was drawn by the analyst: ``added``);
* a box drawn on the layer becomes ``added`` and gets the layer's ``request`` (the window, the source and
  the prompt, which export needs to read the chip again) and, unless it has one, the label the model gave
  most often on the layer (on a referring layer without boxes, the prompt);
* the "Accept selected boxes" / "Reject selected boxes" actions mark the active layer's selection
  (through the edit buffer when the layer is being edited, else saved at once).

The review values are the backend's (wire.REVIEWS). A request sent by value names the file its
pixels came from (when the layer is one), so the backend records it in the request like any other.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from qgis.core import QgsProject, QgsVectorLayer

from ..contract.wire import REVIEWS
from ..core import log
from ..core.qt import QAction, QtCore, QtGui

ACCEPTED, REJECTED, CORRECTED, ADDED = REVIEWS
REVIEW, REQUEST, LABEL = "review", "request", "label"


def tr(text: str) -> str:
    return QtCore.QCoreApplication.translate("EarthDialReview", text)


def is_result_layer(layer: Any) -> bool:
    if not isinstance(layer, QgsVectorLayer) or not layer.isValid():
        return False
    names = layer.fields().names()
    return REVIEW in names and REQUEST in names


def layer_request(layer: QgsVectorLayer) -> str:
    """The request of a result layer's boxes (they share one)."""
    idx = layer.fields().indexOf(REQUEST)
    for feature in layer.getFeatures():
        value = feature.attribute(idx)
        if value:
            return str(value)
    return ""


def common_label(layer: QgsVectorLayer, skip: int | None = None) -> str:
    """The label the model gave most often on ``layer`` (boxes the analyst added do not count): what a
    box drawn on it most likely shows, e.g. "ship" where the prompt was "ships"."""
    label_idx, review_idx = layer.fields().indexOf(LABEL), layer.fields().indexOf(REVIEW)
    if label_idx < 0:
        return ""
    counts: Counter[str] = Counter()
    for feature in layer.getFeatures():
        value = feature.attribute(label_idx)
        if feature.id() == skip or not value or str(value) == "NULL":
            continue
        if review_idx >= 0 and feature.attribute(review_idx) == ADDED:
            continue
        counts[str(value)] += 1
    return counts.most_common(1)[0][0] if counts else ""


def _referred(request: str) -> str:
    """A referring request's prompt (the label when the layer has no box of the model's to go by)."""
    try:
        asked = json.loads(request) if request else {}
    except ValueError:
        return ""
    return str(asked.get("prompt") or "") if isinstance(asked, dict) and asked.get("task") == "refer" else ""


def mark(layer: QgsVectorLayer, verdict: str, fids: list[int] | None = None) -> int:
    """Set ``review`` to ``verdict`` on ``fids`` (default: the selection); returns how many."""
    if verdict not in REVIEWS:
        raise ValueError(f"review must be one of {', '.join(REVIEWS)}, got {verdict!r}")
    fids = list(layer.selectedFeatureIds()) if fids is None else list(fids)
    idx = layer.fields().indexOf(REVIEW)
    if idx < 0 or not fids:
        return 0
    if layer.isEditable():
        for fid in fids:
            layer.changeAttributeValue(fid, idx, verdict)
    else:
        provider = layer.dataProvider()
        if not provider.changeAttributeValues({fid: {idx: verdict} for fid in fids}):
            raise OSError(f"cannot save the review of layer {layer.name()!r}: {provider.error().message()}")
        layer.reload()
        layer.triggerRepaint()
    return len(fids)


class Watcher(QtCore.QObject):
    """Keeps ``review`` in step with the analyst's edits on every result layer of the project."""

    def __init__(self, project: QgsProject | None = None) -> None:
        super().__init__()
        self.project = project or QgsProject.instance()
        self._watched: dict[str, QgsVectorLayer] = {}
        self._busy = False
        self.project.layersAdded.connect(self._layers_added)
        self._layers_added(list(self.project.mapLayers().values()))

    def _layers_added(self, layers: list[Any]) -> None:
        for layer in layers:
            if is_result_layer(layer) and layer.id() not in self._watched:
                self.watch(layer)

    def watch(self, layer: QgsVectorLayer) -> None:
        self._watched[layer.id()] = layer
        layer.featureAdded.connect(lambda fid, lyr=layer: self._added(lyr, fid))
        layer.geometryChanged.connect(lambda fid, _geom, lyr=layer: self._edited(lyr, fid))
        layer_id = layer.id()
        layer.willBeDeleted.connect(lambda: self._watched.pop(layer_id, None))

    def _set(self, layer: QgsVectorLayer, fid: int, name: str, value: str) -> None:
        idx = layer.fields().indexOf(name)
        if idx >= 0 and layer.isEditable():
            self._busy = True
            try:
                layer.changeAttributeValue(fid, idx, value)
            finally:
                self._busy = False

    def _added(self, layer: QgsVectorLayer, fid: int) -> None:
        if self._busy:
            return
        feature = layer.getFeature(fid)
        if not feature.attribute(REVIEW):
            self._set(layer, fid, REVIEW, ADDED)
        request = "" if feature.attribute(REQUEST) else layer_request(layer)
        if request:
            self._set(layer, fid, REQUEST, request)
        if not feature.attribute(LABEL):
            label = common_label(layer, fid) or _referred(str(feature.attribute(REQUEST) or "") or request)
            if label:
                self._set(layer, fid, LABEL, label)

    def _edited(self, layer: QgsVectorLayer, fid: int) -> None:
        if self._busy:
            return
        if layer.getFeature(fid).attribute(REVIEW) != ADDED:
            self._set(layer, fid, REVIEW, CORRECTED)

    def close(self) -> None:
        try:
            self.project.layersAdded.disconnect(self._layers_added)
        except (TypeError, RuntimeError):
            pass
        self._watched.clear()


class ReviewActions:
    """The menu and toolbar actions that mark the active result layer's selected boxes."""

    def __init__(self, iface: Any, menu: str, toolbar: Any = None) -> None:
        self.iface, self.menu, self.toolbar = iface, menu, toolbar
        self.watcher = Watcher()
        self.actions: list[Any] = []
        for text, verdict, tip in (
            (
                tr("Accept selected boxes"),
                ACCEPTED,
                tr("Mark the selected EarthDial boxes as right (review = accepted)"),
            ),
            (
                tr("Reject selected boxes"),
                REJECTED,
                tr("Mark the selected EarthDial boxes as wrong (review = rejected)"),
            ),
        ):
            action = QAction(QtGui.QIcon(), text, iface.mainWindow())
            action.setObjectName(f"EarthDialReview_{verdict}")
            action.setToolTip(tip)
            action.triggered.connect(lambda _=False, v=verdict: self.mark_active(v))
            iface.addPluginToMenu(menu, action)
            if toolbar is not None:
                toolbar.addAction(action)
            self.actions.append(action)

    def mark_active(self, verdict: str) -> int:
        layer = self.iface.activeLayer()
        bar = self.iface.messageBar()
        if not is_result_layer(layer):
            bar.pushMessage(
                tr("EarthDial"), tr("Select boxes on an EarthDial result layer first."), duration=5
            )
            return 0
        try:
            n = mark(layer, verdict)
        except OSError as exc:
            log.error(str(exc))
            bar.pushMessage(tr("EarthDial"), str(exc), duration=8)
            return 0
        if n == 0:
            bar.pushMessage(
                tr("EarthDial"),
                tr("No boxes are selected on {layer}.").format(layer=layer.name()),
                duration=5,
            )
        return n

    def unload(self) -> None:
        self.watcher.close()
        for action in self.actions:
            self.iface.removePluginMenu(self.menu, action)
            if self.toolbar is not None:
                self.toolbar.removeAction(action)
            action.deleteLater()
        self.actions = []
