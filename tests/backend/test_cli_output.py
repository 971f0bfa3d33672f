"""The command line's outputs and endpoints: `-o FILE.gpkg` adds a layer and keeps everything else,
`--layer`/`--overwrite`, refusals of files that are not ours, no globbing of user paths, fail-fast pings,
and `earthdial ask` with no flags (a server at the default endpoint, else the demo model in-process)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pyogrio
import pytest
from test_output import check_users_layer, user_geopackage

from conftest import free_port, run_earthdial, write_geotiff
from earthdial.cli import main as cli
from earthdial.outputs.preview import is_our_png

ANSWER = "<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box>"


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    path = tmp_path / "scene.tif"
    data = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    return write_geotiff(path, data, px=10)


def georef(scene: Path, *extra: str) -> int:
    return cli.main(["georef", str(scene), "--answer", ANSWER, *extra])


def refused(capsys: pytest.CaptureFixture[str], code: str) -> str:
    err = capsys.readouterr().err
    assert f": {code}: " in err, err
    return err


def layers(path: Path) -> list[str]:
    return [name for name, _ in pyogrio.list_layers(path)]


def test_o_adds_a_layer_and_keeps_the_users_layer_and_every_earlier_result(tmp_path, scene, capsys):
    out = tmp_path / "project.gpkg"
    user_geopackage(str(out))
    assert georef(scene, "-o", str(out)) == 0
    assert georef(scene, "-o", str(out)) == 0  # within the same second the name gets _2
    assert georef(scene, "-o", str(out), "--layer", "ships") == 0
    names = layers(out)
    assert names[0] == "roads" and names[3] == "ships" and len(names) == 4
    assert names[1].startswith("georef_scene_") and names[2].startswith("georef_scene_")
    assert names[1] != names[2]
    printed = capsys.readouterr().out
    assert f"layer '{names[1]}'" in printed and "layer 'ships'" in printed
    check_users_layer(str(out))
    for name in names[1:]:
        assert pyogrio.read_info(out, layer=name)["features"] == 1


def test_a_layer_name_is_refused_unless_overwrite_and_never_the_users(tmp_path, scene, capsys):
    out = tmp_path / "project.gpkg"
    user_geopackage(str(out))
    assert georef(scene, "-o", str(out), "--layer", "ships") == 0
    before = out.read_bytes()
    assert georef(scene, "-o", str(out), "--layer", "ships") == 1
    assert "--overwrite" in refused(capsys, "output_exists")
    assert out.read_bytes() == before
    assert georef(scene, "-o", str(out), "--layer", "ships", "--overwrite") == 0
    assert georef(scene, "-o", str(out), "--layer", "roads", "--overwrite") == 1
    refused(capsys, "foreign_output")
    assert layers(out) == ["roads", "ships"]
    check_users_layer(str(out))
    assert georef(scene, "--layer", "ships") == 1  # a layer of which file?
    refused(capsys, "bad_request")


def test_geojson_stays_one_file_per_result(tmp_path, scene, capsys):
    out = tmp_path / "ships.geojson"
    assert georef(scene, "-o", str(out)) == 0
    assert georef(scene, "-o", str(out)) == 1
    refused(capsys, "output_exists")
    assert georef(scene, "-o", str(out), "--overwrite") == 0
    assert pyogrio.read_info(out)["features"] == 1


def sqlite_app(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE users (name TEXT)")
    con.execute("INSERT INTO users VALUES ('ada')")
    con.commit()
    con.close()


@pytest.mark.parametrize(
    ("args", "name", "make", "code"),
    [
        (("-o",), "notes.gpkg", lambda p: p.write_text("my notes\n"), "foreign_output"),
        (("-o",), "app.gpkg", sqlite_app, "foreign_output"),
        (("-o",), "package.json", lambda p: p.write_text('{"name": "app"}\n'), "foreign_output"),
        (("--preview",), "thesis.docx", lambda p: p.write_bytes(b"PK\x03\x04 a document"), "bad_request"),
        (
            ("--preview",),
            "photo.png",
            lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n not ours"),
            "foreign_output",
        ),
    ],
)
def test_files_that_are_not_ours_are_refused_and_untouched(tmp_path, scene, capsys, args, name, make, code):
    target = tmp_path / name
    make(target)
    before = target.read_bytes()
    for extra in ((), ("--overwrite",)):
        assert georef(scene, *args, str(target), *extra) == 1
        refused(capsys, code)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == sorted([name, "scene.tif"])


def test_outputs_are_checked_before_the_request_is_sent(tmp_path, scene, capsys):
    notes = tmp_path / "notes.gpkg"
    notes.write_text("my notes\n")
    started = time.monotonic()
    closed = f"tcp://127.0.0.1:{free_port()}"
    assert cli.main(["ask", str(scene), "--prompt", "ships", "--endpoint", closed, "-o", str(notes)]) == 1
    refused(capsys, "foreign_output")  # not a timeout: no request was tried
    assert time.monotonic() - started < 2.5


def test_user_paths_are_never_globbed(tmp_path, scene, capsys):
    folder = tmp_path / "maps"
    folder.mkdir()
    keep = {"a.aux.xml": b"<PAMDataset/>", "b.png.aux.xml": b"<PAMDataset/>", "c.png": b"\x89PNG\r\n\x1a\n"}
    for name, data in keep.items():
        (folder / name).write_bytes(data)
    assert georef(scene, "--preview", str(folder / "*")) == 1  # not a .png name
    refused(capsys, "bad_request")
    for _ in range(2):  # a literal '*' is just a name; the second time it is our own preview, replaced
        assert georef(scene, "--preview", str(folder / "*.png")) == 0
    assert is_our_png(str(folder / "*.png"))
    assert sorted(os.listdir(folder)) == sorted([*keep, "*.png"])
    for name, data in keep.items():
        assert (folder / name).read_bytes() == data
    assert georef(scene, "-o", str(folder / "*.gpkg")) == 0
    assert (folder / "*.gpkg").is_file()


def test_an_endpoint_that_is_not_there_fails_within_seconds(scene, capsys, monkeypatch):
    closed = f"tcp://127.0.0.1:{free_port()}"
    for argv in (
        ["ask", str(scene), "--prompt", "ships", "--endpoint", closed],
        ["detect", str(scene), "--prompt", "ships", "--endpoint", closed],
    ):
        started = time.monotonic()
        sigint = signal.getsignal(signal.SIGINT)  # detect installs its own
        try:
            assert cli.main(argv) == 1
        finally:
            signal.signal(signal.SIGINT, sigint)
        assert time.monotonic() - started < 5.0
        assert "is `earthdial serve` running there?" in refused(capsys, "timeout")
    monkeypatch.setenv("EARTHDIAL_ENDPOINT", closed)  # the default endpoint
    started = time.monotonic()
    assert cli.main(["status"]) == 1
    assert time.monotonic() - started < 5.0
    refused(capsys, "timeout")
    started = time.monotonic()
    from earthdial.cli import endpoint

    assert not endpoint.answers(endpoint.default_endpoint())  # what `ask` with no flags tries first
    assert time.monotonic() - started < 5.0


def run_ask(scene: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EARTHDIAL_MODEL"} | env
    return run_earthdial("ask", str(scene), "--task", "refer", "--prompt", "ship", *extra, env=env)


def test_ask_with_no_flags_uses_the_server_at_the_default_endpoint(server, scene, tmp_path):
    out = tmp_path / "out.gpkg"
    done = run_ask(scene, {"EARTHDIAL_ENDPOINT": server}, "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert f"using the server at {server}" in done.stderr
    assert done.stdout.strip()  # the tiny random model's answer
    assert len(layers(out)) == 1


def test_ask_with_no_flags_and_no_server_runs_the_demo_model_in_process(tmp_path):
    from earthdial.demo.samples import write_sample_scene

    scene = write_sample_scene(tmp_path / "scene.tif")
    closed = f"tcp://127.0.0.1:{free_port()}"
    out = tmp_path / "out.gpkg"
    done = run_ask(Path(scene), {"EARTHDIAL_ENDPOINT": closed}, "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert f"no server answers at {closed}; running the built-in demo model" in done.stderr
    assert done.stdout.strip()  # the demo model's answer
    assert layers(out)[0].startswith("refer_ship_scene_")


# Lines an in-process run printed that a user can do nothing about (earthdial.model.quiet drops them)
NOISE = ("You are using a model of type", "Failed to load", "Detected no triton", "register_constant()")


def test_the_readme_example_finds_boxes_and_prints_no_noise(tmp_path):
    """README: `earthdial ask scene.tif --prompt ships`, no flags: the prompt names objects, so the task is
    refer and the answer has boxes (chat gave "0 grounded box(es)"); in-process, stderr says which task
    and model ran and nothing a user cannot act on. `detect` in-process is as quiet."""
    from earthdial.demo.samples import write_sample_scene

    scene = write_sample_scene(tmp_path / "scene.tif")
    env = {k: v for k, v in os.environ.items() if k != "EARTHDIAL_MODEL"}
    env["EARTHDIAL_ENDPOINT"] = f"tcp://127.0.0.1:{free_port()}"
    done = run_earthdial("ask", str(scene), "--prompt", "ships", env=env)
    assert done.returncode == 0, done.stderr
    assert "earthdial ask: task refer" in done.stderr
    assert "<box>" in done.stdout and "0 grounded box(es)" not in done.stdout, done.stdout
    assert not [line for line in done.stderr.splitlines() if any(n in line for n in NOISE)], done.stderr
    done = run_earthdial("detect", str(scene), "--prompt", "ships", env=env)
    assert done.returncode == 0, done.stderr
    assert not [line for line in done.stderr.splitlines() if any(n in line for n in NOISE)], done.stderr


def test_every_command_picks_its_model_by_one_rule(tmp_path, monkeypatch):
    """--model, else $EARTHDIAL_MODEL, else the shipped demo model (eval-demo: no environment)."""
    from earthdial.cli import model_choice

    demo = model_choice.demo_model()
    assert demo is not None and Path(demo, "config.json").is_file()
    monkeypatch.delenv("EARTHDIAL_MODEL", raising=False)
    assert model_choice.choose(None) == (demo, "the built-in demo model")
    monkeypatch.setenv("EARTHDIAL_MODEL", str(tmp_path))
    assert model_choice.choose(None) == (str(tmp_path), "$EARTHDIAL_MODEL")
    assert model_choice.choose("given") == ("given", "--model")
    assert model_choice.choose(None, environment=False).path == demo
    monkeypatch.setenv("EARTHDIAL_MODEL", "")  # set but empty: as if unset
    assert model_choice.choose(None).path == demo
