"""A stopped scan resumed over the protocol: `detect` with `options.skip` and the stopped scan's
tiles and boxes (`earlier`, one JSON frame) merges the whole scene exactly as an uninterrupted scan does,
and earlier boxes that are not the scan's are refused at admission with typed errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from conftest import free_port, start_server, stop_server
from earthdial.contract.client import Client
from earthdial.contract.wire import EarthDialError, json_frame, source_by_reference
from earthdial.demo import synthetic
from earthdial.training import DEMO_DIR


@pytest.fixture(scope="module")
def demo_server() -> Iterator[str]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(DEMO_DIR, endpoint)
    yield endpoint
    stop_server(proc)


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 x 3 demo scenes of 224 px: 16 tiles of 224 px at 10 % overlap, objects cut by the seams."""
    n, size = 3, 224
    rows = [
        np.concatenate([synthetic.render(synthetic.make_scene(7, r * n + c), size) for c in range(n)], axis=2)
        for r in range(n)
    ]
    return synthetic.write_geotiff(
        tmp_path_factory.mktemp("resume") / "mosaic.tif", np.concatenate(rows, axis=1)
    )


def _header(path: Path, tile_size: int = 224, **options: Any) -> dict[str, Any]:
    return {
        "op": "detect",
        "task": "refer",
        "prompt": "ships",
        "source": source_by_reference(str(path)),
        "options": {"tile_size": tile_size, "overlap": 0.1, "batch": 2, **options},
    }


def _boxes(features: list[dict[str, Any]]) -> list[tuple]:
    """What the merge decides: each box's place, label, score and tile (not when it was found)."""
    return sorted(
        (
            json.dumps(f["geometry"]),
            f["properties"]["label"],
            f["properties"]["score"],
            f["properties"]["tile"],
        )
        for f in features
    )


def _stopped(
    c: Client, header: dict[str, Any], after: int, **scan: Any
) -> tuple[dict[int, dict], list[dict]]:
    """A scan cancelled once `after` tiles have finished: the tiles and boxes its progress events gave.
    `scan`: more arguments of Client.scan (a streamed layer's read_tile)."""
    tiles: dict[int, dict] = {}
    features: list[dict] = []

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "progress":
            tiles.update({t["index"]: t for t in event["tiles"]})
            features.extend(event["features"])

    with pytest.raises(EarthDialError) as err:
        c.scan(header, on_event=on_event, cancelled=lambda: len(tiles) >= after, **scan)
    assert err.value.code == "cancelled"
    return tiles, features


def test_a_stopped_scan_resumed_with_its_earlier_boxes_merges_as_an_uninterrupted_scan(
    demo_server: str, mosaic: Path
) -> None:
    with Client(demo_server, timeout_s=300) as c:
        events: list[dict] = []
        whole = c.scan(_header(mosaic), on_event=events.append)
        merged_whole = [f for e in events if e["event"] == "merged" for f in e["features"]]

        tiles, features = _stopped(c, _header(mosaic), after=4)
        assert 4 <= len(tiles) < 16 and features

        events = []
        resumed = c.scan(
            _header(mosaic, skip=sorted(tiles)),
            on_event=events.append,
            earlier={"tiles": list(tiles.values()), "features": features},
        )
    merged = [f for e in events if e["event"] == "merged" for f in e["features"]]
    scanned = [t["index"] for e in events if e["event"] == "progress" for t in e["tiles"]]
    assert sorted(scanned) == sorted(set(range(16)) - set(tiles))  # no tile scanned twice
    assert resumed["tiles_skipped"] == len(tiles) and resumed["tiles_done"] == 16 - len(tiles)
    assert resumed["raw_boxes"] == whole["raw_boxes"] > whole["boxes"]  # overlapping tiles were merged
    assert merged_whole and _boxes(merged) == _boxes(merged_whole)


def test_a_streamed_scan_resumes_too(demo_server: str, mosaic: Path) -> None:
    """A layer the backend cannot read (tiles sent by value) resumes the same way: the skipped tiles are
    neither asked for nor sent, and the merge equals the uninterrupted scan's."""
    with rasterio.open(mosaic) as src:
        source = {"kind": "stream", "width": src.width, "height": src.height, "band_count": src.count,
                  "transform": list(src.transform)[:6], "crs": src.crs.to_string(), "dtype": "uint8",
                  "name": "memory layer"}  # fmt: skip
        sent: list[int] = []

        def read_tile(index: int, window: tuple, shape: tuple) -> np.ndarray:
            sent.append(index)
            return src.read(
                [1, 2, 3],
                window=Window(*window),
                out_shape=(3, shape[1], shape[0]),
                resampling=Resampling.average,
            )

        def header(**options: Any) -> dict[str, Any]:
            return {**_header(mosaic, **options), "source": source}

        with Client(demo_server, timeout_s=300) as c:
            events: list[dict] = []
            c.scan(header(), read_tile=read_tile, on_event=events.append)
            whole = [f for e in events if e["event"] == "merged" for f in e["features"]]
            tiles, features = _stopped(c, header(), 4, read_tile=read_tile)
            sent.clear()
            events = []
            c.scan(
                header(skip=sorted(tiles)),
                read_tile=read_tile,
                on_event=events.append,
                earlier={"tiles": list(tiles.values()), "features": features},
            )
    assert sorted(sent) == sorted(set(range(16)) - set(tiles))  # the done tiles were not even read
    merged = [f for e in events if e["event"] == "merged" for f in e["features"]]
    assert whole and _boxes(merged) == _boxes(whole)


def test_earlier_boxes_that_are_not_the_scans_are_refused_with_typed_errors(
    demo_server: str, mosaic: Path
) -> None:
    with Client(demo_server, timeout_s=300) as c:
        tiles, features = _stopped(c, _header(mosaic, batch=1), after=2)
        skip = sorted(tiles)
        earlier = {"tiles": list(tiles.values()), "features": features}

        def refused(header: dict[str, Any], frame: Any) -> EarthDialError:
            header = {**header, "earlier": True}
            with pytest.raises(EarthDialError) as err:
                c.request(header, [frame] if frame is not None else [], timeout_s=60)
            return err.value

        # skip and earlier tiles disagree: some tile's boxes would be missing from the merge
        err = refused(_header(mosaic, skip=skip[:-1]), json_frame(earlier))
        assert err.code == "bad_request" and "exactly the earlier tiles" in err.message
        # a box of a tile that was not finished
        stray = {
            **earlier,
            "features": [{**features[0], "properties": {**features[0]["properties"], "tile": 15}}],
        }
        err = refused(_header(mosaic, skip=skip), json_frame(stray))
        assert err.code == "bad_request" and "properties.tile" in err.message
        # a box without the merge's fields (what a layer's features would be)
        bare = {**earlier, "features": [{**features[0], "properties": {"label": "ship", "tile": skip[0]}}]}
        err = refused(_header(mosaic, skip=skip), json_frame(bare))
        assert err.code == "bad_request" and "order" in err.message
        err = refused(_header(mosaic, skip=skip), np.frombuffer(b"{not json", dtype=np.uint8).reshape(1, -1))
        assert err.code == "bad_request" and "not UTF-8 JSON" in err.message
        assert refused(_header(mosaic, skip=skip), None).code == "missing_frames"
        err = refused(_header(mosaic, skip=skip, merge=False), json_frame(earlier))
        assert err.code == "bad_request" and "merge" in err.message
        # another tiling: the earlier tiles do not lie where this scan's do
        with pytest.raises(EarthDialError) as other:
            c.scan(_header(mosaic, tile_size=200, skip=skip), earlier=earlier)
        assert other.value.code == "bad_request" and "changed" in other.value.message
        assert c.ping()["pong"]  # the server goes on serving
