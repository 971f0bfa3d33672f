"""The dock's tiled scan: the whole layer (or the map extent, a drawn rectangle...) through the backend's
streaming `detect` (or `detect_changes` for a pair or sequence), off the UI thread.

`ScanTask.run` (a worker thread) sends the request, reads and streams tiles when the layer is not a
file the backend reads, and passes each progress event's boxes to the main thread by a queued signal;
`DockScan` (main thread) puts them on the map as tiles finish, shows the progress, and at the end
replaces them with the backend's merged boxes: one styled layer (plus the change map for changes).
Cancel stops the backend within one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from qgis.core import Qgis, QgsApplication, QgsProject, QgsRasterLayer, QgsTask

from . import geopackage, scanning, settings
from .layers import add_result_layer, result_name, unique_layer_name
from .protocol import Client, EarthDialError
from .qt import QtCore, QtWidgets

SCAN_TASKS = ("refer", "grounding")  # one-image grounded tasks a detect scan runs
CHANGE_TASK = "change"


class ScanTask(QgsTask):
    boxes = QtCore.pyqtSignal(object) if hasattr(QtCore, "pyqtSignal") else QtCore.Signal(object)

    def __init__(self, description: str, endpoint: str, layer: scanning.ScanLayer | None, scan: scanning.Scan,
                 rect: Any, timeout_s: float, on_done: Callable[[ScanTask], None],
                 layers: list[scanning.ScanLayer] | None = None) -> None:  # fmt: skip
        super().__init__(description, QgsTask.Flag.CanCancel)
        self.endpoint, self.layer, self.scan, self.rect = endpoint, layer, scan, rect
        self.layers = layers or []  # a change scan's BEFORE AFTER [LATER ...]
        self.timeout_s, self.on_done = timeout_s, on_done
        self.reply: dict[str, Any] | None = None
        self.error: EarthDialError | None = None
        # tiles finished and planned, whichever Scan (by reference or streamed) ran
        self.done = self.total = 0

    def run(self) -> bool:
        def on_event(event: dict[str, Any]) -> None:
            if event.get("event") == "plan":
                self.total = int(event.get("total") or 0)
            if event.get("event") == "progress":
                self.done, self.total = int(event["done"]), int(event["total"])
                self.setProgress(100.0 * event["done"] / max(event["total"], 1))
                if event.get("features"):
                    self.boxes.emit(list(event["features"]))

        try:
            with Client(self.endpoint, timeout_s=self.timeout_s) as client:
                if self.layer is not None and self.scan.header["op"] == "detect":
                    header = self.scan.header
                    self.scan, self.reply = scanning.run_layer(
                        client, self.layer, self.rect, header["task"], header["prompt"], header["options"],
                        self.isCanceled, on_event)  # fmt: skip
                elif self.layers:
                    self.scan, self.reply = scanning.run_changes(
                        client, self.layers, self.scan.header["options"], self.isCanceled, on_event
                    )
                else:
                    self.reply = scanning.run(client, self.scan, self.isCanceled, on_event)
        except EarthDialError as exc:
            self.error = exc
        except Exception as exc:  # a bug must reach the dock as an error, not kill the task silently
            self.error = EarthDialError("internal", f"{type(exc).__name__}: {exc}")
        finally:
            for used in [self.layer, *self.layers]:
                if used is not None:
                    used.provider = None
        return self.error is None

    def finished(self, result: bool) -> None:
        self.on_done(self)


class DockScan(QtCore.QObject):
    """The dock's scan (the panel's "Tiled scan" choice; a progress bar below Send) and its logic. A QObject
    of the main thread, so that the task's signals reach it there (queued)."""

    def __init__(self, dock: Any) -> None:
        super().__init__(dock)
        self.dock = dock
        self.check = dock.scan_radio  # the panel's "Tiled scan" choice (dock_ui), beside the area
        self.tile_spin = dock.tile_spin
        self.progress = QtWidgets.QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setVisible(False)
        rows = dock.request_rows  # the dock's button grid: the progress bar takes the row below its buttons
        rows.addWidget(self.progress, rows.rowCount(), 0, 1, 2)
        self.task: ScanTask | None = None
        self.live: Any = None  # the result layer boxes are added to as tiles finish
        self.tiles_layer: Any = None
        self.pending: dict[str, Any] = {}

    def wanted(self) -> bool:
        return self.check.isChecked() and self.possible()

    def possible(self) -> bool:
        name = str(self.dock.task_combo.currentData())
        return name in SCAN_TASKS or name == CHANGE_TASK

    def task_changed(self) -> None:
        """A scan runs grounded one-image tasks and change: for any other the choice is one window."""
        self.check.setEnabled(self.possible())
        if not self.possible():
            self.dock.window_radio.setChecked(True)

    def start(self) -> None:
        dock = self.dock
        layer = dock._first_layer()
        bands, options = dock._bands()
        options = {k: v for k, v in options.items() if k == "preset"}
        options["tile_size"] = int(self.tile_spin.value())
        name = str(dock.task_combo.currentData())
        needs_prompt = dock._tasks.get(name, {}).get("needs_prompt", name != CHANGE_TASK)
        prompt = dock.prompt_edit.toPlainText().strip() if needs_prompt else ""  # no stale prompt in names
        rect = dock.current_area(layer)
        if name == CHANGE_TASK:
            later = dock.later_layers.layers()
            if not later:
                raise EarthDialError(
                    "no_layer", dock.tr("A change scan compares layers: pick the later layer(s) too.")
                )
            change_layers = [scanning.ScanLayer.of(x) for x in [layer, *later]]
            scan = scanning.Scan(
                {"op": "detect_changes", "task": name, "options": options}
            )  # made in the task
            source_layer, names = None, " | ".join(x.name() for x in [layer, *later])
        else:
            change_layers = []
            source_layer = scanning.ScanLayer.of(layer, bands)
            scan = scanning.Scan({"op": "detect", "task": name, "prompt": prompt, "options": options})
            names = layer.name()
        stamp = datetime.now().strftime("%H:%M:%S")
        self.pending = {"task": name, "prompt": prompt, "crs": layer.crs(), "names": names, "stamp": stamp,
                        "group": dock.tr("EarthDial scan {task}: {prompt} – {layer} ({time})").format(
                            task=name, prompt=prompt[:30], layer=names, time=stamp)}  # fmt: skip
        self.live, self.tiles_layer = None, None
        self.task = ScanTask(dock.tr("EarthDial: scan {task} on {layer}").format(task=name, layer=names),
                             dock.endpoint, source_layer, scan, rect, dock.timeout_spin.value(), self._done,
                             change_layers)  # fmt: skip
        self.task.boxes.connect(self._on_boxes)
        self.task.progressChanged.connect(self._on_progress)
        self.progress.setValue(0)
        self.progress.setVisible(True)
        dock._task = self.task  # the dock's Cancel cancels it
        dock._set_busy(True)
        dock.result_label.setText(dock.tr("Scanning…"))
        dock._running.add(self.task)
        QgsApplication.taskManager().addTask(self.task)

    def _layer_name(self) -> str:
        """Named as single-window results are (task, prompt, layer, time), marked as a scan: two scans of
        one layer make two layers of different names."""
        p = self.pending
        return unique_layer_name(result_name(self.dock.tr("scan {task}").format(task=p["task"]), p["prompt"][:30],
                                             p["names"], p["stamp"]))  # fmt: skip

    def _on_progress(self, value: float) -> None:
        self.progress.setValue(int(value))

    def _on_boxes(self, found: list[dict[str, Any]]) -> None:
        """Boxes of the tiles just finished, on the map at once (before merging): a memory layer that
        the merged result replaces at the end."""
        task = self.task
        if task is None:
            return
        p = self.pending
        if self.live is None or _deleted(self.live):
            self.live = add_result_layer(scanning.collection(found, task.scan), p["crs"],
                                         self.dock.tr("{name} (scanning…)").format(name=self._layer_name()),
                                         group_name=p["group"], in_memory=True)  # fmt: skip
            return
        feats = scanning.features(found, task.scan, p["crs"])
        self.live.dataProvider().addFeatures(feats)
        self.live.updateExtents()
        self.live.triggerRepaint()

    def _drop_live(self) -> None:
        if self.live is not None and not _deleted(self.live):
            project = QgsProject.instance()
            node = project.layerTreeRoot().findLayer(self.live.id())
            group = node.parent() if node is not None else None
            project.removeMapLayer(self.live.id())
            if group is not None and group.parent() is not None and not group.children():
                group.parent().removeChildNode(group)
        self.live = None

    def _keep(self, layer: Any) -> None:
        """A stopped scan's boxes go into the results GeoPackage like any result: left in memory, the
        tiles already finished would be lost with the project."""
        if settings.results_in_memory():
            return
        try:
            geopackage.store_layer(layer, geopackage.project_results_path(), layer.name())
        except OSError as exc:
            self.dock.iface.messageBar().pushMessage(
                self.dock.tr("EarthDial"), str(exc), level=Qgis.MessageLevel.Warning, duration=0
            )

    def _done(self, task: ScanTask) -> None:
        dock = self.dock
        dock._running.discard(task)
        if getattr(dock, "_closed", False):
            return
        dock._task = None
        self.task = None
        dock._set_busy(False)
        self.progress.setVisible(False)
        dock._task_ended(task.description())
        if task.error is not None or task.reply is None:
            note = ""
            if self.live is not None and not _deleted(self.live):  # what was found stays, marked unmerged
                self.live.setName(
                    self.live.name().replace(dock.tr(" (scanning…)"), dock.tr(" (stopped: unmerged)"))
                )
                self._keep(self.live)
                dock.last_layer = self.live  # Zoom and Save act on what the scan found so far
                note = dock.tr("{done} of {total} tile(s) were scanned; their {n} box(es) are kept, unmerged, "
                               "in layer “{name}”.").format(done=task.done, total=task.total,
                                                             n=self.live.featureCount(), name=self.live.name())  # fmt: skip
            dock._set_result_buttons()
            dock._show_error(task.error or EarthDialError("internal", "no reply"), task.endpoint, note)
            return
        p, scan = self.pending, task.scan
        self._drop_live()
        problems: list[str] = []
        layer = add_result_layer(scanning.collection(scan.merged, scan), p["crs"], self._layer_name(),
                                 group_name=p["group"], problems=problems)  # fmt: skip
        if p["task"] == CHANGE_TASK and scan.tiles:
            self.tiles_layer = add_result_layer(
                scanning.tile_collection(scan), p["crs"],
                unique_layer_name(dock.tr("change tiles – {layer} ({time})").format(layer=p["names"], time=p["stamp"])),
                group_name=p["group"] + dock.tr(" (change map)"), problems=problems)  # fmt: skip
        dock.last_reply, dock.last_error, dock.last_layer = task.reply, None, layer
        dock._set_result_buttons()
        text = dock.tr("{tiles} tile(s) scanned: {n} box(es) after merging {raw}.").format(
            tiles=task.reply.get("tiles"), n=len(scan.merged), raw=len(scan.found)
        )
        text += "".join(" " + x for x in problems)
        dock.result_label.setText(text)
        dock.iface.messageBar().pushMessage(
            dock.tr("EarthDial"), text, level=Qgis.MessageLevel.Success, duration=8
        )


def _deleted(layer: Any) -> bool:
    try:
        from qgis.PyQt import sip
    except ImportError:  # pragma: no cover
        import sip  # type: ignore[no-redef]
    return sip.isdeleted(layer) or QgsProject.instance().mapLayer(layer.id()) is None


__all__ = ["DockScan", "QgsRasterLayer", "ScanTask"]
