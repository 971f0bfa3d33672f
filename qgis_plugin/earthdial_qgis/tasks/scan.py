"""The tiled scan's worker: the whole layer (or the map extent, a drawn rectangle...) through the backend's
streaming `detect` (or `detect_changes` for a pair or sequence), off the UI thread.

`ScanTask.run` (a worker thread) sends the request, reads and streams tiles when the layer is not a
file the backend reads, and passes each progress event's boxes to the main thread by a queued signal. It
never touches a widget: the panel's side of a scan (gui/scan.py's `DockScan`) puts the boxes on the map.
Cancel stops the backend within one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qgis.core import QgsProject, QgsTask

from ..contract.client import Client
from ..contract.wire import EarthDialError
from ..core import scanning
from ..core.qt import QtCore
from ..core.request import Request

SCAN_TASKS = ("refer", "grounding")  # one-image grounded tasks a detect scan runs
CHANGE_TASK = "change"


class ScanTask(QgsTask):
    boxes = QtCore.pyqtSignal(object) if hasattr(QtCore, "pyqtSignal") else QtCore.Signal(object)

    def __init__(
        self,
        description: str,
        request: Request,
        on_done: Callable[[ScanTask], None],
        earlier: dict[str, Any] | None = None,
        project: QgsProject | None = None,
    ) -> None:
        """Made on the main thread: the request's layers are found in ``project`` (default: the current
        one) and what the task's thread reads of them (a provider clone each) is taken here."""
        super().__init__(description, QgsTask.Flag.CanCancel)
        self.request = request
        self.endpoint, self.timeout_s, self.rect = request.endpoint, request.timeout_s, request.rect
        found = request.map_layers(project)
        self.layer: scanning.ScanLayer | None = None
        self.layers: list[scanning.ScanLayer] = []  # a change scan's BEFORE AFTER [LATER ...]
        if len(found) > 1:
            self.layers = [scanning.ScanLayer.of(x) for x in found]
        else:
            self.layer = scanning.ScanLayer.of(found[0], request.band_list)
        self.scan = scanning.Scan(request.header())  # replaced by the one the run makes
        self.on_done = on_done
        self.reply: dict[str, Any] | None = None
        self.error: EarthDialError | None = None
        # tiles finished and planned, whichever Scan (by reference or streamed) ran
        self.done = self.total = 0
        self.earlier = earlier  # a resumed scan: the stopped scan's tiles and boxes (resume.earlier)
        # every finished tile and its boxes as the events carried them (the earlier ones included): what a
        # stop keeps for a resume. Written on the task's thread, read on the main one once it has ended.
        self.finished_tiles: dict[int, dict[str, Any]] = {}
        self.found: list[dict[str, Any]] = []
        self._waiting: list[dict[str, Any]] = []  # boxes whose tile's entry has not come yet
        if earlier is not None:
            self.finished_tiles.update({int(t["index"]): t for t in earlier["tiles"]})
            self.found += earlier["features"]

    def on_event(self, event: dict[str, Any]) -> None:
        """One event of the scan (on the task's thread)."""
        if event.get("event") == "plan":
            self.total = int(event.get("total") or 0)
        if event.get("event") == "progress":
            self.done, self.total = int(event["done"]), int(event["total"])
            self.setProgress(100.0 * event["done"] / max(event["total"], 1))
            tiles = {int(t["index"]): t for t in event.get("tiles", [])}
            self.finished_tiles.update(tiles)
            # a tile's boxes may come an event before its entry (events are cut by size): they count as
            # found, go on the map and into a stop's record with the entry, so every box shown has its
            # answer and request, and a record's every box has its tile (a cancel reads no further event:
            # boxes of a tile without its entry would make the record one the backend refuses to resume)
            ready, self._waiting[:] = scanning.finished_boxes(
                self._waiting + event.get("features", []), self.finished_tiles
            )
            self.found += ready
            if ready or tiles:
                self.boxes.emit((ready, tiles))

    def run(self) -> bool:
        on_event = self.on_event
        try:
            with Client(self.endpoint, timeout_s=self.timeout_s) as client:
                request = self.request
                if self.layers:
                    self.scan, self.reply = scanning.run_changes(
                        client, self.layers, dict(request.options), self.isCanceled, on_event
                    )
                elif self.layer is not None:
                    self.scan, self.reply = scanning.run_layer(
                        client,
                        self.layer,
                        self.rect,
                        request.task,
                        request.prompt,
                        dict(request.options),
                        self.isCanceled,
                        on_event,
                        self.earlier,
                    )
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


__all__ = ["CHANGE_TASK", "SCAN_TASKS", "ScanTask"]
