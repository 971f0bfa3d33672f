"""The diagnostics report a user copies from the panel, and the plugin's log tab."""

from __future__ import annotations

from plugin_testing import free_port, wait_until
from qgis.core import QgsApplication

from earthdial_qgis import log


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
