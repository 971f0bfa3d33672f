"""The `earthdial` Processing provider: the algorithms in the Toolbox, the Graphical Modeler, batch mode
and qgis_process. File outputs default to GeoPackage."""

from __future__ import annotations

import os

from qgis.core import QgsProcessingProvider

from ..core.qt import QtCore, QtGui


class EarthDialProvider(QgsProcessingProvider):
    def id(self) -> str:
        return "earthdial"

    def name(self) -> str:
        return "EarthDial"

    def longName(self) -> str:
        return QtCore.QCoreApplication.translate("EarthDialProcessing", "EarthDial vision-language model")

    def icon(self) -> QtGui.QIcon:
        return QtGui.QIcon(os.path.join(os.path.dirname(os.path.dirname(__file__)), "icon.svg"))

    def loadAlgorithms(self) -> None:
        from . import ALGORITHMS

        for algorithm in ALGORITHMS:
            self.addAlgorithm(algorithm())

    def defaultVectorFileExtension(self, hasGeometry: bool = True) -> str:  # noqa: N803
        return "gpkg"
