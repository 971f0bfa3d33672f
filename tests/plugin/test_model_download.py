"""Settings' *Download model...* in real QGIS: the dialog runs the configured backend's `earthdial download`
(a real QProcess) against a local stand-in for the hub (HF_ENDPOINT in its environment), shows its progress,
can be cancelled and continued, and fills the model folder. The checkpoint names come from the backend."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from plugin_testing import EARTHDIAL, ROOT, wait_until

from earthdial_qgis.gui.settings_dialog import SettingsDialog

_spec = importlib.util.spec_from_file_location("fake_hub", ROOT / "tests" / "backend" / "fake_hub.py")
assert _spec is not None and _spec.loader is not None
fake_hub = importlib.util.module_from_spec(_spec)
sys.modules["fake_hub"] = fake_hub  # its dataclasses look their module up
_spec.loader.exec_module(fake_hub)

WEIGHTS = "model.safetensors"
STALL_AT = 300_000


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not EARTHDIAL.exists():
        pytest.skip(f"the backend is not installed ({EARTHDIAL} is missing; run scripts/install.sh)")
    folder = tmp_path_factory.mktemp("published") / "EarthDial_4B_RGB"
    subprocess.run(
        [str(EARTHDIAL), "make-tiny-checkpoint", str(folder)], check=True, capture_output=True, timeout=180
    )
    return folder


@pytest.fixture()
def hub(published: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with fake_hub.serving(fake_hub.FakeHub("akshaydudhane/EarthDial_4B_RGB", published)) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)  # the QProcess gets the system environment
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        yield h


def open_download(qgis_parent: Any) -> tuple[SettingsDialog, Any]:
    settings_dialog = SettingsDialog(qgis_parent)
    settings_dialog.command_widget.setFilePath(str(EARTHDIAL))
    settings_dialog.model_widget.setFilePath("")
    settings_dialog.download_button.click()
    dialog = settings_dialog.download_dialog
    wait_until(lambda: dialog.download_button.isEnabled(), 120)  # the backend listed its checkpoints
    return settings_dialog, dialog


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def test_a_download_from_settings_fills_the_model_folder(hub: Any, tmp_path: Path, qgis_parent: Any) -> None:
    settings_dialog, dialog = open_download(qgis_parent)
    listed = subprocess.run(
        [str(EARTHDIAL), "download", "--list", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert [dialog.name_combo.itemText(i) for i in range(dialog.name_combo.count())] == [
        c["name"] for c in json.loads(listed)
    ]
    dialog.name_combo.setCurrentText("EarthDial_4B_RGB")
    dialog.parent_widget.setFilePath(str(tmp_path / "models"))
    target = tmp_path / "models" / "EarthDial_4B_RGB"
    assert dialog.target_label.text() == str(target)
    dialog.download_button.click()
    wait_until(lambda: settings_dialog.model_widget.filePath() == str(target), 120)
    assert dialog.progress.value() == 1000 and "Downloaded and verified" in dialog.status_label.text()
    assert same_files(target, hub.folder)
    dialog.reject()
    settings_dialog.reject()


def test_a_cancelled_download_continues_and_leaves_the_model_folder_alone(
    hub: Any, tmp_path: Path, qgis_parent: Any
) -> None:
    hub.stall_after[WEIGHTS] = STALL_AT
    settings_dialog, dialog = open_download(qgis_parent)
    dialog.name_combo.setCurrentText("EarthDial_4B_RGB")
    dialog.parent_widget.setFilePath(str(tmp_path))
    target = tmp_path / "EarthDial_4B_RGB"
    incomplete = target / ".partial" / (WEIGHTS + ".incomplete")
    dialog.download_button.click()
    wait_until(lambda: incomplete.is_file() and incomplete.stat().st_size == STALL_AT, 120)
    wait_until(lambda: dialog.progress.value() > 0, 30)  # its progress reached the dialog
    dialog.cancel_button.click()
    wait_until(lambda: dialog.process is None, 30)
    assert "Download again continues it" in dialog.status_label.text()
    assert settings_dialog.model_widget.filePath() == ""
    assert not (target / "config.json").exists()  # not a model folder while incomplete

    hub.stall_after.clear()
    hub.release.set()
    hub.requests.clear()
    dialog.download_button.click()
    wait_until(lambda: settings_dialog.model_widget.filePath() == str(target), 120)
    ranges = [rng for path, rng in hub.resolve_requests() if path.endswith(WEIGHTS)]
    assert ranges and all(rng == f"bytes={STALL_AT}-" for rng in ranges)  # continued, not started over
    assert same_files(target, hub.folder)
    dialog.reject()
    settings_dialog.reject()
