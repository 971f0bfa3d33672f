"""Settings' *Download model...*: runs `earthdial download` of the configured backend in a QProcess, with
its progress, a Cancel, and the model folder filled on success. The checkpoint names come from the
backend (`earthdial download --list --json`): the plugin never lists them itself. The backend keeps what
a cancelled download received; Download again continues it."""

from __future__ import annotations

import json
import os
from typing import Any

from qgis.gui import QgsFileWidget

from ..core import log
from ..core.backend_process import resolve_command
from ..core.qt import QtCore, QtWidgets


def add_download_button(dialog: Any, form: Any, command_widget: Any, model_widget: Any) -> Any:
    """A *Download model...* row under the model folder: opens the download dialog for the backend named in
    ``command_widget``; a finished download's folder goes into ``model_widget``."""
    button = QtWidgets.QPushButton(dialog.tr("Download model..."))
    button.setToolTip(
        dialog.tr(
            "Fetch a published EarthDial checkpoint from the Hugging Face hub with the "
            "backend (about 8.3 GB; resumable) and use it as the model folder"
        )
    )

    def open_dialog() -> None:
        program = resolve_command(command_widget.filePath())
        download = ModelDownloadDialog(program, dialog)
        download.downloaded.connect(model_widget.setFilePath)
        dialog.download_dialog = download  # kept: it runs after this returns (and tests drive it)
        download.open()

    button.clicked.connect(open_dialog)
    form.addRow("", button)
    return button


class ModelDownloadDialog(QtWidgets.QDialog):
    downloaded = QtCore.pyqtSignal(str) if hasattr(QtCore, "pyqtSignal") else QtCore.Signal(str)

    def __init__(self, program: str, parent: Any = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(self.tr("Download an EarthDial model"))
        self.program = program
        self.process: QtCore.QProcess | None = None
        self.lister: QtCore.QProcess | None = None
        self.stdout_buffer = b""
        self.errors: list[str] = []
        self.folder = ""  # the finished download's folder
        self.name_combo = QtWidgets.QComboBox()
        self.name_combo.setToolTip(self.tr("The published checkpoints the backend knows"))
        self.parent_widget = QgsFileWidget()
        self.parent_widget.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.parent_widget.setFilePath(os.path.join(os.path.expanduser("~"), "EarthDial"))
        self.parent_widget.setToolTip(
            self.tr("The model is downloaded into a new folder named after it here")
        )
        self.target_label = QtWidgets.QLabel()
        self.target_label.setTextInteractionFlags(QtCore.Qt.TextInteractionFlag.TextSelectableByMouse)
        self.progress = QtWidgets.QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.status_label = QtWidgets.QLabel()
        self.status_label.setWordWrap(True)
        self.download_button = QtWidgets.QPushButton(self.tr("Download"))
        self.download_button.setEnabled(False)  # until the backend has listed the checkpoints
        self.cancel_button = QtWidgets.QPushButton(self.tr("Cancel download"))
        self.cancel_button.setEnabled(False)
        self.download_button.setToolTip(
            self.tr("Download into the folder above; a stopped download continues")
        )
        self.cancel_button.setToolTip(
            self.tr("Stop the download; what was received is kept for the next try")
        )
        self.progress.setToolTip(self.tr("All files together"))
        close = QtWidgets.QPushButton(self.tr("Close"))
        close.setToolTip(self.tr("Close (stops a running download)"))
        close.clicked.connect(self.reject)
        self.download_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.name_combo.currentTextChanged.connect(self._show_target)
        self.parent_widget.fileChanged.connect(self._show_target)

        form = QtWidgets.QFormLayout()
        form.addRow(self.tr("Checkpoint"), self.name_combo)
        form.addRow(self.tr("Save in"), self.parent_widget)
        form.addRow(self.tr("Folder"), self.target_label)
        buttons = QtWidgets.QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.download_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(close)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.progress)
        layout.addWidget(self.status_label)
        layout.addLayout(buttons)
        self.resize(560, 200)
        self._list_checkpoints()

    # --- the checkpoint names, from the backend
    def _list_checkpoints(self) -> None:
        if not self.program or not os.path.isfile(self.program):
            self._status(
                self.tr(
                    "Set the backend command (the `earthdial` program or its venv) first: the "
                    "backend downloads the model."
                )
            )
            return
        lister = QtCore.QProcess(self)
        lister.finished.connect(self._listed)
        self.lister = lister
        self._status(self.tr("Asking the backend which checkpoints it can download..."))
        lister.start(self.program, ["download", "--list", "--json"])

    def _listed(self, code: int, _status: Any = None) -> None:
        if self.lister is None:
            return
        out = bytes(self.lister.readAllStandardOutput()).decode("utf-8", "replace")
        err = bytes(self.lister.readAllStandardError()).decode("utf-8", "replace").strip()
        self.lister = None
        try:
            listed = json.loads(out) if code == 0 else None
        except ValueError:
            listed = None
        if not listed:
            self._status(
                self.tr("This backend cannot download models (an older version?): {error}").format(
                    error=err.splitlines()[-1] if err else code
                )
            )
            return
        for checkpoint in listed:
            self.name_combo.addItem(checkpoint["name"])
            self.name_combo.setItemData(
                self.name_combo.count() - 1,
                f"{checkpoint['repo_id']}: {checkpoint['use']}",
                QtCore.Qt.ItemDataRole.ToolTipRole,
            )
        self.download_button.setEnabled(True)
        self._status("")

    def target(self) -> str:
        parent = os.path.expanduser(self.parent_widget.filePath().strip())
        name = self.name_combo.currentText()
        return os.path.join(parent, name) if parent and name else ""

    def _show_target(self, *_args: Any) -> None:
        self.target_label.setText(self.target())

    # --- the download
    def start(self) -> None:
        target = self.target()
        if self.process is not None or not target:
            return
        process = QtCore.QProcess(self)
        env = QtCore.QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        process.setProcessEnvironment(env)
        process.readyReadStandardOutput.connect(self._read_events)
        process.readyReadStandardError.connect(self._read_errors)
        process.finished.connect(self._finished)
        process.errorOccurred.connect(self._failed_to_start)
        self.process, self.stdout_buffer, self.errors, self.folder = process, b"", [], ""
        self.download_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.name_combo.setEnabled(False)
        self.parent_widget.setEnabled(False)
        args = ["download", self.name_combo.currentText(), "--dir", target, "--json"]
        log.info(f"downloading a model: {self.program} {' '.join(args)}")
        self._status(self.tr("Starting the download..."))
        process.start(self.program, args)

    def cancel(self) -> None:
        if self.process is not None:
            self.process.kill()  # what it received stays in the folder: Download again continues it
            self._status(self.tr("Cancelling..."))

    def _read_events(self) -> None:
        if self.process is None:
            return
        self.stdout_buffer += bytes(self.process.readAllStandardOutput())
        *lines, self.stdout_buffer = self.stdout_buffer.split(b"\n")
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.get("event")
            if kind == "start":
                self._status(
                    self.tr("{files} files, {size:.1f} GB from commit {commit}").format(
                        files=event["files"], size=event["bytes"] / 1e9, commit=str(event["commit"])[:12]
                    )
                )
                self._set_progress(event["have"], event["bytes"])
            elif kind == "progress":
                self._set_progress(event["all_done"], event["all_size"])
                self._status(
                    self.tr("{file}: {done:.1f} of {size:.1f} MB").format(
                        file=event["file"], done=event["done"] / 1e6, size=event["size"] / 1e6
                    )
                )
            elif kind == "done":
                self.folder = event["path"]

    def _read_errors(self) -> None:
        if self.process is not None:
            text = bytes(self.process.readAllStandardError()).decode("utf-8", "replace")
            self.errors.extend(line for line in text.splitlines() if line.strip())

    def _set_progress(self, done: int, total: int) -> None:
        self.progress.setValue(int(1000 * done / max(total, 1)))

    def _finished(self, code: int, status: Any = None) -> None:
        self._read_events()
        self._read_errors()
        crashed = status == QtCore.QProcess.ExitStatus.CrashExit
        self.process = None
        self.download_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.name_combo.setEnabled(True)
        self.parent_widget.setEnabled(True)
        if code == 0 and not crashed and self.folder:
            self.progress.setValue(1000)
            self._status(
                self.tr("Downloaded and verified: {folder}. It is now the model folder.").format(
                    folder=self.folder
                )
            )
            log.info(f"model downloaded to {self.folder}")
            self.downloaded.emit(self.folder)
            return
        if crashed:
            self._status(self.tr("Download stopped. What was received is kept: Download again continues it."))
            return
        why = next(
            (line for line in reversed(self.errors) if line.startswith("earthdial download:")),
            self.errors[-1] if self.errors else f"exit code {code}",
        )
        self._status(self.tr("The download failed: {why}").format(why=why))
        log.error(f"model download failed: {why}")

    def _failed_to_start(self, error: Any) -> None:
        if error == QtCore.QProcess.ProcessError.FailedToStart and self.process is not None:
            self.process = None
            self.download_button.setEnabled(True)
            self.cancel_button.setEnabled(False)
            self.name_combo.setEnabled(True)
            self.parent_widget.setEnabled(True)
            self._status(self.tr("The backend {program} could not be started.").format(program=self.program))

    def _status(self, text: str) -> None:
        self.status_label.setText(text)

    def reject(self) -> None:
        self.cancel()  # closing stops a running download (it can be continued later)
        super().reject()
