"""The diagnostics report a user copies from the panel (with what the backend says this machine can run),
and the plugin's log tab."""

from __future__ import annotations

import shutil

from plugin_testing import EARTHDIAL, free_port, wait_until
from qgis.core import QgsApplication, QgsSettings

from earthdial_qgis.core import log
from earthdial_qgis.gui.diagnostics import MACHINE_HEADING


def test_report_has_versions_backend_and_errors(
    make_dock, raster_layer, show_view, backend, qgis_app
) -> None:
    show_view()
    dock = make_dock()
    wait_until(lambda: dock.status_label.text().startswith("Connected"), 30)
    logged: list[tuple[str, str]] = []
    QgsApplication.messageLog().messageReceived.connect(lambda m, tag, level: logged.append((tag, m)))

    dock.endpoint_edit.setText(f"tcp://127.0.0.1:{free_port()}")
    dock.timeout_spin.setValue(1)
    dock.select_task("caption")
    dock.send_button.click()
    wait_until(lambda: not dock.is_busy(), 30)
    assert any(tag == log.TAG and "unreachable" in m for tag, m in logged)  # the ping before the request

    text = dock.diagnostics_text()
    for needle in (
        "QGIS: 3.",
        "Python: 3.",
        "numpy: ",
        "pyzmq: ",
        "qtpy: ",
        "libzmq: ",
        "Qt layer: qtpy",
        "missing packages: none",
    ):
        assert needle in text, needle
    assert f"endpoint: {dock.endpoint}" in text
    assert "EarthDial_4B_RGB" in text  # the last status the backend gave
    assert "dtype: float32: a small model" in text  # which dtype the backend computes in, and why
    assert "unreachable: nothing answered a ping" in text  # the last error

    dialog = dock.open_diagnostics()
    assert dialog.text_view.toPlainText() == text
    dialog.copy_button.click()
    assert QgsApplication.clipboard().text() == text
    dialog.close()
    dialog.deleteLater()


def test_diagnostics_shows_what_the_running_backend_says_this_machine_can_run(qgis_iface, tmp_path) -> None:
    from conftest import local_demo_plugin

    with local_demo_plugin(qgis_iface, tmp_path, str(tmp_path / "results.gpkg"), 60) as plugin:
        dock = plugin.dock
        machine = dock.status_reply["machine"]  # the backend's own report, taken before its model loaded
        text = dock.diagnostics_text()
        heading = f"{MACHINE_HEADING} (from the running backend):\n"
        shown = [line.strip() for line in text.split(heading)[1].splitlines()]
        assert shown[: len(machine["summary"])] == [line.strip() for line in machine["summary"]]  # as said
        for needle in (
            "GPU",
            "NVIDIA driver: ",
            "torch: ",
            "RAM: ",
            "memory plan (",
            "EarthDial_4B",
            "recommended: earthdial serve --device ",
            "why: ",
        ):
            assert needle in text, needle
        dialog = dock.open_diagnostics()  # the running backend said it: nothing else is asked
        assert dialog.text_view.toPlainText() == text
        dialog.close()
        dialog.deleteLater()


def test_with_no_backend_diagnostics_asks_the_configured_backend_command(qgis_iface, tmp_path) -> None:
    import earthdial_qgis
    from earthdial_qgis.core import settings

    keys = (settings.ENDPOINT, settings.BACKEND_COMMAND)
    settings.set_value(settings.ENDPOINT, f"tcp://127.0.0.1:{free_port()}")  # nothing there
    plugin = earthdial_qgis.classFactory(qgis_iface)
    plugin.initGui()
    try:
        plugin.action.trigger()
        dock = plugin.dock
        dock.timeout_spin.setValue(1)
        wait_until(lambda: bool(dock.status_error), 30)

        settings.set_value(settings.BACKEND_COMMAND, str(tmp_path / "no-such-earthdial"))
        dialog = dock.open_diagnostics()
        assert f"{MACHINE_HEADING}: not measured: set the backend command" in dialog.text_view.toPlainText()
        dialog.close()
        dialog.deleteLater()

        failing = shutil.which("false")  # a program that is no backend: its failure is said, not a hang
        settings.set_value(settings.BACKEND_COMMAND, failing)
        dialog = dock.open_diagnostics()
        wait_until(lambda: f"{failing} diagnose failed: exit code 1" in dialog.text_view.toPlainText(), 30)
        dialog.close()
        dialog.deleteLater()

        settings.set_value(settings.BACKEND_COMMAND, str(EARTHDIAL.parent.parent))  # the backend's venv
        dialog = dock.open_diagnostics()
        assert "being measured" in dialog.text_view.toPlainText()
        heading = f"{MACHINE_HEADING} (from earthdial diagnose of the configured backend command):"
        wait_until(lambda: heading in dialog.text_view.toPlainText(), 120)
        text = dialog.text_view.toPlainText()
        for needle in ("GPU", "NVIDIA driver: ", "torch: ", "memory plan (", "recommended: ", "why: "):
            assert needle in text, needle
        assert text.startswith("EarthDial for QGIS") and "last errors:" in text  # the rest stays
        dialog.close()
        dialog.deleteLater()
    finally:
        plugin.unload()
        for key in keys:
            QgsSettings().remove(key)
