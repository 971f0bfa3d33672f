"""Qt modules for the plugin: qtpy's, when qtpy is installed and resolves to the binding QGIS itself
runs on; otherwise QGIS's own ``qgis.PyQt`` (always present inside QGIS), so a missing or misconfigured
qtpy (e.g. QT_API pointing at another binding) cannot break the plugin."""

from __future__ import annotations

from qgis.PyQt import QtCore as _QgisQtCore

try:
    from qtpy import QtCore, QtGui, QtWidgets

    if QtCore.QObject is not _QgisQtCore.QObject:  # a different binding: its widgets would not mix
        raise ImportError("qtpy resolved to a Qt binding other than QGIS's")
    BINDING = "qtpy"
except Exception as _exc:  # ImportError, or qtpy's PythonQtError when it finds no binding
    from qgis.PyQt import QtCore, QtGui, QtWidgets

    # quiet on purpose: the plugin works the same this way; Diagnostics shows the line
    BINDING = f"qgis.PyQt (qtpy not used: {type(_exc).__name__}: {_exc})"

# QAction moved from QtWidgets to QtGui in Qt6: qtpy and qgis.PyQt offer it in both, bare PyQt6 only in QtGui.
QAction = QtGui.QAction if hasattr(QtGui, "QAction") else QtWidgets.QAction

__all__ = ["BINDING", "QAction", "QtCore", "QtGui", "QtWidgets", "exec_dialog"]


def exec_dialog(dialog: object) -> int:
    """Run a modal dialog: ``exec`` on Qt6 bindings, ``exec_`` on older PyQt5 ones."""
    run = getattr(dialog, "exec", None) or dialog.exec_  # type: ignore[attr-defined]
    return int(run())
