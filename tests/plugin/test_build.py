"""scripts/build_plugin.py: the installable zip."""

from __future__ import annotations

import stat
import subprocess
import sys
import zipfile

import build_plugin
import pytest
from plugin_testing import ROOT

PLUGIN = ROOT / "qgis_plugin" / "earthdial_qgis"


def test_the_repository_holds_no_symlink_and_no_copy_of_the_contract() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "-s", "--", "qgis_plugin", "backend"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.splitlines()
    assert tracked
    assert not [row for row in tracked if row.startswith("120000")]  # a Windows clone gets no link to fix
    paths = {row.split("\t", 1)[1] for row in tracked}
    for name in ("contract/wire.py", "contract/client.py"):
        assert f"backend/earthdial/{name}" in paths
        assert f"qgis_plugin/earthdial_qgis/{name}" not in paths


def test_build_plugin_zip(tmp_path) -> None:
    out = tmp_path / "earthdial_qgis.zip"
    # QGIS's Python runs it here, but the script needs only the standard library
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_plugin.py"), "--output", str(out)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.strip() == str(out)
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
        # every module of the plugin's source (the contract modules the build copies in included) ships: a
        # list kept by hand here missed the modules added since it was written
        source = ROOT / "qgis_plugin" / "earthdial_qgis"
        modules = [
            p.relative_to(source).as_posix() for p in source.rglob("*.py") if "__pycache__" not in p.parts
        ]
        assert (
            len(modules) > 40 and "contract/wire.py" in modules and "contract/result_features.py" in modules
        )
        for module in modules:
            assert f"earthdial_qgis/{module}" in names, module
        assert not any("/vendor/" in n for n in names)
        assert "earthdial_qgis/help/index.html" in names  # Help opens it: documentation without a network
        assert "hasProcessingProvider=yes" in zf.read("earthdial_qgis/metadata.txt").decode()
        assert all(n.startswith("earthdial_qgis/") and "__pycache__" not in n for n in names)
        metadata = zf.read("earthdial_qgis/metadata.txt").decode()
        assert "name=EarthDial" in metadata and "qgisMinimumVersion=3.22" in metadata
        assert "version=0.3.0" in metadata and "experimental=True" in metadata
        # offered to QGIS 4 (Qt6) too: by the plugin site (the maximum) and by QGIS's installer (supportsQt6)
        assert "\nqgisMaximumVersion=4.99\n" in metadata and "\nsupportsQt6=True\n" in metadata
        assert 'version = "0.3.0"' in (ROOT / "pyproject.toml").read_text()  # one version for both
        # the shared contract: the backend's modules, byte for byte, as regular files
        for name in ("contract/wire.py", "contract/client.py"):
            info = zf.getinfo(f"earthdial_qgis/{name}")
            assert not stat.S_ISLNK(info.external_attr >> 16)
            assert zf.read(info) == (ROOT / "backend" / "earthdial" / name).read_bytes(), name
            # and the copy the tests (and a checkout) run is the same
            assert (PLUGIN / name).read_bytes() == (ROOT / "backend" / "earthdial" / name).read_bytes(), name
        # the backend, as the wheel the panel's Install backend... installs: this version, with its CLI and demo
        wheel_name = "earthdial_qgis/wheels/earthdial_qgis-0.3.0-py3-none-any.whl"
        assert [n for n in names if n.endswith(".whl")] == [wheel_name]
        zf.extractall(tmp_path / "plugins")
    with zipfile.ZipFile(tmp_path / "plugins" / wheel_name) as wheel:
        inside = set(wheel.namelist())
        assert {
            "earthdial/cli/main.py",
            "earthdial/model/engine.py",
            "earthdial/models/demo/model.safetensors",
        } <= inside
        entry_points = wheel.read("earthdial_qgis-0.3.0.dist-info/entry_points.txt").decode()
        assert "earthdial = earthdial.cli.main:main" in entry_points
    size = out.stat().st_size
    assert size < build_plugin.MAX_ZIP_BYTES == 25 * 1024 * 1024, size  # the plugin site's limit

    # The unpacked plugin imports on its own, as QGIS would load it from its plugins folder.
    check = (
        "import sys; sys.path.insert(0, sys.argv[1]); import earthdial_qgis, earthdial_qgis.plugin, "
        "earthdial_qgis.gui.dock, earthdial_qgis.processing.provider, earthdial_qgis.processing; assert earthdial_qgis.__file__.startswith(sys.argv[1]); "
        "assert callable(earthdial_qgis.classFactory); print('ok')"
    )
    run = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path / "plugins")], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_build_refuses_metadata_that_leaves_qgis_4_out(tmp_path, monkeypatch) -> None:
    import build_plugin

    for text in ("qgisMaximumVersion=3.99\nsupportsQt6=True\n", "qgisMaximumVersion=4.99\n"):
        metadata = tmp_path / "metadata.txt"
        metadata.write_text(f"[general]\nname=EarthDial\nversion=0.3.0\n{text}", encoding="utf-8")
        monkeypatch.setattr(build_plugin, "METADATA", metadata)
        with pytest.raises(SystemExit, match="supportsQt6"):
            build_plugin.build(tmp_path / "out.zip")
        assert not (tmp_path / "out.zip").exists()


def test_build_refuses_a_zip_over_the_plugin_sites_limit(tmp_path, monkeypatch) -> None:
    import build_plugin

    monkeypatch.setattr(build_plugin, "MAX_ZIP_BYTES", 10_000)  # the plugin's code alone is more
    with pytest.raises(SystemExit, match="under 25 MB"):
        build_plugin.build(tmp_path / "out.zip", with_wheel=False)
    assert not (tmp_path / "out.zip").exists()  # no zip the site would refuse is left to upload
