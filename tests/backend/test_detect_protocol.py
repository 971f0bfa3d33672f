"""Whole-scene detect over the protocol: progress events, the final reply, and cancelling mid-scene."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from earthdial.protocol import Client, EarthDialError, source_by_reference


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scenes") / "scene.tif"
    data = (np.random.default_rng(5).random((3, 400, 600)) * 255).astype(np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=600, height=400, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500_000, 4_000_000, 1, 1)) as dst:  # fmt: skip
        dst.write(data)
    return path


def _header(path: Path, **options) -> dict:
    return {"op": "detect", "task": "refer", "prompt": "ships", "source": source_by_reference(str(path)),
            "options": {"tile_size": 224, "overlap": 0.1, "batch": 2, **options}}  # fmt: skip


def test_detect_streams_progress_then_the_merged_features(server: str, scene: Path) -> None:
    events: list[tuple[int, int]] = []
    with Client(server, timeout_s=120) as c:
        reply = c.request(_header(scene), progress=lambda ev: events.append((ev["done"], ev["total"]))).header
    total = reply["tiles"]
    assert total == 6  # 3 x 2 tiles of 224 px over 600 x 400
    assert events == [(2, 6), (4, 6), (6, 6)]
    assert reply["features"]["crs"] == "EPSG:32633"


def test_cancelling_a_scene_stops_it_within_a_batch_and_the_server_goes_on(server: str, scene: Path) -> None:
    events: list[int] = []
    with Client(server, timeout_s=120) as c:
        with pytest.raises(EarthDialError) as err:
            c.request(_header(scene, batch=1), progress=lambda ev: events.append(ev["done"]),
                      cancelled=lambda: len(events) >= 1)  # fmt: skip
        assert err.value.code == "cancelled"
        assert c.status()["protocol"] == 1  # the next request is served
    assert len(events) == 1


def test_detect_needs_a_file_by_reference(server: str) -> None:
    header = {
        "op": "detect",
        "prompt": "ships",
        "source": {"kind": "value", "transform": [1, 0, 0, 0, -1, 0]},
    }
    with Client(server, timeout_s=30) as c, pytest.raises(EarthDialError) as err:
        c.request(header, [np.zeros((3, 8, 8), np.uint8)])
    assert err.value.code == "bad_request"


def test_cli_detect_over_the_protocol_writes_a_geopackage(server: str, scene: Path, tmp_path: Path) -> None:
    out = tmp_path / "found.gpkg"
    proc = subprocess.run([sys.executable, "-m", "earthdial.cli", "detect", str(scene), "--prompt", "ships",
                           "--tile-size", "224", "--endpoint", server, "-o", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "6 tiles" in proc.stdout and out.exists()
