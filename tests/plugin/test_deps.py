"""Missing packages are detected (imports monkeypatched to fail: nothing is uninstalled), the install goes
to the plugin's own folder with the exact command shown, and that folder is put on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

from plugin_testing import wait_until

from earthdial_qgis.core import deps


def test_detection_with_failing_imports(monkeypatch) -> None:
    assert deps.missing_packages() == []  # this QGIS has both
    monkeypatch.setitem(sys.modules, "zmq", None)
    assert deps.missing_packages() == ["pyzmq"]
    monkeypatch.setitem(sys.modules, "qtpy", None)
    assert deps.missing_packages() == ["pyzmq", "qtpy"]


def test_the_command_targets_the_plugin_folder(tmp_path: Path) -> None:
    args = deps.pip_arguments(["pyzmq", "qtpy"], str(tmp_path / "vendor"))
    assert args == ["-m", "pip", "install", "--target", str(tmp_path / "vendor"), "pyzmq", "qtpy"]
    text = deps.pip_command_text(["pyzmq", "qtpy"], str(tmp_path / "vendor"))
    assert text.endswith(f"-m pip install --target {tmp_path / 'vendor'} pyzmq qtpy")
    # outside the plugin's folder, which an upgrade of the plugin replaces; per Python version
    from qgis.core import QgsApplication

    vendor = Path(deps.VENDOR_DIR)
    assert Path(deps.PLUGIN_DIR) not in vendor.parents and vendor != Path(deps.PLUGIN_DIR)
    assert (
        vendor.parent == Path(QgsApplication.qgisSettingsDirPath()).resolve() / "python" / "earthdial-vendor"
    )
    assert vendor.name == f"py{sys.version_info.major}{sys.version_info.minor}"
    assert Path(deps.python_executable()).name.startswith("python")


def test_vendor_folder_goes_on_sys_path(tmp_path: Path, monkeypatch) -> None:
    vendor = tmp_path / "vendor"
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert not deps.add_vendor_to_path(str(vendor))  # not there yet
    (vendor / "earthdial_fake_dep").mkdir(parents=True)
    (vendor / "earthdial_fake_dep" / "__init__.py").write_text("VALUE = 42\n")
    assert deps.add_vendor_to_path(str(vendor))
    assert sys.path[-1] == str(vendor)  # after QGIS's own packages
    import earthdial_fake_dep

    assert earthdial_fake_dep.VALUE == 42
    sys.modules.pop("earthdial_fake_dep")


def test_dialog_shows_the_command_and_runs_it(qgis_app, monkeypatch) -> None:
    from earthdial_qgis.gui.deps_dialog import DependenciesDialog

    dialog = DependenciesDialog(["pyzmq"])
    assert dialog.command_edit.text() == deps.pip_command_text(["pyzmq"])
    assert "--target" in dialog.command_edit.text() and deps.VENDOR_DIR in dialog.command_edit.text()
    # The button runs QGIS's Python; here a harmless stand-in for pip.
    monkeypatch.setattr(deps, "pip_arguments", lambda *a, **k: ["-c", "print('pip ran')"])
    dialog.install_button.click()
    wait_until(lambda: dialog.process is None, 30)
    output = dialog.output_view.toPlainText()
    assert "pip ran" in output and "EarthDial is ready" in output
    dialog.deleteLater()
