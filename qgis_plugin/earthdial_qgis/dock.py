"""The EarthDial panel: pick a raster layer and a task, ask about the visible map area, see the answer
and get its boxes as a layer. Requests run as QgsTasks; this widget only reacts to their results."""

from __future__ import annotations

import re
from typing import Any

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsMapLayerProxyModel,
    QgsRasterLayer,
    QgsSettings,
)
from qgis.gui import QgsMapLayerComboBox
from qgis.PyQt import sip

from .errors import BAD_ENDPOINT, BAD_INPUT, NO_LAYER, plain_message
from .layers import add_result_layer
from .protocol import DEFAULT_ENDPOINT, EarthDialError
from .qt import QtCore, QtWidgets
from .sources import area_in_layer_crs, plan_source
from .task import RequestTask

GEOREF = "georef"  # data of the task entry that imports an answer instead of asking the model
SETTING_ENDPOINT = "EarthDial/endpoint"
SETTING_TIMEOUT = "EarthDial/timeout_s"
DEFAULT_TIMEOUT_S = 300
STATUS_TIMEOUT_S = 3.0

# The backend's tasks, for when it cannot be asked (names must match backend/earthdial/prompts.py).
FALLBACK_TASKS: list[dict[str, Any]] = [
    {"name": "chat", "description": "Free question about the image", "needs_prompt": True, "grounded": False},
    {"name": "caption", "description": "Caption the image", "needs_prompt": False, "grounded": False},
    {"name": "vqa", "description": "Short answer to a question", "needs_prompt": True, "grounded": False},
    {
        "name": "classify",
        "description": "Scene class from a list (prompt: comma-separated classes)",
        "needs_prompt": True,
        "grounded": False,
    },
    {
        "name": "grounding",
        "description": "Describe the image with object boxes",
        "needs_prompt": False,
        "grounded": True,
    },
    {
        "name": "refer",
        "description": "Find objects (prompt: what to find, e.g. 'ships')",
        "needs_prompt": True,
        "grounded": True,
    },
    {
        "name": "identify",
        "description": "What is at a box (prompt: [[x1, y1, x2, y2, angle]] on 0-100)",
        "needs_prompt": True,
        "grounded": False,
    },
]
_ENDPOINT = re.compile(r"^(tcp|ipc|inproc)://\S+$")
_BANDS = re.compile(r"^\s*\d+(\s*,\s*\d+)*\s*$")


class EarthDialDock(QtWidgets.QDockWidget):
    def __init__(self, iface: Any, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent if parent is not None else iface.mainWindow())
        self.iface = iface
        self.setObjectName("EarthDialDock")
        self.setWindowTitle(self.tr("EarthDial"))
        self._task: RequestTask | None = None
        self._status_task: RequestTask | None = None
        self._pending: dict[str, Any] = {}  # what the running request was about, for its result layer
        self._tasks: dict[str, dict[str, Any]] = {}
        self.last_reply: dict[str, Any] | None = None
        self.last_error: EarthDialError | None = None
        self.last_layer: Any = None
        self._closed = False
        self._running: set[RequestTask] = set()
        self._layer_signal: Any = None
        self._build_ui()
        self._fill_tasks(FALLBACK_TASKS)
        self._follow_active_layer()
        self.refresh_status()

    # -- construction ---------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        settings = QgsSettings()
        body = QtWidgets.QWidget(self)
        form = QtWidgets.QFormLayout()

        self.endpoint_edit = QtWidgets.QLineEdit(str(settings.value(SETTING_ENDPOINT, DEFAULT_ENDPOINT)))
        self.endpoint_edit.setToolTip(self.tr("ZeroMQ endpoint of `earthdial serve`"))
        self.endpoint_edit.editingFinished.connect(self._endpoint_edited)
        self.refresh_button = QtWidgets.QToolButton()
        self.refresh_button.setText(self.tr("Check"))
        self.refresh_button.setToolTip(self.tr("Ask the backend what it has loaded"))
        self.refresh_button.clicked.connect(self.refresh_status)
        endpoint_row = QtWidgets.QHBoxLayout()
        endpoint_row.addWidget(self.endpoint_edit, 1)
        endpoint_row.addWidget(self.refresh_button)
        form.addRow(self.tr("Backend"), endpoint_row)

        self.status_label = _plain_label(self.tr("Not checked yet"))
        form.addRow(self.tr("Status"), self.status_label)

        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(_raster_filter())
        form.addRow(self.tr("Layer"), self.layer_combo)
        form.addRow(self.tr("Area"), QtWidgets.QLabel(self.tr("the visible map extent")))

        self.task_combo = QtWidgets.QComboBox()
        self.task_combo.currentIndexChanged.connect(self._task_changed)
        form.addRow(self.tr("Task"), self.task_combo)
        self.task_hint = _plain_label()
        form.addRow("", self.task_hint)

        self.bands_edit = QtWidgets.QLineEdit()
        self.bands_edit.setPlaceholderText(self.tr("displayed bands"))
        self.bands_edit.setToolTip(
            self.tr("1-based band numbers, e.g. 4,3,2; empty: the bands the layer shows")
        )
        self.timeout_spin = QtWidgets.QSpinBox()
        self.timeout_spin.setRange(1, 3600)
        self.timeout_spin.setSuffix(self.tr(" s"))
        self.timeout_spin.setValue(int(settings.value(SETTING_TIMEOUT, DEFAULT_TIMEOUT_S, type=int)))
        self.timeout_spin.setToolTip(self.tr("How long to wait for an answer"))
        self.timeout_spin.valueChanged.connect(lambda v: QgsSettings().setValue(SETTING_TIMEOUT, int(v)))
        options_row = QtWidgets.QHBoxLayout()
        options_row.addWidget(self.bands_edit, 1)
        options_row.addWidget(QtWidgets.QLabel(self.tr("Timeout")))
        options_row.addWidget(self.timeout_spin)
        form.addRow(self.tr("Bands"), options_row)

        self.prompt_edit = QtWidgets.QPlainTextEdit()
        self.prompt_edit.setMaximumHeight(90)
        self.send_button = QtWidgets.QPushButton(self.tr("Send"))
        self.send_button.setDefault(True)
        self.send_button.clicked.connect(self.send)
        self.cancel_button = QtWidgets.QPushButton(self.tr("Cancel"))
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QtWidgets.QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.send_button)
        buttons.addWidget(self.cancel_button)

        self.answer_view = QtWidgets.QPlainTextEdit()
        self.answer_view.setReadOnly(True)
        self.answer_view.setPlaceholderText(self.tr("The answer appears here."))
        self.result_label = _plain_label()

        layout = QtWidgets.QVBoxLayout(body)
        layout.addLayout(form)
        layout.addWidget(QtWidgets.QLabel(self.tr("Prompt")))
        layout.addWidget(self.prompt_edit)
        layout.addLayout(buttons)
        layout.addWidget(QtWidgets.QLabel(self.tr("Answer")))
        layout.addWidget(self.answer_view, 1)
        layout.addWidget(self.result_label)
        self.setWidget(body)

    def _follow_active_layer(self) -> None:
        self._active_layer_changed(self.iface.activeLayer())
        signal = getattr(self.iface, "currentLayerChanged", None)
        if signal is not None and hasattr(signal, "connect"):
            signal.connect(self._active_layer_changed)
            self._layer_signal = signal

    def _active_layer_changed(self, layer: Any) -> None:
        if isinstance(layer, QgsRasterLayer) and not sip.isdeleted(self):
            self.layer_combo.setLayer(layer)

    # -- tasks list -----------------------------------------------------------------------------------
    def _fill_tasks(self, tasks: list[dict[str, Any]]) -> None:
        current = self.task_combo.currentData()
        self._tasks = {str(t["name"]): dict(t) for t in tasks if t.get("name")}
        self.task_combo.blockSignals(True)
        self.task_combo.clear()
        for name, info in self._tasks.items():
            self.task_combo.addItem(name, name)
            index = self.task_combo.count() - 1
            self.task_combo.setItemData(index, info.get("description", ""), QtCore.Qt.ToolTipRole)
            if int(info.get("images", 1) or 1) > 1:  # before/after pairs need two layers: not offered yet
                self.task_combo.model().item(index).setEnabled(False)
                self.task_combo.setItemData(
                    index,
                    self.tr("Needs two layers (before/after); not available in this panel yet."),
                    QtCore.Qt.ToolTipRole,
                )
        self.task_combo.addItem(self.tr("Import answer (georef)"), GEOREF)
        index = self.task_combo.findData(current) if current else -1
        if index < 0 or not self.task_combo.model().item(index).isEnabled():
            index = 0
        self.task_combo.setCurrentIndex(index)
        self.task_combo.blockSignals(False)
        self._task_changed()

    def select_task(self, name: str) -> None:
        """Pick a task by its name (or GEOREF), as a user would in the list."""
        index = self.task_combo.findData(name)
        if index < 0:
            raise KeyError(name)
        self.task_combo.setCurrentIndex(index)

    def _task_changed(self, *_: Any) -> None:
        name = self.task_combo.currentData()
        if name == GEOREF:
            self.task_hint.setText(
                self.tr(
                    "Paste an EarthDial answer from elsewhere (with <box> tags): its boxes are placed on the visible map area."
                )
            )
            self.prompt_edit.setPlaceholderText(self.tr("<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box>"))
            return
        info = self._tasks.get(str(name), {})
        self.task_hint.setText(info.get("description", ""))
        if info.get("default_prompt"):
            placeholder = self.tr("Default: {prompt}").format(prompt=info["default_prompt"])
        elif info.get("needs_prompt", True):
            placeholder = self.tr("Your question or what to find")
        else:
            placeholder = self.tr("(no prompt needed)")
        self.prompt_edit.setPlaceholderText(placeholder)

    # -- backend status -------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return self.endpoint_edit.text().strip()

    def _endpoint_edited(self) -> None:
        QgsSettings().setValue(SETTING_ENDPOINT, self.endpoint)
        self.refresh_status()

    def refresh_status(self) -> None:
        """Ask the backend, in the background, what it has loaded; fills the task list from its answer."""
        if not _ENDPOINT.match(self.endpoint):
            self.status_label.setText(self.tr("The endpoint must look like tcp://127.0.0.1:5557."))
            return
        self.status_label.setText(self.tr("Checking {endpoint}…").format(endpoint=self.endpoint))
        task = RequestTask(
            self.tr("EarthDial: status"),
            self.endpoint,
            {"op": "status"},
            None,
            STATUS_TIMEOUT_S,
            self._status_done,
        )
        self._status_task = task
        self._start(task)

    def _status_done(self, task: RequestTask) -> None:
        self._running.discard(task)
        if self._closed or sip.isdeleted(self) or task is not self._status_task:
            return  # closed, or an older check answering after a newer one started
        self._status_task = None
        if task.error is not None or task.reply is None:
            error = task.error or EarthDialError("internal", "no reply")
            self.status_label.setText(plain_message(error, task.endpoint))
            return
        model = task.reply.get("model")
        if model:
            text = self.tr("Connected: {variant} on {device}, {queue} queued").format(
                variant=model.get("variant", "?"),
                device=model.get("device", "?"),
                queue=task.reply.get("queue", 0),
            )
        else:
            text = self.tr("Connected: no model loaded (only answers can be imported)")
        self.status_label.setText(text)
        tasks = task.reply.get("tasks")
        if isinstance(tasks, list) and tasks:
            self._fill_tasks(tasks)

    # -- requests -------------------------------------------------------------------------------------
    def is_busy(self) -> bool:
        return self._task is not None

    def send(self) -> None:
        """Send the prompt (or import the pasted answer) for the visible area of the chosen layer."""
        if self._task is not None:
            return
        try:
            task = self._make_request()
        except EarthDialError as exc:
            self._show_error(exc, self.endpoint)
            return
        self._task = task
        self._set_busy(True)
        self.result_label.setText(self.tr("Waiting for the backend…"))
        self._start(task)

    def _start(self, task: RequestTask) -> None:
        # Python keeps each task object until its result is handled, whatever replaced it in the
        # dock's attributes meanwhile (a status check superseded by a newer one, say).
        self._running.add(task)
        QgsApplication.taskManager().addTask(task)

    def cancel(self) -> None:
        if self._task is not None:
            self.result_label.setText(self.tr("Cancelling…"))
            self._task.cancel()

    def _make_request(self) -> RequestTask:
        endpoint = self.endpoint
        if not _ENDPOINT.match(endpoint):
            raise EarthDialError(BAD_ENDPOINT, self.tr("The endpoint must look like tcp://127.0.0.1:5557."))
        QgsSettings().setValue(SETTING_ENDPOINT, endpoint)
        layer = self.layer_combo.currentLayer()
        if not isinstance(layer, QgsRasterLayer) or not layer.isValid():
            raise EarthDialError(NO_LAYER, self.tr("Pick a raster layer first."))
        bands_text = self.bands_edit.text().strip()
        if bands_text and not _BANDS.match(bands_text):
            raise EarthDialError(BAD_INPUT, self.tr("Bands must be numbers separated by commas, e.g. 4,3,2."))
        bands = [int(b) for b in bands_text.split(",")] if bands_text else None
        name = str(self.task_combo.currentData())
        prompt = self.prompt_edit.toPlainText().strip()
        if name == GEOREF and not prompt:
            raise EarthDialError(BAD_INPUT, self.tr("Paste the answer to import into the prompt box."))

        canvas = self.iface.mapCanvas()
        area = area_in_layer_crs(canvas.extent(), canvas.mapSettings().destinationCrs(), layer)
        plan = plan_source(layer, area, bands)
        if name == GEOREF:
            header: dict[str, Any] = {"op": "georef", "answer": prompt}
        else:
            header = {"op": "ask", "task": name, "prompt": prompt, "options": {}}
        self._pending = {
            "task": name,
            "prompt": prompt,
            "crs": layer.crs(),
            "layer_name": layer.name(),
            "source": plan.label,
        }
        return RequestTask(
            self.tr("EarthDial: {task} on {layer}").format(task=name, layer=layer.name()),
            endpoint,
            header,
            plan,
            self.timeout_spin.value(),
            self._request_done,
        )

    def _request_done(self, task: RequestTask) -> None:
        self._running.discard(task)
        if self._closed or sip.isdeleted(self):
            return
        self._task = None
        self._set_busy(False)
        if task.error is not None or task.reply is None:
            self._show_error(task.error or EarthDialError("internal", "no reply"), task.endpoint)
            return
        reply, pending = task.reply, self._pending
        self.last_reply, self.last_error = reply, None
        self.answer_view.setPlainText(str(reply.get("answer", "")))
        layer = add_result_layer(
            reply,
            pending["crs"],
            self.tr("EarthDial {task} – {layer}").format(task=pending["task"], layer=pending["layer_name"]),
            pending["task"],
            pending["prompt"],
            pending["source"],
        )
        self.last_layer = layer
        note = ""
        if task.sent_by_value:
            note = self.tr("The backend cannot read the file, so its pixels were sent instead. ")
        if layer is None:
            self.result_label.setText(note + self.tr("No boxes in the answer."))
            return
        text = self.tr("{n} box(es) added as layer “{name}”.").format(
            n=layer.featureCount(), name=layer.name()
        )
        self.result_label.setText(note + text)
        self.iface.messageBar().pushMessage(self.tr("EarthDial"), text, level=Qgis.Success, duration=5)

    def _show_error(self, error: EarthDialError, endpoint: str) -> None:
        self.last_error = error
        text = plain_message(error, endpoint)
        self.answer_view.setPlainText(text)
        self.result_label.setText("")
        level = Qgis.Info if error.code == "cancelled" else Qgis.Critical
        self.iface.messageBar().pushMessage(self.tr("EarthDial"), text, level=level, duration=10)

    def _set_busy(self, busy: bool) -> None:
        self.send_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)

    # -- teardown -------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Cancel what is running and let go of QGIS signals (the plugin is being unloaded)."""
        self._closed = True
        for task in list(self._running):
            task.cancel()
        if self._layer_signal is not None:
            try:
                self._layer_signal.disconnect(self._active_layer_changed)
            except (TypeError, RuntimeError):
                pass
            self._layer_signal = None


def _plain_label(text: str = "") -> QtWidgets.QLabel:
    # plain text: answers and messages hold "<box>", "<array>" and the like, which rich text would eat
    label = QtWidgets.QLabel(text)
    label.setTextFormat(QtCore.Qt.PlainText)
    label.setWordWrap(True)
    return label


def _raster_filter() -> Any:
    layer_filter = getattr(Qgis, "LayerFilter", None)  # QGIS >= 3.34 moved the flags here
    return layer_filter.RasterLayer if layer_filter is not None else QgsMapLayerProxyModel.RasterLayer
