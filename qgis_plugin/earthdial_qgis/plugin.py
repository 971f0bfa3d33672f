"""The plugin object QGIS holds: one toolbar/menu action that shows and hides the EarthDial panel."""

from __future__ import annotations

import os
from typing import Any

from .qt import QtCore, QtGui, QtWidgets

MENU = "&EarthDial"


def tr(text: str) -> str:
    return QtCore.QCoreApplication.translate("EarthDialPlugin", text)


class EarthDialPlugin:
    def __init__(self, iface: Any) -> None:
        self.iface = iface
        self.action: QtWidgets.QAction | None = None
        self.toolbar: QtWidgets.QToolBar | None = None
        self.dock: Any = None  # created on first use: it contacts the backend

    def initGui(self) -> None:
        icon = QtGui.QIcon(os.path.join(os.path.dirname(__file__), "icon.svg"))
        self.action = QtWidgets.QAction(icon, tr("EarthDial"), self.iface.mainWindow())
        self.action.setObjectName("EarthDialShowPanel")
        self.action.setToolTip(tr("Show or hide the EarthDial panel"))
        self.action.setCheckable(True)
        self.action.toggled.connect(self.set_dock_visible)
        self.toolbar = self.iface.addToolBar(tr("EarthDial"))
        self.toolbar.setObjectName("EarthDialToolbar")
        self.toolbar.addAction(self.action)
        self.iface.addPluginToMenu(MENU, self.action)

    def set_dock_visible(self, visible: bool) -> None:
        if visible and self.dock is None:
            from .dock import EarthDialDock

            self.dock = EarthDialDock(self.iface)
            self.iface.addDockWidget(QtCore.Qt.RightDockWidgetArea, self.dock)
            self.dock.visibilityChanged.connect(self._dock_visibility_changed)
        if self.dock is not None:
            self.dock.setVisible(visible)

    def _dock_visibility_changed(self, visible: bool) -> None:
        # keep the action's check mark in step when the panel is closed with its own button
        if self.action is not None and self.action.isChecked() != visible:
            self.action.blockSignals(True)
            self.action.setChecked(visible)
            self.action.blockSignals(False)

    def unload(self) -> None:
        if self.dock is not None:
            self.dock.shutdown()
            self.dock.visibilityChanged.disconnect(self._dock_visibility_changed)
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.action is not None:
            self.iface.removePluginMenu(MENU, self.action)
            if self.toolbar is not None:
                self.toolbar.removeAction(self.action)
            self.action.deleteLater()
            self.action = None
        if self.toolbar is not None:
            self.toolbar.deleteLater()  # QGIS removes a deleted toolbar from its main window
            self.toolbar = None
