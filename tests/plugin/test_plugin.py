"""Loading and unloading the plugin the way QGIS does, through classFactory."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from qgis.core import Qgis, QgsApplication
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QCoreApplication, QEvent

import earthdial_qgis
from earthdial_qgis.plugin import MENU


def flush_deletes() -> None:
    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
    QCoreApplication.processEvents()


@pytest.fixture
def main_window(qgis_parent: Any) -> Iterator[Any]:
    """QGIS's main window, shown: a panel inside a hidden window is never visible."""
    qgis_parent.show()
    try:
        yield qgis_parent
    finally:
        qgis_parent.hide()


def test_load_toggle_and_unload(qgis_iface, main_window, qgis_new_project) -> None:
    spied = ("addPluginToMenu", "removePluginMenu", "addDockWidget", "removeDockWidget")
    with mock.patch.multiple(qgis_iface, **{name: mock.DEFAULT for name in spied}) as iface:
        plugin = earthdial_qgis.classFactory(qgis_iface)
        plugin.initGui()
        action, toolbar = plugin.action, plugin.toolbar
        assert action is not None and action.isCheckable()
        assert action in toolbar.actions()
        menu_calls = iface["addPluginToMenu"].call_args_list
        assert menu_calls[0] == mock.call(MENU, action)
        assert [c.args[1].text() for c in menu_calls[1:]] == [
            "Settings…",
            "Install dependencies…",
            "Install backend…",
            "Diagnostics…",
            "Accept selected boxes",
            "Reject selected boxes",
        ]
        assert plugin.dock is None  # made on first use
        registry = QgsApplication.processingRegistry()
        assert registry.providerById("earthdial") is plugin.provider
        assert registry.algorithmById("earthdial:detect") is not None

        action.trigger()  # show the panel
        dock = plugin.dock
        assert dock is not None and dock.isVisible()
        iface["addDockWidget"].assert_called_once()
        action.trigger()  # hide it
        assert not dock.isVisible() and not action.isChecked()
        dock.show()  # shown by other means: the action follows
        assert action.isChecked()

        plugin.unload()
        flush_deletes()
        assert plugin.action is None and plugin.toolbar is None and plugin.dock is None
        assert mock.call(MENU, action) in iface["removePluginMenu"].call_args_list
        assert iface["removePluginMenu"].call_count == 7  # the panel, four dialogs, two review actions
        iface["removeDockWidget"].assert_called_once_with(dock)
        assert registry.providerById("earthdial") is None
    assert sip.isdeleted(toolbar) and sip.isdeleted(dock) and sip.isdeleted(action)


def test_missing_dependencies_are_offered_not_installed(qgis_iface, qgis_new_project, monkeypatch) -> None:
    """With pyzmq "missing" (its import made to fail), loading the plugin says so and offers the install;
    nothing is installed by itself."""
    from earthdial_qgis.core import deps

    monkeypatch.setitem(sys.modules, "zmq", None)  # `import zmq` now raises ImportError
    ran = mock.Mock()
    monkeypatch.setattr("qgis.PyQt.QtCore.QProcess.start", ran)
    qgis_iface.messageBar().clear_messages()
    plugin = earthdial_qgis.classFactory(qgis_iface)
    with mock.patch.object(qgis_iface.messageBar(), "pushWidget", side_effect=AttributeError):
        plugin.initGui()
    try:
        assert deps.missing_packages() == ["pyzmq"]
        warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
        assert any("pyzmq" in m for m in warnings)
        ran.assert_not_called()
    finally:
        plugin.unload()
