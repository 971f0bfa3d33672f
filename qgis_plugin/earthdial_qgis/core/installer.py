"""Installing the backend from the panel: a private virtual environment in the QGIS profile, the backend
wheel shipped inside the plugin, and the torch build that fits the machine. No Qt here: the plan is a list
of commands (`install_plan`) that the install dialog runs one by one and a test runs for real.

The venv is ``<QGIS profile>/python/earthdial-backend/venv``, beside the vendor folder and outside the
plugins folder, so that upgrading the plugin keeps it (and then upgrades the backend in it from the new
wheel). Nothing is ever installed into QGIS's own Python: its interpreter only creates the venv
(``-m venv``), and every pip command runs the venv's own Python.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import sys
import zipfile
from dataclasses import dataclass

from .deps import PLUGIN_DIR, VENDOR_DIR, python_executable

MIN_PYTHON = (3, 10)  # pyproject.toml's requires-python
WHEELS_DIR = os.path.join(PLUGIN_DIR, "wheels")  # scripts/build_plugin.py puts the backend wheel here
DIST_NAME = "earthdial_qgis"  # the backend distribution's name in wheel and dist-info file names
PYPI_DEFAULT = ""  # torch from the package index pip is set up with (PyPI): no extra index

# The CUDA builds of the pinned torch (pyproject.toml: torch==2.13.0), as PyTorch's install selector
# (pytorch.org/get-started, "Compute Platform") lists them: index https://download.pytorch.org/whl/<tag>.
# A driver runs CUDA builds up to the CUDA version that `nvidia-smi` reports. Revise with the torch pin.
CUDA_BUILDS: tuple[tuple[tuple[int, int], str], ...] = (
    ((12, 6), "cu126"),
    ((12, 8), "cu128"),
    ((13, 0), "cu130"),
)
TORCH_INDEX = "https://download.pytorch.org/whl/{tag}"


@dataclass(frozen=True)
class TorchBuild:
    """Which torch build to install and where from; `device` is what the backend will run on."""

    tag: str  # "cu128", "cpu", or "default" (the index's own build: Apple silicon's has MPS)
    index_url: str  # "" for the default index
    device: str  # "cuda", "mps" or "cpu"
    why: str


@dataclass(frozen=True)
class Step:
    """One command of the plan: what it does in words, and the program with its arguments."""

    title: str
    program: str
    args: tuple[str, ...]

    def text(self) -> str:
        parts = [self.program, *self.args]
        if os.name == "nt":
            return " ".join(f'"{p}"' if " " in p else p for p in parts)
        return shlex.join(parts)


def backend_home(profile: str | None = None) -> str:
    """``<QGIS profile>/python/earthdial-backend``: the venv, the install record and the install logs."""
    if profile is None:  # VENDOR_DIR is <profile>/python/earthdial-vendor/py<version>
        return os.path.join(os.path.dirname(os.path.dirname(VENDOR_DIR)), "earthdial-backend")
    return os.path.join(os.path.abspath(profile), "python", "earthdial-backend")


def venv_dir(home: str) -> str:
    return os.path.join(home, "venv")


def venv_python(venv: str, windows: bool = os.name == "nt") -> str:
    """The venv's interpreter: Scripts\\python.exe on Windows, bin/python elsewhere."""
    return os.path.join(venv, "Scripts", "python.exe") if windows else os.path.join(venv, "bin", "python")


def venv_earthdial(venv: str, windows: bool = os.name == "nt") -> str:
    return (
        os.path.join(venv, "Scripts", "earthdial.exe") if windows else os.path.join(venv, "bin", "earthdial")
    )


def shipped_wheel(wheels_dir: str = WHEELS_DIR) -> str | None:
    """The backend wheel inside the plugin (the newest, should there be several), or None."""
    found = sorted(glob.glob(os.path.join(wheels_dir, f"{DIST_NAME}-*-py3-none-any.whl")), key=_wheel_key)
    return found[-1] if found else None


def _wheel_key(path: str) -> tuple[int, ...]:
    return version_tuple(wheel_version(path))


def wheel_version(path: str) -> str:
    """The version in a wheel's file name (``earthdial_qgis-0.3.0-py3-none-any.whl`` -> ``0.3.0``)."""
    return os.path.basename(path).split("-")[1]


def version_tuple(version: str) -> tuple[int, ...]:
    """``0.3.0`` -> (0, 3, 0); a part that is no number counts as 0 (enough for this project's versions)."""
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+-]", version))


def torch_requirement(wheel: str) -> str:
    """The torch pin the backend wheel declares (``torch==2.13.0``): the plugin keeps no copy of it."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(name).decode("utf-8")
    for line in metadata.splitlines():
        match = re.match(r"Requires-Dist:\s*(torch\s*[=<>!~][^;]*)$", line.strip())
        if match:
            return match.group(1).replace(" ", "")
    return "torch"


def parse_cuda_version(nvidia_smi_output: str) -> tuple[int, int] | None:
    """The driver's CUDA version from `nvidia-smi`'s header ("CUDA Version: 12.8"), or None."""
    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", nvidia_smi_output)
    return (int(match.group(1)), int(match.group(2))) if match else None


def choose_torch(system: str, machine: str, cuda: tuple[int, int] | None) -> TorchBuild:
    """The torch build for a machine: `system` as platform.system() says it, `machine` as
    platform.machine(), `cuda` the driver's CUDA version (None: no NVIDIA driver found)."""
    if cuda is not None and system in ("Linux", "Windows"):
        fitting = [tag for version, tag in CUDA_BUILDS if version <= cuda]
        if fitting:
            tag = fitting[-1]
            return TorchBuild(
                tag,
                TORCH_INDEX.format(tag=tag),
                "cuda",
                f"NVIDIA driver with CUDA {cuda[0]}.{cuda[1]}: the newest build it runs is {tag}",
            )
        oldest = CUDA_BUILDS[0][0]
        why = (
            f"the NVIDIA driver's CUDA {cuda[0]}.{cuda[1]} is older than the oldest CUDA build of this torch "
            f"({oldest[0]}.{oldest[1]}): CPU build (update the driver to use the GPU)"
        )
        return TorchBuild("cpu", TORCH_INDEX.format(tag="cpu"), "cpu", why)
    if system == "Darwin":
        if machine.lower() in ("arm64", "aarch64"):
            return TorchBuild("default", PYPI_DEFAULT, "mps", "Apple silicon: the default build, with MPS")
        return TorchBuild("default", PYPI_DEFAULT, "cpu", "an Intel Mac: the default (CPU) build")
    # Linux's default build is the CUDA one (gigabytes of CUDA libraries): the CPU index has the small one
    return TorchBuild("cpu", TORCH_INDEX.format(tag="cpu"), "cpu", "no NVIDIA GPU found: the CPU build")


def base_python() -> tuple[str | None, str]:
    """A Python >= 3.10 to create the venv with, and why not when there is none. QGIS's own interpreter
    (beside its prefix: on Windows sys.executable is qgis-bin.exe, python.exe is under sys.exec_prefix)
    only runs ``-m venv``; nothing is installed into it."""
    if sys.version_info[:2] < MIN_PYTHON:
        return None, (
            f"QGIS's Python is {sys.version_info.major}.{sys.version_info.minor}; the backend needs "
            f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer: choose a Python to create the environment with"
        )
    candidate = python_executable()
    if not os.path.isfile(candidate) or "qgis" in os.path.basename(candidate).lower():
        return None, "QGIS's Python interpreter was not found beside QGIS: choose a Python 3.10+ program"
    return candidate, ""


def venv_ready(venv: str) -> bool:
    return os.path.isfile(venv_python(venv))


def install_plan(venv: str, python: str, wheel: str, torch: TorchBuild, requirement: str) -> list[Step]:
    """The commands that install (or upgrade) the backend, in order. Re-running them is safe: an existing
    venv is kept, pip leaves what is already satisfied, and a newer wheel replaces the older backend."""
    steps = []
    if not venv_ready(venv):
        steps.append(Step("Create the environment", python, ("-m", "venv", venv)))
    py = venv_python(venv)
    pip = (py, "-m", "pip", "install", "--disable-pip-version-check")
    torch_args = ("--extra-index-url", torch.index_url) if torch.index_url else ()
    steps.append(Step(f"Install torch ({torch.tag})", pip[0], (*pip[1:], requirement, *torch_args)))
    steps.append(Step("Install the EarthDial backend", pip[0], (*pip[1:], "--upgrade", wheel)))
    check = 'import torch, earthdial.model.engine; print("torch", torch.__version__, "ready")'
    steps.append(Step("Check the installation", py, ("-c", check)))
    return steps


def installed_version(venv: str) -> str | None:
    """The backend version installed in the venv (from its dist-info folder), or None."""
    pattern = os.path.join(venv, "**", "site-packages", f"{DIST_NAME}-*.dist-info")
    found = sorted(glob.glob(pattern, recursive=True), key=lambda p: version_tuple(_dist_info_version(p)))
    return _dist_info_version(found[-1]) if found else None


def _dist_info_version(path: str) -> str:
    return os.path.basename(path)[len(DIST_NAME) + 1 : -len(".dist-info")]


def needs_upgrade(venv: str, wheel: str | None) -> bool:
    """True when the venv holds a backend older than the wheel the plugin ships."""
    have = installed_version(venv)
    return bool(have and wheel and version_tuple(have) < version_tuple(wheel_version(wheel)))


RECORD = "installed.json"


def write_record(home: str, wheel: str, torch: TorchBuild) -> str:
    """What was installed (the wheel's version, the torch build): Diagnostics and upgrades read it."""
    path = os.path.join(home, RECORD)
    record = {"backend": wheel_version(wheel), "torch": torch.tag, "device": torch.device, "why": torch.why}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return path


def read_record(home: str) -> dict[str, str]:
    try:
        with open(os.path.join(home, RECORD), encoding="utf-8") as f:
            got = json.load(f)
        return got if isinstance(got, dict) else {}
    except (OSError, ValueError):
        return {}
