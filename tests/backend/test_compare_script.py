"""scripts/compare_upstream.py stays runnable from a fresh clone (docs/fidelity.md): its half that runs in
upstream's old-transformers venv imports nothing of this project, and no option defaults to a folder of
one machine. Each test runs the script as that venv would: a fresh interpreter with no site-packages
(`-S`), no PYTHON* variables (`-E`), no PYTHONPATH, from a folder outside the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_upstream.py"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(
        [sys.executable, "-S", "-E", str(SCRIPT), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _run_without_this_project(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The script under this venv's interpreter (numpy, torch importable) with the `earthdial` package
    made unimportable, as it is in upstream's venv before the upstream half puts upstream's own on
    sys.path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    code = (
        "import runpy, sys; sys.modules['earthdial'] = None; "
        f"sys.argv = [{str(SCRIPT)!r}, *{args!r}]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-E", "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_upstream_half_parses_its_arguments_without_this_project_or_site_packages(tmp_path: Path) -> None:
    # an empty work folder: the upstream role must get as far as checking it and say what is missing
    for run in (_run, _run_without_this_project):
        proc = run(["--role", "upstream", "--work", str(tmp_path)], tmp_path)
        assert "ModuleNotFoundError" not in proc.stderr and "ImportError" not in proc.stderr, proc.stderr
        assert proc.returncode == 2
        assert "no cases.json" in proc.stderr


def test_the_upstream_half_reaches_its_model_code_with_a_prepared_work_folder(tmp_path: Path) -> None:
    # with cases.json present, argument parsing passes and the run goes on to import torch (absent here:
    # no site-packages), i.e. past everything that ran at module level
    (tmp_path / "cases.json").write_text(json.dumps([]))
    proc = _run(["--role", "upstream", "--work", str(tmp_path)], cwd=tmp_path)
    assert proc.returncode != 0
    assert "No module named 'numpy'" in proc.stderr or "No module named 'torch'" in proc.stderr, proc.stderr
    assert "earthdial" not in proc.stderr.splitlines()[-1]


def test_our_half_names_every_folder_it_needs_instead_of_defaulting_to_one(tmp_path: Path) -> None:
    proc = _run([], cwd=tmp_path)
    assert proc.returncode == 2
    assert "--work" in proc.stderr
    proc = _run(["--work", str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 2
    assert "--upstream-git" in proc.stderr and "--venv" in proc.stderr
    assert "/" + "work/" not in SCRIPT.read_text()  # no folder of the machine it was written on
