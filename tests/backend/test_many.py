"""`earthdial detect-many`: scenes from arguments, list files and STAC items on Ray workers; a layer per
scene equal to a single-process `earthdial detect` of that scene, the merged layer, resume after a
Ctrl-C or a kill, typed errors per scene, and Ray needed only by this command.

Small on purpose (CI runs on 2 cores): four 448 px scenes of 4 tiles each, the shipped demo model, Ray
with 2 CPUs. The first test starts its own local Ray (the command's default); the two others on Ray share
one started by the `local_ray` fixture, shut down at the end of the module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import rasterio
from test_output import check_users_layer, user_geopackage

from conftest import TILES_224, demo_model_args, run_earthdial
from earthdial.cli import main as cli
from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.demo import synthetic
from earthdial.jobs import archive, journal, many
from earthdial.jobs import job as scan_job
from earthdial.training import DEMO_DIR

TILING = [
    "--prompt",
    "ships",
    *TILES_224,
    "--batch",
    "2",
    *demo_model_args(),
]
MANY = ["--workers", "2", "--cpus-per-worker", "1"]
FIELDS = (
    "label",
    "tile",
    "score",
    "answer",
    "task",
    "prompt",
    "source",
    "gsd_data",
    "gsd_model",
    "model",
)  # all but `created`


def mosaic(path: Path, seed: int) -> Path:
    """2 x 2 demo scenes side by side: 448 px, four 224 px tiles with objects the demo model knows."""
    rows = [
        np.concatenate(
            [synthetic.render(synthetic.make_scene(seed, r * 2 + c), 224) for c in range(2)], axis=2
        )
        for r in range(2)
    ]
    return synthetic.write_geotiff(path, np.concatenate(rows, axis=1))


def features(path: Path, layer: str) -> list[tuple[Any, ...]]:
    """A layer's features, comparable: geometry WKB and every field but the time it was written."""
    meta, _, geoms, fields = pyogrio.raw.read(str(path), layer=layer)
    names = list(meta["fields"])
    columns = [
        [None if isinstance(v, float) and np.isnan(v) else v for v in fields[names.index(n)]] for n in FIELDS
    ]
    return sorted(zip([bytes(g) for g in geoms], *columns, strict=True), key=repr)


def layers(path: Path) -> list[str]:
    return [name for name, _ in pyogrio.list_layers(path)]


def by_scene(path: Path) -> tuple[dict[str, list[tuple[Any, ...]]], list[tuple[Any, ...]]]:
    """The scene layers of a detect-many output keyed by the scene they hold, and the merged layer."""
    names = [n for n in layers(path) if n.startswith("refer_ships_")]
    merged = [n for n in names if n.startswith("refer_ships_all_")]
    assert len(merged) == 1, names
    scenes = {}
    for name in names:
        if name != merged[0]:
            feats = features(path, name)
            sources = {f[FIELDS.index("source") + 1] for f in feats}
            assert len(sources) == 1, (name, sources)  # every scene here has boxes
            scenes[sources.pop()] = feats
    assert len(scenes) == len(names) - 1  # one layer per scene
    return scenes, features(path, merged[0])


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Four scenes, and what four single-process `earthdial detect` runs found in each."""
    folder = tmp_path_factory.mktemp("archive")
    paths = [mosaic(folder / f"scene{k}.tif", 40 + k) for k in range(4)]
    reference = folder / "reference.gpkg"
    expected = {}
    for k, path in enumerate(paths):
        assert cli.main(["detect", str(path), *TILING, "-o", str(reference), "--layer", f"scene{k}"]) == 0
        expected[str(path)] = features(reference, f"scene{k}")
    assert all(expected.values()), "the demo model finds ships in every scene"
    return {"folder": folder, "paths": paths, "expected": expected}


def stac(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    return path


def item(item_id: str, **assets: str) -> dict[str, Any]:
    return {"type": "Feature", "id": item_id, "assets": {k: {"href": v} for k, v in assets.items()}}


def test_two_ray_workers_give_the_same_features_as_four_single_process_detects(archive_dir, tmp_path) -> None:
    """The default path: the command starts its own local Ray (2 CPUs), runs, shuts it down. Scenes come
    as arguments, from a list file and from a STAC ItemCollection with a relative href; the output is a
    GeoPackage of the user's, whose own layer stays as it was."""
    a, b, c, d = archive_dir["paths"]
    listing = tmp_path / "scenes.txt"
    listing.write_text(f"# scenes\n{c}\n\n")
    items = stac(archive_dir["folder"] / "items.json", [item("scene-d", visual=d.name, thumbnail="d.png")])
    out = tmp_path / "project.gpkg"
    user_geopackage(str(out))
    run = run_earthdial(
        "detect-many",
        str(a),
        str(b),
        "--list",
        str(listing),
        "--stac",
        str(items),
        *TILING,
        *MANY,
        "-o",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    assert "4 scene(s) on 2 worker(s) (1 CPU each)" in run.stderr
    assert "4 scene(s): 4 run now, 0 done before, 0 failed" in run.stdout
    scenes, merged = by_scene(out)
    assert scenes == archive_dir["expected"]
    assert merged == sorted((f for fs in archive_dir["expected"].values() for f in fs), key=repr)
    check_users_layer(str(out))
    assert not Path(journal.path_for(str(out), "many")).exists()


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 << 20,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


def test_ctrl_c_keeps_finished_scenes_and_resume_runs_only_the_others(
    archive_dir, local_ray, tmp_path, monkeypatch, capsys
) -> None:
    """Ctrl-C while the second scene is being written: both finished scenes are journalled and in the
    GeoPackage, no merged layer yet; `--resume` runs the other two only and ends equal to a whole run."""
    out = tmp_path / "out.gpkg"
    args = ["detect-many", *map(str, archive_dir["paths"]), *TILING, *MANY, "-o", str(out)]
    take, taken = many._take, []

    def take_then_ctrl_c(*a: Any, **kw: Any) -> None:
        take(*a, **kw)
        taken.append(a[3])
        if len(taken) == 2:
            signal.raise_signal(signal.SIGINT)  # arrives while the scene is written: it is finished first

    monkeypatch.setattr(many, "_take", take_then_ctrl_c)
    assert cli.main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted; the 2 finished scene(s) are kept" in err and "--resume" in err
    log = Path(journal.path_for(str(out), "many"))
    assert log.exists() and len(log.read_text().splitlines()) == 3  # the request and two scenes
    assert len(layers(out)) == 2 and not [n for n in layers(out) if "_all_" in n]
    monkeypatch.setattr(many, "_take", take)

    assert cli.main(args) == 1  # without --resume the journal is not overwritten
    assert "pass --resume" in capsys.readouterr().err and log.exists()
    assert cli.main([*args, "--resume"]) == 0
    captured = capsys.readouterr()
    assert "4 scene(s): 2 run now, 2 done before, 0 failed" in captured.out
    assert "resuming: 2 of 4 scene(s) already done" in captured.err
    scenes, merged = by_scene(out)
    assert scenes == archive_dir["expected"]
    assert merged == sorted((f for fs in archive_dir["expected"].values() for f in fs), key=repr)
    assert not log.exists()


def test_a_journalled_scene_whose_layer_never_reached_the_file_is_written_on_resume(
    archive_dir, tmp_path, monkeypatch
) -> None:
    """A kill between a scene's journal line and its layer: resume writes that layer from the journal.
    (The journal and the GeoPackage are what is tested: the worker runs in this process, without Ray.)"""
    out = tmp_path / "out.gpkg"
    args = ["detect-many", *map(str, archive_dir["paths"][:2]), *TILING, *MANY, "-o", str(out)]
    write = scan_job.write_layer

    def killed_before_the_second_layer(path: str, entry: dict[str, Any], resumed: bool = False) -> None:
        if out.exists() and not resumed:
            raise KeyboardInterrupt  # as a kill would, after the scene's journal line was fsynced
        write(path, entry, resumed)

    monkeypatch.setattr(many, "_stream", in_process_stream(many.SceneWorker(str(DEMO_DIR), "cpu", 1)))
    monkeypatch.setattr(scan_job, "write_layer", killed_before_the_second_layer)
    assert cli.main(args) == 130
    assert (
        len(layers(out)) == 1 and len(Path(journal.path_for(str(out), "many")).read_text().splitlines()) == 3
    )
    monkeypatch.setattr(scan_job, "write_layer", write)
    monkeypatch.setattr(many, "_stream", None)  # nothing is left to run
    assert cli.main([*args, "--resume"]) == 0
    scenes, _ = by_scene(out)
    assert scenes == {p: archive_dir["expected"][p] for p in map(str, archive_dir["paths"][:2])}


def test_bad_scenes_get_typed_errors_and_the_others_are_written(
    archive_dir, local_ray, tmp_path, capsys
) -> None:
    good = archive_dir["paths"][0]
    no_crs = tmp_path / "no_crs.tif"
    with rasterio.open(no_crs, "w", driver="GTiff", width=224, height=224, count=3, dtype="uint8") as dst:
        dst.write(np.zeros((3, 224, 224), np.uint8))
    items = stac(
        tmp_path / "items.json",
        [
            item("remote", visual="https://example.com/a.tif"),
            {"type": "Feature", "id": "no-tiff", "assets": {"meta": {"href": "m.xml"}}},
        ],
    )
    out = tmp_path / "out.gpkg"
    code = cli.main(
        [
            "detect-many",
            str(good),
            str(no_crs),
            str(tmp_path / "missing.tif"),
            "--stac",
            str(items),
            *TILING,
            *MANY,
            "-o",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "5 scene(s): 1 run now, 0 done before, 4 failed" in captured.out
    failed = {line.split(" (")[0]: line for line in captured.out.splitlines() if line.startswith("failed: ")}
    assert ": bad_crs: " in failed["failed: no_crs.tif"]
    assert ": file_not_found: " in failed["failed: missing.tif"]
    assert ": forbidden_path: " in failed["failed: remote"] and "no network" in failed["failed: remote"]
    assert ": bad_request: " in failed["failed: no-tiff"] and "--asset" in failed["failed: no-tiff"]
    scenes, merged = by_scene(out)  # the good scene's layer and the merged layer are written all the same
    assert scenes == {str(good): archive_dir["expected"][str(good)]} and merged == scenes[str(good)]
    assert not Path(journal.path_for(str(out), "many")).exists()


def test_stac_items_and_list_files_resolve_to_local_scenes(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    items = stac(
        tmp_path / "sub" / "items.json",
        [
            item("rel", visual="../a.tif", nir="n.tif"),
            item("no-visual", thumbnail="t.png", data="data/b.TIF"),
            item("uri", visual=f"file://{tmp_path}/c%20d.tif"),
            item("s3", visual="s3://bucket/e.tif"),
            {
                "type": "Feature",
                "id": "typed",
                "assets": {"cog": {"href": "cog", "type": "image/tiff; application=geotiff"}},
            },
            {"type": "Feature", "id": "bare"},
        ],
    )
    listing = tmp_path / "sub" / "list.txt"
    listing.write_text(f"# a comment\n\nx.tif\n  {tmp_path}/a.tif  \nhttp://host/y.tif\n")
    found = archive.scenes_of([str(tmp_path / "a.tif")], [str(listing)], [str(items)])
    summary = [(s.name, s.path, s.error.code if s.error else None) for s in found]
    assert summary == [
        ("a.tif", str(tmp_path / "a.tif"), None),  # the list's second line and the STAC's first: run once
        ("x.tif", str(tmp_path / "sub" / "x.tif"), None),
        ("http://host/y.tif", "http://host/y.tif", ErrorCode.FORBIDDEN_PATH),
        ("no-visual", str(tmp_path / "sub" / "data" / "b.TIF"), None),
        ("uri", str(tmp_path / "c d.tif"), None),
        ("s3", "s3://bucket/e.tif", ErrorCode.FORBIDDEN_PATH),
        ("typed", str(tmp_path / "sub" / "cog"), None),
        ("bare", "", ErrorCode.BAD_REQUEST),
    ]
    nir = archive.scenes_of([], [], [str(items)], asset="nir")
    assert nir[0].path == str(tmp_path / "sub" / "n.tif") and nir[1].error.code == ErrorCode.BAD_REQUEST
    for bad, code in ((tmp_path / "none.json", "file_not_found"), (listing, "bad_request")):
        with pytest.raises(EarthDialError) as caught:
            archive.scenes_of([], [], [str(bad)])
        assert caught.value.code == code


def test_outputs_are_refused_before_any_worker_starts(tmp_path: Path, capsys) -> None:
    pytest.importorskip("ray")  # (without it the command stops at its first check: the next test)
    scene = mosaic(tmp_path / "s.tif", 1)
    foreign = tmp_path / "notes.gpkg"
    foreign.write_text("not a GeoPackage")
    for target, code in ((tmp_path / "out.geojson", "bad_request"), (foreign, "foreign_output")):
        assert cli.main(["detect-many", str(scene), *TILING, "-o", str(target)]) == 1
        assert f": {code}: " in capsys.readouterr().err
    assert foreign.read_text() == "not a GeoPackage"
    assert (
        cli.main(["detect-many", str(scene), *TILING, "--task", "caption", "-o", str(tmp_path / "o.gpkg")])
        == 1
    )
    assert "grounded" in capsys.readouterr().err


def test_without_ray_detect_many_says_how_to_install_it(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    scene = mosaic(tmp_path / "s.tif", 1)
    assert cli.main(["detect-many", str(scene), *TILING, "-o", str(tmp_path / "o.gpkg")]) == 1
    err = capsys.readouterr().err
    assert ": missing_dependency: " in err and "pip install 'earthdial-qgis[cluster]'" in err
    assert not (tmp_path / "o.gpkg").exists()


def test_the_runtime_and_the_rest_of_the_cli_never_import_ray() -> None:
    code = (
        "import sys, earthdial.cli.main, earthdial.serving.server, earthdial.jobs.many, earthdial.jobs.archive, earthdial.serving.scan; "
        "earthdial.cli.main.build_parser().parse_args(['detect-many', 'x.tif', '--prompt', 'p', '-o', 'o.gpkg']); "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def in_process_stream(worker: many.SceneWorker):
    """`many._stream` without Ray: the same worker class, called in this process."""

    def stream(job: many.Run, items: list[dict[str, Any]], say: Any) -> Iterator[dict[str, Any]]:
        for it in items:
            result = worker({"index": [it["index"]], "header": [it["header"]]})
            yield {"index": result["index"][0], "result": result["result"][0]}

    return stream


def test_a_model_that_cannot_load_stops_the_run_with_a_typed_error(
    archive_dir, tmp_path, monkeypatch, capsys
) -> None:
    worker = many.SceneWorker(str(tmp_path / "no-model"), "cpu", 1)
    monkeypatch.setattr(many, "_stream", in_process_stream(worker))
    out = tmp_path / "out.gpkg"
    args = ["detect-many", str(archive_dir["paths"][0]), *TILING, "-o", str(out)]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "earthdial detect-many: model_error: cannot load " in err and "no scene was finished" in err, err
    assert not out.exists() and not Path(journal.path_for(str(out), "many")).exists()  # a fresh run may start


def test_the_merged_layer_of_scenes_in_different_crs_is_in_wgs84(tmp_path: Path) -> None:
    def box(x: float, y: float) -> dict[str, Any]:
        ring = [[x, y], [x + 100, y], [x + 100, y + 100], [x, y + 100], [x, y]]
        return {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"label": "ship", "task": "refer", "source": f"{x}"},
        }

    out = tmp_path / "out.gpkg"
    log = journal.Journal.open(journal.path_for(str(out), "many"), {"op": "detect-many"}, False)
    done = {
        0: {"crs": "EPSG:32633", "features": [box(500_000, 4_000_000)]},
        1: {"crs": "EPSG:3857", "features": [box(1_669_792, 4_865_942)]},
    }
    job = many.Run([], "refer", "ships", {}, str(out), "m")
    name = many._write_merged(
        str(out), scan_job.ScanJob(log), done, job, many.datetime.now(many.timezone.utc)
    )
    log.close()
    assert pyogrio.read_info(str(out), layer=name)["crs"] == "EPSG:4326"
    _, _, geoms, _ = pyogrio.raw.read(str(out), layer=name)
    import shapely

    centres = sorted((round(p.x, 2), round(p.y, 2)) for p in shapely.centroid(shapely.from_wkb(geoms)))
    assert centres == [(15.0, 36.15), (15.0, 40.0)]  # 33N: its central meridian 15 E; 3857: 15 E, 40 N
