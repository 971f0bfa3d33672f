"""How a stopped request ends in the panel: a cancelled scan keeps *Zoom to results* and
*Save to GeoPackage…* for the boxes it kept and says so in one message (QGIS's own "Task failed" notice
is taken off the bar); a local backend killed mid-scan is one message giving its real exit cause, not
its start-up banner."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

from plugin_testing import ROOT, free_port, random_raster_layer, wait_until
from qgis.core import (
    Qgis,
    QgsApplication,
    QgsRasterLayer,
    QgsSettings,
    QgsTask,
    QgsVectorLayer,
)
from qgis.gui import QgsMessageBarItem
from test_scan_dock import _cancelled_scan, _dock, big_mosaic, demo_backend  # noqa: F401  (module fixtures, reused)

from earthdial_qgis.contract.wire import ErrorCode
from earthdial_qgis.core import settings
from earthdial_qgis.core.backend_process import RUNNING, exit_cause


class QgisAppNotices:
    """What QGIS's main window does when a task ends (there is none under pytest-qgis): with no desktop
    notification service, "Task failed"/"Task complete" and the task's description in the message bar."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        QgsApplication.taskManager().statusChanged.connect(self.changed)

    def changed(self, task_id: int, status: int) -> None:
        task = QgsApplication.taskManager().task(task_id)
        if task is not None and status in (QgsTask.Terminated, QgsTask.Complete):
            title = "Task failed" if status == QgsTask.Terminated else "Task complete"
            self.bar.pushItem(QgsMessageBarItem(title, task.description(), Qgis.MessageLevel.Info))

    def close(self) -> None:
        QgsApplication.taskManager().statusChanged.disconnect(self.changed)

    def task_notices(self) -> list[str]:
        return [f"{i.title()}: {i.text()}" for i in self.bar.items() if i.title().startswith("Task ")]


def test_a_cancelled_scan_keeps_zoom_and_save_and_says_so_once(
    demo_backend,  # noqa: F811  (the fixture imported above)
    big_mosaic,  # noqa: F811
    qgis_new_project,
    qgis_iface,
    tmp_path: Path,  # noqa: F811  (the fixtures)
) -> None:
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    notices = QgisAppNotices(bar)
    try:
        dock = _cancelled_scan(qgis_iface, demo_backend.endpoint, big_mosaic)
        try:
            wait_until(lambda: not notices.task_notices(), 5)  # QGIS's notice, if any came, is gone again
        except AssertionError:
            raise AssertionError(notices.task_notices()) from None

        assert dock.last_error is not None and dock.last_error.code == ErrorCode.CANCELLED
        stopped = dock.scan.live
        assert stopped is not None and "stopped: unmerged" in stopped.name()
        assert dock.zoom_button.isEnabled() and dock.save_button.isEnabled()
        dock.zoom_button.click()
        assert qgis_iface.mapCanvas().extent().contains(stopped.extent())
        saved = dock.save_results(str(tmp_path / "kept.gpkg"))
        assert saved is not None
        kept = QgsVectorLayer(saved, "kept", "ogr")
        assert kept.isValid() and kept.featureCount() == stopped.featureCount() > 0

        said = [
            m
            for level in (Qgis.MessageLevel.Info, Qgis.MessageLevel.Critical, Qgis.MessageLevel.Warning)
            for m in bar.get_messages(level)
            if "cancelled" in m.lower()
        ]
        assert len(said) == 1, said  # one message, which names what was kept
        assert stopped.name() in said[0]
        done, total = (int(n) for n in re.search(r"(\d+) of (\d+) tile\(s\) were scanned", said[0]).groups())
        assert 0 < done < total  # stopped part-way, counted from the scan's own events
        assert bar.get_messages(Qgis.MessageLevel.Critical) == []
        dock.shutdown()
    finally:
        notices.close()


def test_the_exit_cause_is_what_the_backend_said_after_its_banner_or_how_it_ended() -> None:
    banner = [
        "earthdial: access: local only; reads files under /data",
        "earthdial: serving EarthDial_4B_RGB (/m) on tcp://127.0.0.1:5557 [cpu, float32]",
    ]
    killed = exit_cause(9, True, banner)
    assert "killed" in killed and "serving" not in killed and "access" not in killed
    assert exit_cause(1, False, banner) == "exit code 1"
    trace = [*banner, "Traceback (most recent call last):", '  File "x.py", line 1', "MemoryError: no room"]
    assert exit_cause(1, False, trace) == "exit code 1; it said: MemoryError: no room"
    # it died while starting: what it said then is the cause
    assert exit_cause(2, False, ["earthdial serve: --model /x: no such folder"]).endswith("no such folder")


def _random_raster(path: Path, size: int = 1600) -> QgsRasterLayer:
    return random_raster_layer(path, size, seed=5)


def test_a_local_backend_killed_mid_scan_is_one_message_with_its_exit_cause(
    backend, qgis_new_project, qgis_iface, tmp_path: Path
) -> None:
    keys = (settings.ENDPOINT, settings.BACKEND_COMMAND, settings.MODEL_DIR, settings.DEVICE)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    settings.set_value(settings.BACKEND_COMMAND, str(ROOT / ".venv"))
    settings.set_value(settings.MODEL_DIR, str(backend.model))
    settings.set_value(settings.DEVICE, "cpu")
    settings.set_value(settings.EXTRA_ARGS, "")
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    layer = _random_raster(tmp_path / "big.tif")
    # 1 296 tiles: long enough to be killed in
    dock = _dock(qgis_iface, endpoint, layer, tile=50, running=False)
    try:
        dock.endpoint_edit.setText(endpoint)
        dock.start_button.click()
        wait_until(lambda: dock.local_backend.state == RUNNING and dock.status_reply is not None, 180)
        dock.task_combo.setCurrentIndex(dock.task_combo.findData("refer"))  # from the backend's own list
        dock.send_button.click()
        task = dock.scan.task
        steps: list[float] = []
        task.progressChanged.connect(steps.append)
        wait_until(lambda: bool(steps) or not dock.is_busy(), 120)
        assert dock.is_busy(), dock.answer_view.toPlainText()
        os.kill(int(dock.local_backend.process.processId()), signal.SIGKILL)
        wait_until(lambda: not dock.is_busy(), 60)

        assert dock.last_error is not None
        critical = [m for m in bar.get_messages(Qgis.MessageLevel.Critical)]
        assert len(critical) == 1, critical  # the request's message tells of the backend's end too
        (text,) = critical
        assert "killed" in text and "serving" not in text  # the cause, not the start-up banner
        assert text.lower().count("dropped") <= 1  # said once, not again in other words
        assert "killed" in dock.status_label.text()
    finally:
        dock.shutdown()
        for key in keys:
            QgsSettings().remove(key)
