"""A local `earthdial serve` started and stopped by the plugin (QProcess), for users who do not want a
terminal. Its command (the `earthdial` program or the venv holding it), model directory, device and any
extra arguments come from the plugin settings; its output goes to the "EarthDial" log tab. It is stopped
on request and when the plugin unloads. It may read by reference only the folders of the project's raster
files (`--allow-dir` each, plus any the extra arguments name); other layers go by value."""

from __future__ import annotations

import os
import re
import shlex
from typing import Any

from . import log, settings
from .qt import QtCore

STOPPED, STARTING, RUNNING = "stopped", "starting", "running"
READY_LINE = "earthdial: serving"
STOP_WAIT_MS = 5000


def resolve_command(configured: str) -> str:
    """The program to run: the configured file, or ``bin/earthdial`` (``Scripts\\earthdial.exe``) of a
    configured virtual environment folder."""
    path = os.path.expanduser(configured.strip())
    if os.path.isdir(path):
        for candidate in (
            os.path.join(path, "bin", "earthdial"),
            os.path.join(path, "Scripts", "earthdial.exe"),
            os.path.join(path, "earthdial"),
        ):
            if os.path.isfile(candidate):
                return candidate
    return path


def serve_arguments(
    model_dir: str,
    endpoint: str,
    device: str,
    extra: str = "",
    allow_dirs: list[str] | None = None,
    adapter: str = "",
) -> list[str]:
    args = ["serve", "--endpoint", endpoint, "--device", device or "auto"]
    if model_dir.strip():  # else the backend's default: $EARTHDIAL_MODEL or its built-in demo model
        args += ["--model", os.path.expanduser(model_dir)]
    if adapter.strip():  # a LoRA adapter from `earthdial finetune`
        args += ["--adapter", os.path.expanduser(adapter.strip())]
    for folder in allow_dirs or []:
        args += ["--allow-dir", folder]
    return args + (shlex.split(extra) if extra.strip() else [])


def layer_folders() -> list[str]:
    """The folders of the current project's file-backed raster layers: what a local backend may read."""
    from qgis.core import QgsProject, QgsRasterLayer

    from .sources import file_path

    folders: list[str] = []
    for layer in QgsProject.instance().mapLayers().values():
        path = file_path(layer) if isinstance(layer, QgsRasterLayer) else None
        folder = os.path.dirname(path) if path else ""
        if folder and os.path.isdir(folder) and folder not in folders:
            folders.append(folder)
    return folders


# what an error looks like in its output: a traceback's last line, the CLI's own error line, the kernel's word
_CAUSE = re.compile(r"^(\w+(Error|Exception)\b|earthdial serve: |Killed|Segmentation fault)|out of memory")


def exit_cause(code: int, crashed: bool, output: list[str], tr: Any = str) -> str:
    """Why the backend ended, in a few words: killed (a signal has no exit code) or its exit code, and the
    last error it wrote, if any. Lines from before it served (its start-up banner) are no cause."""
    start = max((i + 1 for i, line in enumerate(output) if line.startswith(READY_LINE)), default=0)
    said = [line.strip() for line in output[start:] if _CAUSE.search(line.strip())]
    how = (
        tr("it was killed or crashed (no exit code: out of memory, or killed by another program?)")
        if crashed
        else tr("exit code {code}").format(code=code)
    )
    return f"{how}; it said: {said[-1]}" if said else how


class LocalBackend(QtCore.QObject):
    """One backend process at a time."""

    stateChanged = QtCore.pyqtSignal(str) if hasattr(QtCore, "pyqtSignal") else QtCore.Signal(str)

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.process: QtCore.QProcess | None = None
        self.state = STOPPED
        self.output: list[str] = []  # the last lines it wrote, for diagnostics
        self.last_error = ""  # why it failed: a crash, a start that failed (a red message)
        self.last_exit = ""  # how it ended when that was no failure (news, not an error)
        self._stopping = False

    def is_running(self) -> bool:
        return self.process is not None and self.process.state() != QtCore.QProcess.ProcessState.NotRunning

    def start(self, endpoint: str) -> str:
        """Start the configured backend on ``endpoint``; returns "" or why it cannot be started."""
        if self.is_running():
            return ""
        program = resolve_command(settings.text(settings.BACKEND_COMMAND))
        if not program:
            return self.tr(
                "No backend is set: install one with the panel's Install backend…, or set the backend command "
                "(the `earthdial` program or its venv) in the EarthDial settings."
            )
        if not os.path.isfile(program):
            return self.tr(
                "The backend command {program} does not exist; fix it in the EarthDial settings."
            ).format(program=program)
        model = settings.text(settings.MODEL_DIR)
        if model.strip() and not os.path.isdir(os.path.expanduser(model)):
            return self.tr(
                "The model folder {model} does not exist; fix it in the EarthDial settings."
            ).format(model=model)
        adapter = settings.text(settings.ADAPTER_DIR)
        if adapter.strip() and not os.path.isdir(os.path.expanduser(adapter.strip())):
            return self.tr(
                "The adapter folder {adapter} does not exist; fix it in the EarthDial settings."
            ).format(adapter=adapter)
        args = serve_arguments(
            model,
            endpoint,
            settings.text(settings.DEVICE, "auto"),
            settings.text(settings.EXTRA_ARGS),
            layer_folders(),
            adapter,
        )
        process = QtCore.QProcess(self)
        process.setProcessChannelMode(QtCore.QProcess.ProcessChannelMode.MergedChannels)
        process.setWorkingDirectory(os.path.expanduser("~"))  # it reads only the --allow-dir folders
        env = QtCore.QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        process.setProcessEnvironment(env)
        process.readyReadStandardOutput.connect(self._read_output)
        process.finished.connect(self._finished)
        process.errorOccurred.connect(self._error)
        self.process, self.output, self.last_error, self.last_exit = process, [], "", ""
        log.info(f"starting the backend: {shlex.join([program, *args])}")
        self._set_state(STARTING)
        process.start(program, args)
        return ""

    def stop(self) -> None:
        """Stop the process: politely first (it finishes the batch in flight), then for good."""
        process = self.process
        if process is None:
            return
        self._stopping = True  # its exit, whatever the code, is the one asked for
        self.last_error, self.last_exit = "", self.tr("The local backend was stopped.")
        if process.state() != QtCore.QProcess.ProcessState.NotRunning:
            log.info("stopping the backend")
            process.terminate()
            if not process.waitForFinished(STOP_WAIT_MS):
                process.kill()
                process.waitForFinished(STOP_WAIT_MS)
        self._stopping = False
        self._read_output()
        try:
            process.finished.disconnect(self._finished)
            process.errorOccurred.disconnect(self._error)
            process.readyReadStandardOutput.disconnect(self._read_output)
        except (TypeError, RuntimeError):
            pass
        process.deleteLater()
        self.process = None
        self._set_state(STOPPED)

    def _read_output(self) -> None:
        if self.process is None:
            return
        text = bytes(self.process.readAllStandardOutput()).decode("utf-8", "replace")
        for line in text.splitlines():
            if not line.strip():
                continue
            self.output = (self.output + [line])[-200:]
            log.info(f"backend: {line}")
            if line.startswith(READY_LINE) and self.state == STARTING:
                self._set_state(RUNNING)

    def _finished(self, code: int, status: Any = None) -> None:
        self._read_output()
        crashed = status == QtCore.QProcess.ExitStatus.CrashExit
        if self._stopping or self.state == STOPPED:
            pass  # stop() says so
        elif code == 0 and not crashed:  # it ended by itself without an error, e.g. stopped from a terminal
            self.last_exit = self.tr("The local backend stopped (exit code 0).")
            log.info(self.last_exit)
        else:
            self.last_error = self.tr("The local backend stopped: {cause}.").format(
                cause=exit_cause(code, crashed, self.output, self.tr)
            )
            log.error(self.last_error)
        self._set_state(STOPPED)

    def _error(self, error: Any) -> None:
        if error == QtCore.QProcess.ProcessError.FailedToStart:
            self.last_error = self.tr("The backend could not be started: {why}").format(
                why=self.process.errorString() if self.process else error
            )
            log.error(self.last_error)
            self._set_state(STOPPED)

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.stateChanged.emit(state)
