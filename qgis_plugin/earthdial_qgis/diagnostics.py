"""A diagnostics report a user can copy into a bug report: versions, the endpoint, what the backend said
about itself, the local backend process and the last errors."""

from __future__ import annotations

import json
import platform
import sys
from typing import Any

from qgis.core import Qgis

from . import deps, log
from .qt import BINDING, QtCore, QtWidgets, exec_dialog


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


def report(
    endpoint: str,
    status: dict[str, Any] | None,
    status_error: str = "",
    local_backend: Any = None,
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
        lines.append(f"backend status: protocol {status.get('protocol')}, queue {status.get('queue')}, "
                     f"running {status.get('running')}")  # fmt: skip
        lines.append(f"model: {json.dumps(summary)}")
        if model.get("dtype_reason"):  # why the backend computes in this dtype (bf16 or fp32 on a CPU)
            lines.append(f"dtype: {model['dtype_reason']}")
        lines.append(f"tasks: {', '.join(str(t.get('name')) for t in status.get('tasks') or [])}")
    else:
        lines.append(f"backend status: {status_error or 'not checked'}")
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

    def copy(self) -> None:
        QtWidgets.QApplication.clipboard().setText(self.text_view.toPlainText())

    def run(self) -> int:
        return exec_dialog(self)
