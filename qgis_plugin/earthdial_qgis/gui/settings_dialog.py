"""The plugin settings a user sets once: the local backend's command (or venv), model folder, device and
extra `earthdial serve` arguments."""

from __future__ import annotations

from typing import Any

from qgis.gui import QgsFileWidget

from ..core import settings
from ..core.qt import QtWidgets, exec_dialog


class SettingsDialog(QtWidgets.QDialog):
    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(self.tr("EarthDial settings"))
        form = QtWidgets.QFormLayout()
        self.command_widget = QgsFileWidget()
        self.command_widget.setStorageMode(QgsFileWidget.StorageMode.GetFile)
        self.command_widget.setFilePath(settings.text(settings.BACKEND_COMMAND))
        self.command_widget.setToolTip(
            self.tr("The `earthdial` program, or the virtual environment folder it is installed in")
        )
        form.addRow(self.tr("Backend command or venv"), self.command_widget)
        self.model_widget = QgsFileWidget()
        self.model_widget.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.model_widget.setFilePath(settings.text(settings.MODEL_DIR))
        self.model_widget.setToolTip(
            self.tr("An EarthDial checkpoint folder (e.g. EarthDial_4B_RGB); empty: the built-in demo model")
        )
        form.addRow(self.tr("Model folder"), self.model_widget)
        # --- Download model...: the backend's `earthdial download` fills the model folder
        from .model_download import add_download_button

        self.download_button = add_download_button(self, form, self.command_widget, self.model_widget)
        # --- end of Download model...
        self.adapter_widget = QgsFileWidget()
        self.adapter_widget.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.adapter_widget.setFilePath(settings.text(settings.ADAPTER_DIR))
        self.adapter_widget.setToolTip(
            self.tr("A LoRA adapter folder written by `earthdial finetune` for this model; empty: none")
        )
        form.addRow(self.tr("Adapter folder"), self.adapter_widget)
        self.device_combo = QtWidgets.QComboBox()
        self.device_combo.addItems(list(settings.DEVICES))
        self.device_combo.setCurrentText(settings.text(settings.DEVICE, "auto") or "auto")
        self.device_combo.setToolTip(
            self.tr("Where the local backend runs the model; auto: a GPU when there is one")
        )
        form.addRow(self.tr("Device"), self.device_combo)
        self.extra_edit = QtWidgets.QLineEdit(settings.text(settings.EXTRA_ARGS))
        self.extra_edit.setPlaceholderText("--allow-dir /data --quantize int8")
        self.extra_edit.setToolTip(self.tr("More `earthdial serve` arguments for the local backend"))
        form.addRow(self.tr("Extra arguments"), self.extra_edit)
        self.results_widget = QgsFileWidget()
        self.results_widget.setStorageMode(QgsFileWidget.StorageMode.SaveFile)
        self.results_widget.setFilter(self.tr("GeoPackage (*.gpkg)"))
        self.results_widget.setConfirmOverwrite(False)  # results are added to it as new layers
        self.results_widget.setFilePath(settings.text(settings.RESULTS_GPKG))
        self.results_widget.setToolTip(
            self.tr(
                "The GeoPackage every result is added to as a new layer; empty: "
                "<project>_earthdial.gpkg beside the project file"
            )
        )
        form.addRow(self.tr("Results GeoPackage"), self.results_widget)
        self.memory_check = QtWidgets.QCheckBox(self.tr("Keep results in memory layers (lost unless saved)"))
        self.memory_check.setChecked(settings.results_in_memory())
        self.memory_check.setToolTip(
            self.tr("Memory layers are not written anywhere: they are gone when QGIS closes unless saved")
        )
        form.addRow("", self.memory_check)
        buttons = QtWidgets.QDialogButtonBox(
            QtWidgets.QDialogButtonBox.StandardButton.Ok | QtWidgets.QDialogButtonBox.StandardButton.Cancel
        )
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(buttons)
        self.resize(560, 240)

    def save(self) -> None:
        settings.set_value(settings.BACKEND_COMMAND, self.command_widget.filePath().strip())
        settings.set_value(settings.MODEL_DIR, self.model_widget.filePath().strip())
        settings.set_value(settings.ADAPTER_DIR, self.adapter_widget.filePath().strip())
        settings.set_value(settings.DEVICE, self.device_combo.currentText())
        settings.set_value(settings.EXTRA_ARGS, self.extra_edit.text().strip())
        settings.set_value(settings.RESULTS_GPKG, self.results_widget.filePath().strip())
        settings.set_value(settings.RESULTS_IN_MEMORY, self.memory_check.isChecked())

    def accept(self) -> None:
        self.save()
        super().accept()

    def run(self) -> int:
        return exec_dialog(self)
