"""The plugin's layers stay apart (the Processing/Deepness layout): core/ and tasks/ hold no widget, never
reach QGIS's interface (`qgis.utils.iface`) and never import gui/. tasks/ run on worker threads, where
a widget or the interface must not be touched; core/ is what gui/, tasks/ and processing/ share.

Read from the sources with ast: an import is a fact of the file, whichever code path runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from plugin_testing import ROOT

PLUGIN = ROOT / "qgis_plugin" / "earthdial_qgis"
LAYERS = ("core", "tasks")
# the one module that names QtWidgets: it picks the Qt binding for the whole plugin (gui/ takes it there)
QT_SHIM = PLUGIN / "core" / "qt.py"


def _dotted(node: ast.expr) -> str:
    """`a.b.c` for an attribute chain on a name; "" for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([node.id, *reversed(parts)])


def crossings(path: Path, package_depth: int = 1) -> list[str]:
    """What in ``path`` breaks the rule, one `line: what` each. ``package_depth``: how many packages
    below the plugin's root the module sits (core/x.py: 1), so that `..gui` is recognised."""
    found: list[str] = []
    widgets_allowed = path.resolve() == QT_SHIM.resolve()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [alias.name for alias in node.names]
            # relative: `..gui` from core/x.py; absolute: earthdial_qgis.gui
            if node.level == package_depth + 1 and module.split(".")[0] == "gui":
                found.append(f"{node.lineno}: imports from ..{module}")
            elif node.level == package_depth + 1 and not module and "gui" in names:
                found.append(f"{node.lineno}: imports the gui package")
            elif node.level == 0 and module.split(".")[:2] == ["earthdial_qgis", "gui"]:
                found.append(f"{node.lineno}: imports from {module}")
            if module == "qgis.utils" and ("iface" in names or "*" in names):
                found.append(f"{node.lineno}: imports qgis.utils.iface")
            if not widgets_allowed and ("QtWidgets" in module.split(".") or "QtWidgets" in names):
                found.append(f"{node.lineno}: imports QtWidgets")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[:2] == ["earthdial_qgis", "gui"]:
                    found.append(f"{node.lineno}: imports {alias.name}")
                if not widgets_allowed and "QtWidgets" in alias.name.split("."):
                    found.append(f"{node.lineno}: imports {alias.name}")
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted == "qgis.utils.iface":
                found.append(f"{node.lineno}: uses qgis.utils.iface")
            elif not widgets_allowed and node.attr == "QtWidgets":  # e.g. qt.QtWidgets through the shim
                found.append(f"{node.lineno}: uses {dotted or 'QtWidgets'}")
    return found


def _modules() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (PLUGIN / layer).glob("*.py"))


def test_core_and_tasks_touch_no_widget_no_iface_and_no_gui() -> None:
    modules = _modules()
    assert {p.parent.name for p in modules} == set(LAYERS)  # the glob found both packages' modules
    broken = {str(p.relative_to(PLUGIN)): c for p in modules if (c := crossings(p))}
    assert broken == {}


@pytest.mark.parametrize(
    "source",
    [
        "from ..gui.scan import DockScan\n",
        "from .. import gui\n",
        "from earthdial_qgis.gui import dock\n",
        "import earthdial_qgis.gui.dock\n",
        "from qgis.utils import iface\n",
        "import qgis.utils\n\ndef f():\n    return qgis.utils.iface.mapCanvas()\n",
        "from ..core.qt import QtWidgets\n",
        "from qgis.PyQt.QtWidgets import QProgressBar\n",
        "from ..core import qt\n\nbar = qt.QtWidgets.QProgressBar()\n",
    ],
)
def test_a_module_that_crosses_is_caught(tmp_path: Path, source: str) -> None:
    """The check fails on a module of tasks/ that does what the rule forbids."""
    module = tmp_path / "tasks" / "crossing.py"
    module.parent.mkdir()
    module.write_text("from __future__ import annotations\n" + source, encoding="utf-8")
    assert len(crossings(module)) == 1


def test_a_worker_module_like_the_real_ones_passes(tmp_path: Path) -> None:
    """What tasks/ legitimately import (core, the contract, QtCore for signals) is not flagged."""
    module = tmp_path / "tasks" / "fine.py"
    module.parent.mkdir()
    module.write_text(
        "from qgis.core import QgsTask\nfrom ..contract.client import Client\nfrom ..core import scanning\n"
        "from ..core.qt import QtCore\nfrom . import request\n",
        encoding="utf-8",
    )
    assert crossings(module) == []
