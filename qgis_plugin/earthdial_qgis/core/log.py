"""The plugin's log: QGIS's Log Messages panel, tab "EarthDial", plus the last errors for diagnostics."""

from __future__ import annotations

from collections import deque
from datetime import datetime, timezone

from qgis.core import Qgis, QgsMessageLog

TAG = "EarthDial"
_errors: deque[str] = deque(maxlen=20)


def info(message: str) -> None:
    QgsMessageLog.logMessage(message, TAG, Qgis.MessageLevel.Info)


def warning(message: str) -> None:
    QgsMessageLog.logMessage(message, TAG, Qgis.MessageLevel.Warning)


def error(message: str) -> None:
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _errors.append(f"{stamp} {message}")
    QgsMessageLog.logMessage(message, TAG, Qgis.MessageLevel.Critical)


def recent_errors() -> list[str]:
    return list(_errors)
