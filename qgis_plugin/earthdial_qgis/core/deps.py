"""Python packages the plugin needs beyond QGIS, and installing them into a folder of the plugin's own.

pyzmq carries the requests; qtpy lets the same code run on Qt5 and Qt6 builds of QGIS (the plugin falls
back to qgis.PyQt without it). Nothing is ever installed silently or into QGIS's own site-packages: the
user sees the exact pip command, may run it from a button (a QProcess on QGIS's own Python) or by hand,
and the packages go to ``<QGIS profile>/python/earthdial-vendor/py<version>``, which `add_vendor_to_path`
puts on sys.path at import. That folder is beside the plugins folder, not inside the plugin's: an upgrade
of the plugin replaces its whole folder and would remove them; the Python version in the name keeps a
compiled pyzmq from being loaded by another QGIS's Python.
"""

from __future__ import annotations

import importlib
import os
import shlex
import shutil
import sys

PLUGIN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the plugin's folder, above core/


def vendor_dir() -> str:
    """Where the plugin's own packages go: under the QGIS profile (qgisSettingsDirPath), outside the plugins
    folder; without QGIS, the profile is taken to be two levels above the plugin (<profile>/python/plugins)."""
    base = ""
    try:
        from qgis.core import QgsApplication

        base = QgsApplication.qgisSettingsDirPath()
    except Exception:  # no QGIS in this Python (a script importing the module): fall back to the layout
        base = ""
    if not base:
        base = os.path.join(PLUGIN_DIR, os.pardir, os.pardir, os.pardir)
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(os.path.abspath(base), "python", "earthdial-vendor", version)


VENDOR_DIR = vendor_dir()
# import name -> pip name
REQUIRED = {"zmq": "pyzmq", "qtpy": "qtpy"}


def add_vendor_to_path(vendor: str = VENDOR_DIR) -> bool:
    """Make packages installed into the plugin's vendor folder importable (after QGIS's own, so that a
    package QGIS ships always wins). True when the folder exists and is on sys.path."""
    if not os.path.isdir(vendor):
        return False
    if vendor not in sys.path:
        sys.path.append(vendor)
        importlib.invalidate_caches()
    return True


def missing_packages() -> list[str]:
    """The pip names of the required packages that cannot be imported."""
    missing = []
    for module, package in REQUIRED.items():
        try:
            importlib.import_module(module)
        except Exception:  # ImportError, or a broken install raising something else
            missing.append(package)
    return missing


OPTIONAL = ("qtpy",)  # the plugin falls back to qgis.PyQt without it


def essential(missing: list[str]) -> list[str]:
    """The missing packages the plugin cannot work without (pyzmq); qtpy is installed along with them."""
    return [p for p in missing if p not in OPTIONAL]


def python_executable() -> str:
    """QGIS's own Python interpreter. Inside QGIS, sys.executable is often the QGIS program itself, so
    the interpreter is looked for beside the running Python's prefix first."""
    names = ("python.exe", "python3.exe") if os.name == "nt" else ("python3", "python")
    folders = [sys.exec_prefix, os.path.join(sys.exec_prefix, "bin"), os.path.dirname(sys.executable)]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for folder in folders:
        for name in (version, *names):
            candidate = os.path.join(folder, name)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    base = os.path.basename(sys.executable).lower()
    if base.startswith("python"):
        return sys.executable
    return shutil.which("python3") or shutil.which("python") or sys.executable


def pip_arguments(packages: list[str] | None = None, vendor: str = VENDOR_DIR) -> list[str]:
    """Arguments for QGIS's Python: ``-m pip install --target <vendor> pyzmq qtpy``."""
    return ["-m", "pip", "install", "--target", vendor, *(packages or list(REQUIRED.values()))]


def pip_command_text(packages: list[str] | None = None, vendor: str = VENDOR_DIR) -> str:
    """The same command as one line a user can paste into a terminal."""
    parts = [python_executable(), *pip_arguments(packages, vendor)]
    if os.name == "nt":
        return " ".join(f'"{p}"' if " " in p else p for p in parts)
    return shlex.join(parts)
