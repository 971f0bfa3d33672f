"""The panel's *Install backend...* for real, without the dialog: the plan's own commands (installer.py)
create a fresh venv with this machine's Python, install the torch build chosen for this machine from the
package index and the backend from the wheel build_plugin.py ships in the zip, and the `earthdial` of that
venv serves the built-in demo model and answers. Then the plan is run again (a re-run or an upgrade):
it keeps the venv and succeeds. Minutes the first time on a machine; pip's cache makes it quick after.
It runs with the backend's Python (.venv) where the plugin would use QGIS's; tests/plugin/test_installer.py
runs the dialog, and the plan's venv step, with QGIS's Python."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "qgis_plugin"), str(ROOT / "scripts")]
import build_plugin  # noqa: E402

from earthdial_qgis.core import installer  # noqa: E402  (plain Python: no QGIS needed)

del sys.path[:2]

STEP_TIMEOUT_S = 900


def clean_env() -> dict[str, str]:
    """The test session's environment less PYTHONPATH (it points at the checkout's backend: the venv must
    run what it installed) and less any active venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_plan(steps: list[installer.Step]) -> list[float]:
    """Run each step as the dialog does (one process each, in order, stop at the first failure)."""
    seconds = []
    for step in steps:
        start = time.monotonic()
        done = subprocess.run(
            [step.program, *step.args],
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT_S,
            env=clean_env(),
        )
        seconds.append(time.monotonic() - start)
        assert done.returncode == 0, (
            f"{step.title}: {step.text()}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return seconds


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_plugin.build_wheel(tmp_path_factory.mktemp("wheel")))


@pytest.fixture
def venv_home(tmp_path: Path) -> Iterator[Path]:
    """Where the venv goes; removed afterwards (about 1 GB that pytest would keep with its temp folders)."""
    home = tmp_path / "earthdial-backend"
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_the_plan_installs_a_backend_that_answers(wheel: str, venv_home: Path, tmp_path: Path) -> None:
    python, why = installer.base_python()
    assert python, why
    torch = installer.choose_torch(platform.system(), platform.machine(), None)  # no NVIDIA GPU here
    assert torch.device == "cpu"
    venv = str(venv_home / "venv")
    steps = installer.install_plan(venv, python, wheel, torch, installer.torch_requirement(wheel))
    assert [s.title for s in steps][0] == "Create the environment"
    first = run_plan(steps)
    print(
        f"install: {sum(first):.0f} s ({', '.join(f'{s.title} {t:.0f} s' for s, t in zip(steps, first, strict=True))})"
    )

    assert installer.installed_version(venv) == installer.wheel_version(wheel) == "0.3.0"
    assert not installer.needs_upgrade(venv, wheel)
    earthdial = installer.venv_earthdial(venv)  # what the plugin's backend command resolves to
    assert os.path.isfile(earthdial)
    where = subprocess.run(
        [
            installer.venv_python(venv),
            "-c",
            "import earthdial, torch; print(earthdial.__file__, torch.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=clean_env(),
    ).stdout
    assert where.startswith(venv) and "+cpu" in where  # the venv's own copy, the CPU build
    assert sys.prefix not in where  # nothing of the test's (QGIS's) Python

    scene = tmp_path / "harbour.tif"
    subprocess.run(
        [earthdial, "make-sample", str(scene)], check=True, capture_output=True, timeout=300, env=clean_env()
    )
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [earthdial, "serve", "--endpoint", endpoint, "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
    )
    try:
        started = []
        assert server.stdout is not None
        for line in server.stdout:  # its start-up lines, up to "serving" (or its end)
            started.append(line)
            if line.startswith("earthdial: serving"):
                break
        assert started and started[-1].startswith("earthdial: serving"), "".join(started)
        assert any("demo model" in line for line in started), "".join(started)
        out = tmp_path / "ships.geojson"
        asked = subprocess.run(
            [earthdial, "ask", str(scene), "--prompt", "ships", "--endpoint", endpoint, "-o", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            env=clean_env(),
        )
        assert asked.returncode == 0, asked.stderr
    finally:
        server.kill()
        server.wait(30)
    features = json.loads(out.read_text())["features"]
    assert features and {f["properties"]["label"] for f in features} == {"ship"}

    again = installer.install_plan(venv, python, wheel, torch, installer.torch_requirement(wheel))
    assert "Create the environment" not in [s.title for s in again]  # the venv is kept
    seconds = run_plan(again)
    print(f"re-run: {sum(seconds):.0f} s")
    assert installer.installed_version(venv) == "0.3.0"
