"""*Install backend...*: the plan (installer.py: which torch, which commands, where) and the dialog that runs
it in real QGIS (install_dialog.py: steps, log, Cancel, re-run, the backend command set at the end), the
panel's offer while no backend is set, and the plugin's upgrade offer. The full install with torch and an
answer from the installed backend is test_install_backend.py."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from plugin_testing import free_port, wait_until
from qgis.core import QgsSettings

from earthdial_qgis.core import installer, settings
from earthdial_qgis.core.backend_process import resolve_command

NVIDIA_SMI_HEADER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 570.86.15              Driver Version: 570.86.15      CUDA Version: 12.8     |
|-----------------------------------------+------------------------+----------------------+
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> str:
    import build_plugin

    return str(build_plugin.build_wheel(tmp_path_factory.mktemp("wheel")))


@pytest.fixture
def no_backend_command() -> Any:
    saved = QgsSettings().value(settings.BACKEND_COMMAND, "")
    QgsSettings().setValue(settings.BACKEND_COMMAND, "")
    yield
    QgsSettings().setValue(settings.BACKEND_COMMAND, saved)


# -- the plan -----------------------------------------------------------------------------------------


def test_the_drivers_cuda_version_picks_the_newest_build_it_runs() -> None:
    assert installer.parse_cuda_version(NVIDIA_SMI_HEADER) == (12, 8)
    assert installer.parse_cuda_version("NVIDIA-SMI has failed because it couldn't communicate") is None
    cases = {(12, 8): "cu128", (12, 9): "cu128", (13, 2): "cu130", (12, 6): "cu126", (12, 7): "cu126"}
    for cuda, tag in cases.items():
        for system in ("Linux", "Windows"):
            build = installer.choose_torch(system, "x86_64", cuda)
            assert (build.tag, build.device) == (tag, "cuda"), (system, cuda)
            assert build.index_url == f"https://download.pytorch.org/whl/{tag}"
    too_old = installer.choose_torch("Linux", "x86_64", (11, 8))
    assert (too_old.tag, too_old.device) == ("cpu", "cpu") and "update the driver" in too_old.why


def test_without_nvidia_linux_and_windows_get_the_cpu_build_apple_silicon_the_default_with_mps() -> None:
    for system in ("Linux", "Windows"):
        build = installer.choose_torch(system, "x86_64", None)
        assert (build.tag, build.index_url, build.device) == (
            "cpu",
            "https://download.pytorch.org/whl/cpu",
            "cpu",
        )
    mac = installer.choose_torch("Darwin", "arm64", None)
    assert (mac.tag, mac.index_url, mac.device) == ("default", "", "mps")
    intel_mac = installer.choose_torch("Darwin", "x86_64", None)
    assert (intel_mac.index_url, intel_mac.device) == ("", "cpu")
    assert installer.choose_torch("Darwin", "arm64", (12, 8)).device == "mps"  # no CUDA build for macOS


def test_venv_layout_on_windows_and_elsewhere() -> None:
    assert installer.venv_python("V", windows=True) == os.path.join("V", "Scripts", "python.exe")
    assert installer.venv_earthdial("V", windows=True) == os.path.join("V", "Scripts", "earthdial.exe")
    assert installer.venv_python("V", windows=False) == os.path.join("V", "bin", "python")
    assert installer.venv_earthdial("V", windows=False) == os.path.join("V", "bin", "earthdial")
    home = installer.backend_home("/profiles/default")
    assert home == os.path.join(os.path.abspath("/profiles/default"), "python", "earthdial-backend")
    # beside the vendor folder, outside the plugins folder a plugin upgrade replaces
    assert os.path.dirname(installer.backend_home()) == os.path.dirname(os.path.dirname(installer.VENDOR_DIR))


def test_the_plan_never_installs_into_qgis_python(wheel: str, tmp_path: Path) -> None:
    python, why = installer.base_python()
    assert python and not why
    torch = installer.choose_torch("Linux", "x86_64", None)
    venv = str(tmp_path / "venv")
    steps = installer.install_plan(venv, python, wheel, torch, installer.torch_requirement(wheel))
    assert installer.torch_requirement(wheel) == "torch==2.13.0"  # the wheel's own pin, not a copy
    assert steps[0].program == python and steps[0].args == ("-m", "venv", venv)  # QGIS's Python: -m venv only
    for step in steps[1:]:
        assert step.program == installer.venv_python(venv), step.text()
    torch_step, backend_step = steps[1], steps[2]
    assert "torch==2.13.0" in torch_step.args
    assert torch_step.args[-2:] == ("--extra-index-url", "https://download.pytorch.org/whl/cpu")
    assert backend_step.args[-2:] == ("--upgrade", wheel)
    mac = installer.install_plan(
        venv, python, wheel, installer.choose_torch("Darwin", "arm64", None), "torch==2.13.0"
    )
    assert "--extra-index-url" not in mac[1].args  # the default index's build


def test_the_shipped_wheel_and_the_installed_version(wheel: str, tmp_path: Path) -> None:
    folder = tmp_path / "wheels"
    folder.mkdir()
    assert installer.shipped_wheel(str(folder)) is None
    (folder / Path(wheel).name).write_bytes(Path(wheel).read_bytes())
    shipped = installer.shipped_wheel(str(folder))
    assert shipped is not None and installer.wheel_version(shipped) == "0.3.0"
    venv = tmp_path / "venv"
    assert installer.installed_version(str(venv)) is None and not installer.needs_upgrade(str(venv), shipped)
    site = venv / "lib" / "python3.11" / "site-packages"
    (site / "earthdial_qgis-0.2.9.dist-info").mkdir(parents=True)  # the layout pip leaves
    assert installer.installed_version(str(venv)) == "0.2.9" and installer.needs_upgrade(str(venv), shipped)
    (site / "earthdial_qgis-0.2.9.dist-info").rename(site / "earthdial_qgis-0.3.0.dist-info")
    assert not installer.needs_upgrade(str(venv), shipped)
    assert installer.version_tuple("0.10.0") > installer.version_tuple("0.9.1")


# -- the dialog in QGIS ---------------------------------------------------------------------------------


def short_plan(dialog: Any, wheel: str) -> Any:
    """The plan's real first step (create the venv with this Python) and the real wheel installed with
    --no-deps: no torch, so the dialog's run takes seconds. What it does not test: that the backend's
    dependencies install (test_install_backend.py does, with the plan's own commands)."""

    def plan(python: str) -> list[installer.Step]:
        steps = installer.install_plan(dialog.venv, python, wheel, dialog.torch, "torch==2.13.0")
        py = installer.venv_python(dialog.venv)
        install = installer.Step(
            "Install the EarthDial backend (no dependencies)",
            py,
            ("-m", "pip", "install", "--no-deps", "--upgrade", wheel),
        )
        return [s for s in steps if s.title == "Create the environment"] + [install]

    return plan


@pytest.mark.skipif(
    importlib.util.find_spec("ensurepip") is None,
    reason="this Python cannot create a venv with pip (Debian without python3-venv, as in the 3.40 chroot)",
)
def test_the_dialog_installs_saves_its_log_and_sets_the_backend(
    wheel: str, tmp_path: Path, qgis_app: Any, no_backend_command: Any
) -> None:
    from earthdial_qgis.gui.install_dialog import InstallDialog

    cpu = installer.choose_torch("Linux", "x86_64", None)
    dialog = InstallDialog(home=str(tmp_path / "earthdial-backend"), wheel=wheel, torch=cpu)
    dialog._plan = short_plan(dialog, wheel)
    done: list[str] = []
    dialog.installed.connect(done.append)
    dialog.install()
    assert dialog.is_running() and dialog.progress.maximum() == 2
    wait_until(lambda: not dialog.is_running() and (done or dialog.install_button.isEnabled()), 300)
    assert done == [dialog.venv], dialog.output_view.toPlainText()
    assert dialog.progress.value() == dialog.progress.maximum() == 2
    assert settings.text(settings.BACKEND_COMMAND) == dialog.venv
    assert resolve_command(dialog.venv) == installer.venv_earthdial(dialog.venv)  # what Start local runs
    assert installer.installed_version(dialog.venv) == "0.3.0"
    record = json.loads((tmp_path / "earthdial-backend" / "installed.json").read_text())
    assert record["backend"] == "0.3.0" and record["torch"] == "cpu"
    saved = Path(dialog.log_path).read_text()
    assert "-m venv" in saved and "Successfully installed earthdial-qgis-0.3.0" in saved
    assert dialog.install_button.text() == "Install again"
    # again: the venv is kept (no create step) and the wheel is reinstalled over itself
    dialog.install()
    assert dialog.progress.maximum() == 1
    wait_until(lambda: not dialog.is_running() and len(done) == 2, 300)
    assert dialog.succeeded and installer.installed_version(dialog.venv) == "0.3.0"
    # no torch in this short install: the machine report says why it has nothing, rather than nothing
    wait_until(lambda: dialog.output_view.toPlainText().count("what this machine can run: ") == 2, 180)
    assert "diagnose failed" in dialog.output_view.toPlainText().rsplit("what this machine can run: ", 1)[1]
    dialog.deleteLater()


def test_cancel_kills_the_running_step_and_install_again_goes_on(
    wheel: str, tmp_path: Path, qgis_app: Any, no_backend_command: Any
) -> None:
    from earthdial_qgis.gui.install_dialog import InstallDialog

    cpu = installer.choose_torch("Linux", "x86_64", None)
    dialog = InstallDialog(home=str(tmp_path / "home"), wheel=wheel, torch=cpu)
    waiting = installer.Step("A step that waits", sys.executable, ("-c", "import sys; sys.stdin.read()"))
    quick = installer.Step("A step that ends", sys.executable, ("-c", "print('done')"))
    dialog._plan = lambda python: [quick, waiting]
    done: list[str] = []
    dialog.installed.connect(done.append)
    dialog.install()
    wait_until(
        lambda: dialog.index == 1 and dialog.process is not None and dialog.process.processId() > 0, 60
    )
    pid = dialog.process.processId()
    assert os.path.exists(f"/proc/{pid}")
    dialog.cancel()
    wait_until(lambda: not dialog.is_running(), 60)
    assert not os.path.exists(f"/proc/{pid}")  # killed (and reaped), not left running
    assert dialog.step_label.text().startswith("Cancelled") and not done and not dialog.succeeded
    assert settings.text(settings.BACKEND_COMMAND) == ""  # nothing half-done is set as the backend
    assert "[cancelled]" in Path(dialog.log_path).read_text()
    # a failing step stops the run with its exit code; Install again runs the plan anew
    dialog._plan = lambda python: [
        installer.Step("A failing step", sys.executable, ("-c", "raise SystemExit(3)"))
    ]
    dialog.install()
    wait_until(lambda: not dialog.is_running(), 60)
    assert "A failing step failed (exit code 3)" in dialog.step_label.text() and not done
    dialog._plan = lambda python: [quick]
    dialog.install()
    wait_until(lambda: not dialog.is_running(), 60)
    assert done == [dialog.venv] and dialog.succeeded
    dialog.deleteLater()


def test_the_panel_offers_install_backend_while_none_is_set_and_starts_what_it_installed(
    make_dock: Any, no_backend_command: Any, tmp_path: Path, wheel: str
) -> None:
    """The panel's side: the offer, and an install that succeeds starting the local backend from the venv.
    The venv here is the test session's backend venv (.venv) and the plan has nothing left to do, as on a
    re-run over a complete install: what is tested is the hand-over, not the install."""
    from plugin_testing import EARTHDIAL

    from earthdial_qgis.core.backend_process import RUNNING, STOPPED

    dock = make_dock()
    assert dock.show_install_offer() and not dock.install_backend_button.isHidden()
    dock.endpoint_edit.setText(f"tcp://127.0.0.1:{free_port()}")  # not the test backend's
    home = tmp_path / "earthdial-backend"
    home.mkdir()
    (home / "venv").symlink_to(EARTHDIAL.parent.parent)
    cpu = installer.choose_torch("Linux", "x86_64", None)
    dialog = dock.open_installer(home=str(home), wheel=wheel, torch=cpu, plan=lambda python: [])
    dialog.install()
    wait_until(lambda: dock.local_backend.state == RUNNING or bool(dock.local_backend.last_error), 180)
    assert dock.local_backend.state == RUNNING, dock.local_backend.last_error
    assert settings.text(settings.BACKEND_COMMAND) == dialog.venv
    assert dock.install_backend_button.isHidden()  # a backend is set now: no offer
    wait_until(lambda: dock.status_label.text().startswith("Connected"), 60)
    # and it says what this machine can run, as the installed backend reports it, into the saved log too
    wait_until(lambda: "recommended: earthdial serve" in dialog.output_view.toPlainText(), 180)
    assert (
        "what this machine can run" in dialog.output_view.toPlainText()
        and "GPU: " in dialog.output_view.toPlainText()
    )
    assert "recommended: earthdial serve" in Path(dialog.log_path).read_text()
    dock.local_backend.stop()
    assert dock.local_backend.state == STOPPED
    dialog.deleteLater()


def test_the_plugin_offers_the_upgrade_when_its_wheel_is_newer(
    wheel: str, tmp_path: Path, qgis_iface: Any
) -> None:
    from earthdial_qgis.plugin import EarthDialPlugin

    plugin = EarthDialPlugin(qgis_iface)
    home = tmp_path / "earthdial-backend"
    assert plugin.check_backend_upgrade(str(home), wheel) == ""  # nothing installed: nothing to upgrade
    site = home / "venv" / "lib" / "python3.11" / "site-packages"
    (site / "earthdial_qgis-0.2.0.dist-info").mkdir(parents=True)
    message = plugin.check_backend_upgrade(str(home), wheel)
    assert "is version 0.2.0; this plugin ships 0.3.0" in message
    (site / "earthdial_qgis-0.2.0.dist-info").rename(site / "earthdial_qgis-0.3.0.dist-info")
    assert plugin.check_backend_upgrade(str(home), wheel) == ""


def test_starting_with_no_backend_set_points_to_install_backend(
    qgis_app: Any, no_backend_command: Any
) -> None:
    from earthdial_qgis.core.backend_process import STOPPED, LocalBackend

    backend = LocalBackend()
    problem = backend.start("tcp://127.0.0.1:5557")
    assert "Install backend…" in problem and backend.state == STOPPED and backend.process is None
