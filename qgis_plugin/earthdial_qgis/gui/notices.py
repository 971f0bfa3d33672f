"""QGIS's own notice of a finished task ("Task failed: EarthDial: scan ..."), taken off the message bar
where the panel says what happened itself.

QGIS 3.22 tells of every task that ran 5 s or more that it completed or failed, as a desktop notification
or, where there is none (no notification service), in the message bar; a cancelled request is a "failed"
task to it. Its tasks have no flag to opt out (QgsTask.Silent came with 3.26), so the panel removes that
bar message for its own tasks: one message per outcome, the panel's.
"""

from __future__ import annotations

from typing import Any

from ..core.qt import QtCore

WATCH_MS = 3000  # how long after a task ends its notice may still come


def _titles() -> set[str]:
    return {QtCore.QCoreApplication.translate("QgisApp", text) for text in ("Task failed", "Task complete")}


def drop_task_notice(bar: Any, description: str) -> None:
    """Take QGIS's notice about the task ``description`` off ``bar``: now, and if it comes a moment later."""
    titles = _titles()

    def ours(item: Any) -> bool:
        try:
            return item.title() in titles and item.text() == description
        except (AttributeError, RuntimeError):  # another widget, or one already deleted
            return False

    def drop(item: Any) -> None:
        try:
            bar.popWidget(item)
        except RuntimeError:
            pass

    for item in list(bar.items()):
        if ours(item):
            drop(item)

    def added(item: Any) -> None:
        if ours(item):
            QtCore.QTimer.singleShot(0, lambda: drop(item))  # not from inside the bar's own signal

    bar.widgetAdded.connect(added)

    def stop() -> None:
        try:
            bar.widgetAdded.disconnect(added)
        except (TypeError, RuntimeError):
            pass

    QtCore.QTimer.singleShot(WATCH_MS, stop)
