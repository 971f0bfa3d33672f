"""Fuzzing every path the protocol accepts, from random bytes to nearly-valid requests.

In-process (over 10 000 messages): protocol.decode, the server's admission checks and service.prepare +
finish, with no model (a valid `ask` ends in model_error after its pixels were read). Over ZeroMQ
(hundreds): the same kinds of messages against a real `earthdial serve --no-model` process. Every
message must end in a reply or a typed error whose code is an ErrorCode (and not `internal`, which
would be a bug); nothing else may escape, and the server must go on answering.

Every generator also makes hostile input: PROJ strings and WKT/PROJJSON naming grid files as
CRSs, FIFOs, directories, VRTs (one named .tif), hard links and a 200 000 x 200 000 px sparse raster as
paths, lone surrogates in paths and prompts, band lists of hundreds, `detect` requests with bounds of the
wrong type; each must end in a typed error within the per-message wait (a FIFO or grid file opened
would block the server for good).

Derandomized, so CI sees the same messages every run; no deadline; bounded example counts. Three
generators: hypothesis strategies for the request grammar, seeded mutations of valid requests (cheap to
generate, so they carry most of the count and reach deep paths), and raw frames.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import struct
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    dealer,
    free_port,
    geotiff,
    grid_outside,
    sparse_geotiff,
    start_server,
    stop_server,
    write_geotiff,
)
from earthdial.contract.client import Client
from earthdial.contract.wire import (
    ALLOWED_DTYPES,
    OPS,
    EarthDialError,
    ErrorCode,
    decode,
    encode,
    error_reply,
    ok_reply,
)
from earthdial.geo import file_access
from earthdial.serving import requests, service
from earthdial.serving.scheduling import Pending
from earthdial.serving.server import Server, _encode_reply, admit

CODES = {v for k, v in vars(ErrorCode).items() if k.isupper()}
# hypothesis examples per test; raw, mutant and pixel examples carry several messages each, to spread
# hypothesis's own cost per example: 800*3 + 400 + 1500*4 + 700*2 = 10 200 messages in-process
N_RAW, N_GRAMMAR, N_MUTANTS, N_ARRAYS, N_SERVER = 800, 400, 1500, 700, 300
PER_RAW, PER_MUTANT, PER_PIXELS = 3, 4, 2
TASKS = ["chat", "caption", "vqa", "classify", "grounding", "refer", "identify", "change", "methane", "nope"]
SENSORS = ["[hr_rgb_0.5]", "[s2_ms_10]", "[s1_vh_10]", "[bogus]"]
ANSWERS = [
    "",
    "<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box>",
    "<box>[[0,0,100,100,90]]</box>",
    "<box>[[1e308, -5, 3, 4, 720]]</box>",
    "<ref>a</ref><box>[[1,2,3]]</box><box>",
    "[[5, 5, 95, 95]]",
]
PROJ_CRS = ["+proj=longlat +ellps=WGS84 +nadgrids=/dev/stdin +type=crs", "+init=epsg:4326",
            'GEOGCS["x",DATUM["d",SPHEROID["s",6378137,298.25]],EXTENSION["PROJ4","+proj=longlat +nadgrids=/dev/stdin"]]',
            '{"type": "BoundCRS", "transformation": {"parameters": [{"name": "f", "value": "/dev/stdin"}]}}',
            "/dev/stdin", "proj=longlat"]  # fmt: skip
NASTY: list[Any] = [None, True, False, 0, -1, 1, 3, 2**63, -(2**63), 2**100, 1e308, -1e308, 5e-324, 0.5, "",
                    "x" * 3000, "<image>", "../../../../etc/passwd", "\x00", "EPSG:999999", "EPSG:4326", [], {},
                    [[[]]], [1, 2, 3, 4], [0] * 6, {"kind": "ref"}, {"kind": "value"}, ["a", "b"],
                    *PROJ_CRS, "\ud800", "ships \udfff", "/tmp/\udcff.tif", [1] * 600, ["a", 1, 2, 3],
                    [None, 0, 1, 1], [float("inf"), 0, 1, 1]]  # fmt: skip
ANSWER_MANY = "<ref>a</ref>" + "<box>[[1,2,30,40,0]]</box>" * 2000  # a reply of ~100 MiB if it were built
TRANSFORM = [10.0, 0.0, 500_000.0, 0.0, -10.0, 4_000_000.0]
COUNTS: dict[str, int] = {}


def fuzz(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


# --------------------------------------------------------------------------------------------------
# Files a by-reference source may name: rasters, non-rasters, links and paths out of the allowed dir
# --------------------------------------------------------------------------------------------------


def _tif(path: Path, data: np.ndarray, crs: str | None = "EPSG:32633") -> str:
    return str(write_geotiff(path, data, crs=crs, px=10))


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    outside_dir = Path(tempfile.mkdtemp(prefix="earthdial-fuzz-outside-"))
    outside = _tif(outside_dir / "outside.tif", np.zeros((3, 8, 8), np.uint8))
    (root / "text.tif").write_text("not a raster")
    (root / "adir").mkdir()
    (root / "link-out.tif").symlink_to(outside)
    os.mkfifo(root / "fifo.tif")  # opened for reading, it would block for good
    os.link(outside, root / "hard.tif")
    (root / "vrt.tif").write_text(
        f'<VRTDataset rasterXSize="8" rasterYSize="8"><VRTRasterBand dataType="Byte" band="1">'
        f"<SimpleSource><SourceFilename>{outside}</SourceFilename><SourceBand>1</SourceBand>"
        "</SimpleSource></VRTRasterBand></VRTDataset>"
    )
    with sparse_geotiff(root / "huge.tif", 200_000, 1, px=10):
        pass  # every tile sparse: 1 MB on disk
    found = [
        _tif(root / "rgb.tif", (rng.random((3, 24, 40)) * 255).astype(np.uint8)),
        _tif(root / "one.tif", rng.integers(0, 4000, (1, 16, 16)).astype(np.uint16)),
        _tif(root / "four.tif", rng.integers(0, 4000, (4, 16, 16)).astype(np.uint16)),
        _tif(root / "nocrs.tif", np.ones((3, 8, 8), np.float32), crs=None),
        str(root / "text.tif"), str(root / "adir"), str(root / "missing.tif"), str(root / "link-out.tif"),
        f"{root}/../../../../../..{outside}", outside, "/etc/passwd", "", "relative.tif", "/vsimem/x.tif",
        "a\x00b", "~/x.tif",
        str(root / "fifo.tif"), str(root / "hard.tif"), str(root / "vrt.tif"), str(root / "huge.tif"),
        f"{root}/\ud800.tif", "/vsicurl/http://127.0.0.1:9/x.tif", "http://127.0.0.1:9/x.tif",
    ]  # fmt: skip
    yield found
    shutil.rmtree(outside_dir)


@pytest.fixture(scope="module")
def allow_fuzz_dir(paths: list[str]):
    previous = file_access.allowed_dirs()
    file_access.set_allowed_dirs([str(Path(paths[0]).parent)])
    yield
    file_access.set_allowed_dirs(previous)


# --------------------------------------------------------------------------------------------------
# Hypothesis strategies for the request grammar (mostly right, sometimes anything at all)
# --------------------------------------------------------------------------------------------------

leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**66), 2**66)
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
)
anything = st.recursive(
    leaf,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
    max_leaves=4,
)
number = st.integers(-(10**6), 10**6) | st.floats(allow_nan=False)


def mostly(right: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(right, right, right, right, right, anything)


def sources(paths: list[str]) -> st.SearchStrategy:
    ref = st.fixed_dictionaries(
        {"kind": st.just("ref"), "path": mostly(st.sampled_from(paths))},
        optional={
            "bands": mostly(st.lists(st.integers(-1, 13), max_size=4) | st.just([1] * 600)),
            "bounds": mostly(
                st.lists(number, min_size=4, max_size=4) | st.just([500_000, 3_999_800, 500_200, 4_000_000])
            ),
            "crs": mostly(st.sampled_from(["EPSG:4326", "EPSG:32633", "bogus", "", *PROJ_CRS])),
        },
    )
    value = st.fixed_dictionaries(
        {
            "kind": st.just("value"),
            "transform": mostly(st.just(TRANSFORM) | st.lists(number, min_size=6, max_size=6)),
        },
        optional={
            "crs": mostly(st.sampled_from(["EPSG:32633", "EPSG:4326", "", "nope", *PROJ_CRS])),
            "nodata": mostly(number),
        },
    )
    return st.one_of(ref, ref, value, value, anything)


def headers(paths: list[str]) -> st.SearchStrategy:
    options = st.fixed_dictionaries(
        {},
        optional={
            "max_new_tokens": mostly(st.integers(-3, 5000)),
            "sensor": mostly(st.sampled_from(SENSORS)),
            "history": mostly(
                st.lists(
                    st.lists(st.sampled_from(["q", "<image> q", "a"]), min_size=2, max_size=2), max_size=2
                )
            ),
            "preset": mostly(st.sampled_from(["rgb8", "s2_rgb", "nope"])),
            "gsd": mostly(number),
        },
    )
    return st.fixed_dictionaries(
        {
            "v": st.sampled_from([1] * 12 + [2, 1.0, True, "1", None]),
            "id": mostly(st.text(max_size=20)),
            "op": mostly(st.sampled_from([*OPS, "ask", "georef", "ask", "georef", "detect", "format_disk"])),
        },
        optional={
            "task": mostly(st.sampled_from(TASKS)),
            "prompt": mostly(
                st.sampled_from(["ships", "", "<image>", "[[1, 2, 3, 4, 0]]", "a" * 500, "\ud800 ships"])
            ),
            "answer": mostly(st.sampled_from(ANSWERS)),
            "source": sources(paths),
            "sources": mostly(st.lists(sources(paths), max_size=3)),
            "options": mostly(options),
            "target": mostly(st.text(max_size=6)),
            "client": mostly(st.text(max_size=6)),
        },
    )


@st.composite
def pixel_frames(draw, count: int) -> tuple[list, list]:
    """`count` arrays: mostly images whose frames match their specs, sometimes not quite."""
    specs, frames = [], []
    for _ in range(count):
        dtype = draw(st.sampled_from([*ALLOWED_DTYPES, "uint8", "uint16", "complex64", "<u2"]))
        ndim = draw(st.sampled_from([3, 3, 3, 2, 1, 4]))
        shape = [
            draw(st.sampled_from([1, 3, 4, 12, 0])),
            *(draw(st.integers(1, 40)) for _ in range(ndim - 1)),
        ]
        itemsize = np.dtype(dtype).itemsize if dtype in ALLOWED_DTYPES else 8
        size = int(np.prod(shape)) * itemsize + draw(st.sampled_from([0] * 8 + [1, -1]))
        fill = draw(st.sampled_from(["zeros", "random", "nan"]))
        buf = np.zeros(max(size, 0), np.uint8)
        if fill == "random":
            buf = np.random.default_rng(max(size, 0)).integers(0, 256, max(size, 0), dtype=np.uint8)
        elif fill == "nan" and dtype.startswith("float") and size > 0 and size % itemsize == 0:
            buf = np.full(size // itemsize, np.nan, dtype).view(np.uint8)
        specs.append(draw(mostly(st.just({"dtype": dtype, "shape": shape}))))
        frames.append(buf.tobytes())
    if draw(st.integers(0, 15)) == 0:
        frames.append(b"extra")
    return specs, frames


def _value_sources(header: dict) -> int:
    many = header.get("sources")
    listed = [header.get("source"), *(many if isinstance(many, list) else [])]
    return sum(1 for s in listed if isinstance(s, dict) and s.get("kind") == "value")


def grammar(paths: list[str]) -> st.SearchStrategy:
    @st.composite
    def message(draw) -> list[bytes]:
        header = draw(headers(paths))
        specs, frames = draw(pixel_frames(_value_sources(header) + draw(st.sampled_from([0] * 10 + [1]))))
        header["arrays"] = draw(mostly(st.just(specs)))
        return [json.dumps(header).encode(), *frames]

    return message()


raw_frames = st.lists(
    st.binary(max_size=100)
    | st.sampled_from(
        [
            b"{}",
            b'{"v":1}',
            b'{"v":1,"op":"status"}',
            b"[]",
            b"null",
            b"[" * 5000,
            b'{"v": NaN}',
            b"\xff\xfe",
            b'{"v":1,"arrays":[{}]}',
        ]
    ),
    min_size=0,
    max_size=4,
)


# --------------------------------------------------------------------------------------------------
# Seeded mutations of valid requests
# --------------------------------------------------------------------------------------------------


def valid_requests(paths: list[str]) -> list[tuple[dict, list[np.ndarray]]]:
    rgb, one, four = paths[:3]
    rng = np.random.default_rng(1)
    px = (rng.random((3, 24, 24)) * 255).astype(np.uint8)
    ms = rng.integers(0, 5000, (4, 20, 20)).astype(np.uint16)
    value = {"kind": "value", "transform": TRANSFORM, "crs": "EPSG:32633"}

    def ref(path: str, **kw: Any) -> dict:
        return {"kind": "ref", "path": path, **kw}

    return [
        ({"op": "georef", "answer": ANSWERS[1], "source": ref(rgb)}, []),
        ({"op": "georef", "answer": ANSWERS[2], "source": ref(rgb, bands=[3, 2, 1], crs="EPSG:32633",
                                                              bounds=[500_010, 3_999_900, 500_200, 3_999_990])}, []),
        ({"op": "georef", "answer": ANSWERS[1], "source": value}, [px]),
        ({"op": "georef", "answer": ANSWERS[1], "sources": [ref(rgb), ref(four)]}, []),
        ({"op": "ask", "task": "refer", "prompt": "ships", "source": ref(rgb), "options": {"max_new_tokens": 5}}, []),
        ({"op": "ask", "task": "caption", "source": value, "options": {"sensor": "[s2_ms_10]"}}, [ms]),
        ({"op": "ask", "task": "change", "sources": [ref(rgb), value]}, [px]),
        ({"op": "ask", "task": "chat", "prompt": "hi", "source": ref(one),
          "options": {"history": [["<image> what?", "a field"]], "gsd": 10}}, []),
        ({"op": "cancel", "target": "x"}, []),
        ({"op": "ping"}, []),
        ({"op": "detect", "task": "refer", "prompt": "ships", "source": ref(rgb, bounds=[500_010, 3_999_900, 500_200, 3_999_990]),
          "options": {"tile_size": 16, "overlap": 0.5}}, []),
        ({"op": "georef", "answer": ANSWER_MANY, "source": ref(rgb)}, []),
        ({"op": "georef", "answer": ANSWERS[1], "source": ref(next(p for p in paths if p.endswith("huge.tif")), bounds=[500_000, 3_990_000, 510_000, 4_000_000])}, []),
    ]  # fmt: skip


def _slots(node: Any, out: list) -> list:
    """Every (container, key) in a JSON tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in list(items):
        out.append((node, key))
        _slots(child, out)
    return out


def mutate(rng: random.Random, header: dict, arrays: list[np.ndarray]) -> list[bytes]:
    header = copy.deepcopy(header)
    frames: list[bytes] = []
    for _ in range(rng.randint(1, 3)):
        slots = _slots(header, [])
        how = rng.randrange(9)
        if how == 0 and slots:  # drop a field or an item
            node, key = rng.choice(slots)
            del node[key]
        elif how in (1, 2, 3) and slots:  # a nasty value anywhere
            node, key = rng.choice(slots)
            node[key] = copy.deepcopy(rng.choice(NASTY))
        elif how == 4:  # an extra field anywhere
            dicts = [header] + [n[k] for n, k in slots if isinstance(n[k], dict)]
            rng.choice(dicts)[rng.choice(["v", "id", "op", "arrays", "kind", "path", "zz"])] = rng.choice(
                NASTY
            )
    try:
        frames = [bytes(f) for f in encode({"v": 1, "id": "m", **header}, arrays)]
    except (EarthDialError, ValueError, TypeError):
        frames = [json.dumps({"v": 1, **header}, default=str).encode()]
    head = json.loads(frames[0])
    how = rng.randrange(10)
    if how == 0 and head.get("arrays"):  # a wrong array spec
        spec = rng.choice(head["arrays"])
        spec[rng.choice(["dtype", "shape"])] = rng.choice(
            [*NASTY, "float16", [2**40, 2**40], [-1], [3, 0, 5]]
        )
    elif how == 1 and len(frames) > 1:  # a frame cut short or padded
        i = rng.randrange(1, len(frames))
        frames[i] = (
            frames[i][: rng.randrange(len(frames[i]) + 1)] if rng.random() < 0.5 else frames[i] + b"\x01"
        )
    elif how == 2:  # a frame too many or too few
        frames = frames + [b"x"] if rng.random() < 0.5 or len(frames) == 1 else frames[:-1]
    text = json.dumps(head).encode()
    if rng.randrange(12) == 0:  # bytes flipped in the header
        text = bytearray(text)
        for _ in range(rng.randint(1, 4)):
            text[rng.randrange(len(text))] = rng.randrange(256)
        text = bytes(text)
    return [text, *frames[1:]]


def mutants(paths: list[str]) -> st.SearchStrategy:
    bases = valid_requests(paths)

    @st.composite
    def mutant(draw) -> list[bytes]:
        rng = random.Random(draw(st.integers(0, 2**32 - 1)))
        header, arrays = bases[rng.randrange(len(bases))]
        return (
            mutate(rng, header, arrays)
            if rng.random() < 0.95
            else encode({"v": 1, "id": "m", **header}, arrays)
        )

    return mutant()


# --------------------------------------------------------------------------------------------------
# In-process: decode -> admission -> the worker's per-request handling -> the encoded reply
# --------------------------------------------------------------------------------------------------

# `internal` replies are bugs: any of them fails the test. (The first fuzz runs found six, in imagery,
# service and georef - a singular pair transform, transforms putting pixels at infinity, an unchecked
# options.sensor, bounds PROJ cannot transform, a near-zero GSD, 1-D pixel arrays - now typed errors.)
KNOWN_BUGS: dict[str, str] = {}


@pytest.fixture(scope="module")
def worker():
    """A server object used without its sockets: Server._answer is what the worker does per request."""
    server = Server(None, "tcp://127.0.0.1:0")
    yield server
    server.close()


def outcome(reply: dict) -> str:
    if reply["ok"]:
        return "ok"
    code, message = reply["error"]["code"], reply["error"]["message"]
    assert code in CODES, reply
    if code == ErrorCode.INTERNAL:
        known = [name for name, pattern in KNOWN_BUGS.items() if re.search(pattern, message)]
        assert known, f"a new internal error (a bug): {message}"
        return f"known-bug:{known[0]}"
    return code


class _NoEvents:
    """Where the worker sends a scan's progress events; in-process they go nowhere."""

    def send_multipart(self, frames: list[Any]) -> None:
        pass


def run_in_process(worker: Server, frames: list[bytes]) -> str:
    """What a message comes to without a model: "ok", or the code of the typed error it got."""
    try:
        msg = decode(frames)
        admit(msg.header, msg.arrays)
    except EarthDialError as exc:
        return outcome(error_reply(None, exc))
    if msg.header["op"] in ("status", "ping", "cancel"):
        return "loop-op"  # answered by the server's I/O loop: fuzzed over ZeroMQ below
    job = Pending(b"fuzz", "fuzz", msg.header, msg.arrays)
    if msg.header["op"] == "plan":  # answered by the I/O loop from metadata: it must be as safe
        try:
            reply = ok_reply(msg.header.get("id"), **service.plan(msg.header, msg.arrays, None))
        except EarthDialError as exc:
            reply = error_reply(None, exc)
        return outcome(decode(_encode_reply(reply)).header)
    if msg.header["op"] in ("detect", "detect_changes"):
        return outcome(decode(_encode_reply(worker._scan(job, _NoEvents()))).header)
    if msg.header["op"] == "scan_tiles":  # routed by the I/O loop to a running streamed detect: none here
        try:
            worker._feed_stream(b"fuzz", msg.header, msg.arrays)
        except EarthDialError as exc:
            return outcome(error_reply(None, exc))
        return "fed"
    ((_, reply),) = worker._answer([job])
    return outcome(decode(_encode_reply(reply)).header)  # as the server would send it


def _tally(name: str, outcome: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1
    COUNTS[f"{name}:{outcome}"] = COUNTS.get(f"{name}:{outcome}", 0) + 1


def _report(name: str, n: int) -> None:
    outcomes = {k.split(":", 1)[1]: v for k, v in sorted(COUNTS.items()) if k.startswith(f"{name}:")}
    print(f"\nfuzz {name}: {COUNTS.get(name, 0)} messages; outcomes {outcomes}")
    assert COUNTS.get(name, 0) >= n


def test_fuzz_raw_frames_in_process(allow_fuzz_dir, worker) -> None:
    @fuzz(N_RAW)
    @given(st.lists(raw_frames, min_size=PER_RAW, max_size=PER_RAW))
    def check(messages: list[list[bytes]]) -> None:
        for frames in messages:
            _tally("raw", run_in_process(worker, frames))

    check()
    _report("raw", N_RAW * PER_RAW)


def test_fuzz_request_grammar_in_process(allow_fuzz_dir, worker, paths: list[str]) -> None:
    @fuzz(N_GRAMMAR)
    @given(grammar(paths))
    def check(frames: list[bytes]) -> None:
        _tally("grammar", run_in_process(worker, frames))

    check()
    _report("grammar", N_GRAMMAR)


def test_fuzz_mutated_requests_in_process(allow_fuzz_dir, worker, paths: list[str]) -> None:
    @fuzz(N_MUTANTS)
    @given(st.lists(mutants(paths), min_size=PER_MUTANT, max_size=PER_MUTANT))
    def check(messages: list[list[bytes]]) -> None:
        for frames in messages:
            _tally("mutants", run_in_process(worker, frames))

    check()
    _report("mutants", N_MUTANTS * PER_MUTANT)


def test_fuzz_pixels_by_value_in_process(allow_fuzz_dir, worker) -> None:
    base = {
        "v": 1,
        "id": "a",
        "op": "georef",
        "answer": ANSWERS[1],
        "source": {"kind": "value", "transform": TRANSFORM, "crs": "EPSG:32633"},
    }

    @fuzz(N_ARRAYS)
    @given(st.lists(pixel_frames(1), min_size=PER_PIXELS, max_size=PER_PIXELS))
    def check(drawn: list[tuple[list, list]]) -> None:
        for specs, frames in drawn:
            _tally(
                "pixels", run_in_process(worker, [json.dumps({**base, "arrays": specs}).encode(), *frames])
            )

    check()
    _report("pixels", N_ARRAYS * PER_PIXELS)


def test_the_hostile_input_findings_are_typed_errors(allow_fuzz_dir, worker, paths: list[str]) -> None:
    """An earlier fuzz run got `internal` for these: `detect` bounds items of the wrong type, lone
    surrogates in a path or a prompt. And the other findings, one message each, in bounded time."""
    root = str(Path(paths[0]).parent)
    rgb = paths[0]

    def code(header: dict, arrays: tuple = ()) -> str:
        t = time.monotonic()
        got = run_in_process(worker, [bytes(f) for f in encode({"v": 1, "id": "f", **header}, arrays)])
        assert time.monotonic() - t < 10, header
        return got

    detect = {"op": "detect", "task": "refer", "prompt": "ships"}
    for bounds in (["a", 0, 1, 1], [None, 0, 1, 1], [[1], 0, 1, 1], [True, 0, 1, 1]):
        assert code({**detect, "source": {"kind": "ref", "path": rgb, "bounds": bounds}}) == "bad_request"
    assert (
        code({"op": "georef", "answer": ANSWERS[1], "source": {"kind": "ref", "path": f"{root}/\ud800.tif"}})
        == "bad_request"
    )
    assert (
        code({"op": "ask", "task": "refer", "prompt": "ships \udfff", "source": {"kind": "ref", "path": rgb}})
        == "bad_request"
    )
    assert code({**detect, "prompt": "\ud800", "source": {"kind": "ref", "path": rgb}}) == "bad_request"
    for crs in PROJ_CRS:
        assert (
            code(
                {
                    "op": "georef",
                    "answer": ANSWERS[1],
                    "source": {"kind": "ref", "path": rgb, "bounds": [0, 0, 1, 1], "crs": crs},
                }
            )
            == "bad_crs"
        ), crs
        assert (
            code(
                {
                    "op": "georef",
                    "answer": ANSWERS[1],
                    "source": {"kind": "value", "transform": TRANSFORM, "crs": crs},
                },
                (np.zeros((3, 8, 8), np.uint8),),
            )
            == "bad_crs"
        ), crs
    for name, expected in (
        ("fifo.tif", "not_a_raster"),
        ("vrt.tif", "not_a_raster"),
        ("hard.tif", "forbidden_path"),
        ("huge.tif", "too_large"),
    ):
        assert (
            code({"op": "georef", "answer": ANSWERS[1], "source": {"kind": "ref", "path": f"{root}/{name}"}})
            == expected
        )
    for name, expected in (("fifo.tif", "not_a_raster"), ("vrt.tif", "not_a_raster"), ("huge.tif", "ok")):
        plan = {
            "op": "plan",
            "task": "refer",
            "prompt": "ships",
            "source": {"kind": "ref", "path": f"{root}/{name}"},
        }
        assert code(plan) == expected, name  # a plan reads metadata and a small sample only
    assert (
        code(
            {"op": "georef", "answer": ANSWERS[1], "source": {"kind": "ref", "path": rgb, "bands": [1] * 600}}
        )
        == "too_large"
    )
    assert (
        code({"op": "georef", "answer": ANSWER_MANY, "source": {"kind": "ref", "path": rgb}}) == "too_large"
    )


def test_in_process_fuzz_reached_ten_thousand_messages() -> None:
    total = sum(COUNTS.get(name, 0) for name in ("raw", "grammar", "mutants", "pixels"))
    print(f"\nfuzz in-process: {total} messages in all")
    if total:  # 0 when only some of this module's tests were selected
        assert total >= 10_000


# --------------------------------------------------------------------------------------------------
# Over ZeroMQ, against a real server process
# --------------------------------------------------------------------------------------------------


def test_fuzz_a_real_server_over_zeromq(paths: list[str]) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(None, endpoint)  # no model: a valid `ask` reads its pixels, then model_error
    sock = dealer(endpoint)
    try:

        @fuzz(N_SERVER)
        @given(st.one_of(mutants(paths), mutants(paths), grammar(paths), raw_frames.filter(bool)))
        def check(frames: list[bytes]) -> None:
            sock.send_multipart(frames)
            assert sock.poll(20_000), "the server did not answer"
            reply = decode(sock.recv_multipart()).header
            assert not sock.poll(0), f"two replies to one message: {reply}"
            _tally("server", outcome(reply))

        check()
        with Client(endpoint, timeout_s=10) as c:
            status = c.status()
        assert status["protocol"] == 1 and status["queue"] == 0
        assert proc.poll() is None  # still running
    finally:
        sock.close()
        stop_server(proc)
    _report("server", N_SERVER)


# --------------------------------------------------------------------------------------------------
# Output paths and layer names (-o, --layer, --preview): written, or a typed error, and the user's own
# layer and file beside them untouched
# --------------------------------------------------------------------------------------------------

N_OUTPUTS = 100
NAME_PARTS = [
    "*",
    "?",
    "[a]",
    "..",
    ".",
    "/",
    "\\",
    "\x00",
    "\udc80",
    "\ud800",
    " ",
    "\n",
    "gpkg_",
    "rtree_x",
    "ü船",
    "'",
    '"',
    ";DROP TABLE roads;--",
    "roads",
    "ROADS",
    "notes",
    "x" * 300,
    ".earthdial-tmp-x",
]


def test_fuzz_output_paths_and_layer_names(tmp_path) -> None:
    import pyogrio.raw
    import shapely

    from earthdial.outputs import files as output
    from earthdial.outputs import preview

    user = tmp_path / "user.gpkg"
    point = shapely.to_wkb(np.array([shapely.Point(1, 2)], dtype=object))
    pyogrio.raw.write(
        str(user),
        point,
        [np.array(["mine"], dtype=object)],
        ["name"],
        layer="roads",
        driver="GPKG",
        geometry_type="Point",
        crs="EPSG:3857",
    )
    notes = tmp_path / "notes.txt.json"
    notes.write_text('{"mine": true}')
    ring = [[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]
    result = {"type": "FeatureCollection", "crs": "EPSG:32633",
              "features": [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                            "properties": {"label": "ship", "prompt": "\udcff"}}]}  # fmt: skip
    image = np.zeros((3, 4, 4), np.uint8)
    parts = st.lists(st.sampled_from(NAME_PARTS) | st.text(max_size=8), max_size=4).map("".join)
    seen: dict[str, int] = {}

    @fuzz(N_OUTPUTS)
    @given(
        parts,
        st.sampled_from([".gpkg", ".geojson", ".json", ".png", ".docx", ""]),
        st.none() | parts,
        st.booleans(),
        st.sampled_from(["new", "user.gpkg", "notes.txt.json"]),
    )
    def check(name: str, ext: str, layer: str | None, overwrite: bool, where: str) -> None:
        path = str(tmp_path / (name + ext)) if where == "new" else str(tmp_path / where)
        for write in (
            lambda: output.write_features(path, result, layer, overwrite=overwrite),
            lambda: preview.write_png(path, image),
        ):
            try:
                write()
                seen["written"] = seen.get("written", 0) + 1
            except EarthDialError as exc:
                assert exc.code in CODES and exc.code != ErrorCode.INTERNAL, exc.message
                seen[exc.code] = seen.get(exc.code, 0) + 1

    check()
    assert pyogrio.raw.read(str(user), layer="roads")[3][0].tolist() == ["mine"]
    assert notes.read_text() == '{"mine": true}'
    assert not [p for p in tmp_path.rglob(".earthdial-tmp-*") if p.is_dir()]
    assert seen.get("written") and seen.get(ErrorCode.FOREIGN_OUTPUT) and seen.get(ErrorCode.BAD_REQUEST), (
        seen
    )


# --------------------------------------------------------------------------------------------------
# The GeoTIFF fuzz run (benchmarks/fuzz_geotiff.py): each finding, scaled to one file
# --------------------------------------------------------------------------------------------------

_UTM_WKT = (
    'PROJCS["UTM",GEOGCS["GCS",DATUM["D",SPHEROID["WGS_1984",6378137.0,298.257223563]'
    '{extension}],PRIMEM["Greenwich",0.0],UNIT["Degree",0.0174532925199433]],'
    'PROJECTION["Transverse_Mercator"],PARAMETER["False_Easting",500000.0],PARAMETER["False_Northing",0.0],'
    'PARAMETER["Central_Meridian",15.0],PARAMETER["Scale_Factor",0.9996],PARAMETER["Latitude_Of_Origin",0.0],'
    'UNIT["Meter",1.0]]'
)


@pytest.fixture()
def allow_tmp(tmp_path: Path):
    """Reads restricted to the test's own folder (as a server started with --allow-dir there)."""
    previous = file_access.allowed_dirs()
    file_access.set_allowed_dirs([tmp_path])
    yield
    file_access.set_allowed_dirs(previous)


def tiff_of_entries(
    path: Path,
    entries: list[tuple[int, int, list[int] | bytes]],
    size: tuple[int, int] = (8, 8),
    tile: int = 0,
    samples: int = 1,
    scale: tuple[float, float] = (10.0, 10.0),
    origin: tuple[float, float] = (500_000.0, 4_000_000.0),
    sample_format: tuple[int, int] = (1, 8),
) -> Path:
    """A little-endian GeoTIFF (uint8 unless `sample_format` says else) of `size` (width, height) px, georeferenced by a scale and a tie
    point, whose first directory holds `entries` (tag, TIFF type, values) after the image's own, in the
    order given: duplicates and any type allowed. In one uncompressed strip, or (`tile`) in one DEFLATE
    tile of tile x tile px (zeros); `samples` bands, pixel-interleaved; pixel `scale` and the top left
    corner's coordinates (`origin`) as written; `sample_format` the SampleFormat and BitsPerSample."""
    codes = {1: "B", 2: "B", 3: "H", 4: "I", 12: "d"}
    width, height = size
    fmt, bits = sample_format
    nbytes = (tile * tile if tile else width * height) * samples * bits // 8
    pixels = zlib.compress(bytes(nbytes)) if tile else bytes(nbytes)
    blocks = (
        [(259, 3, [8]), (322, 4, [tile]), (323, 4, [tile]), (324, 4, [0]), (325, 4, [len(pixels)])]
        if tile
        else [(259, 3, [1]), (273, 4, [0]), (278, 3, [height]), (279, 4, [len(pixels)])]
    )
    image = [
        (256, 4, [width]),
        (257, 4, [height]),
        (258, 3, [bits]),
        (262, 3, [1]),
        (277, 3, [samples]),
        *blocks,
        (339, 3, [fmt]),
        (33550, 12, [*scale, 0.0]),
        (33922, 12, [0.0, 0.0, 0.0, *origin, 0.0]),
    ]
    listed: list[tuple[int, int, list[Any] | bytes]] = [*sorted(image), *entries]
    data_at = 8 + 2 + 12 * len(listed) + 4
    blobs, table = bytearray(pixels), b""  # the pixels first, at data_at
    for tag, kind, values in listed:
        raw = (
            bytes(values)
            if isinstance(values, bytes)
            else struct.pack(f"<{len(values)}{codes[kind]}", *values)
        )
        if tag in (273, 324):
            raw = struct.pack("<I", data_at)
        count = len(raw) // struct.calcsize(codes[kind])
        if len(raw) <= 4:
            table += struct.pack("<HHI", tag, kind, count) + raw.ljust(4, b"\0")
        else:
            blobs += b"\0" * (len(blobs) % 2)
            table += struct.pack("<HHII", tag, kind, count, data_at + len(blobs))
            blobs += raw
    path.write_bytes(b"II*\0" + struct.pack("<IH", 8, len(listed)) + table + bytes(4) + bytes(blobs))
    return path


def _pe_citation_entries(grid: str | None, ascii_kind: int = 2) -> list[tuple[int, int, list[int] | bytes]]:
    """A user-defined CRS that GDAL builds from the ESRI PE string in PCSCitationGeoKey (the form in
    which a raster's own CRS named a grid FIFO), naming `grid` (or none), its GeoAsciiParams stored as
    `ascii_kind` (ASCII, or one value a character)."""
    extension = f',EXTENSION["PROJ4_GRIDS","{grid}"]' if grid else ""
    text = ("ESRI PE String = " + _UTM_WKT.format(extension=extension) + "|").encode() + b"\0"
    keys = [1, 1, 0, 3, 1024, 0, 1, 32767, 1025, 0, 1, 1, 3073, 34737, len(text) - 1, 0]
    return [(34735, 3, keys), (34737, ascii_kind, text if ascii_kind == 2 else list(text))]


FUZZ_FINDINGS = {
    # libtiff converts a SHORT or LONG GeoAsciiParams to text, one value a character; the check read
    # its raw bytes ("E\0S\0R\0I\0...") and found no grid in them
    "GeoAsciiParams as SHORT": lambda grid: _pe_citation_entries(grid, 3),
    "GeoAsciiParams as LONG": lambda grid: _pe_citation_entries(grid, 4),
    # libtiff keeps the first of two entries of a tag; the check kept the last
    "GeoAsciiParams twice, the grid first": lambda grid: [*_pe_citation_entries(grid), (34737, 2, b"|\0")],
}


@pytest.mark.parametrize("finding", sorted(FUZZ_FINDINGS))
def test_a_grid_hidden_from_the_geokey_check_is_refused_before_gdal_opens_the_file(
    tmp_path: Path, finding: str
) -> None:
    """Fuzz findings: GeoTIFFs whose CRS names a grid past the GeoKey text check; GDAL then built the
    CRS and PROJ opened the grid (a FIFO froze the whole server: the open holds the GIL). Now refused
    from the file's bytes: the grid file is never read."""
    grid, inside, past = grid_outside(tmp_path)
    tif = tiff_of_entries(inside / "x.tif", FUZZ_FINDINGS[finding](str(grid)))
    previous = file_access.allowed_dirs()
    file_access.set_allowed_dirs([inside])
    try:
        with pytest.raises(EarthDialError) as err:
            service.resolve_source(requests.source({"kind": "ref", "path": str(tif)}), [])
    finally:
        file_access.set_allowed_dirs(previous)
    assert err.value.code == ErrorCode.BAD_CRS, err.value
    assert os.stat(grid).st_atime == past, "GDAL or PROJ read the grid"


def test_the_geokey_check_lets_the_plain_forms_through(tmp_path: Path) -> None:
    """The stricter reading refuses only what hides text: a PE citation in ASCII (or BYTE) naming no
    file, with one GeoAsciiParams entry, georeferences as before."""
    previous = file_access.allowed_dirs()
    file_access.set_allowed_dirs([tmp_path])
    try:
        for kind in (2, 1):
            tif = tiff_of_entries(tmp_path / f"plain{kind}.tif", _pe_citation_entries(None, kind))
            chip = service.resolve_source(requests.source({"kind": "ref", "path": str(tif)}), [])
            assert chip.width == 8 and chip.crs not in ("", "EPSG:4326"), (kind, chip.crs)
    finally:
        file_access.set_allowed_dirs(previous)


def test_a_tile_larger_than_its_image_counts_whole_in_the_pixel_budget(
    tmp_path: Path, allow_tmp: None
) -> None:
    """Fuzz finding: a 7 x 16 px GeoTIFF in one 32 768 x 32 768 px tile. The budget counted the tile
    clipped to the image (112 px); GDAL decodes it whole (1 G px; 2 GiB as int16): `plan` held the I/O
    loop for 2.5 s and the server grew by 2 GB. Scaled: a 4 096 px tile, a budget of 1 M px."""
    from earthdial import limits
    from earthdial.geo import imagery

    tif = tiff_of_entries(tmp_path / "tile.tif", [], size=(7, 16), tile=4096)
    assert limits.blocks_cost((0, 0, 7, 16), (7, 16), (4096, 4096), 1) == 4096 * 4096
    previous = limits.configure(limits.Limits(max_pixels=1_000_000))
    try:
        assert imagery.sample_band(str(tif)) is None  # 16 M px: over the sample's 4 M px, so no sample
        with pytest.raises(EarthDialError) as err:
            imagery.read_chip(str(tif))
        assert err.value.code == ErrorCode.TOO_LARGE and "4096 x 4096" in err.value.message, err.value
    finally:
        limits.configure(previous)


def test_a_tiff_of_tens_of_thousands_of_bands_is_refused_before_gdal_opens_it(tmp_path: Path) -> None:
    """Fuzz finding: a 96 x 64 px GeoTIFF claiming 65 535 samples a pixel. GDAL and rasterio make an
    object for every band as they open it (1.3 s here), and `plan` opens the file 4 times: it held the I/O
    loop for 2.5 s; the `ask` decoded 3 GB (every band of a pixel-interleaved block). Now refused from the
    file's bytes; a file of a hyperspectral sensor's few hundred bands still opens."""
    from earthdial.geo import geokeys

    many = tiff_of_entries(tmp_path / "many.tif", [], size=(1, 1), samples=65_535)
    hyper = tiff_of_entries(tmp_path / "hyper.tif", [], size=(2, 2), samples=geokeys.MAX_SAMPLES)
    previous = file_access.allowed_dirs()
    file_access.set_allowed_dirs([tmp_path])
    try:
        with pytest.raises(EarthDialError) as err:
            service.resolve_source(requests.source({"kind": "ref", "path": str(many)}), [])
        assert err.value.code == ErrorCode.NOT_A_RASTER and "65535 bands" in err.value.message, err.value
        chip = service.resolve_source(requests.source({"kind": "ref", "path": str(hyper)}), [])
        assert chip.band_indexes == [1, 2, 3]
    finally:
        file_access.set_allowed_dirs(previous)


def test_a_crs_without_a_code_is_identified_once(tmp_path: Path) -> None:
    """Fuzz finding: `plan` of a GeoTIFF whose CRS is an ESRI PE string (a UTM zone without its EPSG code,
    as ArcGIS writes it) held the I/O loop for 1.1 s on two busy cores: PROJ compared the CRS against
    its database twice (0.3 to 0.6 s each). Each definition is identified once now; a second `plan` of
    the file does no identification."""
    from earthdial.geo import imagery

    tif = tiff_of_entries(tmp_path / "pe.tif", _pe_citation_entries(None))
    header = {"op": "plan", "task": "caption", "prompt": "", "source": {"kind": "ref", "path": str(tif)}}
    previous = file_access.allowed_dirs()
    file_access.set_allowed_dirs([tmp_path])
    try:
        first = service.plan(header, [], None)
        identified = imagery._epsg_code.cache_info().misses
        second = service.plan(header, [], None)
        assert imagery._epsg_code.cache_info().misses == identified
        assert imagery.describe(str(tif)).crs.startswith("PROJCS")  # no EPSG code: its own definition
    finally:
        file_access.set_allowed_dirs(previous)
    assert first == second


def test_a_geotransform_whose_inverse_is_not_finite_is_not_a_raster(tmp_path: Path) -> None:
    """Fuzz finding: a pixel height of 1e-300 under a top edge at 1e308. The transform and its corners
    are finite, its inverse's offset is not (1e308 / 1e-300): a `plan` with bounds got `internal`
    (OverflowError snapping an infinite row)."""
    from earthdial.geo import imagery

    tif = tiff_of_entries(tmp_path / "t.tif", [], scale=(1.0, 1e-300), origin=(0.0, 1e308))
    previous = file_access.allowed_dirs()
    file_access.set_allowed_dirs([tmp_path])
    try:
        for bounds in (None, (0.0, 0.0, 10.0, 10.0)):
            with pytest.raises(EarthDialError) as err:
                imagery.read_chip(str(tif), bounds=bounds)
            assert err.value.code == ErrorCode.NOT_A_RASTER, err.value
    finally:
        file_access.set_allowed_dirs(previous)


def test_bounds_that_overflow_pixel_space_are_outside(tmp_path: Path, allow_tmp: None) -> None:
    """Bounds far out under a fine pixel (1e-200 m): their pixel columns overflow to infinity. A typed
    `bounds_outside`, as for any bounds off the raster, not `internal`."""
    from earthdial.geo import imagery

    tif = tiff_of_entries(tmp_path / "fine.tif", [], scale=(1e-200, 1.0), origin=(0.0, 4_000_000.0))
    with pytest.raises(EarthDialError) as err:
        imagery.read_chip(str(tif), bounds=(1e110, 3_999_990.0, 2e110, 4_000_000.0))
    assert err.value.code == ErrorCode.BOUNDS_OUTSIDE, err.value
    chip = imagery.read_chip(str(tif), bounds=(0.0, 3_999_995.0, 3e-200, 4_000_000.0))
    assert (chip.width, chip.height) == (3, 5)


def test_a_plan_samples_no_huge_tile_of_a_raster_with_overviews(tmp_path: Path, allow_tmp: None) -> None:
    """Fuzz finding: a 33 x 16 px GeoTIFF with overviews in 32 768 px tiles. `plan` took its overviews
    for the sample's read, but a raster smaller than the sample is read at full resolution: the tile was
    decoded whole (1 G px, 1 GB, 1.1 s on the I/O loop). Scaled: 4 096 px tiles, over the sample's 4 M px."""
    from earthdial.geo import imagery

    tif = tmp_path / "ov.tif"
    with geotiff(
        tif, 33, 16, 1, px=10, tiled=True, blockxsize=4096, blockysize=4096, compress="deflate"
    ) as dst:
        dst.write(np.ones((1, 16, 33), np.uint8))
        dst.build_overviews([2, 4])
    assert imagery.sample_band(str(tif)) is None
    small = tmp_path / "small.tif"  # the same with 16 px tiles: sampled
    with geotiff(small, 33, 16, 1, px=10, tiled=True, blockxsize=16, blockysize=16) as dst:
        dst.write(np.ones((1, 16, 33), np.uint8))
        dst.build_overviews([2, 4])
    sample = imagery.sample_band(str(small))
    assert sample is not None and sample.shape == (16, 33)


def test_complex_samples_are_not_a_raster(tmp_path: Path, allow_tmp: None) -> None:
    """Fuzz finding: a GeoTIFF of complex 16-bit integers (SampleFormat 5, as SAR SLC products store
    them): numpy has no such type, and `plan` and `ask` got `internal`. The model reads real values."""
    from earthdial.geo import imagery

    for fmt in ((5, 32), (6, 64)):  # complex int16 pairs, complex float32 pairs
        tif = tiff_of_entries(tmp_path / f"c{fmt[0]}.tif", [], sample_format=fmt)
        with pytest.raises(EarthDialError) as err:
            service.plan(
                {"op": "plan", "task": "caption", "prompt": "", "source": {"kind": "ref", "path": str(tif)}},
                [],
                None,
            )
        assert err.value.code == ErrorCode.NOT_A_RASTER and "complex" in err.value.message, err.value
        with pytest.raises(EarthDialError) as err:
            imagery.read_chip(str(tif))
        assert err.value.code == ErrorCode.NOT_A_RASTER, err.value


def test_a_crs_text_that_is_not_utf8_is_bad_crs(tmp_path: Path, allow_tmp: None) -> None:
    """Fuzz finding (seed 1): a PE citation with a 0xff byte in its CRS's name. GDAL passes the bytes on
    in the CRS's WKT, rasterio decodes it as UTF-8 while it opens the file: `plan` and `ask` got
    `internal` (UnicodeDecodeError)."""
    from earthdial.geo import imagery

    wkt = _UTM_WKT.format(extension="").encode().replace(b'"UTM"', b'"UTM\xff"')
    text = b"ESRI PE String = " + wkt + b"|\0"
    keys = [1, 1, 0, 3, 1024, 0, 1, 32767, 1025, 0, 1, 1, 3073, 34737, len(text) - 1, 0]
    tif = tiff_of_entries(tmp_path / "latin.tif", [(34735, 3, keys), (34737, 2, text)])
    header = {"op": "plan", "task": "caption", "prompt": "", "source": {"kind": "ref", "path": str(tif)}}
    for attempt in (lambda: service.plan(header, [], None), lambda: imagery.read_chip(str(tif))):
        with pytest.raises(EarthDialError) as err:
            attempt()
        assert err.value.code == ErrorCode.BAD_CRS and "UTF-8" in err.value.message, err.value
