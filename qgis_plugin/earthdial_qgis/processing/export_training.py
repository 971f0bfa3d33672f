"""earthdial:export_training — a reviewed result layer (a GeoPackage table) -> EarthDial training records.

The backend does the work (`earthdial export-training`: it reads the chips with its own imagery path),
run as the local backend's command from the plugin settings, so QGIS needs nothing more than to start it.
"""

from __future__ import annotations

import os
from typing import Any

from qgis.core import (
    QgsProcessingException,
    QgsProcessingOutputFolder,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterVectorLayer,
)

from ..core import settings
from ..core.backend_process import resolve_command
from ..core.geopackage import split_source
from ..core.qt import QtCore
from .common import INPUT, OUTPUT, EarthDialAlgorithm

EXPORT_TIMEOUT_S = 3600


class ExportTrainingAlgorithm(EarthDialAlgorithm):
    def name(self) -> str:
        return "export_training"

    def displayName(self) -> str:
        return self.tr("Export reviewed boxes as training data")

    def shortHelpString(self) -> str:
        return self.tr(
            "Turns a reviewed EarthDial result layer (review field: accepted, rejected, corrected, added) into "
            "EarthDial training records (records.jsonl) and the image chips they refer to, read again from "
            "the source rasters. Runs `earthdial export-training` (the backend command of the EarthDial "
            "settings). Train an adapter on the folder with `earthdial finetune`."
        )

    def initAlgorithm(self, config: Any = None) -> None:
        self.addParameter(
            QgsProcessingParameterVectorLayer(INPUT, self.tr("Reviewed result layer (GeoPackage)"))
        )
        self.addParameter(QgsProcessingParameterFolderDestination(OUTPUT, self.tr("Training records folder")))
        self.addOutput(QgsProcessingOutputFolder(OUTPUT, self.tr("Training records folder")))

    def prepareAlgorithm(self, parameters: dict[str, Any], context: Any, feedback: Any) -> bool:
        layer = self.parameterAsVectorLayer(parameters, INPUT, context)
        if layer is None:
            raise QgsProcessingException(self.tr("No layer given"))
        if layer.isEditable() and layer.isModified():
            raise QgsProcessingException(
                self.tr(
                    "Layer {name} has unsaved edits: save them first (they are the training data)."
                ).format(name=layer.name())
            )
        path, table = split_source(layer.source())
        if layer.providerType() != "ogr" or not path.lower().endswith(".gpkg") or not os.path.isfile(path):
            raise QgsProcessingException(
                self.tr("Layer {name} is not a GeoPackage table; save it into a GeoPackage first.").format(
                    name=layer.name()
                )
            )
        self.path, self.table = path, table
        return True

    def processAlgorithm(self, parameters: dict[str, Any], context: Any, feedback: Any) -> dict[str, Any]:
        program = resolve_command(settings.text(settings.BACKEND_COMMAND))
        if not program or not os.path.isfile(program):
            raise QgsProcessingException(
                self.tr(
                    "Set the backend command (the `earthdial` program or its venv) in the EarthDial settings."
                )
            )
        out = self.parameterAsString(parameters, OUTPUT, context)
        args = [program, "export-training", self.path, "-o", out]
        if self.table:
            args += ["--layer", self.table]
        feedback.pushCommandInfo(" ".join(args))
        # QProcess rather than subprocess: no shell, and the same process API the panel's local backend uses
        process = QtCore.QProcess()
        process.start(program, args[1:])
        if not process.waitForStarted(10_000):
            raise QgsProcessingException(
                self.tr("earthdial export-training failed: {why}").format(why=process.errorString())
            )
        if not process.waitForFinished(EXPORT_TIMEOUT_S * 1000):
            process.kill()
            process.waitForFinished(5_000)
            raise QgsProcessingException(
                self.tr("earthdial export-training took longer than {s} s").format(s=EXPORT_TIMEOUT_S)
            )
        stdout = bytes(process.readAllStandardOutput()).decode("utf-8", "replace")
        stderr = bytes(process.readAllStandardError()).decode("utf-8", "replace")
        for line in stdout.splitlines():
            feedback.pushInfo(line)
        code = process.exitCode() if process.exitStatus() == QtCore.QProcess.ExitStatus.NormalExit else -1
        if code != 0:
            raise QgsProcessingException((stderr or stdout).strip() or f"exit {code}")
        return {OUTPUT: out}
