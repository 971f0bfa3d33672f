"""The panel's tiled scan (the "Tiled scan" choice and the progress bar below Send), on the main thread.

`DockScan` starts a `ScanTask` (tasks/scan.py, a worker thread), puts the boxes the task's queued signal
brings on the map as tiles finish, shows the progress, and at the end replaces them with the backend's
merged boxes: one styled layer (plus the change map for changes). A stop keeps what was found, with what
"Resume scan" needs to go on from it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from qgis.core import Qgis, QgsApplication, QgsProject

from ..contract.wire import EarthDialError
from ..core import geopackage, resume, scanning, settings
from ..core.errors import NO_LAYER
from ..core.layers import add_result_layer, result_name, unique_layer_name
from ..core.qt import QtCore, QtWidgets
from ..core.request import Request
from ..tasks.scan import CHANGE_TASK, SCAN_TASKS, ScanTask


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
        # the running scan's finished tiles: the entries of the live boxes' tiles
        self.tiles: dict[int, dict[str, Any]] = {}

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

    def start(self, request: Request) -> None:
        """Run the panel's scan ``request`` (the dock's `request(scan=True)`)."""
        dock = self.dock
        layers = request.map_layers()
        names = " | ".join(x.name() for x in layers)
        task = ScanTask(
            dock.tr("EarthDial: scan {task} on {layer}").format(task=request.task, layer=names),
            request,
            self._done,
        )
        self._begin(request.task, request.prompt, layers[0], names)
        # what a stop keeps for "Resume scan" (resume.py); change scans are not resumed
        if len(layers) == 1:
            self.pending["resume"] = {"v": resume.VERSION, "layer": resume.describe_source(layers[0]),
                                      "bands": request.band_list, "rect": list(request.area), "task": request.task,
                                      "prompt": request.prompt, "options": dict(request.options)}  # fmt: skip
        self._launch(task)

    def resume(self, stopped: Any = None) -> None:
        """Go on with a stopped scan (the dock's "Resume scan"): the tiles it did not finish, sent with its
        finished tiles (`options.skip`) and their boxes, which the backend merges with the new ones. On
        success the merged layer takes over from the stopped one (`_retire`)."""
        dock = self.dock
        stopped = stopped if stopped is not None else dock.stopped_scan_layer()
        record = resume.recorded(stopped)
        if record is None:
            raise EarthDialError(
                NO_LAYER, dock.tr("Select a stopped scan layer (“… (stopped: unmerged)”) first.")
            )
        layer = resume.source_layer(record)
        request = Request(
            dock.endpoint,
            float(dock.timeout_spin.value()),
            record["task"],
            record["prompt"],
            (layer.id(),),
            tuple(record["rect"]),
            record["bands"],
            {**record["options"], "skip": resume.skip(record)},
            scan=True,
        )
        earlier = resume.earlier(record)
        task = ScanTask(
            dock.tr("EarthDial: resume scan {task} on {layer}").format(task=request.task, layer=layer.name()),
            request,
            self._done,
            earlier=earlier,
        )
        self._begin(request.task, request.prompt, layer, layer.name())
        self.pending.update(
            resume={k: v for k, v in record.items() if k not in ("tiles", "features")}, resumed=stopped
        )
        self._launch(task)
        # the earlier boxes are on the map from the start, with the new ones as they come (one live layer,
        # which a stop keeps whole, the earlier boxes included); the task's boxes reach the main thread
        # queued, after this
        self._on_boxes((earlier["features"], {int(t["index"]): t for t in earlier["tiles"]}))

    def _begin(self, name: str, prompt: str, layer: Any, names: str) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        self.pending = {"task": name, "prompt": prompt, "crs": layer.crs(), "names": names, "stamp": stamp,
                        "group": self.dock.tr("EarthDial scan {task}: {prompt} – {layer} ({time})").format(
                            task=name, prompt=prompt[:30], layer=names, time=stamp)}  # fmt: skip
        self.live, self.tiles_layer = None, None
        self.tiles = {}

    def _launch(self, task: ScanTask) -> None:
        dock = self.dock
        self.task = task
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
        one layer make two layers of different names. The time is to the second and the live layer is
        renamed when the scan stops, so the name is one that no layer has with either mark either: a scan
        resumed within the second of its stop would otherwise stop under the stopped layer's very name."""
        p, tr = self.pending, self.dock.tr
        return unique_layer_name(
            result_name(tr("scan {task}").format(task=p["task"]), p["prompt"][:30], p["names"], p["stamp"]),
            marks=("", tr(" (scanning…)"), tr(" (stopped: unmerged)")),
        )

    def _on_progress(self, value: float) -> None:
        self.progress.setValue(int(value))

    def _on_boxes(self, payload: tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]) -> None:
        """Boxes of the tiles just finished, on the map at once (before merging): a memory layer that
        the merged result replaces at the end. Each box gets its tile's answer and request (the tile's
        entry, which comes with its last box)."""
        task = self.task
        found, tiles = payload
        if task is None:
            return
        self.tiles.update(tiles)
        if not found:
            return
        view = scanning.Scan(task.scan.header, tiles=self.tiles)
        p = self.pending
        if self.live is None or _deleted(self.live):
            self.live = add_result_layer(
                scanning.collection(found, view),
                p["crs"],
                self.dock.tr("{name} (scanning…)").format(name=self._layer_name()),
                group_name=p["group"],
                in_memory=True,
            )
            return
        feats = scanning.features(found, view, p["crs"])
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

    def _keep(self, layer: Any) -> bool:
        """A stopped scan's boxes go into the results GeoPackage like any result: left in memory, the
        tiles already finished would be lost with the project. False when it could not be written."""
        if settings.results_in_memory():
            return True
        try:
            geopackage.store_layer(layer, geopackage.project_results_path(), layer.name())
        except OSError as exc:
            self.dock.iface.messageBar().pushMessage(
                self.dock.tr("EarthDial"), str(exc), level=Qgis.MessageLevel.Warning, duration=0
            )
            return False
        return True

    def _retire(self, old: Any, new: Any, safe: bool) -> str:
        """A resumed scan's new layer (merged, or stopped again with every box so far) takes over from the
        stopped layer ``old``, which is never deleted: once ``new`` is ``safe`` (written as the results
        setting wants) ``old`` leaves the project, its GeoPackage table staying in the file; with edits or
        reviews of its own it stays in the project too. Returns what to tell the user."""
        tr = self.dock.tr
        if old is None or _deleted(old):
            return ""
        if new is None or not safe:
            return tr("The stopped layer “{name}” is kept as it was.").format(name=old.name())
        resume.forget(old)  # its part of the scan lives on in ``new``: it offers no resume of its own
        reviewed = old.fields().indexOf("review") >= 0 and any(f["review"] for f in old.getFeatures())
        if old.isModified() or reviewed:
            return tr(
                "The stopped layer “{name}” stays in the project: it has edits or reviews of its own."
            ).format(name=old.name())
        path, table = geopackage.split_source(old.source()) if old.providerType() == "ogr" else ("", None)
        name = old.name()
        project = QgsProject.instance()
        node = project.layerTreeRoot().findLayer(old.id())
        group = node.parent() if node is not None else None
        project.removeMapLayer(old.id())
        if group is not None and group.parent() is not None and not group.children():
            group.parent().removeChildNode(group)
        if table is None:
            return tr("It replaces the stopped layer “{name}”.").format(name=name)
        return tr("It replaces the stopped layer “{name}”, whose table “{table}” stays in {path}.").format(
            name=name, table=table, path=path
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
            old = self.pending.get("resumed")
            if (
                old is not None
                and task.earlier is not None
                and len(task.finished_tiles) == len(task.earlier["tiles"])
            ):
                # a resume that finished no new tile: the stopped layer stays as it was, no copy of it is made
                self._drop_live()
                if not _deleted(old):
                    dock.last_layer = old
                    note = dock.tr(
                        "No new tile was scanned; the stopped layer “{name}” is kept as it was."
                    ).format(name=old.name())
            elif self.live is not None and not _deleted(self.live):  # what was found stays, marked unmerged
                self.live.setName(
                    self.live.name().replace(dock.tr(" (scanning…)"), dock.tr(" (stopped: unmerged)"))
                )
                record = self.pending.get("resume")
                if record is not None:  # set before it is stored: the property goes with the layer
                    resume.remember(
                        self.live,
                        {
                            **record,
                            "total": task.total,
                            "tiles": list(task.finished_tiles.values()),
                            "features": task.found,
                        },
                    )
                kept = self._keep(self.live)
                dock.last_layer = self.live  # Zoom and Save act on what the scan found so far
                note = dock.tr(
                    "{done} of {total} tile(s) were scanned; their {n} box(es) are kept, unmerged, "
                    "in layer “{name}”."
                ).format(done=task.done, total=task.total, n=self.live.featureCount(), name=self.live.name())
                if record is not None:
                    note += " " + dock.tr("“Resume scan” goes on from them.")
                    retired = self._retire(old, self.live, kept)
                    note += " " + retired if retired else ""
            dock._set_result_buttons()
            dock._show_error(task.error or EarthDialError("internal", "no reply"), task.endpoint, note)
            return
        p, scan = self.pending, task.scan
        self._drop_live()
        problems: list[str] = []
        layer = add_result_layer(
            scanning.collection(scan.merged, scan),
            p["crs"],
            self._layer_name(),
            group_name=p["group"],
            problems=problems,
        )
        if p["task"] == CHANGE_TASK and scan.tiles:
            self.tiles_layer = add_result_layer(
                scanning.tile_collection(scan),
                p["crs"],
                unique_layer_name(
                    dock.tr("change tiles – {layer} ({time})").format(layer=p["names"], time=p["stamp"])
                ),
                group_name=p["group"] + dock.tr(" (change map)"),
                problems=problems,
            )
        retired = ""
        # a resumed scan's merged layer, written as the setting wants (no problem), takes the stopped one's place
        if "resumed" in p:
            retired = self._retire(p["resumed"], layer, not problems)
        dock.last_reply, dock.last_error, dock.last_layer = task.reply, None, layer
        dock._set_result_buttons()
        text = dock.tr("{tiles} tile(s) scanned: {n} box(es) after merging {raw}.").format(
            tiles=task.reply.get("tiles"), n=len(scan.merged), raw=len(scan.found)
        )
        if task.reply.get("tiles_skipped"):
            text += " " + dock.tr("{n} of them were scanned before the scan stopped.").format(
                n=task.reply["tiles_skipped"]
            )
        text += "".join(" " + x for x in problems)
        text += " " + retired if retired else ""
        dock.result_label.setText(text)
        dock.iface.messageBar().pushMessage(
            dock.tr("EarthDial"), text, level=Qgis.MessageLevel.Success, duration=8
        )


def _deleted(layer: Any) -> bool:
    try:
        from qgis.PyQt import sip
    except ImportError:  # pragma: no cover
        import sip
    return sip.isdeleted(layer) or QgsProject.instance().mapLayer(layer.id()) is None


__all__ = ["DockScan"]
