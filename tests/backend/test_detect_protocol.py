"""Whole scenes over the protocol: the streaming detect / detect_changes ops, events small enough for any
frame limit, cancel, tiles streamed by value, resume, and typed errors with the server still serving."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import rasterio
from rasterio.transform import from_origin

from conftest import (
    EARTHDIAL,
    TILES_224,
    demo_model_args,
    free_port,
    run_earthdial,
    serving,
    start_server,
    stop_server,
    write_geotiff,
)
from earthdial.contract import wire
from earthdial.contract.client import Client
from earthdial.contract.wire import MAX_HEADER_BYTES, EarthDialError, source_by_reference
from earthdial.demo import synthetic
from earthdial.jobs import journal
from earthdial.model.engine import Engine
from earthdial.model.scoring import Answer
from earthdial.serving.server import Server
from earthdial.training import DEMO_DIR


def write(
    path: Path, data: np.ndarray, crs: str | None = "EPSG:32633", x0: float = 500_000, px: float = 1
) -> Path:
    return write_geotiff(path, data, crs=crs, transform=from_origin(x0, 4_000_000, px, px))


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    data = (np.random.default_rng(5).random((3, 400, 600)) * 255).astype(np.uint8)
    return write(tmp_path_factory.mktemp("scenes") / "scene.tif", data)


def mosaic(path: Path, n: int = 3, size: int = 224, seed: int = 7) -> Path:
    """n x n synthetic demo scenes side by side: a multi-tile layer with objects the demo model knows."""
    rows = [
        np.concatenate(
            [synthetic.render(synthetic.make_scene(seed, r * n + c), size) for c in range(n)], axis=2
        )
        for r in range(n)
    ]
    return synthetic.write_geotiff(path, np.concatenate(rows, axis=1))


def _header(path: Path, **options: Any) -> dict:
    return {
        "op": "detect",
        "task": "refer",
        "prompt": "ships",
        "source": source_by_reference(str(path)),
        "options": {"tile_size": 224, "overlap": 0.1, "batch": 2, **options},
    }


def test_detect_streams_the_plan_then_progress_then_merged_chunks(server: str, scene: Path) -> None:
    events: list[dict] = []
    with Client(server, timeout_s=120) as c:
        reply = c.scan(_header(scene), on_event=events.append)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "plan" and events[0]["plan"]["tiles"] == 6  # 3 x 2 tiles of 224 px over 600 x 400
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["done"] for e in progress] == [2, 4, 6] and reply["tiles"] == 6
    assert sorted(t["index"] for e in progress for t in e["tiles"]) == list(range(6))
    assert reply["crs"] == "EPSG:32633" and reply["boxes"] == sum(
        len(e["features"]) for e in events if e["event"] == "merged"
    )


def test_cancelling_a_scan_stops_it_within_a_batch_and_the_next_request_is_answered_at_once(
    server: str, scene: Path
) -> None:
    events: list[int] = []
    with Client(server, timeout_s=120) as c:
        with pytest.raises(EarthDialError) as err:
            c.scan(
                _header(scene, batch=1),
                on_event=lambda ev: ev["event"] == "progress" and events.append(ev["done"]),
                cancelled=lambda: len(events) >= 1,
            )
        assert err.value.code == "cancelled"
        t = time.monotonic()
        assert c.ping(timeout_s=10)["pong"] and c.status()["protocol"] == 1
        assert time.monotonic() - t < 5  # answered by the loop while the worker drops the scan
        # the worker is free again: an ask goes through
        ask = c.ask(
            source_by_reference(str(scene), bounds=[500_000, 3_999_800, 500_200, 4_000_000]),
            "ships",
            task="refer",
        )
        assert ask["ok"]
    assert len(events) == 1


def test_an_ask_during_a_long_scan_is_answered_within_two_of_its_batches(server: str, tmp_path: Path) -> None:
    """A 600-tile scan shares the model: another client's ask waits for the scan's batch in progress,
    not for the scene (before, the scan held the worker to its end). The scan is cancelled afterwards,
    so the test costs a few batches."""
    scene = write(
        tmp_path / "big.tif", (np.random.default_rng(2).random((3, 640, 960)) * 255).astype(np.uint8)
    )
    header = _header(scene, tile_size=32, overlap=0.0, batch=4)  # 20 x 30 = 600 tiles
    seen: list[int] = []
    started, stop = threading.Event(), threading.Event()
    outcome: list[Any] = []

    def on_event(event: dict) -> None:
        if event["event"] == "progress":
            seen.append(event["done"])
            started.set()

    def scanning() -> None:
        with Client(server, timeout_s=300) as a:
            try:
                outcome.append(a.scan(header, on_event=on_event, cancelled=stop.is_set))
            except EarthDialError as exc:
                outcome.append(exc.code)

    thread = threading.Thread(target=scanning)
    thread.start()
    try:
        assert started.wait(120), "the scan sent no progress"
        before = seen[-1]
        with Client(server, timeout_s=120) as b:
            reply = b.ask(
                source_by_reference(str(scene), bounds=[500_000, 3_999_900, 500_100, 4_000_000]),
                "ships",
                task="refer",
            )
        after = seen[-1]
    finally:
        stop.set()
        thread.join(120)
    assert reply["ok"] and isinstance(reply["answer"], str)
    assert after - before <= 2 * 4, f"the ask waited for {after - before} tiles of the scan"
    assert outcome == ["cancelled"] and after < 600  # the scan was still running when the ask came back


def test_two_scans_take_turns_batch_by_batch(server: str, tmp_path: Path) -> None:
    """A second client's scan starts while the first is running, and progresses before the first ends."""
    scene = write(
        tmp_path / "two.tif", (np.random.default_rng(3).random((3, 320, 640)) * 255).astype(np.uint8)
    )
    order: list[str] = []
    first_started = threading.Event()

    def run(name: str, tiles: int) -> None:
        def on_event(event: dict) -> None:
            if event["event"] == "progress":
                order.append(name)
                first_started.set()

        header = _header(scene, tile_size=32, overlap=0.0, batch=4)
        header["source"] = source_by_reference(
            str(scene), bounds=[500_000, 4_000_000 - 32, 500_000 + 32 * tiles, 4_000_000]
        )
        with Client(server, timeout_s=300) as c:
            assert c.scan(header, on_event=on_event)["tiles"] == tiles

    a = threading.Thread(target=run, args=("a", 20))  # 20 tiles in one row: 5 batches
    a.start()
    assert first_started.wait(120)
    run("b", 8)  # 2 batches, asked while a is running
    a.join(120)
    assert order.count("a") == 5 and order.count("b") == 2
    assert order.index("b") < len(order) - 1 - order[::-1].index("a")  # b progressed before a finished


class ManyBoxes:
    """The real tiny engine (vision path, tags) answering every tile with a 32 x 32 grid of boxes, so
    that a scan produces more than any frame limit could carry in one reply."""

    def __init__(self, engine: Engine) -> None:
        self.inner, self.info = engine, engine.info
        text = "".join(
            f"[[{3 * c}, {3 * r}, {3 * c + 2}, {3 * r + 2}, 0]]" for r in range(32) for c in range(32)
        )
        self.answer = "<ref>ship</ref><box>" + text + "</box>"

    def image(self, *a: Any, **k: Any) -> Any:
        return self.inner.image(*a, **k)

    def check_tags(self, text: str) -> None:
        self.inner.check_tags(text)

    def generate(self, queries: list) -> list[str]:
        return [Answer(self.answer) for _ in queries]


def test_a_scan_of_20000_boxes_arrives_whole_in_events_within_the_frame_limit(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    path = write(tmp_path / "wide.tif", np.zeros((3, 224, 224 * 20), np.uint8) + 80)
    engine = ManyBoxes(Engine(str(tiny_checkpoint), device="cpu"))
    server = Server(engine, f"tcp://127.0.0.1:{free_port()}", allowed_dirs=[str(tmp_path)])
    sizes: list[int] = []
    got: dict[str, list] = {"progress": [], "merged": []}

    def on_event(ev: dict) -> None:
        sizes.append(len(wire.encode(ev)[0]))
        if ev["event"] in got:
            got[ev["event"]] += ev["features"]

    with serving(server) as endpoint, Client(endpoint, timeout_s=120) as c:
        reply = c.scan(_header(path, overlap=0, batch=8), on_event=on_event)
    assert reply["tiles"] == 20 and reply["raw_boxes"] == 20 * 1024 == len(got["progress"])
    assert reply["boxes"] == 20 * 1024 == len(got["merged"])  # no two boxes overlap: all kept
    assert max(sizes) < MAX_HEADER_BYTES  # every event fits where the whole reply (megabytes) would not
    assert sum(sizes) > 5 * MAX_HEADER_BYTES


def _stream_header(path: Path) -> dict:
    with rasterio.open(path) as src:
        source = {"kind": "stream", "width": src.width, "height": src.height, "band_count": src.count,
                  "transform": list(src.transform)[:6], "crs": src.crs.to_string(), "dtype": "uint8",
                  "name": "memory layer"}  # fmt: skip
    header = _header(path)
    header["source"] = source
    return header


def _read_like_the_backend(path: Path):
    src = rasterio.open(path)

    def read_tile(index: int, window: tuple, shape: tuple) -> np.ndarray:
        return src.read(
            [1, 2, 3],
            window=rasterio.windows.Window(*window),
            out_shape=(3, shape[1], shape[0]),
            resampling=rasterio.enums.Resampling.average,
        )

    return src, read_tile


def _merged(c: Client, header: dict, read_tile=None) -> tuple[dict, list[dict], list[dict]]:
    events: list[dict] = []
    reply = c.scan(header, read_tile=read_tile, on_event=events.append)
    merged = [f for e in events if e["event"] == "merged" for f in e["features"]]
    return reply, merged, events


def test_a_layer_streamed_by_value_scans_with_the_same_tiles_and_merge_as_the_file(tmp_path: Path) -> None:
    path = mosaic(tmp_path / "mosaic.tif", n=2)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(DEMO_DIR, endpoint)
    try:
        with Client(endpoint, timeout_s=120) as c:
            by_file, merged_file, ev_file = _merged(c, _header(path))
            src, read_tile = _read_like_the_backend(path)
            with src:
                by_value, merged_value, ev_value = _merged(c, _stream_header(path), read_tile)
            assert c.status()["protocol"] == 1
    finally:
        stop_server(proc)
    assert ev_file[0]["plan"] == ev_value[0]["plan"] and by_file["tiles"] == by_value["tiles"] == 9

    def strip(fs):
        return [
            (f["geometry"], f["properties"]["label"], f["properties"]["score"], f["properties"]["tile"])
            for f in fs
        ]

    assert merged_file and strip(merged_file) == strip(merged_value)
    assert by_value["raw_boxes"] == by_file["raw_boxes"] > by_value["boxes"]  # overlapping tiles merged


def _gpkg(path: Path, layer: str | None = None) -> list[tuple]:
    meta, _, geoms, fields = pyogrio.raw.read(str(path), layer=layer)
    names = list(meta["fields"])
    return sorted(
        zip(
            [bytes(g) for g in geoms],
            *(fields[names.index(n)] for n in ("label", "tile", "score", "answer")),
            strict=True,
        )
    )


def _scan_args(path: Path, *flags: str) -> list[str]:
    """`earthdial detect` of ships in 224 px tiles, two a batch, on `path`."""
    return ["detect", str(path), "--prompt", "ships", "--tile-size", "224", "--batch", "2", *flags]


def test_a_refused_cli_scan_leaves_no_journal_and_the_next_run_starts_afresh(tmp_path: Path) -> None:
    """A scan refused before any tile finished (here a tile size out of range) keeps nothing to resume: no
    journal is left beside the output, so the corrected command runs without --resume or a file to delete."""
    path = mosaic(tmp_path / "mosaic.tif", n=1)
    out = tmp_path / "out.gpkg"
    log = Path(journal.path_for(str(out)))
    refused = run_earthdial(
        "detect", str(path), "--prompt", "ships", "--tile-size", "16", "-o", str(out), *demo_model_args()
    )
    assert refused.returncode == 1 and "bad_request" in refused.stderr, refused.stderr
    assert not log.exists() and not out.exists()
    again = run_earthdial(*_scan_args(path, *demo_model_args()), "-o", str(out))
    assert again.returncode == 0, again.stderr
    assert out.exists() and not log.exists()


def test_an_interrupted_cli_scan_resumes_skipping_done_tiles_and_equals_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    path = mosaic(tmp_path / "mosaic.tif", n=3)
    base = _scan_args(path, *demo_model_args())
    whole = tmp_path / "whole.gpkg"
    run = run_earthdial(*base, "-o", str(whole))
    assert run.returncode == 0, run.stderr
    cut = tmp_path / "cut.gpkg"
    log = Path(journal.path_for(str(cut)))
    proc = subprocess.Popen(
        [*EARTHDIAL, *base, "-o", str(cut)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.exists() or log.read_text().count("\n") < 3):
        time.sleep(0.05)  # waiting on state: two batches journalled
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert not cut.exists() and log.exists() and "--resume" in err
    done_before = _tiles_in(log)
    assert 4 <= done_before < 16
    resumed = run_earthdial(*base, "-o", str(cut), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{16 - done_before} run now, {done_before} done before" in resumed.stdout
    assert not log.exists()
    assert _gpkg(cut) == _gpkg(whole) and len(_gpkg(whole)) > 0


def _tiles_in(log: Path) -> int:
    import json

    lines = log.read_text().split("\n")[1:-1]  # after the request line, each whole line is an event
    return sum(len(json.loads(line)["tiles"]) for line in lines)


def test_a_server_restart_leaves_a_resumable_scan(tmp_path: Path) -> None:
    path = mosaic(tmp_path / "mosaic.tif", n=3, seed=8)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    out = tmp_path / "out.gpkg"
    log = Path(journal.path_for(str(out)))
    cmd = _scan_args(path, "--endpoint", endpoint, "--timeout", "60", "-o", str(out))
    server = start_server(DEMO_DIR, endpoint)
    proc = subprocess.Popen([*EARTHDIAL, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.exists() or log.read_text().count("\n") < 2):
        time.sleep(0.05)
    stop_server(server)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and log.exists() and "--resume" in err and not out.exists()
    server = start_server(DEMO_DIR, endpoint)
    try:
        resumed = run_earthdial(*cmd, "--resume")
    finally:
        stop_server(server)
    assert resumed.returncode == 0, resumed.stderr
    assert "done before" in resumed.stdout and " 0 done before" not in resumed.stdout
    assert out.exists() and not log.exists()


def test_detect_changes_cli_writes_merged_change_boxes_and_a_tile_change_map(tmp_path: Path) -> None:
    pairs = [synthetic.make_pair(11, i) for i in range(4)]
    before = np.concatenate([synthetic.render(p.before, 224) for p in pairs], axis=2)
    after = np.concatenate([synthetic.render(p.after, 224) for p in pairs], axis=2)
    a = synthetic.write_geotiff(tmp_path / "before.tif", before)
    b = synthetic.write_geotiff(tmp_path / "after.tif", after)
    out = tmp_path / "changes.gpkg"
    run = run_earthdial(
        "detect-changes",
        str(a),
        str(b),
        *TILES_224,
        *demo_model_args(),
        "-o",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    layers = [name for name, _ in pyogrio.list_layers(str(out))]
    (tiles_layer,) = [n for n in layers if n.endswith("_tiles")]
    (boxes_layer,) = [n for n in layers if n != tiles_layer]
    tiles = _gpkg(out, tiles_layer)
    assert len(tiles) == 4
    truth = ["changed" if p.changed else "unchanged" for p in pairs]
    assert [t[1] for t in sorted(tiles, key=lambda t: int(t[2]))] == truth  # the demo model is right here
    boxes = _gpkg(out, boxes_layer)
    assert all(" appeared" in b[1] or " disappeared" in b[1] for b in boxes)
    assert len(boxes) >= sum(1 for p in pairs if p.changed)


def test_a_sequence_streamed_by_value_detects_the_same_changes_as_the_files(tmp_path: Path) -> None:
    """BEFORE AFTER LATER read by the client on one grid and streamed (a web or memory layer's way) give
    the tile plan, per-tile answers and merged change boxes of the same files read by the backend. Tiles
    of 112 px are read at the demo model's 112 px, so both ways see the same pixels; a batch of 3 over 4
    tiles a pair makes the client send a later pair's tiles while the pair before is still asked about."""
    pairs = [synthetic.make_pair(11, i) for i in range(4)]
    layers = [
        np.concatenate([synthetic.render(getattr(p, side), 112) for p in pairs], axis=2)
        for side in ("before", "after", "before")
    ]
    paths = [synthetic.write_geotiff(tmp_path / f"t{k}.tif", data) for k, data in enumerate(layers)]
    options = {"tile_size": 112, "overlap": 0.0, "batch": 3}
    by_ref = {
        "op": "detect_changes",
        "task": "change",
        "sources": [source_by_reference(str(p)) for p in paths],
        "options": options,
    }
    with rasterio.open(paths[0]) as src:
        grid = {"kind": "stream", "width": src.width, "height": src.height, "band_count": 3, "dtype": "uint8",
                "transform": list(src.transform)[:6], "crs": src.crs.to_string(),
                "layers": ["before (web)", "after (web)", "later (web)"]}  # fmt: skip
    streamed = {"op": "detect_changes", "task": "change", "source": grid, "options": options}
    read: list[int] = []

    def read_tile(index: int, window: tuple, shape: tuple) -> np.ndarray:
        k = index // 4  # pair k: layers k and k + 1
        read.append(index)
        col, row, w, h = window
        return np.concatenate([data[:, row : row + h, col : col + w] for data in layers[k : k + 2]])

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(DEMO_DIR, endpoint)
    try:
        with Client(endpoint, timeout_s=120) as c:
            ref_reply, ref_merged, ref_events = _merged(c, by_ref)
            val_reply, val_merged, val_events = _merged(c, streamed, read_tile)
    finally:
        stop_server(proc)

    def tiles(events: list[dict]) -> list[tuple]:
        return sorted(
            (t["index"], t["pair"], t["answer"], t["changed"])
            for e in events
            if e["event"] == "progress"
            for t in e["tiles"]
        )

    assert ref_reply["tiles"] == val_reply["tiles"] == 8 and sorted(read) == list(range(8))
    assert ref_events[0]["plan"] == val_events[0]["plan"]
    ref_tiles, val_tiles = tiles(ref_events), tiles(val_events)
    assert [t[0] for t in val_tiles] == list(range(8)) and [t[2:] for t in val_tiles] == [
        t[2:] for t in ref_tiles
    ]
    assert any(t[3] for t in val_tiles) and not all(t[3] for t in val_tiles)  # the answers tell pairs apart
    assert [t[1] for t in val_tiles] == ["before (web) -> after (web)"] * 4 + [
        "after (web) -> later (web)"
    ] * 4

    def boxes(merged: list[dict]) -> list[tuple]:
        return sorted(
            (f["properties"]["tile"], f["properties"]["label"], str(f["geometry"]["coordinates"]))
            for f in merged
        )

    assert boxes(val_merged) == boxes(ref_merged)


def test_bad_scans_get_typed_errors_and_the_server_keeps_serving(
    server: str, scene: Path, tmp_path: Path
) -> None:
    far = write(tmp_path / "far.tif", np.zeros((3, 50, 50), np.uint8), x0=900_000)
    no_crs = write(tmp_path / "nocrs.tif", np.zeros((3, 300, 300), np.uint8), crs=None)
    four = write(tmp_path / "four.tif", np.zeros((4, 400, 600), np.uint8))

    def pair(*ps: Path) -> dict:
        return {
            "op": "detect_changes",
            "task": "change",
            "sources": [source_by_reference(str(p)) for p in ps],
            "options": {"tile_size": 224},
        }

    def streamed_pair(layers: list[str], crs: str = "EPSG:32633") -> dict:
        grid = {
            "kind": "stream",
            "width": 448,
            "height": 224,
            "band_count": 3,
            "transform": [1, 0, 500_000, 0, -1, 4_000_000],
            "crs": crs,
            "layers": layers,
        }
        return {"op": "detect_changes", "task": "change", "source": grid, "options": {"tile_size": 224}}

    cases = [
        (_header(scene, tile_size=8), "bad_request"),
        (_header(scene, tile_size=100_000), "bad_request"),
        (_header(scene, overlap=0.95), "bad_request"),
        (_header(scene, overlap=-0.1), "bad_request"),
        (_header(no_crs), "bad_crs"),
        (pair(scene, far), "no_overlap"),
        (pair(scene, no_crs), "bad_crs"),
        (pair(scene, scene, four), "band_out_of_range"),
        (streamed_pair(["only one"]), "bad_request"),
        (streamed_pair(["a", "b"], crs=""), "bad_crs"),
    ]
    with Client(server, timeout_s=60) as c:
        for header, code in cases:
            with pytest.raises(EarthDialError) as err:
                c.scan(header)
            assert err.value.code == code, (header, err.value.message)
            assert c.status()["protocol"] == 1
