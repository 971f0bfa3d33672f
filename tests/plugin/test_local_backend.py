"""Starting and stopping a local `earthdial serve` from the panel, with the command and model set once in
the plugin settings; the plugin stops it when it unloads."""

from __future__ import annotations

import os
from typing import Any

from plugin_testing import ROOT, free_port, wait_until, write_geotiff
from qgis.core import Qgis, QgsProject, QgsRasterLayer, QgsSettings

import earthdial_qgis
from earthdial_qgis.core import settings
from earthdial_qgis.core.backend_process import (
    RUNNING,
    STOPPED,
    layer_folders,
    resolve_command,
    serve_arguments,
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_command_and_arguments(tmp_path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "earthdial").write_text("#!/bin/sh\n")
    assert resolve_command(str(venv)) == str(venv / "bin" / "earthdial")
    assert resolve_command("/opt/earthdial") == "/opt/earthdial"
    assert serve_arguments("/m", "tcp://127.0.0.1:1", "cpu", "--allow-dir '/a b'") == [
        "serve",
        "--endpoint",
        "tcp://127.0.0.1:1",
        "--device",
        "cpu",
        "--model",
        "/m",
        "--allow-dir",
        "/a b",
    ]
    # no model folder set: the backend picks its default (the built-in demo model)
    assert serve_arguments("", "tcp://127.0.0.1:1", "auto") == [
        "serve",
        "--endpoint",
        "tcp://127.0.0.1:1",
        "--device",
        "auto",
    ]


def test_the_local_backend_reads_only_the_folders_of_the_projects_rasters(qgis_new_project, tmp_path) -> None:
    (tmp_path / "scenes").mkdir()
    write_geotiff(str(tmp_path / "scenes" / "a.tif"))
    layer = QgsRasterLayer(str(tmp_path / "scenes" / "a.tif"), "a")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    folders = layer_folders()
    assert folders == [str(tmp_path / "scenes")]  # not the home folder it runs in, nor the project's
    assert serve_arguments("", "tcp://127.0.0.1:1", "cpu", "", folders)[-2:] == ["--allow-dir", folders[0]]


def test_start_and_stop_from_the_panel_and_on_unload(qgis_iface, qgis_new_project, backend, tmp_path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    QgsSettings().setValue(settings.ENDPOINT, endpoint)
    plugin = earthdial_qgis.classFactory(qgis_iface)
    plugin.initGui()
    try:
        plugin.action.trigger()
        dock = plugin.dock
        wait_until(lambda: "not reachable" in dock.status_label.text(), 15)

        # Not configured yet: the panel says what to set.
        settings.set_value(settings.BACKEND_COMMAND, str(tmp_path / "missing" / "earthdial"))
        dock.start_button.click()
        assert "does not exist" in dock.status_label.text()
        assert dock.local_backend.state == STOPPED and dock.start_button.isEnabled()

        settings.set_value(settings.BACKEND_COMMAND, str(ROOT / ".venv"))  # the venv folder is enough
        settings.set_value(settings.MODEL_DIR, str(backend.model))
        settings.set_value(settings.DEVICE, "cpu")
        dock.start_button.click()
        assert dock.stop_button.isEnabled() and not dock.start_button.isEnabled()
        wait_until(lambda: dock.status_label.text().startswith("Connected"), 180)
        assert dock.local_backend.state == RUNNING
        assert "EarthDial_4B_RGB" in dock.status_label.text() and "cpu" in dock.status_label.text()
        assert "running" in dock.diagnostics_text()

        dock.stop_button.click()
        assert dock.local_backend.state == STOPPED and dock.local_backend.process is None
        bar = qgis_iface.messageBar()  # a stop that was asked for is news, not a red "exited with code 0"
        assert not any("exited" in m for m in bar.get_messages(Qgis.MessageLevel.Critical))
        assert any("stopped" in m for m in bar.get_messages(Qgis.MessageLevel.Info))
        assert dock.start_button.isEnabled() and not dock.stop_button.isEnabled()

        # Started again, then the plugin unloads: the process goes with it.
        dock.start_button.click()
        wait_until(
            lambda: dock.local_backend.process is not None and dock.local_backend.process.processId() > 0, 30
        )
        pid = int(dock.local_backend.process.processId())
        assert alive(pid)
    finally:
        backend_process: Any = plugin.local_backend
        plugin.unload()
    assert plugin.local_backend is None
    assert backend_process is not None and not alive(pid)
    for key in (settings.BACKEND_COMMAND, settings.MODEL_DIR, settings.DEVICE):
        QgsSettings().remove(key)
