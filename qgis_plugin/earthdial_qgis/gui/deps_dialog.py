"""The dialog that offers to install missing packages (pyzmq, qtpy) into the plugin's own folder, with
the exact command shown, a button that runs it with QGIS's Python, and what to do by hand otherwise."""

from __future__ import annotations

from typing import Any

from ..core import deps, log
from ..core.qt import QtCore, QtGui, QtWidgets, exec_dialog


class DependenciesDialog(QtWidgets.QDialog):
    def __init__(self, missing: list[str], parent: Any = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(self.tr("EarthDial: missing Python packages"))
        self.missing = list(missing) or list(deps.REQUIRED.values())
        self.process: QtCore.QProcess | None = None
        self.command = deps.pip_command_text(self.missing)
        intro = QtWidgets.QLabel(
            self.tr(
                "EarthDial needs the Python packages {packages}, which QGIS's Python does not have. They can be "
                "installed into a folder of the plugin's own ({vendor}, kept when the plugin is upgraded); QGIS's own packages are not touched. "
                "This runs:"
            ).format(packages=", ".join(self.missing), vendor=deps.VENDOR_DIR)
        )
        intro.setWordWrap(True)
        intro.setTextFormat(QtCore.Qt.TextFormat.PlainText)
        self.command_edit = QtWidgets.QLineEdit(self.command)
        self.command_edit.setReadOnly(True)
        manual = QtWidgets.QLabel(
            self.tr(
                "If the button fails (no network, no pip), run the command yourself in a terminal (the "
                "OSGeo4W Shell on Windows), or install the packages with your system's package manager "
                "(e.g. python3-zmq), then restart QGIS."
            )
        )
        manual.setWordWrap(True)
        self.output_view = QtWidgets.QPlainTextEdit()
        self.output_view.setReadOnly(True)
        self.install_button = QtWidgets.QPushButton(self.tr("Install"))
        self.install_button.clicked.connect(self.install)
        copy = QtWidgets.QPushButton(self.tr("Copy command"))
        copy.clicked.connect(lambda: QtWidgets.QApplication.clipboard().setText(self.command))
        close = QtWidgets.QPushButton(self.tr("Close"))
        close.clicked.connect(self.reject)
        buttons = QtWidgets.QHBoxLayout()
        buttons.addWidget(copy)
        buttons.addStretch(1)
        buttons.addWidget(self.install_button)
        buttons.addWidget(close)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addWidget(self.command_edit)
        layout.addWidget(manual)
        layout.addWidget(self.output_view, 1)
        layout.addLayout(buttons)
        self.resize(640, 360)

    def install(self) -> None:
        """Run pip with QGIS's Python in the background; the output shows up as it comes."""
        if self.process is not None:
            return
        process = QtCore.QProcess(self)
        process.setProcessChannelMode(QtCore.QProcess.ProcessChannelMode.MergedChannels)
        process.readyReadStandardOutput.connect(self._output)
        process.finished.connect(self._finished)
        self.process = process
        self.install_button.setEnabled(False)
        self.output_view.appendPlainText(self.command)
        log.info(f"installing dependencies: {self.command}")
        process.start(deps.python_executable(), deps.pip_arguments(self.missing))

    def _output(self) -> None:
        if self.process is not None:
            text = bytes(self.process.readAllStandardOutput()).decode("utf-8", "replace")
            self.output_view.moveCursor(QtGui.QTextCursor.MoveOperation.End)
            self.output_view.insertPlainText(text)

    def _finished(self, code: int, _status: Any = None) -> None:
        self._output()
        self.process = None
        self.install_button.setEnabled(True)
        deps.add_vendor_to_path()
        still = deps.missing_packages()
        if code == 0 and not still:
            self.output_view.appendPlainText(self.tr("Installed. EarthDial is ready."))
            log.info("dependencies installed")
        else:
            message = self.tr(
                "The installation did not succeed (exit code {code}); still missing: {missing}. "
                "Run the command by hand."
            ).format(code=code, missing=", ".join(still) or "-")
            self.output_view.appendPlainText(message)
            log.error(message)

    def run(self) -> int:
        return exec_dialog(self)
