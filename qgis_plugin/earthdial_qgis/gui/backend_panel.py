"""The panel's backend: its status line (a `status` request on demand, the watcher in between), the local
backend's start and stop and what its life-cycle tells, the installer and the diagnostics.

The dock makes one (`EarthDialDock.backend`) and this controller drives the dock's backend widgets (the
status line, Start and Stop, Install backend...). What a status reply means for the request controls (the
task and preset lists, the tile size) stays with the dock: `EarthDialDock.backend_answered`.
"""

from __future__ import annotations

import re
from typing import Any

from qgis.core import Qgis, QgsSettings
from qgis.PyQt import sip

from ..contract.wire import EarthDialError, ErrorCode
from ..core import log, settings
from ..core.backend_process import RUNNING, STARTING, STOPPED, LocalBackend
from ..core.errors import BAD_ENDPOINT, plain_message
from ..core.qt import QtCore
from ..core.watch import StatusWatcher
from ..tasks.request import RequestTask

STATUS_TIMEOUT_S = 3.0
LOSS_WAIT_MS = 1500  # a dropped connection: how long to wait for the local backend's exit to show
ENDPOINT_PATTERN = re.compile(r"^(tcp|ipc|inproc)://\S+$")


class BackendPanel(QtCore.QObject):
    def __init__(self, dock: Any, local_backend: LocalBackend | None = None) -> None:
        super().__init__(dock)
        self.dock = dock
        self.owns_local = local_backend is None  # else the plugin stops it when it unloads
        self.local = local_backend or LocalBackend(dock)
        self.reply: dict[str, Any] | None = None  # the backend's last status reply; None while none answers
        self.error = ""  # why no status reply, in plain words
        self._status_task: RequestTask | None = None
        self._reporting_loss = False  # a request's error is telling why the local backend ended
        self.watcher = StatusWatcher(dock)
        self.watcher.answered.connect(self._watched)
        self.local.stateChanged.connect(self._state_changed)

    def tr(self, text: str) -> str:
        return str(self.dock.tr(text))

    def _gone(self) -> bool:
        return bool(self.dock._closed) or sip.isdeleted(self.dock)

    def _starting_text(self) -> str:
        return self.tr("Starting the local backend (loading the model)…")

    # -- the status line --------------------------------------------------------------------------------
    def endpoint_edited(self) -> None:
        QgsSettings().setValue(settings.ENDPOINT, self.dock.endpoint)
        self.reply = None
        self.refresh()

    def refresh(self) -> None:
        """Ask the backend, in the background, what it has loaded; the dock fills its lists from the answer."""
        dock, endpoint = self.dock, self.dock.endpoint
        if not ENDPOINT_PATTERN.match(endpoint):
            dock.status_label.setText(self.tr("The endpoint must look like tcp://127.0.0.1:5557."))
            return
        dock.status_label.setText(self.tr("Checking {endpoint}…").format(endpoint=endpoint))
        if not dock._closed:
            self.watcher.watch(endpoint)
        task = RequestTask(
            self.tr("EarthDial: status"),
            endpoint,
            {"op": "status"},
            None,
            STATUS_TIMEOUT_S,
            self._status_done,
        )
        self._status_task = task
        dock._start(task)

    def _status_done(self, task: RequestTask) -> None:
        dock = self.dock
        dock._running.discard(task)
        if self._gone():
            return
        dock._task_ended(task.description())
        if task is not self._status_task:
            return  # an older check answering after a newer one started
        self._status_task = None
        if task.error is not None or task.reply is None:
            error = task.error or EarthDialError("internal", "no reply")
            self.reply, self.error = None, plain_message(error, task.endpoint)
            dock.status_label.setText(self._starting_text() if self.local.state == STARTING else self.error)
            return
        self._connected(task.reply)

    def _connected(self, reply: dict[str, Any]) -> None:
        """A status reply: the status line; the dock's lists when the server is new to us."""
        known = (self.reply or {}).get("server")
        fresh = self.reply is None or known != reply.get("server")
        self.reply, self.error = reply, ""
        model = reply.get("model")
        if model:
            text = self.tr(
                "Connected: {variant} ({name}) on {device}, {queue} queued, {running} running"
            ).format(
                variant=model.get("variant", "?"),
                name=_basename(model.get("path", "")),
                device=model.get("device", "?"),
                queue=reply.get("queue", 0),
                running=reply.get("running", 0),
            )
            adapter = model.get("adapter") or {}
            if adapter.get("name"):
                text += self.tr(", adapter {name}").format(name=adapter["name"])
        else:
            text = self.tr("Connected: no model loaded (only answers can be imported)")
        self.dock.status_label.setText(text)
        self.dock.backend_answered(reply, fresh)

    def _watched(self, endpoint: str, reply: Any, error: str) -> None:
        """The status watcher's answer (main thread): the line follows the server as it comes and goes."""
        if self._gone() or endpoint != self.dock.endpoint:
            return
        if isinstance(reply, dict):
            self._connected(reply)
            return
        was_up = self.reply is not None
        self.reply = None
        self.error = plain_message(EarthDialError(ErrorCode.TIMEOUT, error), endpoint)
        self.dock.status_label.setText(self._starting_text() if self.local.state == STARTING else self.error)
        if was_up:
            self.dock.schedule_plan()

    # -- the local backend ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the local backend set in the settings, on the panel's endpoint."""
        dock, endpoint = self.dock, self.dock.endpoint
        if not ENDPOINT_PATTERN.match(endpoint):
            error = EarthDialError(BAD_ENDPOINT, self.tr("The endpoint must look like tcp://127.0.0.1:5557."))
            dock._show_error(error, endpoint)
            return
        QgsSettings().setValue(settings.ENDPOINT, endpoint)
        problem = self.local.start(endpoint)
        if problem:
            dock.status_label.setText(problem)
            dock._message(problem, Qgis.MessageLevel.Warning)
            log.error(problem)
            return
        dock.status_label.setText(self._starting_text())

    def stop(self) -> None:
        self.local.stop()
        self.dock.status_label.setText(self.tr("Local backend stopped."))

    def _state_changed(self, state: str) -> None:
        if self._gone():
            return
        dock, local = self.dock, self.local
        dock.start_button.setEnabled(state not in (STARTING, RUNNING))
        dock.stop_button.setEnabled(state in (STARTING, RUNNING))
        if state == RUNNING:
            self.refresh()
        elif local.last_error:  # a crash or a failed start
            dock.status_label.setText(local.last_error)
            if dock._task is None and not self._reporting_loss:  # else the request's message tells it
                dock._message(local.last_error, Qgis.MessageLevel.Critical)
        elif state == STOPPED and local.last_exit:  # stopped as asked: news, not an error
            dock.status_label.setText(local.last_exit)
            dock._message(local.last_exit, Qgis.MessageLevel.Info, 4)

    def lost(self, error: EarthDialError) -> str:
        """For a request cut off because the panel's local backend ended: that, and why it ended."""
        if error.code not in (ErrorCode.DISCONNECTED, ErrorCode.TIMEOUT):
            return ""
        local, process = self.local, self.local.process
        if error.code == ErrorCode.DISCONNECTED and local.state == RUNNING and process is not None:
            self._reporting_loss = True  # its exit, seen now, is told here rather than in a second message
            try:
                process.waitForFinished(LOSS_WAIT_MS)  # a dropped connection: did the process end?
            finally:
                self._reporting_loss = False
        if local.state != STOPPED or not local.last_error:
            return ""
        return self.tr("The request was cut off. {why}").format(why=local.last_error)

    # -- installing the backend (install_dialog.py), diagnostics ----------------------------------------
    def show_install_offer(self) -> bool:
        """Offer *Install backend...* while no backend command is set; True when it is offered."""
        offered = not settings.text(settings.BACKEND_COMMAND).strip()
        self.dock.install_backend_button.setVisible(offered)
        return offered

    def open_installer(self, **options: Any) -> Any:
        """The install dialog (not modal: the panel stays usable); when it succeeds the backend starts.
        `options`: InstallDialog's (tests)."""
        from .install_dialog import InstallDialog

        dialog = InstallDialog(self.dock, **options)
        dialog.installed.connect(self._installed)
        dialog.show()
        return dialog

    def _installed(self, _venv: str) -> None:
        if self._gone():
            return
        self.show_install_offer()
        self.start()

    def diagnostics_text(self, machine: dict[str, Any] | None = None, machine_note: str = "") -> str:
        from .diagnostics import report

        return report(self.dock.endpoint, self.reply, self.error, self.local, machine, machine_note)

    def open_diagnostics(self) -> Any:
        from .diagnostics import DiagnosticsDialog

        dialog = DiagnosticsDialog(self.diagnostics_text(), self.dock)
        if not (self.reply or {}).get("machine"):  # no running backend said it: ask the local one
            dialog.diagnose(settings.text(settings.BACKEND_COMMAND), self.diagnostics_text)
        dialog.setModal(False)
        dialog.show()
        return dialog

    def shutdown(self) -> None:
        """The plugin is unloading: stop watching, stop the local backend this panel started."""
        self.watcher.stop()
        if self.owns_local:
            self.local.stop()
        try:
            self.local.stateChanged.disconnect(self._state_changed)
        except (TypeError, RuntimeError):
            pass


def _basename(path: str) -> str:
    return str(path).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
