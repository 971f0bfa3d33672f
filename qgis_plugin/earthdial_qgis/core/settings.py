"""The plugin's settings, kept in QGIS's own settings store (QgsSettings) under "EarthDial/"."""

from __future__ import annotations

from typing import Any

from qgis.core import QgsSettings

from ..contract.wire import DEFAULT_ENDPOINT

ENDPOINT = "EarthDial/endpoint"
TIMEOUT = "EarthDial/timeout_s"
BACKEND_COMMAND = "EarthDial/backend_command"  # the `earthdial` program, or the venv holding it
MODEL_DIR = "EarthDial/model_dir"
ADAPTER_DIR = "EarthDial/adapter_dir"  # a LoRA adapter (earthdial finetune) the local backend loads
DEVICE = "EarthDial/device"
EXTRA_ARGS = "EarthDial/extra_args"  # more `earthdial serve` arguments, e.g. --allow-dir /data
RESULTS_GPKG = "EarthDial/results_gpkg"  # where result layers go; empty: <project>_earthdial.gpkg beside it
RESULTS_IN_MEMORY = "EarthDial/results_in_memory"  # memory layers instead (lost unless saved)

DEFAULT_TIMEOUT_S = 300
DEVICES = ("auto", "cpu", "cuda", "mps")  # mps: Apple silicon (the backend's --device)


def value(key: str, default: Any = "") -> Any:
    return QgsSettings().value(key, default)


def text(key: str, default: str = "") -> str:
    got = QgsSettings().value(key, default)
    return str(got) if got is not None else default


def set_value(key: str, new: Any) -> None:
    QgsSettings().setValue(key, new)


def endpoint() -> str:
    return text(ENDPOINT, DEFAULT_ENDPOINT).strip() or DEFAULT_ENDPOINT


def timeout_s() -> int:
    try:
        return max(1, int(value(TIMEOUT, DEFAULT_TIMEOUT_S)))
    except (TypeError, ValueError):
        return DEFAULT_TIMEOUT_S


def results_in_memory() -> bool:
    got = value(RESULTS_IN_MEMORY, False)
    return got is True or str(got).lower() in ("true", "1", "yes")
