"""The plugin object QGIS holds: the toolbar/menu action that shows and hides the EarthDial panel, menu
entries for settings, dependencies and diagnostics, the `earthdial` Processing provider and the local
backend process (stopped when the plugin unloads)."""

from __future__ import annotations

import os
from typing import Any

from qgis.core import Qgis, QgsApplication

from .core import deps, log
from .core.qt import QAction, QtCore, QtGui, QtWidgets

MENU = "&EarthDial"


def tr(text: str) -> str:
    return QtCore.QCoreApplication.translate("EarthDialPlugin", text)


class EarthDialPlugin:
    def __init__(self, iface: Any) -> None:
        self.iface = iface
        self.action: QAction | None = None
        self.menu_actions: list[Any] = []
        self.toolbar: QtWidgets.QToolBar | None = None
        self.dock: Any = None  # created on first use: it contacts the backend
        self.provider: Any = None
        self.local_backend: Any = None
        self.review: Any = None  # review.ReviewActions: the review field follows edits on result layers

    def initGui(self) -> None:
        icon = QtGui.QIcon(os.path.join(os.path.dirname(__file__), "icon.svg"))
        self.action = QAction(icon, tr("EarthDial"), self.iface.mainWindow())
        self.action.setObjectName("EarthDialShowPanel")
        self.action.setToolTip(tr("Show or hide the EarthDial panel"))
        self.action.setCheckable(True)
        self.action.toggled.connect(self.set_dock_visible)
        self.toolbar = self.iface.addToolBar(tr("EarthDial"))
        self.toolbar.setObjectName("EarthDialToolbar")
        self.toolbar.addAction(self.action)
        self.iface.addPluginToMenu(MENU, self.action)
        for text, slot in (
            (tr("Settings…"), self.open_settings),
            (tr("Install dependencies…"), self.open_dependencies),
            (tr("Install backend…"), lambda: self.open_installer()),
            (tr("Diagnostics…"), self.open_diagnostics),
        ):
            action = QAction(text, self.iface.mainWindow())
            action.triggered.connect(slot)
            self.iface.addPluginToMenu(MENU, action)
            self.menu_actions.append(action)
        from .gui.review import ReviewActions

        self.review = ReviewActions(self.iface, MENU, self.toolbar)
        self.initProcessing()
        self.check_dependencies()
        self.check_backend_upgrade()

    def initProcessing(self) -> None:  # noqa: N802  (the name QGIS and qgis_process call)
        """Register the `earthdial` Processing provider (qgis_process calls only this, without a GUI)."""
        if self.provider is not None:
            return
        from .processing.provider import EarthDialProvider

        self.provider = EarthDialProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def check_dependencies(self) -> list[str]:
        """On load: offer to install what is missing, in the message bar (never silently). qtpy alone
        missing is no news: the plugin runs on qgis.PyQt the same (a log line; Diagnostics says so), and
        the installer adds it whenever it installs pyzmq."""
        missing = deps.missing_packages()
        if not missing:
            return []
        if not deps.essential(missing):
            log.info(
                f"qtpy is not installed: the plugin uses qgis.PyQt ({deps.pip_command_text(missing)} adds it)"
            )
            return []
        text = tr("EarthDial needs the Python package(s) {packages}.").format(packages=", ".join(missing))
        log.warning(text + " " + deps.pip_command_text(missing))
        bar = self.iface.messageBar()
        try:
            widget = bar.createMessage(tr("EarthDial"), text)
            button = QtWidgets.QPushButton(tr("Install…"), widget)
            button.clicked.connect(lambda: self.open_dependencies(missing))
            widget.layout().addWidget(button)
            bar.pushWidget(widget, Qgis.MessageLevel.Warning)
        except Exception:  # a message bar without widgets (tests): the plain message is enough
            bar.pushMessage(tr("EarthDial"), text, level=Qgis.MessageLevel.Warning)
        return missing

    # -- the backend installed from the panel (installer.py, install_dialog.py) --------------------------
    def check_backend_upgrade(self, home: str | None = None, wheel: str | None = None) -> str:
        """On load: when the panel's backend venv holds an older backend than the wheel this plugin ships
        (the plugin was upgraded), offer the upgrade in the message bar (never silently). The message, or ""."""
        from .core import installer

        home = home or installer.backend_home()
        wheel = wheel or installer.shipped_wheel()
        venv = installer.venv_dir(home)
        if wheel is None or not installer.needs_upgrade(venv, wheel):
            return ""
        text = tr("The EarthDial backend in {venv} is version {have}; this plugin ships {new}.").format(
            venv=venv, have=installer.installed_version(venv), new=installer.wheel_version(wheel)
        )
        log.warning(text)
        bar = self.iface.messageBar()
        try:
            widget = bar.createMessage(tr("EarthDial"), text)
            button = QtWidgets.QPushButton(tr("Upgrade backend…"), widget)
            button.clicked.connect(lambda: self.open_installer())
            widget.layout().addWidget(button)
            bar.pushWidget(widget, Qgis.MessageLevel.Warning)
        except Exception:  # a message bar without widgets (tests): the plain message is enough
            bar.pushMessage(tr("EarthDial"), text, level=Qgis.MessageLevel.Warning)
        return text

    def open_installer(self) -> Any:
        """Install or upgrade the backend from the panel, which starts it when done."""
        if self.action is not None and not self.action.isChecked():
            self.action.setChecked(True)  # shows the panel
        self.set_dock_visible(True)
        return self.dock.open_installer()

    def _backend(self) -> Any:
        if self.local_backend is None:
            from .core.backend_process import LocalBackend

            self.local_backend = LocalBackend()
        return self.local_backend

    def set_dock_visible(self, visible: bool) -> None:
        if visible and self.dock is None:
            from .gui.dock import EarthDialDock

            self.dock = EarthDialDock(self.iface, local_backend=self._backend())
            self.iface.addDockWidget(QtCore.Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
            self.dock.visibilityChanged.connect(self._dock_visibility_changed)
        if self.dock is not None:
            self.dock.setVisible(visible)

    def _dock_visibility_changed(self, visible: bool) -> None:
        # keep the action's check mark in step when the panel is closed with its own button
        if self.action is not None and self.action.isChecked() != visible:
            self.action.blockSignals(True)
            self.action.setChecked(visible)
            self.action.blockSignals(False)

    def open_settings(self) -> None:
        from .gui.settings_dialog import SettingsDialog

        SettingsDialog(self.iface.mainWindow()).run()

    def open_dependencies(self, missing: list[str] | None = None) -> None:
        from .gui.deps_dialog import DependenciesDialog

        DependenciesDialog(missing or deps.missing_packages(), self.iface.mainWindow()).run()

    def open_diagnostics(self) -> None:
        if self.dock is not None:
            self.dock.open_diagnostics()
            return
        from .core import settings
        from .gui.diagnostics import DiagnosticsDialog, report

        def render(machine: dict[str, Any] | None = None, note: str = "") -> str:
            return report(settings.endpoint(), None, "", self.local_backend, machine, note)

        dialog = DiagnosticsDialog(render(), self.iface.mainWindow())
        dialog.diagnose(settings.text(settings.BACKEND_COMMAND), render)
        dialog.run()

    def unload(self) -> None:
        if self.dock is not None:
            self.dock.shutdown()
            self.dock.visibilityChanged.disconnect(self._dock_visibility_changed)
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.local_backend is not None:
            self.local_backend.stop()
            self.local_backend.deleteLater()
            self.local_backend = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        if self.review is not None:
            self.review.unload()
            self.review = None
        for action in self.menu_actions:
            self.iface.removePluginMenu(MENU, action)
            action.deleteLater()
        self.menu_actions = []
        if self.action is not None:
            self.iface.removePluginMenu(MENU, self.action)
            if self.toolbar is not None:
                self.toolbar.removeAction(self.action)
            self.action.deleteLater()
            self.action = None
        if self.toolbar is not None:
            self.toolbar.deleteLater()  # QGIS removes a deleted toolbar from its main window
            self.toolbar = None
