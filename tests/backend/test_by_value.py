"""The command line against a real `earthdial serve` whose --allow-dir does not cover the file: it reads the
file itself and sends the pixels (an `ask`'s window by value, a scan's tiles streamed), as the plugin does,
and gets the answer the server gives for the same file by reference; results still name the file."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import conftest
from conftest import free_port, start_server, stop_server
from earthdial.cli import main as cli
from earthdial.cli import model_choice
from earthdial.demo.samples import write_sample_scene


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(allowed, elsewhere): the server may read the first, not the second; the same scenes in both."""
    allowed, elsewhere = tmp_path_factory.mktemp("allowed"), tmp_path_factory.mktemp("elsewhere")
    for folder in (allowed, elsewhere):
        write_sample_scene(folder / "scene.tif")
        write_sample_scene(folder / "later.tif", index=3)
    return allowed, elsewhere


@pytest.fixture(scope="module")
def demo_server(folders: tuple[Path, Path]) -> Iterator[str]:
    """The demo model (its answers are deterministic and hold boxes) served with --allow-dir ALLOWED only."""
    model = model_choice.demo_model()
    if model is None:
        pytest.skip("the demo model is not installed")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    saved = conftest.ALLOWED_DIRS[:]
    conftest.ALLOWED_DIRS[:] = [str(folders[0])]
    try:
        proc = start_server(Path(model), endpoint)
    finally:
        conftest.ALLOWED_DIRS[:] = saved
    yield endpoint
    stop_server(proc)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[str, str]:
    sigint = signal.getsignal(signal.SIGINT)  # the scans install their own
    try:
        code = cli.main(list(argv))
    finally:
        signal.signal(signal.SIGINT, sigint)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def run_to(capsys: pytest.CaptureFixture[str], server: str, out: Path, *argv: str) -> tuple[str, str]:
    """`run` of `argv` against `server`, writing its result to `out`."""
    return run(capsys, *argv, "--endpoint", server, "-o", str(out))


def features(path: Path) -> list[dict]:
    return json.loads(path.read_text())["features"]


def same_boxes(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["properties"]["label"] == y["properties"]["label"]
        ring_x, ring_y = x["geometry"]["coordinates"][0], y["geometry"]["coordinates"][0]
        assert [v for p in ring_x for v in p] == pytest.approx([v for p in ring_y for v in p], abs=1e-6)


def test_ask_and_change_send_the_pixels_of_a_file_the_server_may_not_open(
    demo_server, folders, tmp_path, capsys
) -> None:
    allowed, elsewhere = folders
    scene = elsewhere / "scene.tif"
    out, err = run_to(capsys, demo_server, tmp_path / "value.geojson", "ask", str(scene), "--prompt", "ships")
    assert "forbidden_path" in err and "its pixels are read here and sent instead" in err
    by_value = features(tmp_path / "value.geojson")
    assert by_value and {f["properties"]["source"] for f in by_value} == {str(scene)}
    reference_out, reference_err = run_to(
        capsys, demo_server, tmp_path / "ref.geojson", "ask", str(allowed / "scene.tif"), "--prompt", "ships"
    )
    assert "forbidden_path" not in reference_err
    assert out.splitlines()[0] == reference_out.splitlines()[0]  # the same answer as by reference
    same_boxes(by_value, features(tmp_path / "ref.geojson"))

    pair = [str(scene), str(elsewhere / "later.tif")]
    out, err = run(capsys, "change", *pair, "--endpoint", demo_server)
    assert "forbidden_path" in err
    reference_out, _ = run(
        capsys, "change", str(allowed / "scene.tif"), str(allowed / "later.tif"), "--endpoint", demo_server
    )
    assert out.splitlines()[0] == reference_out.splitlines()[0]


def test_scans_stream_the_tiles_of_a_file_the_server_may_not_open(
    demo_server, folders, tmp_path, capsys
) -> None:
    allowed, elsewhere = folders
    scene = elsewhere / "scene.tif"
    _, err = run_to(
        capsys,
        demo_server,
        tmp_path / "value.geojson",
        "detect",
        str(scene),
        "--prompt",
        "ships",
        "--tile-size",
        "200",
    )
    assert "forbidden_path" in err and "9 tiles of 200 px" in err
    by_value = features(tmp_path / "value.geojson")
    assert by_value and {f["properties"]["source"] for f in by_value} == {str(scene)}
    _, err = run_to(
        capsys,
        demo_server,
        tmp_path / "ref.geojson",
        "detect",
        str(allowed / "scene.tif"),
        "--prompt",
        "ships",
        "--tile-size",
        "200",
    )
    assert "forbidden_path" not in err
    same_boxes(by_value, features(tmp_path / "ref.geojson"))

    out, err = run_to(
        capsys,
        demo_server,
        tmp_path / "changes.gpkg",
        "detect-changes",
        str(scene),
        str(elsewhere / "later.tif"),
        "--tile-size",
        "200",
    )
    assert "forbidden_path" in err and "9 tiles of 200 px" in err
    reference, _ = run_to(
        capsys,
        demo_server,
        tmp_path / "ref.gpkg",
        "detect-changes",
        str(allowed / "scene.tif"),
        str(allowed / "later.tif"),
        "--tile-size",
        "200",
    )
    changed = [line for line in out.splitlines() if "tile pairs changed" in line]
    assert changed and changed == [line for line in reference.splitlines() if "tile pairs changed" in line]


def test_the_preview_of_an_ask_sent_by_value_shows_the_bands_asked_for(
    demo_server, folders, tmp_path, capsys
) -> None:
    import rasterio

    allowed, elsewhere = folders
    for folder, name in ((elsewhere, "value.png"), (allowed, "ref.png")):
        run(
            capsys,
            "ask",
            str(folder / "scene.tif"),
            "--prompt",
            "ships",
            "--bands",
            "3,2,1",
            "--endpoint",
            demo_server,
            "--preview",
            str(tmp_path / name),
        )
    with rasterio.open(tmp_path / "value.png") as a, rasterio.open(tmp_path / "ref.png") as b:
        assert (a.read() == b.read()).all()  # bands 3, 2, 1 of the file in both, boxes drawn alike
