"""The EarthDial panel: the backend (status, start/stop of a local one), the layers (one, or an ordered pair
or sequence for change tasks), the area, the band mapping, the task and prompt; the answer, a preview of
what was sent with the boxes on it, and the chat history of the layer. Requests run as QgsTasks; this
widget only reacts to their results, on the main thread."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from typing import Any

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsSettings,
)
from qgis.PyQt import sip

from ..contract.wire import EarthDialError, ErrorCode
from ..core import area as areas
from ..core import geopackage, history, log, settings
from ..core.backend_process import LocalBackend
from ..core.errors import BAD_ENDPOINT, BAD_INPUT, NO_CRS, NO_LAYER, plain_message
from ..core.layers import add_result_layer, is_in_memory, result_name, unique_layer_name
from ..core.presets import AUTO, bands_for, presets
from ..core.qt import QtCore, QtWidgets
from ..core.request import GEOREF, Request
from ..core.sources import area_in_layer_crs, displayed_bands, native_resolution
from ..tasks.request import RequestTask
from ..tasks.scan import CHANGE_TASK
from .backend_panel import ENDPOINT_PATTERN, BackendPanel
from .dock_ui import DockLayout
from .maptools import RectangleMapTool, RegionMapTool
from .notices import drop_task_notice
from .results import ResultActions
from .scan import DockScan

SETTING_ENDPOINT = settings.ENDPOINT
SETTING_TIMEOUT = settings.TIMEOUT
SETTING_LAST_TASKS = "EarthDial/last_tasks"  # the tasks the last backend's status listed (JSON)
DEFAULT_TIMEOUT_S = settings.DEFAULT_TIMEOUT_S
PLAN_TIMEOUT_S = 3.0  # the summary of what will be sent: a cheap request, never a long wait
# a one-window Send the model would see this many times coarser than the layer: the panel offers a scan
SHRINK_WARN = 4.0
PLAN_DELAY_MS = 400  # after the last change of a control, before asking for a new summary
HELP_PAGE = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "help", "index.html"
)  # ships in the plugin's zip
CHAT = "chat"
FIRST_TASK = "refer"  # on first open: find objects by name, the panel's most common use (a backend task)
REGION_TASK, REGION_PAIR_TASK = "identify", "damage"

_BANDS = re.compile(r"^\s*\d+(\s*,\s*\d+)*\s*$")


class EarthDialDock(DockLayout, ResultActions, QtWidgets.QDockWidget):
    def __init__(
        self, iface: Any, parent: QtWidgets.QWidget | None = None, local_backend: LocalBackend | None = None
    ) -> None:
        super().__init__(parent if parent is not None else iface.mainWindow())
        self.iface = iface
        self.setObjectName("EarthDialDock")
        self.setWindowTitle(self.tr("EarthDial"))
        self.backend = BackendPanel(self, local_backend)  # status, the local backend, installer, diagnostics
        self._task: RequestTask | None = None
        self._pending: dict[str, Any] = {}  # what the running request was about, for its result layer
        self._tasks: dict[str, dict[str, Any]] = {}
        self.last_reply: dict[str, Any] | None = None
        self.last_error: EarthDialError | None = None
        self.last_layer: Any = None
        self.last_group: Any = None
        self.last_preview: Any = None  # QImage of the last chip preview
        self.drawn: tuple[QgsRectangle, Any] | None = None  # the drawn rectangle and its CRS
        self._closed = False
        self._running: set[RequestTask] = set()
        self._layer_signal: Any = None
        self._plan_task: RequestTask | None = None
        self.last_plan: dict[str, Any] | None = None  # the backend's summary of what a Send would send
        self.plan_error: EarthDialError | None = None
        self._plan_bands: list[int] | None = None  # the layer's bands a by-value request reads
        self._plan_native = 0  # the long side, in the layer's pixels, of the area the plan is of
        self._shrink_accepted = False  # the user chose one window over the scan offered
        self.shrink_offer: Any = None  # the message offering the scan
        canvas = iface.mapCanvas()
        self.rectangle_tool = RectangleMapTool(canvas)
        self.rectangle_tool.rectangleDrawn.connect(self.set_drawn_area)
        self.region_tool = RegionMapTool(canvas)
        self.region_tool.rectangleDrawn.connect(self.ask_region)
        self._plan_timer = QtCore.QTimer(self)
        self._plan_timer.setSingleShot(True)
        self._plan_timer.setInterval(PLAN_DELAY_MS)
        self._plan_timer.timeout.connect(self.update_plan)
        self._build_ui()
        self.scan = DockScan(self)  # the tiled scan's panel side: gui/scan.py
        self._fill_tasks(_last_tasks())  # the last backend's, until this one answers
        self._follow_active_layer()
        QgsProject.instance().readProject.connect(self._project_read)
        QgsProject.instance().writeProject.connect(self._project_writing)
        canvas.extentsChanged.connect(self._extent_changed)
        self._show_history()
        self._show_storage()
        self.show_install_offer()
        self.refresh_status()

    def _follow_active_layer(self) -> None:
        self._active_layer_changed(self.iface.activeLayer())
        signal = getattr(self.iface, "currentLayerChanged", None)
        if signal is not None and hasattr(signal, "connect"):
            signal.connect(self._active_layer_changed)
            self._layer_signal = signal

    def _active_layer_changed(self, layer: Any) -> None:
        if sip.isdeleted(self):
            return
        if isinstance(layer, QgsRasterLayer):
            self.layer_combo.setLayer(layer)
        self._set_result_buttons()  # a stopped scan layer selected: "Resume scan"

    def _layer_changed(self, *_: Any) -> None:
        self._show_history()
        self.schedule_plan()

    def _extent_changed(self) -> None:
        if self.area_combo.currentData() == areas.MAP_EXTENT:
            self.schedule_plan()

    def _project_read(self, *_: Any) -> None:
        if not self._closed and not sip.isdeleted(self):
            self._show_history()
            self._show_storage()

    def _project_writing(self, *_: Any) -> None:
        """QGIS is writing the project file: results of a project saved for the first time move from the
        temporary GeoPackage beside it, before the file records where the layers read from."""
        try:
            moved = geopackage.move_temporary_results(QgsProject.instance())
        except OSError as exc:
            self._message(
                self.tr("Results could not be moved beside the project: {why}").format(why=exc),
                Qgis.MessageLevel.Critical,
            )
            return
        if moved:
            log.info(f"{len(moved)} result layer(s) moved to {geopackage.project_results_path()}")
        self._show_storage()

    def _show_storage(self) -> None:
        """Where results go, under the result buttons; memory results are named as what they are."""
        if settings.results_in_memory():
            text = self.tr(
                "Results are kept in memory (a setting): they are lost when QGIS closes unless you save "
                "them with Save to GeoPackage…"
            )
        else:
            path = geopackage.project_results_path()
            where = (
                self.tr("a temporary GeoPackage until the project is saved, then beside the project file")
                if geopackage.is_temporary(path)
                else path
            )
            text = self.tr("Results are stored in {where}.").format(where=where)
        self.storage_label.setText(text)

    # -- tasks list -----------------------------------------------------------------------------------
    def _fill_tasks(self, tasks: list[dict[str, Any]]) -> None:
        current = self.task_combo.currentData()
        if not self._tasks:  # nothing chosen yet but the import entry, all there was: a sensible first task
            current = FIRST_TASK
        self._tasks = {str(t["name"]): dict(t) for t in tasks if t.get("name")}
        variant = ((self.status_reply or {}).get("model") or {}).get("variant")
        self.task_combo.blockSignals(True)
        self.task_combo.clear()
        for name, info in self._tasks.items():
            self.task_combo.addItem(name, name)
            index = self.task_combo.count() - 1
            tip = info.get("description", "")
            if self.images_for(name) > 1:
                tip += self.tr(" — takes {n} layers (before/after)").format(n=self.images_for(name))
            variants = info.get("variants")
            if variant and isinstance(variants, list) and variants and variant not in variants:
                tip += self.tr(" — the loaded model ({variant}) cannot do this task").format(variant=variant)
            self.task_combo.setItemData(index, tip, QtCore.Qt.ItemDataRole.ToolTipRole)
        self.task_combo.addItem(self.tr("Import answer (georef)"), GEOREF)
        index = self.task_combo.findData(current) if current else -1
        self.task_combo.setCurrentIndex(max(index, 0))  # the backend's first task when it has not that one
        self.task_combo.blockSignals(False)
        self._task_changed()

    def images_for(self, name: str) -> int:
        try:
            return max(1, int(self._tasks.get(name, {}).get("images", 1) or 1))
        except (TypeError, ValueError):
            return 1

    def select_task(self, name: str) -> None:
        """Pick a task by its name (or GEOREF), as a user would in the list."""
        index = self.task_combo.findData(name)
        if index < 0:
            raise KeyError(name)
        self.task_combo.setCurrentIndex(index)

    def _task_changed(self, *_: Any) -> None:
        name = self.task_combo.currentData()
        if getattr(self, "scan", None) is not None:
            self.scan.task_changed()
        pair = name != GEOREF and self.images_for(str(name)) > 1
        self.later_label.setVisible(pair)
        self.later_layers.setVisible(pair)
        self.layer_label.setText(self.tr("Before") if pair else self.tr("Layer"))
        if name == GEOREF:
            self.model_note.setVisible(False)
            self.task_hint.setText(
                self.tr(
                    "Paste an EarthDial answer from elsewhere (with <box> tags): its boxes are placed on the area."
                )
            )
            self.prompt_edit.setPlaceholderText(self.tr("<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box>"))
            return
        info = self._tasks.get(str(name), {})
        self.task_hint.setText(info.get("description", ""))
        self._show_model_note()
        if info.get("default_prompt"):
            placeholder = self.tr("Default: {prompt}").format(prompt=info["default_prompt"])
        elif info.get("needs_prompt", True):
            placeholder = self.tr("Your question or what to find")
        else:
            placeholder = self.tr("(no prompt needed)")
        self.prompt_edit.setPlaceholderText(placeholder)

    def _show_model_note(self) -> None:
        """A note when the loaded model was not trained for the chosen task (the demo model knows a few:
        the backend's status lists them); its answers to it would be noise."""
        model = (self.status_reply or {}).get("model") or {}
        trained = model.get("trained_tasks")
        name = str(self.task_combo.currentData())
        untrained = isinstance(trained, list) and name != GEOREF and name not in trained
        if untrained and isinstance(trained, list):
            self.model_note.setText(
                self.tr(
                    "The loaded model is the built-in demo model, which was not trained for {task}: its answers "
                    "will be noise. It was trained for {tasks}; load EarthDial's weights (Settings…) for the rest."
                ).format(task=name, tasks=", ".join(str(t) for t in trained))
            )
        self.model_note.setVisible(untrained)

    # -- the backend (gui/backend_panel.py) -------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return self.endpoint_edit.text().strip()

    @property
    def status_reply(self) -> dict[str, Any] | None:
        """The backend's last status reply (None while none answers): its tasks, presets and model."""
        return self.backend.reply

    @status_reply.setter
    def status_reply(self, reply: dict[str, Any] | None) -> None:
        self.backend.reply = reply

    @property
    def status_error(self) -> str:
        return self.backend.error

    @property
    def local_backend(self) -> LocalBackend:
        return self.backend.local

    def refresh_status(self) -> None:
        self.backend.refresh()

    def show_install_offer(self) -> bool:
        return self.backend.show_install_offer()

    def open_installer(self, **options: Any) -> Any:
        return self.backend.open_installer(**options)

    def diagnostics_text(self, machine: dict[str, Any] | None = None, machine_note: str = "") -> str:
        return self.backend.diagnostics_text(machine, machine_note)

    def open_diagnostics(self) -> Any:
        return self.backend.open_diagnostics()

    def backend_answered(self, reply: dict[str, Any], fresh: bool) -> None:
        """A status reply (gui/backend_panel.py): the model note; from a server new to us, the tile size,
        the task and preset lists."""
        self._show_model_note()
        if not fresh:
            return
        model = reply.get("model") or {}
        size = model.get("image_size")
        if isinstance(size, int) and not self._tile_chosen:
            # a scan tile of the model's own input size reaches the model at the layer's GSD
            self._setting_tile = True
            self.tile_spin.setValue(size)
            self._setting_tile = False
        tasks = reply.get("tasks")
        if isinstance(tasks, list) and tasks:
            self._fill_tasks(tasks)
            QgsSettings().setValue(SETTING_LAST_TASKS, json.dumps(tasks))
        self._fill_presets(presets(reply))
        self.schedule_plan()

    def _fill_presets(self, listed: list[dict[str, Any]]) -> None:
        current = self.preset_combo.currentData()
        self.preset_combo.blockSignals(True)
        while self.preset_combo.count() > 1:  # keep "auto"
            self.preset_combo.removeItem(1)
        for preset in listed:
            self.preset_combo.addItem(preset["name"], preset["name"])
            self.preset_combo.setItemData(
                self.preset_combo.count() - 1,
                str(preset.get("description") or ""),
                QtCore.Qt.ItemDataRole.ToolTipRole,
            )
        index = self.preset_combo.findData(current)
        self.preset_combo.setCurrentIndex(max(index, 0))
        self.preset_combo.blockSignals(False)

    def open_settings(self) -> None:
        from .settings_dialog import SettingsDialog

        SettingsDialog(self).run()
        self.show_install_offer()

    def open_help(self) -> QtCore.QUrl:
        """The plugin's own help page, in the desktop's browser (it needs no network)."""
        from ..core.qt import QtGui

        url = QtCore.QUrl.fromLocalFile(HELP_PAGE)
        QtGui.QDesktopServices.openUrl(url)
        return url

    # -- areas and map tools --------------------------------------------------------------------------
    def _draw_toggled(self, on: bool) -> None:
        canvas = self.iface.mapCanvas()
        if on:
            self.region_button.setChecked(False)
            canvas.setMapTool(self.rectangle_tool)
        elif canvas.mapTool() is self.rectangle_tool:
            canvas.unsetMapTool(self.rectangle_tool)

    def _region_toggled(self, on: bool) -> None:
        canvas = self.iface.mapCanvas()
        if on:
            self.draw_button.setChecked(False)
            canvas.setMapTool(self.region_tool)
        elif canvas.mapTool() is self.region_tool:
            canvas.unsetMapTool(self.region_tool)

    def set_drawn_area(self, rect: QgsRectangle) -> None:
        """A rectangle drawn on the map (canvas CRS) becomes the area asked about."""
        crs = self.iface.mapCanvas().mapSettings().destinationCrs()
        self.drawn = (QgsRectangle(rect), crs)
        self.area_combo.setCurrentIndex(self.area_combo.findData(areas.DRAWN))
        self.draw_button.setChecked(False)
        self.schedule_plan()

    def set_area_mode(self, mode: str) -> None:
        self.area_combo.setCurrentIndex(self.area_combo.findData(mode))

    def current_area(self, layer: QgsRasterLayer) -> QgsRectangle:
        """The area asked about, in ``layer``'s CRS, snapped to its pixels."""
        canvas = self.iface.mapCanvas()
        return areas.area_for(
            str(self.area_combo.currentData()),
            layer,
            canvas.extent(),
            canvas.mapSettings().destinationCrs(),
            self.drawn,
        )

    def ask_region(self, rect: QgsRectangle) -> None:
        """A region picked on the map (canvas CRS): ask what is there (`identify`, or `damage` for a pair),
        with the box in the model's own format on 0-100 of the area asked about."""
        self.region_button.setChecked(False)
        try:
            layer = self._first_layer()
            window = self.current_area(layer)
            canvas_crs = self.iface.mapCanvas().mapSettings().destinationCrs()
            region = area_in_layer_crs(rect, canvas_crs, layer)
            box = areas.region_box(region, window)
        except EarthDialError as exc:
            self._show_error(exc, self.endpoint)
            return
        pair = self.images_for(str(self.task_combo.currentData())) > 1 and bool(self.later_layers.layers())
        task = REGION_PAIR_TASK if pair and REGION_PAIR_TASK in self._tasks else REGION_TASK
        if task in self._tasks:
            self.select_task(task)
        self.prompt_edit.setPlainText(areas.box_text(box))
        self.send()

    # -- chat history ---------------------------------------------------------------------------------
    def _show_history(self) -> None:
        layer = self.layer_combo.currentLayer()
        turns = history.load(layer) if isinstance(layer, QgsRasterLayer) else []
        self.chat_view.setPlainText(history.as_text(turns))
        self.new_chat_button.setEnabled(bool(turns))

    def clear_history(self) -> None:
        layer = self.layer_combo.currentLayer()
        if isinstance(layer, QgsRasterLayer):
            history.clear(layer)
        self._show_history()

    # -- requests -------------------------------------------------------------------------------------
    def is_busy(self) -> bool:
        return self._task is not None

    def send(self) -> None:
        """Send the prompt (or import the pasted answer) for the area of the chosen layer(s)."""
        if self._task is not None:
            return
        try:
            request = self.request()
            if request.scan:
                self.scan.start(request)
                return
            if self._shrinks(self.last_plan) and not self._shrink_accepted:
                self._offer_scan(float(self.last_plan["shrink"]))  # type: ignore[index]
                return
            self._shrink_accepted = False
            task = self._make_request(request)
        except EarthDialError as exc:
            self._show_error(exc, self.endpoint)
            return
        self._task = task
        self._set_busy(True)
        self.result_label.setText(self.tr("Waiting for the backend…"))
        self._start(task)

    def _offer_scan(self, factor: float) -> None:
        """Not sent: the window would reach the model ``factor`` times coarser than the layer. A message
        offers the scan, or the one window all the same."""
        text = self.tr(
            "Not sent: the model would see this area {factor:.0f}× coarser than the layer (small objects vanish)."
        ).format(factor=factor)
        self.result_label.setText(text)
        bar = self.iface.messageBar()
        item = bar.createMessage(self.tr("EarthDial"), text)
        scan_button = QtWidgets.QPushButton(self.tr("Tiled scan"), item)
        anyway_button = QtWidgets.QPushButton(self.tr("Send one window"), item)

        def choose(scan: bool) -> None:
            try:
                bar.popWidget(item)
            except RuntimeError:
                pass
            if scan:
                self.scan.check.setChecked(True)
            else:
                self._shrink_accepted = True
            self.send()

        scan_button.clicked.connect(lambda: choose(True))
        anyway_button.clicked.connect(lambda: choose(False))
        item.layout().addWidget(scan_button)
        item.layout().addWidget(anyway_button)
        bar.pushWidget(item, Qgis.MessageLevel.Warning)
        self.shrink_offer = item

    def _start(self, task: RequestTask) -> None:
        # Python keeps each task object until its result is handled, whatever replaced it in the
        # dock's attributes meanwhile (a status check superseded by a newer one, say).
        self._running.add(task)
        QgsApplication.taskManager().addTask(task)

    def cancel(self) -> None:
        if self._task is not None:
            self.result_label.setText(self.tr("Cancelling…"))
            self._task.cancel()

    def _first_layer(self) -> QgsRasterLayer:
        layer = self.layer_combo.currentLayer()
        if not isinstance(layer, QgsRasterLayer) or not layer.isValid():
            raise EarthDialError(NO_LAYER, self.tr("Pick a raster layer first."))
        _check_crs(layer, self)
        return layer

    def _bands(self) -> tuple[list[int] | None, dict[str, Any]]:
        """The bands to send and the band options (preset, GSD) from the panel."""
        options: dict[str, Any] = {}
        bands_text = self.bands_edit.text().strip()
        if bands_text and not _BANDS.match(bands_text):
            raise EarthDialError(BAD_INPUT, self.tr("Bands must be numbers separated by commas, e.g. 4,3,2."))
        bands = [int(b) for b in bands_text.split(",")] if bands_text else None
        preset = str(self.preset_combo.currentData() or AUTO)
        if preset != AUTO:
            options["preset"] = preset
            bands = bands or bands_for(preset, self.status_reply)
        if self.gsd_spin.value() > 0:
            options["gsd"] = float(self.gsd_spin.value())
        return bands, options

    def request(self, scan: bool | None = None) -> Request:
        """What the controls ask for, as one request: the endpoint and timeout, the layer(s), the area, the
        bands, the task, the prompt and the options as sent. ``scan`` (default: the panel's choice) asks
        for a tiled scan's request: its options are the preset and the tile size."""
        scan = self.scan.wanted() if scan is None else scan
        endpoint = self.endpoint
        if not ENDPOINT_PATTERN.match(endpoint):
            raise EarthDialError(BAD_ENDPOINT, self.tr("The endpoint must look like tcp://127.0.0.1:5557."))
        layer = self._first_layer()
        bands, options = self._bands()
        name = str(self.task_combo.currentData())
        prompt = self.prompt_edit.toPlainText().strip()
        if name == GEOREF and not prompt:
            raise EarthDialError(BAD_INPUT, self.tr("Paste the answer to import into the prompt box."))
        later: list[QgsRasterLayer] = []
        if scan and name == CHANGE_TASK:
            later = self.later_layers.layers()
            if not later:
                raise EarthDialError(
                    NO_LAYER, self.tr("A change scan compares layers: pick the later layer(s) too.")
                )
        elif not scan and name != GEOREF and self.images_for(name) > 1:
            later = self.later_layers.layers()
            if len(later) < self.images_for(name) - 1:
                raise EarthDialError(
                    NO_LAYER,
                    self.tr("Task {task} compares layers: pick the later layer(s) too.").format(task=name),
                )
        for other in later:
            _check_crs(other, self)
        if scan:
            options = {k: v for k, v in options.items() if k == "preset"}
            options["tile_size"] = int(self.tile_spin.value())
            if not self._tasks.get(name, {}).get("needs_prompt", name != CHANGE_TASK):
                prompt = ""  # no stale prompt in the result's name
        elif name == CHAT:
            turns = history.load(layer)
            if turns:
                options["history"] = history.wire_history(turns)
        area = self.current_area(layer)
        return Request(
            endpoint,
            float(self.timeout_spin.value()),
            name,
            prompt,
            tuple(x.id() for x in [layer, *later]),
            (area.xMinimum(), area.yMinimum(), area.xMaximum(), area.yMaximum()),
            tuple(bands) if bands else None,
            options,
            scan,
        )

    def _make_request(self, request: Request) -> RequestTask:
        QgsSettings().setValue(SETTING_ENDPOINT, request.endpoint)
        layers = request.map_layers()
        names = " | ".join(lyr.name() for lyr in layers)
        preview_bands = displayed_bands(layers[0]) or (list(request.bands[:3]) if request.bands else None)
        task = RequestTask.of(
            self.tr("EarthDial: {task} on {layer}").format(task=request.task, layer=names),
            request,
            self._request_done,
            preview_bands,
        )
        self._pending = {
            "task": request.task,
            "prompt": request.prompt,
            "crs": layers[0].crs(),
            "layer": layers[0],
            "layer_name": names,
            "source": " | ".join(p.label for p in task.plans),
            "by_value": task.plans[0].by_value,
        }
        return task

    # -- what will be sent ----------------------------------------------------------------------------
    def schedule_plan(self, *_: Any) -> None:
        """Ask for a new summary of what Send would send, once the controls stop changing."""
        if not self._closed and not sip.isdeleted(self):
            self._plan_timer.start()

    def update_plan(self) -> None:
        """Ask the backend (`plan`, in the background, a short timeout) what a Send would send now."""
        if self._closed or sip.isdeleted(self):
            return
        name = str(self.task_combo.currentData())
        if name == GEOREF:
            self._show_plan_text(self.tr("Imports an answer: nothing is sent to the model."))
            return
        if self.status_reply is None or not ENDPOINT_PATTERN.match(self.endpoint):
            self._show_plan_text(self.tr("What will be sent is shown here once a backend answers."))
            return
        try:
            request = self.request()
            task = RequestTask.of(
                self.tr("EarthDial: what will be sent"),
                request,
                self._plan_done,
                plan_only=True,
                timeout_s=PLAN_TIMEOUT_S,
            )
        except EarthDialError as exc:
            self.last_plan, self.plan_error = None, exc
            self._show_plan_text(plain_message(exc, self.endpoint))
            return
        self._plan_native = native_side(request.map_layers()[0], request.rect)
        first = task.plans[0]
        self._plan_bands = first.bands if first.by_value else first.fallback.bands if first.fallback else None
        self._plan_task = task
        self._start(task)

    def _plan_done(self, task: RequestTask) -> None:
        self._running.discard(task)
        if not self._closed and not sip.isdeleted(self):
            self._task_ended(task.description())
        if self._closed or sip.isdeleted(self) or task is not self._plan_task:
            return  # closed, or a newer summary is on its way
        self._plan_task = None
        if task.error is not None or task.reply is None:
            self.last_plan, self.plan_error = None, task.error
            error = task.error or EarthDialError(ErrorCode.INTERNAL, "no reply")
            prefix = "" if error.code == ErrorCode.TIMEOUT else self.tr("Send would be refused: ")
            self._show_plan_text(prefix + plain_message(error, task.endpoint), error=True)
            return
        plan = dict(task.reply.get("plan") or {})
        if task.sent_by_value:
            plan["by"] = "value"
        if plan.get("by") == "value" and self._plan_bands:
            plan["layer_bands"] = self._plan_bands  # the sent array's bands 1..n are these of the layer
        if not plan.get("scan") and self._plan_native and plan.get("model_gsd_m") and plan.get("gsd_m"):
            # how much coarser than the layer the model sees it: the read's shrink, then the model's
            read = self._plan_native / max(int(plan.get("width") or 1), int(plan.get("height") or 1))
            plan["shrink"] = read * float(plan["model_gsd_m"]) / float(plan["gsd_m"])
        self.last_plan, self.plan_error = plan, None
        text = plan_summary(plan, self.tr)
        if self._shrinks(plan):
            text += "\n" + self.tr(
                "Warning: the model sees this window {factor:.0f}× coarser than the layer: small objects vanish. "
                "Choose Tiled scan to look at every part at the layer's resolution."
            ).format(factor=plan["shrink"])
        self._show_plan_text(text)

    def _shrinks(self, plan: dict[str, Any] | None) -> bool:
        """Whether a one-window Send would show the model the layer much coarser than it is, where a scan
        could look at it whole."""
        return bool(plan) and float((plan or {}).get("shrink") or 0) > SHRINK_WARN and self.scan.possible()

    def _show_plan_text(self, text: str, error: bool = False) -> None:
        self.plan_label.setText(text)
        self.plan_label.setStyleSheet("color: #b00020;" if error else "")

    def _request_done(self, task: RequestTask) -> None:
        self._running.discard(task)
        if self._closed or sip.isdeleted(self):
            return
        self._task_ended(task.description())
        self._task = None
        self._set_busy(False)
        if task.error is not None or task.reply is None:
            self._show_error(task.error or EarthDialError("internal", "no reply"), task.endpoint)
            return
        reply, pending = task.reply, self._pending
        self.last_reply, self.last_error = reply, None
        answer = str(reply.get("answer", ""))
        self.answer_view.setPlainText(answer)
        self._show_preview(task, pending)
        if pending["task"] == CHAT and not sip.isdeleted(pending["layer"]):
            sensor = str((reply.get("input") or {}).get("sensor") or "")
            history.append(pending["layer"], history.Turn(pending["prompt"], answer, sensor))
            self._show_history()
        stamp = datetime.now().strftime("%H:%M:%S")
        # the prompt as the backend recorded it: none for a task that takes none (no stale prompt in names)
        asked = str((reply.get("properties") or {}).get("prompt") or "")
        short = self.tr("imported answer") if pending["task"] == GEOREF else asked
        short = short if len(short) <= 30 else short[:29] + "…"
        group = self.tr("EarthDial {task}: {prompt} – {layer} ({time})").format(
            task=pending["task"], prompt=short, layer=pending["layer_name"], time=stamp
        )
        problems: list[str] = []
        layer = add_result_layer(
            reply,
            pending["crs"],
            unique_layer_name(result_name(pending["task"], short, pending["layer_name"], stamp)),
            group_name=group,
            problems=problems,
        )
        self.last_layer = layer
        self._set_result_buttons()
        notes = []
        if task.sent_by_value:
            notes.append(self.tr("The backend cannot read the file, so its pixels were sent instead."))
        notes += [str(w) for w in (reply.get("input") or {}).get("warnings") or []]
        for problem in problems:
            notes.append(self.tr("The results GeoPackage could not be written ({why}).").format(why=problem))
            log.error(problem)
        if layer is not None and is_in_memory(layer):
            notes.append(self.tr("The layer is in memory: it is lost when QGIS closes unless you save it."))
        note = "".join(n + " " for n in notes)
        log.info(f"{pending['task']} on {pending['layer_name']}: {answer}")
        if layer is None:
            self.result_label.setText(note + self.tr("No boxes in the answer."))
            self._message(self.tr("Answer: {answer}").format(answer=answer[:200]), Qgis.MessageLevel.Info)
            return
        text = self.tr("{n} box(es) added as layer “{name}”.").format(
            n=layer.featureCount(), name=layer.name()
        )
        self.result_label.setText(note + text)
        self._message(text, Qgis.MessageLevel.Success)

    # -- feedback -------------------------------------------------------------------------------------
    def _message(self, text: str, level: Any, duration: int = 8) -> None:
        self.iface.messageBar().pushMessage(self.tr("EarthDial"), text, level=level, duration=duration)

    def _show_error(self, error: EarthDialError, endpoint: str, note: str = "") -> None:
        """One message for how a request ended: the error in plain words (for a local backend that died
        under it, why it died), plus ``note`` (what was kept)."""
        self.last_error = error
        text = self.backend.lost(error) or plain_message(error, endpoint)
        self.answer_view.setPlainText(text)
        self.result_label.setText(note)
        self.tabs.setCurrentIndex(0)
        cancelled = error.code == ErrorCode.CANCELLED
        if cancelled:
            if not note:
                self.result_label.setText(self.tr("Cancelled: the backend stopped working on it."))
            log.info(text)
        else:
            log.error(f"{error.code}: {error.message}")
        self._message(
            text + (" " + note if note else ""),
            Qgis.MessageLevel.Info if cancelled else Qgis.MessageLevel.Critical,
            10,
        )

    def _task_ended(self, description: str) -> None:
        """QGIS's own "Task failed/complete" notice of a panel request is dropped: the panel says it."""
        drop_task_notice(self.iface.messageBar(), description)

    def _set_busy(self, busy: bool) -> None:
        self.send_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        self.region_button.setEnabled(not busy)
        self.resume_button.setEnabled(not busy and self.stopped_scan_layer() is not None)

    # -- teardown -------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Cancel what is running and let go of QGIS signals and map tools (the plugin is unloading)."""
        self._closed = True
        self._plan_timer.stop()
        for task in list(self._running):
            task.cancel()
        self.backend.shutdown()
        canvas = self.iface.mapCanvas()
        for tool in (self.rectangle_tool, self.region_tool):
            if canvas.mapTool() is tool:
                canvas.unsetMapTool(tool)
            tool.clear()
        for signal, slot in (
            (self._layer_signal, self._active_layer_changed),
            (QgsProject.instance().readProject, self._project_read),
            (QgsProject.instance().writeProject, self._project_writing),
            (self.iface.mapCanvas().extentsChanged, self._extent_changed),
        ):
            if signal is None:
                continue
            try:
                signal.disconnect(slot)
            except (TypeError, RuntimeError):
                pass
        self._layer_signal = None


def _check_crs(layer: QgsRasterLayer, owner: Any) -> None:
    if not layer.crs().isValid():
        raise EarthDialError(
            NO_CRS,
            owner.tr(
                "Layer “{layer}” has no coordinate reference system, so its boxes could not be placed on the map. "
                "Set one in Layer Properties → Source, then ask again."
            ).format(layer=layer.name()),
        )


def _last_tasks() -> list[dict[str, Any]]:
    """The tasks the last backend answered with (the plugin keeps no list of its own); [] before any."""
    try:
        tasks = json.loads(str(QgsSettings().value(SETTING_LAST_TASKS, "[]") or "[]"))
    except ValueError:
        return []
    return [t for t in tasks if isinstance(t, dict)] if isinstance(tasks, list) else []


def native_side(layer: QgsRasterLayer, area: QgsRectangle) -> int:
    """The long side of ``area`` in ``layer``'s own pixels (0 for a layer without a pixel grid: WMS, XYZ)."""
    resolution = native_resolution(layer)
    if resolution is None or min(resolution) <= 0:
        return 0
    return round(max(area.width() / resolution[0], area.height() / resolution[1]))


def plan_summary(plan: dict[str, Any], tr: Any) -> str:
    """The backend's `plan` in a few words: for a scan its tiles, batches and the GSD the model sees each
    tile at; for one window its size and the GSD the model sees it at; how it travels, the bands and
    preset, the sensor tag; then its warnings."""
    bands = plan.get("layer_bands") or plan.get("bands") or []
    how = tr("by value") if plan.get("by") == "value" else tr("by reference")
    scan = plan.get("scan") or {}

    def gsd(value: Any) -> str:
        return tr("{gsd:.3g} m").format(gsd=float(value)) if value else "?"

    if scan:
        parts = [
            tr(
                "a tiled scan of {w} × {h} px {how}: {tiles} tiles of {tile} px in {batches} batch(es)"
            ).format(
                w=plan.get("width", "?"),
                h=plan.get("height", "?"),
                how=how,
                tiles=scan.get("tiles"),
                tile=scan.get("tile_size"),
                batches=scan.get("batches"),
            ),
            tr("the model sees each tile at GSD {model} (the layer's {gsd})").format(
                model=gsd(scan.get("model_gsd_m")), gsd=gsd(plan.get("gsd_m"))
            ),
        ]
    else:
        parts = [
            tr("one window of {w} × {h} px {how}").format(
                w=plan.get("width", "?"), h=plan.get("height", "?"), how=how
            )
        ]
        if plan.get("model_gsd_m"):
            parts.append(
                tr("the model sees it at GSD {model} in {n} model tile(s)").format(
                    model=gsd(plan.get("model_gsd_m")), n=plan.get("tiles")
                )
            )
        elif plan.get("gsd_m"):
            parts.append(tr("GSD {gsd}").format(gsd=gsd(plan.get("gsd_m"))))
    parts += [
        tr("bands {bands}").format(bands=",".join(str(b) for b in bands)),
        tr("preset {preset} ({reason})").format(preset=plan.get("preset"), reason=plan.get("reason", "")),
        tr("sensor {sensor}").format(sensor=plan.get("sensor")),
    ]
    text = tr("Will send ") + "; ".join(parts) + "."
    for warning in plan.get("warnings") or []:
        text += "\n" + tr("Warning: ") + str(warning)
    return text
