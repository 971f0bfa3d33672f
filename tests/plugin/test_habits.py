"""The panel's habits and status line, in real QGIS: the status line follows a backend that is killed and
restarted, Ctrl+Return sends, every control has a tooltip, Help opens the README's plugin section, the
panel fits a 300 px dock, and a missing qtpy is no warning."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from unittest import mock

from plugin_testing import ANSWER, EARTHDIAL, ROOT, free_port, wait_until
from qgis.core import Qgis, QgsApplication
from qgis.PyQt.QtCore import QCoreApplication, Qt
from qgis.PyQt.QtTest import QTest
from qgis.PyQt.QtWidgets import QAbstractButton, QWidget

import earthdial_qgis
from conftest import running_backend
from earthdial_qgis.gui import diagnostics
from earthdial_qgis.gui.dock import GEOREF

PLUGIN = ROOT / "qgis_plugin" / "earthdial_qgis"


def test_the_status_line_follows_a_backend_that_is_killed_and_restarted(make_dock, backend) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    command = [
        str(EARTHDIAL),
        "serve",
        "--model",
        str(backend.model),
        "--endpoint",
        endpoint,
        "--device",
        "cpu",
    ]
    dock = make_dock()
    dock.endpoint_edit.setText(endpoint)
    dock.endpoint_edit.editingFinished.emit()
    with running_backend(command) as (process, _):
        wait_until(lambda: dock.status_label.text().startswith("Connected"), 30)
        first = dock.status_reply["server"]
        process.kill()  # no goodbye: the line must notice by itself
        process.wait(10)
        wait_until(lambda: "not reachable" in dock.status_label.text(), 15)
        assert dock.status_reply is None
    with running_backend(command):
        wait_until(lambda: dock.status_label.text().startswith("Connected"), 30)
        assert dock.status_reply["server"] != first  # a new server instance, noticed


def test_ctrl_return_sends(make_dock, raster_layer, show_view) -> None:
    show_view()
    dock = make_dock()
    dock.setFloating(True)
    dock.show()
    dock.activateWindow()
    dock.select_task(GEOREF)
    dock.prompt_edit.setPlainText(ANSWER)
    dock.prompt_edit.setFocus()
    wait_until(lambda: QCoreApplication.instance().activeWindow() is not None, 5)
    QTest.keyClick(dock.prompt_edit, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert dock.is_busy()  # sent, not a new line in the prompt
    wait_until(lambda: not dock.is_busy(), 60)
    assert dock.last_error is None and dock.prompt_edit.toPlainText() == ANSWER


def controls(dock: Any) -> dict[str, QWidget]:
    """The panel's own controls: the widgets it keeps as attributes (not Qt's parts of them)."""
    return {name: w for name, w in vars(dock).items() if isinstance(w, QWidget) and w is not dock}


def test_every_control_has_a_tooltip_and_help_opens_the_plugins_own_page(make_dock) -> None:
    dock = make_dock()
    bare = [name for name, w in controls(dock).items() if not w.toolTip() and not name.endswith("_label")]
    assert bare == [], f"controls without a tooltip: {bare}"
    with mock.patch("earthdial_qgis.core.qt.QtGui.QDesktopServices.openUrl") as opened:
        dock.help_button.click()
    url = opened.call_args[0][0]
    assert url.isLocalFile() and Path(url.toLocalFile()) == PLUGIN / "help" / "index.html"  # in the zip
    page = Path(url.toLocalFile()).read_text(encoding="utf-8")
    assert "Tiled scan" in page and "Sends" in page  # it documents the panel as it is


def test_the_panel_fits_a_300_px_dock_without_clipped_buttons(make_dock) -> None:
    dock = make_dock()
    dock.setFloating(True)
    dock.resize(300, 1300)
    dock.show()
    QCoreApplication.processEvents()
    scroll = dock.widget()
    assert scroll.widget().width() <= scroll.viewport().width()  # nothing runs off to the right
    for name, w in controls(dock).items():
        if isinstance(w, QAbstractButton) and w.isVisible():
            needed = w.fontMetrics().horizontalAdvance(w.text())
            assert w.width() >= needed + 8, f"{name} ({w.text()!r}) is {w.width()} px for {needed} px of text"
    dock.hide()


def test_a_missing_qtpy_is_a_line_in_the_log_not_a_warning(qgis_iface, qgis_new_project, monkeypatch) -> None:
    from earthdial_qgis.core import deps

    monkeypatch.setitem(sys.modules, "qtpy", None)
    qgis_iface.messageBar().clear_messages()
    logged: list[tuple[str, str]] = []
    QgsApplication.messageLog().messageReceived.connect(lambda m, tag, level: logged.append((tag, m)))
    plugin = earthdial_qgis.classFactory(qgis_iface)
    plugin.initGui()
    try:
        assert deps.missing_packages() == ["qtpy"]
        assert qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning) == []
        assert any(tag == "EarthDial" and "qgis.PyQt" in m for tag, m in logged)  # one line in the log
    finally:
        plugin.unload()
    assert "Qt layer: " in diagnostics.report("tcp://127.0.0.1:1", None)
