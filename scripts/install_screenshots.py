#!/usr/bin/env python3
"""The panel's *Install backend...* in the real QGIS desktop under Xvfb, on a fresh profile with no backend:
the plugin installed from the built zip into that profile, the panel's offer, the install dialog before and
during the install and when done, and the sample scene's answer from the backend it started. Writes
install-offer.png, install-dialog.png, install-progress.png, install-done.png, install-result.png and the
install's own log (install.log) into --out.

    python3 scripts/install_screenshots.py [--out docs/screenshots] [--log-dir out/install]

A real install (torch included): minutes. Standard library only outside QGIS; the backend of .venv only
makes the sample scene (`earthdial make-sample`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ENV_PREFIX = "EARTHDIAL_INSTALL_SHOT_"
try:
    SCRIPT = Path(__file__).resolve()
except NameError:  # `qgis --code` runs the file without __file__
    SCRIPT = Path(os.environ[ENV_PREFIX + "SCRIPT"])
ROOT = SCRIPT.parent.parent
EARTHDIAL = ROOT / ".venv" / "bin" / "earthdial"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="where the install log goes (default: --out)"
    )
    parser.add_argument("--timeout", type=int, default=1500, help="seconds for the whole QGIS run")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(SCRIPT.parent))
    import build_plugin
    from screenshots import free_port, run_qgis

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_dir = (args.log_dir or args.out).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="earthdial-install-shots-") as tmp:
        work = Path(tmp)
        scene = work / "harbour.tif"
        subprocess.run([str(EARTHDIAL), "make-sample", str(scene)], check=True, env=env, capture_output=True)
        # the plugin as a user installs it: the zip (with its backend wheel) unpacked into the fresh profile
        profile = (
            work / "profiles" / "profiles" / "default"
        )  # what QGIS makes of --profiles-path work/profiles
        plugins = profile / "python" / "plugins"
        plugins.mkdir(parents=True)
        with zipfile.ZipFile(build_plugin.build(work / "earthdial_qgis.zip")) as zf:
            zf.extractall(plugins)
        env.update(
            {
                f"{ENV_PREFIX}SCENE": str(scene),
                f"{ENV_PREFIX}OUT": str(out),
                f"{ENV_PREFIX}ENDPOINT": f"tcp://127.0.0.1:{free_port()}",
                f"{ENV_PREFIX}WORK": str(work),
                f"{ENV_PREFIX}PLUGINS": str(plugins),
                f"{ENV_PREFIX}SCRIPT": str(SCRIPT),
            }
        )
        returncode, output = run_qgis(SCRIPT, env, work, args.timeout, "1600x1200x24")
        status = (work / "status.txt").read_text() if (work / "status.txt").exists() else ""
        installed_log = profile / "python" / "earthdial-backend" / "install.log"
        if installed_log.exists():
            shutil.copyfile(installed_log, log_dir / "install.log")
    print(status)
    if returncode != 0 or not status.startswith("ok"):
        sys.stderr.write(output[-4000:] + "\n")
        return 1
    return 0


def in_qgis() -> None:
    from qgis.core import QgsProject, QgsRasterLayer
    from qgis.utils import iface
    from screenshots import run_steps, wait

    def env(name: str) -> str:
        return os.environ[ENV_PREFIX + name]

    out, work = Path(env("OUT")), Path(env("WORK"))
    sys.path.insert(0, env("PLUGINS"))
    import earthdial_qgis
    from earthdial_qgis.core import installer, settings

    state: dict = {"notes": []}

    def settle(n: int = 5):
        for _ in range(n):
            yield

    def steps():
        if not earthdial_qgis.__file__.startswith(env("PLUGINS")):
            raise RuntimeError(f"the plugin came from {earthdial_qgis.__file__}, not the profile")
        home = installer.backend_home()
        if not home.startswith(env("PLUGINS").rsplit("/plugins", 1)[0]):
            raise RuntimeError(f"the backend would go to {home}, outside the fresh profile")
        window = iface.mainWindow()
        window.resize(1600, 1000)
        window.showMaximized()
        settings.set_value(settings.ENDPOINT, env("ENDPOINT"))
        settings.set_value(settings.EXTRA_ARGS, f"--allow-dir {work}")  # the backend reads the scene itself
        if settings.text(settings.BACKEND_COMMAND):
            raise RuntimeError("the fresh profile has a backend command set")
        plugin = earthdial_qgis.classFactory(iface)
        plugin.initGui()
        state["plugin"] = plugin
        layer = QgsRasterLayer(env("SCENE"), "harbour (sample scene)", "gdal")
        QgsProject.instance().addMapLayer(layer)
        iface.setActiveLayer(layer)
        iface.mapCanvas().setExtent(layer.extent())
        plugin.action.trigger()
        dock = plugin.dock
        yield from settle(10)
        if dock.install_backend_button.isHidden():
            raise RuntimeError("no Install backend... offered on a profile without a backend")
        dock.grab().save(str(out / "install-offer.png"))

        dock.install_backend_button.click()
        from earthdial_qgis.gui.install_dialog import InstallDialog

        dialog = dock.findChildren(InstallDialog)[-1]
        yield from settle(10)
        dialog.grab().save(str(out / "install-dialog.png"))
        dialog.install_button.click()
        yield from wait(lambda: dialog.index >= 2 or not dialog.is_running(), 1200)  # the backend's own step
        yield from settle(5)
        dialog.grab().save(str(out / "install-progress.png"))
        yield from wait(lambda: not dialog.is_running(), 1200)
        yield from settle(5)
        dialog.grab().save(str(out / "install-done.png"))
        if not dialog.succeeded:
            raise RuntimeError(f"the install did not succeed: {dialog.step_label.text()}")
        dialog.close()
        yield from wait(lambda: dock.status_label.text().startswith("Connected"), 300)

        dock.set_area_mode("layer")
        dock.select_task("refer")
        dock.prompt_edit.setPlainText("ships")
        dock.schedule_plan()
        yield from wait(lambda: dock.last_plan is not None or dock.plan_error is not None, 60)
        dock.send_button.click()
        yield from wait(lambda: not dock.is_busy(), 120)
        if dock.last_error is not None:
            raise RuntimeError(dock.answer_view.toPlainText())
        dock.zoom_to_results()
        canvas = iface.mapCanvas()
        canvas.refreshAllLayers()
        yield from wait(lambda: not canvas.isDrawing(), 30)
        yield from settle(10)
        window.grab().save(str(out / "install-result.png"))
        state["notes"].append(f"status: {dock.status_label.text()}")
        state["notes"].append(f"answer: {dock.answer_view.toPlainText()[:300]}")
        plugin.unload()
        (work / "status.txt").write_text("ok\n" + "\n".join(state["notes"]) + "\n")

    run_steps(steps(), work, state)
    globals()["_earthdial_install_shots"] = state


if __name__ == "__main__":
    if os.environ.get(ENV_PREFIX + "OUT") and "qgis.core" in sys.modules:
        sys.path.insert(0, str(SCRIPT.parent))  # `qgis --code` does not put this script's folder on sys.path
        from screenshots import run_in_qgis

        run_in_qgis(in_qgis, Path(os.environ[ENV_PREFIX + "WORK"]))
    else:
        sys.exit(main())
