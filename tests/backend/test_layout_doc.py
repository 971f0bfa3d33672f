"""The README's Layout section and docs/architecture.md show the tree as it is: every package of the backend
and the plugin, and every backend module outside training/, is named there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BACKEND = ROOT / "backend" / "earthdial"
PLUGIN = ROOT / "qgis_plugin" / "earthdial_qgis"


def _layout() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Layout\n", 1)[1]
    return section.split("\n## ", 1)[0]


def _packages(root: Path) -> list[str]:
    return sorted(p.parent.name for p in root.glob("*/__init__.py"))


def missing(text: str, names: list[str]) -> list[str]:
    return [n for n in names if not re.search(rf"(?<![\w/]){re.escape(n)}(?!\w)", text)]


def test_every_package_is_in_the_layout_and_the_architecture_page() -> None:
    packages = [f"{p}/" for p in _packages(BACKEND) + _packages(PLUGIN)]
    assert len(packages) >= 14
    architecture = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert missing(_layout(), packages) == []
    assert missing(architecture, packages) == []


def test_every_runtime_module_of_the_backend_is_in_the_layout() -> None:
    modules = sorted(
        p.stem for p in BACKEND.glob("*/*.py") if p.stem != "__init__" and p.parent.name != "training"
    )
    assert len(modules) > 40
    assert missing(_layout(), modules) == []


def test_the_check_finds_a_name_that_is_not_there() -> None:
    text = "geo/  imagery · tiling\nserving/  server"
    assert missing(text, ["geo/", "imagery", "serving/"]) == []
    assert missing(text, ["outputs/", "files", "tile"]) == ["outputs/", "files", "tile"]
