"""A request's sources are checked once, at admission, into typed values: the same malformed source gets
the same typed error, with one message, whichever op it reaches; the server refuses it before it queues."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from conftest import write_geotiff
from earthdial.contract.wire import PROTOCOL_VERSION, EarthDialError, source_by_reference, source_by_value
from earthdial.serving import requests, server, service

TRANSFORM = [10.0, 0.0, 500_000.0, 0.0, -10.0, 4_000_000.0]


@pytest.fixture()
def tif(tmp_path: Path) -> str:
    path = tmp_path / "rgb.tif"
    return str(write_geotiff(path, np.full((3, 30, 40), 7, np.uint8), transform=Affine(*TRANSFORM)))


def _bad_sources(tif: str) -> dict[str, tuple[dict, list[np.ndarray], str]]:
    """Malformed sources -> (source, array frames, the error code they get)."""
    ref, value, pixels = (
        source_by_reference(tif),
        source_by_value(TRANSFORM, "EPSG:32633"),
        np.zeros((3, 4, 4), np.uint8),
    )
    return {
        "no kind": ({**ref, "kind": None}, [], "bad_request"),
        "a stream to one window": (
            {
                "kind": "stream",
                "width": 4,
                "height": 4,
                "band_count": 3,
                "transform": TRANSFORM,
                "crs": "EPSG:32633",
            },
            [],
            "bad_request",
        ),
        "a path that is no string": ({**ref, "path": 5}, [], "bad_request"),
        "bands that are no ints": ({**ref, "bands": ["red"]}, [], "bad_request"),
        "bands that are no list": ({**ref, "bands": 3}, [], "bad_request"),
        "three bounds": ({**ref, "bounds": [0, 0, 1]}, [], "bad_request"),
        "empty bounds": ({**ref, "bounds": [1, 0, 1, 1]}, [], "bad_request"),
        "a CRS that is no string": ({**ref, "bounds": [0, 0, 1, 1], "crs": 4326}, [], "bad_request"),
        "no transform": ({**value, "transform": None}, [pixels], "bad_request"),
        "a degenerate transform": ({**value, "transform": [0, 0, 0, 0, 0, 0]}, [pixels], "bad_request"),
        "nodata that is text": ({**value, "nodata": "none"}, [pixels], "bad_request"),
        "by value without its frame": (value, [], "missing_frames"),
        "by reference with a frame": (ref, [pixels], "missing_frames"),
    }


def _error(call, *args) -> EarthDialError:
    with pytest.raises(EarthDialError) as err:
        call(*args)
    return err.value


def test_a_malformed_source_gets_one_typed_error_and_message_from_every_op(tif: str) -> None:
    for name, (source, arrays, code) in _bad_sources(tif).items():
        ask = {"op": "ask", "task": "caption", "prompt": "", "source": source}
        errors = {
            "ask": _error(service.run, ask, arrays, None),
            "plan": _error(service.plan, {**ask, "op": "plan"}, arrays, None),
            "georef": _error(service.run, {"op": "georef", "answer": "", "source": source}, arrays, None),
            "admission": _error(server.admit, {"v": PROTOCOL_VERSION, "id": "1", **ask}, arrays),
            "a pair's first": _error(
                service.run,
                {**ask, "sources": [source, source_by_reference(tif)], "source": None},
                arrays,
                None,
            ),
        }
        codes = {op: e.code for op, e in errors.items()}
        assert set(codes.values()) == {code}, (name, codes)
        messages = {op: e.message.replace("sources[0]", "source") for op, e in errors.items()}
        assert len(set(messages.values())) == 1, (name, messages)


def test_the_server_checks_a_request_s_sources_at_admission_and_hands_them_on(tif: str) -> None:
    ask = {"v": PROTOCOL_VERSION, "id": "1", "op": "ask", "task": "caption", "prompt": ""}
    pixels = np.zeros((3, 4, 4), np.uint8)
    admitted = server.admit(
        {
            **ask,
            "sources": [
                source_by_reference(tif, bands=[3, 2, 1]),
                {**source_by_value(TRANSFORM, "EPSG:32633"), "name": "layer"},
            ],
        },
        [pixels],
    )
    assert admitted is not None
    ref, value = admitted.sources
    assert ref == requests.Ref(tif, bands=(3, 2, 1))
    assert isinstance(value, requests.Value) and value.transform == tuple(TRANSFORM) and value.name == "layer"
    with pytest.raises(EarthDialError) as err:  # refused before it is queued, not when the worker reads it
        server.admit({**ask, "source": source_by_value(TRANSFORM, "EPSG:32633")}, [])
    assert err.value.code == "missing_frames"
    stream = {"kind": "stream", "width": 8, "height": 8, "band_count": 3, "transform": TRANSFORM, "crs": ""}
    with pytest.raises(EarthDialError) as err:
        server.admit({**ask, "op": "detect", "task": "refer", "prompt": "ships", "source": stream}, [])
    assert err.value.code == "bad_crs"
    with pytest.raises(EarthDialError) as err:  # a change scan's layers: 2 to 8
        server.admit(
            {
                **ask,
                "op": "detect_changes",
                "task": "change",
                "source": {**stream, "crs": "EPSG:32633", "layers": ["only one"]},
            },
            [],
        )
    assert err.value.code == "bad_request" and "2 to 8 layers" in err.value.message
