"""Packaging facts that drift when edited in one place: versions, pins, licence, optional torchao."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from earthdial.contract.wire import ErrorCode

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> str:
    return (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def test_install_sh_installs_the_torch_pyproject_requires() -> None:
    required = re.search(r'"(torch==[^"]+)"', _pyproject())
    default = re.search(r"TORCH_SPEC:-(torch==[^}]+)\}", (ROOT / "scripts" / "install.sh").read_text())
    assert required and default
    assert required.group(1) == default.group(1)


def test_torchao_is_an_extra_not_a_dependency() -> None:
    text = _pyproject()
    dependencies = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "torchao" not in dependencies
    assert re.search(r'^quantize = \["torchao', text, re.MULTILINE)
    assert '".[test,quantize,finetune,cluster]"' in (ROOT / "scripts" / "install.sh").read_text()


def test_ray_is_an_extra_not_a_dependency() -> None:
    text = _pyproject()
    dependencies = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "ray" not in dependencies
    assert re.search(r'^cluster = \["ray\[data\]>=', text, re.MULTILINE)


def test_licence_is_gpl2_or_later() -> None:
    licence = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "or (at your option) any later version" in licence
    assert "GNU GENERAL PUBLIC LICENSE" in licence and "Version 2, June 1991" in licence
    assert 'license = { text = "GPL-2.0-or-later" }' in _pyproject()


def test_package_and_plugin_versions_agree() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import build_plugin
    finally:
        sys.path.pop(0)
    package, plugin = build_plugin.versions()
    assert package is not None and package == plugin


def test_quantize_without_torchao_says_how_to_install(tmp_path) -> None:
    # a fresh interpreter in which `import torchao` fails, as in an install without the extra
    code = (
        "import sys; sys.modules['torchao'] = None\n"
        "from earthdial.model.quantize import quantize\n"
        "from earthdial.contract.wire import EarthDialError\n"
        "try:\n    quantize(object(), 'nf4')\n"  # nf4 needs torchao on every device (CPU int8 does not)
        "except EarthDialError as exc:\n    print(exc.code); print(exc.message)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    code_line, message = done.stdout.splitlines()[:2]
    assert code_line == ErrorCode.MISSING_DEPENDENCY, done.stderr
    assert "earthdial-qgis[quantize]" in message
    with pytest.raises(ValueError):  # an unknown mode is still a ValueError, torchao or not
        from earthdial.model.quantize import quantize

        quantize(object(), "int3")
