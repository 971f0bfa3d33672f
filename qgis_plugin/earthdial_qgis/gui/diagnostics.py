"""A diagnostics report a user can copy into a bug report: versions, the endpoint, what the backend said
about itself, what this machine can run (the backend's own report: GPU, driver, torch build, free memory,
its memory plan per checkpoint and quantisation, a recommendation), the local backend process and the last
errors. The plugin never plans memory itself: it shows the backend's report, from a running backend's
status or, with none running, from `earthdial diagnose --json` of the configured backend command."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

from qgis.core import Qgis

from ..core import deps, log
from ..core.qt import BINDING, QtCore, QtWidgets, exec_dialog


def _version(module: str, attribute: str = "__version__") -> str:
    try:
        mod = __import__(module)
    except Exception as exc:  # missing or broken
        return f"not available ({type(exc).__name__}: {exc})"
    return str(getattr(mod, attribute, "?"))


def versions() -> dict[str, str]:
    out = {
        "QGIS": f"{Qgis.QGIS_VERSION} ({Qgis.QGIS_VERSION_INT})",
        "Python": sys.version.split()[0],
        "platform": platform.platform(),
        "Qt": QtCore.QT_VERSION_STR if hasattr(QtCore, "QT_VERSION_STR") else QtCore.qVersion(),
        "numpy": _version("numpy"),
        "pyzmq": _version("zmq"),
        "qtpy": _version("qtpy"),
        "Qt layer": BINDING,
    }
    try:
        import zmq

        out["libzmq"] = zmq.zmq_version()
    except Exception as exc:  # a diagnostics report names what is missing instead of failing
        out["libzmq"] = f"unavailable ({exc.__class__.__name__})"
    try:
        import qtpy

        out["qtpy API"] = str(getattr(qtpy, "API_NAME", "?"))
    except Exception as exc:
        out["qtpy API"] = f"unavailable ({exc.__class__.__name__}; qgis.PyQt is used)"
    return out


DIAGNOSE_TIMEOUT_MS = 120_000  # importing torch and reading the GPUs: seconds, more on a cold disk
MACHINE_HEADING = "what this machine can run"


def machine_lines(status: dict[str, Any] | None, machine: dict[str, Any] | None, note: str) -> list[str]:
    """The backend's machine report (its own summary lines): a running backend's, else the one
    `earthdial diagnose` gave, else why there is none."""
    if status and status.get("machine"):
        found, source = status["machine"], "the running backend"
    elif machine:
        found, source = machine, "earthdial diagnose of the configured backend command"
    else:
        return ["", f"{MACHINE_HEADING}: {note or 'not reported (no backend running)'}"]
    return [
        "",
        f"{MACHINE_HEADING} (from {source}):",
        *("  " + str(line) for line in found.get("summary") or []),
    ]


def report(
    endpoint: str,
    status: dict[str, Any] | None,
    status_error: str = "",
    local_backend: Any = None,
    machine: dict[str, Any] | None = None,
    machine_note: str = "",
) -> str:
    lines = ["EarthDial for QGIS — diagnostics", ""]
    lines += [f"{name}: {value}" for name, value in versions().items()]
    missing = deps.missing_packages()
    lines.append(f"missing packages: {', '.join(missing) if missing else 'none'}")
    lines.append(f"vendor folder: {deps.VENDOR_DIR}")
    lines += ["", f"endpoint: {endpoint}"]
    if status:
        model = status.get("model") or {}
        summary = {
            k: model.get(k)
            for k in ("variant", "path", "device", "dtype", "quantize", "max_tiles")
            if k in model
        }
        lines.append(
            f"backend status: protocol {status.get('protocol')}, queue {status.get('queue')}, "
            f"running {status.get('running')}"
        )
        lines.append(f"model: {json.dumps(summary)}")
        if model.get("dtype_reason"):  # why the backend computes in this dtype (bf16 or fp32 on a CPU)
            lines.append(f"dtype: {model['dtype_reason']}")
        lines.append(f"tasks: {', '.join(str(t.get('name')) for t in status.get('tasks') or [])}")
    else:
        lines.append(f"backend status: {status_error or 'not checked'}")
    lines += machine_lines(status, machine, machine_note)
    if local_backend is not None:
        lines.append(f"local backend process: {local_backend.state}")
        if local_backend.last_error:
            lines.append(f"local backend error: {local_backend.last_error}")
        if local_backend.output:
            lines += [
                "local backend output (last lines):",
                *("  " + line for line in local_backend.output[-10:]),
            ]
    errors = log.recent_errors()
    lines += ["", "last errors:" if errors else "last errors: none", *("  " + e for e in errors[-10:])]
    return "\n".join(lines)


class MachineDiagnosis(QtCore.QObject):
    """`earthdial diagnose --json` of the configured backend command, in a QProcess (it imports torch:
    seconds, in which QGIS goes on). `done` gives (the backend's machine report, "") or (None, why there is
    none). The Diagnostics dialog and the first-run flow show its report as it is."""

    done = QtCore.pyqtSignal(object, str) if hasattr(QtCore, "pyqtSignal") else QtCore.Signal(object, str)

    def start(self, configured: str) -> bool:
        """Start it; False (and `done` already sent) where no backend command is set or it is missing."""
        from ..core.backend_process import resolve_command

        self.program = resolve_command(configured)
        if not self.program or not os.path.isfile(self.program):
            self.done.emit(None, "not measured: set the backend command in the EarthDial settings")
            return False
        self.process = QtCore.QProcess(self)
        self.process.finished.connect(self._finished)
        self.process.errorOccurred.connect(self._error)
        timer = QtCore.QTimer(self.process)  # goes with the process
        timer.setSingleShot(True)
        timer.timeout.connect(self.process.kill)
        timer.start(DIAGNOSE_TIMEOUT_MS)
        self.process.start(self.program, ["diagnose", "--json"])
        return True

    def _finished(self, code: int, _status: Any) -> None:
        out = bytes(self.process.readAllStandardOutput()).decode("utf-8", "replace")
        err = bytes(self.process.readAllStandardError()).decode("utf-8", "replace").strip()
        try:
            machine = json.loads(out) if code == 0 else None
        except ValueError:
            machine = None
        if isinstance(machine, dict):
            self.done.emit(machine, "")
            return
        why = err.splitlines()[-1] if err else f"exit code {code}"
        if "invalid choice" in err:  # argparse's answer to an unknown command: a backend older than this
            why = "this backend has no `diagnose` command; update it"
        self.done.emit(None, f"{self.program} diagnose failed: {why}")

    def _error(self, error: Any) -> None:
        if error == QtCore.QProcess.ProcessError.FailedToStart:  # else `finished` follows and tells
            self.done.emit(None, f"{self.program} could not be started")


class DiagnosticsDialog(QtWidgets.QDialog):
    def __init__(self, text: str, parent: Any = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(self.tr("EarthDial diagnostics"))
        self.setObjectName("EarthDialDiagnostics")
        self.text_view = QtWidgets.QPlainTextEdit(text)
        self.text_view.setReadOnly(True)
        self.copy_button = QtWidgets.QPushButton(self.tr("Copy to clipboard"))
        self.copy_button.clicked.connect(self.copy)
        close = QtWidgets.QPushButton(self.tr("Close"))
        close.clicked.connect(self.accept)
        buttons = QtWidgets.QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.copy_button)
        buttons.addWidget(close)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addWidget(self.text_view)
        layout.addLayout(buttons)
        self.resize(640, 480)

    def diagnose(self, configured: str, render: Callable[[dict[str, Any] | None, str], str]) -> None:
        """Run `earthdial diagnose --json` of the configured backend command and show the report again with
        its machine section: ``render(machine, note)`` makes the report's text."""
        self.diagnosis = MachineDiagnosis(self)
        self.diagnosis.done.connect(lambda machine, note: self.text_view.setPlainText(render(machine, note)))
        self.text_view.setPlainText(render(None, "being measured (earthdial diagnose --json) ..."))
        self.diagnosis.start(configured)

    def copy(self) -> None:
        QtWidgets.QApplication.clipboard().setText(self.text_view.toPlainText())

    def run(self) -> int:
        return exec_dialog(self)
