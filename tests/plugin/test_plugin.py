"""Loading and unloading the plugin the way QGIS does, through classFactory."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
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
        iface["addPluginToMenu"].assert_called_once_with(MENU, action)
        assert plugin.dock is None  # made on first use

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
        iface["removePluginMenu"].assert_called_once_with(MENU, action)
        iface["removeDockWidget"].assert_called_once_with(dock)
    assert sip.isdeleted(toolbar) and sip.isdeleted(dock) and sip.isdeleted(action)
