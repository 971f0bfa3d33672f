#!/usr/bin/env python3
"""Screenshots of the plugin in the real QGIS desktop, under Xvfb: docs/screenshots/dock.png (the panel with
its chip preview) and docs/screenshots/result.png (the result layer on the map); with `--flow scan`,
scan-stopped.jpg and scan-resumed.jpg (a tiled scan of a demo mosaic stopped mid-way, then resumed from the
panel).

Run from the repository with any Python 3 (it needs only the standard library):

    python3 scripts/screenshots.py [--out docs/screenshots] [--flow ask|scan]

It makes the sample scene with the backend's command (.venv), starts `qgis --code` on this same file under
`xvfb-run` with a throw-away profile, and there, as a user would: loads the plugin, adds the scene, opens
the panel, starts the local backend from it (no model folder set: the built-in demo model), asks for the
ships, and grabs the panel and the main window.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

ENV_PREFIX = "EARTHDIAL_SHOT_"
try:
    SCRIPT = Path(__file__).resolve()
except NameError:  # `qgis --code` runs the file without __file__: the outer run says where it is
    SCRIPT = Path(os.environ[ENV_PREFIX + "SCRIPT"])
ROOT = SCRIPT.parent.parent
EARTHDIAL = ROOT / ".venv" / "bin" / "earthdial"
SHOTS = {"ask": ("dock.png", "result.png"), "scan": ("scan-stopped.jpg", "scan-resumed.jpg")}
# 6 x 6 demo scenes of 112 px: a 672 px mosaic, 49 tiles of the demo model's 112 px
MOSAIC = """
import sys, numpy as np
from earthdial.demo import synthetic
n, size = 6, 112
rows = [np.concatenate([synthetic.render(synthetic.make_scene(7, r * n + c), size) for c in range(n)], axis=2)
        for r in range(n)]
synthetic.write_geotiff(sys.argv[1], np.concatenate(rows, axis=1))
"""


# --------------------------------------------------------------------------------------------------
# Outside QGIS: prepare the data and run QGIS under Xvfb
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_qgis(script: Path, env: dict[str, str], work: Path, timeout: int, screen: str) -> tuple[int, str]:
    """`qgis --code script` under Xvfb with a throw-away profile in work/profiles: its exit code and output.
    QGIS's embedded Python finds its home through PATH, so QGIS's own folder goes first (the Python running
    this, a venv or pyenv, is not QGIS's); QGIS and its Xvfb get a session of their own, so that a hung
    run is stopped whole."""
    qgis = shutil.which("qgis") or "/usr/bin/qgis"
    env = {**env, "PATH": os.pathsep.join([os.path.dirname(qgis), env.get("PATH", "")])}
    for name in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(name, None)
    command = [
        "xvfb-run", "-a", "-s", f"-screen 0 {screen}",
        qgis, "--nologo", "--noversioncheck", "--noplugins",
        "--profiles-path", str(work / "profiles"), "--code", str(script),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        output += f"\nQGIS did not finish in {timeout} s"
    return process.returncode, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--timeout", type=int, default=300, help="seconds for the whole QGIS run")
    parser.add_argument(
        "--flow", choices=sorted(SHOTS), default="ask", help="one ask, or a scan stopped and resumed"
    )
    args = parser.parse_args(argv)
    if not EARTHDIAL.exists():
        raise SystemExit(f"{EARTHDIAL} is missing: run scripts/install.sh first")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="earthdial-shots-") as tmp:
        work = Path(tmp)
        scene = work / "harbour.tif"
        if args.flow == "scan":
            python = EARTHDIAL.parent / "python"
            subprocess.run([str(python), "-c", MOSAIC, str(scene)], check=True, env=env, capture_output=True)
        else:
            subprocess.run(
                [str(EARTHDIAL), "make-sample", str(scene)], check=True, env=env, capture_output=True
            )
        env.update(
            {
                f"{ENV_PREFIX}FLOW": args.flow,
                f"{ENV_PREFIX}SCENE": str(scene),
                f"{ENV_PREFIX}OUT": str(out),
                f"{ENV_PREFIX}ENDPOINT": f"tcp://127.0.0.1:{free_port()}",
                f"{ENV_PREFIX}WORK": str(work),
                f"{ENV_PREFIX}SCRIPT": str(SCRIPT),
            }
        )
        returncode, output = run_qgis(SCRIPT, env, work, args.timeout, "1600x1400x24")
        status = (work / "status.txt").read_text() if (work / "status.txt").exists() else ""
    if returncode != 0 or not status.startswith("ok"):
        sys.stderr.write(output[-4000:] + "\n" + status)
        return 1
    for name in SHOTS[args.flow]:
        print(out / name)
    return 0


# --------------------------------------------------------------------------------------------------
# Inside QGIS (`qgis --code`): drive the plugin as a user and grab the pictures
# --------------------------------------------------------------------------------------------------


def in_qgis() -> None:
    from qgis.core import QgsProject, QgsRasterLayer
    from qgis.utils import iface

    def env(name: str) -> str:
        return os.environ[ENV_PREFIX + name]

    out, work = Path(env("OUT")), Path(env("WORK"))
    sys.path.insert(0, str(SCRIPT.parent))  # `qgis --code` does not put this script's folder on sys.path
    from build_plugin import sync_shared

    sync_shared()  # the contract modules the build copies from the backend
    sys.path.insert(0, str(ROOT / "qgis_plugin"))
    import earthdial_qgis
    from earthdial_qgis.core import settings

    state: dict = {}

    def steps():
        window = iface.mainWindow()
        window.resize(1600, 1000)
        window.showMaximized()
        settings.set_value(settings.ENDPOINT, env("ENDPOINT"))
        # the backend's command: .venv's, or another one (e.g. a wrapper running a checkout's own code)
        settings.set_value(
            settings.BACKEND_COMMAND, os.environ.get(ENV_PREFIX + "BACKEND") or str(ROOT / ".venv")
        )
        settings.set_value(settings.MODEL_DIR, "")  # the built-in demo model
        settings.set_value(settings.DEVICE, "cpu")
        settings.set_value(settings.EXTRA_ARGS, f"--allow-dir {work}")  # the backend reads the scene itself
        plugin = earthdial_qgis.classFactory(iface)
        plugin.initGui()
        state["plugin"] = plugin

        name = "mosaic (demo scenes)" if env("FLOW") == "scan" else "harbour (sample scene)"
        layer = QgsRasterLayer(env("SCENE"), name, "gdal")
        QgsProject.instance().addMapLayer(layer)
        iface.setActiveLayer(layer)
        iface.mapCanvas().setExtent(layer.extent())
        plugin.action.trigger()
        dock = plugin.dock
        yield

        dock.start_button.click()  # the local backend, from the panel
        yield from wait(lambda: dock.status_label.text().startswith("Connected"), 180)

        dock.set_area_mode("layer")
        dock.select_task("refer")
        dock.prompt_edit.setPlainText("ships")
        if env("FLOW") == "scan":
            yield from scan_steps(window, dock, out)
        else:
            yield from ask_steps(window, dock, layer, out)
        plugin.unload()
        (work / "status.txt").write_text("ok\n")

    run_steps(steps(), work, state)
    globals()["_earthdial_shots"] = state


def run_steps(steps: Iterator[None], work: Path, state: dict) -> None:
    """Runs `steps` on QGIS's event loop, one step every 200 ms, then quits QGIS. An error goes to
    work/status.txt, where the outer run looks for it, and unloads the plugin in state["plugin"]; the
    steps write their own "ok" there. Shared with install_screenshots.py."""
    from qgis.core import QgsApplication
    from qgis.PyQt.QtCore import QTimer

    def finish(error: str = "") -> None:
        if error:
            (work / "status.txt").write_text(error)
            plugin = state.get("plugin")
            if plugin is not None:
                plugin.unload()
        QgsApplication.exit(0)

    def tick() -> None:
        try:
            next(steps)
        except StopIteration:
            timer.stop()
            finish()
        except Exception as exc:
            timer.stop()
            import traceback

            finish(f"error: {exc}\n{traceback.format_exc()}")

    timer = QTimer()
    timer.timeout.connect(tick)
    timer.start(200)
    state["timer"] = timer  # kept alive after this script returns


def run_in_qgis(in_qgis: Callable[[], None], work: Path) -> None:
    """Calls `in_qgis` (the setup, before QGIS's event loop runs); if it fails, reports it in work/status.txt
    and quits QGIS once the loop runs. Shared with install_screenshots.py."""
    try:
        in_qgis()
    except Exception as exc:
        import traceback

        from qgis.core import QgsApplication
        from qgis.PyQt.QtCore import QTimer

        (work / "status.txt").write_text(f"error: {exc}\n{traceback.format_exc()}")
        QTimer.singleShot(0, lambda: QgsApplication.exit(1))


def wait(condition, seconds: float):  # a generator step: yield until the condition holds
    for _ in range(int(seconds / 0.2)):
        if condition():
            return
        yield
    raise TimeoutError(f"waited {seconds} s")


def ask_steps(window, dock, layer, out: Path):
    """One ask for the ships in the layer: the panel with its chip preview, then the result on the map."""
    from qgis.core import QgsProject
    from qgis.utils import iface

    dock.schedule_plan()
    yield from wait(lambda: dock.last_plan is not None or dock.plan_error is not None, 30)
    if dock.last_plan is None:  # the summary of what will be sent
        raise RuntimeError(f"no summary of what will be sent: {dock.plan_label.text()}")
    dock.send_button.click()
    yield from wait(lambda: not dock.is_busy(), 60)
    if dock.last_error is not None:
        raise RuntimeError(dock.answer_view.toPlainText())
    dock.tabs.setCurrentIndex(1)  # Preview
    dock.setFloating(True)  # tall enough to show the whole panel at once, as narrow as a small dock
    dock.resize(300, 1350)
    for _ in range(5):
        yield
    dock.grab().save(str(out / "dock.png"))
    dock.setFloating(False)

    view = iface.layerTreeView()
    view.expandAllNodes()  # the result group and its legend: an outline colour per label
    view.setExpanded(view.node2index(QgsProject.instance().layerTreeRoot().findLayer(layer.id())), False)
    dock.zoom_to_results()
    canvas = iface.mapCanvas()
    canvas.refreshAllLayers()
    yield from wait(lambda: not canvas.isDrawing(), 30)
    for _ in range(10):
        yield
    window.grab().save(str(out / "result.png"))


def scan_steps(window, dock, out: Path):
    """A tiled scan stopped after a few tiles, then resumed from the panel: the stopped layer keeps what
    was found, and the merged layer takes over when the rest is done."""
    from qgis.utils import iface

    dock.scan_radio.setChecked(True)
    dock.schedule_plan()
    yield from wait(lambda: dock.last_plan is not None or dock.plan_error is not None, 30)
    dock.send_button.click()
    yield from wait(
        lambda: not dock.is_busy() or (dock.scan.task is not None and dock.scan.task.done >= 12), 120
    )
    dock.cancel_button.click()
    yield from wait(lambda: not dock.is_busy(), 60)
    canvas = iface.mapCanvas()
    iface.layerTreeView().expandAllNodes()
    canvas.refreshAllLayers()
    yield from wait(lambda: not canvas.isDrawing(), 30)
    for _ in range(10):
        yield
    window.grab().save(str(out / "scan-stopped.jpg"), "JPG", 85)  # a mosaic: a PNG is 1 MB
    if not dock.resume_button.isEnabled():
        raise RuntimeError(f"Resume scan is not offered after the stop: {dock.result_label.text()}")
    dock.resume_button.click()
    yield from wait(lambda: not dock.is_busy(), 300)
    if dock.last_error is not None:
        raise RuntimeError(f"the resumed scan failed: {dock.last_error}")
    iface.layerTreeView().expandAllNodes()
    canvas.refreshAllLayers()
    yield from wait(lambda: not canvas.isDrawing(), 30)
    for _ in range(10):
        yield
    window.grab().save(str(out / "scan-resumed.jpg"), "JPG", 85)


if __name__ == "__main__":
    if os.environ.get(ENV_PREFIX + "OUT") and "qgis.core" in sys.modules:
        run_in_qgis(in_qgis, Path(os.environ[ENV_PREFIX + "WORK"]))
    else:
        sys.exit(main())
