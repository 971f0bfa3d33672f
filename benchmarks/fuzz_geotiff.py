"""Fuzz a real `earthdial serve` with crafted GeoTIFFs through `plan` and `ask` (the fuzz run
of docs/security.md).

A command a person runs, not a test (10 000 files take about an hour on two shared cores):

    flock /tmp/earthdial-heavy.lock python benchmarks/fuzz_geotiff.py --n 10000 --seed 0 --out /tmp/fz

Each file starts as a valid GeoTIFF written by rasterio (random size, bands, dtype, strips or tiles,
compression, byte order, BigTIFF, overviews, CRS) and is then rewritten at the TIFF level: its image
directories are parsed and written again with mutated entries (random tags and types, counts that lie,
tile/strip sizes and offsets/bytecounts pointing anywhere, compression, bits per sample, sample format,
photometric, huge width/height, GeoKey directories with random keys, ESRI PE citations whose WKT names
a grid, NaN/inf pixel scales, tie points and transformations, duplicate tags), with chains of image
directories (loops, self-references, thousands of directories, SubIFDs), and finally some bytes flipped.
File i is made from seed (seed, i) alone, so `--only i` makes it again.

The server is started with the demo model, `--allow-dir` the fuzz folder, its default budgets and an
address-space limit (RLIMIT_AS). Every file goes through `plan` and an `ask` (a small window, a few
tokens) with the real client, while a probe thread sends `status` every 0.2 s on its own connection.
Per file: the reply codes, times and the server's RSS. Failures: a freeze (a status reply over 1 s, a
request past its wait), an `internal` reply, the server's death, its peak RSS over the budget, and a
grid FIFO (outside the allowed folder, named by the files' CRSs) opened by the server. A failing file is
kept in OUT/failures/ (named by its index) and the server is restarted for the next one.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from earthdial.geo.geokeys import TYPE_SIZES  # TIFF field type -> bytes per value

STATUS_EVERY_S = 0.2
FREEZE_S = 1.0  # a status reply slower than this is a freeze
PLAN_WAIT_S = 10.0  # plan is answered by the I/O loop from metadata
ASK_WAIT_S = 60.0  # a few tokens of the demo model over a small window take well under a second

# --------------------------------------------------------------------------------------------------
# TIFF structure: parse every image directory, write them again (mutated) after the original bytes
# --------------------------------------------------------------------------------------------------

TYPE_CODES = {
    1: "B",
    3: "H",
    4: "I",
    6: "b",
    8: "h",
    9: "i",
    11: "f",
    12: "d",
    13: "I",
    16: "Q",
    17: "q",
    18: "Q",
}


LOOP_FIRST, LOOP_SELF = -1, -2  # next offsets: back to the first directory, or to the directory itself


@dataclass
class Entry:
    tag: int
    kind: int
    count: int
    raw: bytes  # the value in the file's byte order
    offset: int | None = None  # an explicit value offset (pointing anywhere) instead of raw


@dataclass
class Tiff:
    data: bytearray
    order: str  # "<" or ">"
    big: bool
    ifds: list[list[Entry]] = field(default_factory=list)
    next_of_last: int = 0


def parse(data: bytes) -> Tiff:
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\0", b"\0+")
    tiff = Tiff(bytearray(data), order, big)
    ifd = struct.unpack(order + ("Q" if big else "I"), data[8:16] if big else data[4:8])[0]
    csize, esize, ocode = (8, 20, "Q") if big else (2, 12, "I")
    inline = 8 if big else 4
    seen: set[int] = set()
    while ifd and ifd not in seen and len(seen) < 64:
        seen.add(ifd)
        (n,) = struct.unpack(order + ("Q" if big else "H"), data[ifd : ifd + csize])
        entries = []
        for i in range(n):
            e = data[ifd + csize + i * esize : ifd + csize + (i + 1) * esize]
            tag, kind = struct.unpack(order + "HH", e[:4])
            (count,) = struct.unpack(order + ocode, e[4 : 4 + inline])
            size = count * TYPE_SIZES.get(kind, 1)
            if size <= inline:
                raw = e[4 + inline : 4 + inline + size]
            else:
                (at,) = struct.unpack(order + ocode, e[4 + inline :])
                raw = data[at : at + size]
            entries.append(Entry(tag, kind, count, bytes(raw)))
        tiff.ifds.append(entries)
        at = ifd + csize + n * esize
        (ifd,) = struct.unpack(order + ocode, data[at : at + inline])
    return tiff


def pack(order: str, kind: int, values: list) -> bytes:
    if kind in (1, 2, 6, 7) and all(isinstance(v, int) and 0 <= v < 256 for v in values):
        return bytes(values)
    if kind in (5, 10):
        return struct.pack(
            f"{order}{2 * len(values)}{'I' if kind == 5 else 'i'}", *[v for pair in values for v in pair]
        )
    return struct.pack(f"{order}{len(values)}{TYPE_CODES[kind]}", *values)


def values(tiff: Tiff, entry: Entry) -> list:
    code = TYPE_CODES.get(entry.kind)
    size = TYPE_SIZES.get(entry.kind, 1)
    if code is None or len(entry.raw) % size:
        return []
    return list(struct.unpack(f"{tiff.order}{len(entry.raw) // size}{code}", entry.raw))


def serialize(tiff: Tiff, nexts: list[int | None] | None = None) -> bytes:
    """The original bytes, then every directory (and its out-of-line values) appended; the header points
    to the first. `nexts[i]`, when given and not None, replaces directory i's next offset."""
    order, big = tiff.order, tiff.big
    out = bytearray(tiff.data)
    csize, ccode, ocode, inline = (8, "Q", "Q", 8) if big else (2, "H", "I", 4)
    limit = (1 << 64) - 1 if big else (1 << 32) - 1
    starts: list[int] = []
    fixups: list[int] = []  # where each directory's next offset is written
    for entries in tiff.ifds:
        blobs: dict[int, int] = {}
        for i, e in enumerate(entries):
            if e.offset is None and len(e.raw) > inline:
                if len(out) % 2:
                    out += b"\0"
                blobs[i] = len(out)
                out += e.raw
        if len(out) % 2:
            out += b"\0"
        starts.append(len(out))
        out += struct.pack(order + ccode, len(entries))
        for i, e in enumerate(entries):
            head = struct.pack(order + "HH", e.tag & 0xFFFF, e.kind & 0xFFFF) + struct.pack(
                order + ocode, e.count & limit
            )
            if e.offset is not None:
                value = struct.pack(order + ocode, e.offset & limit)
            elif i in blobs:
                value = struct.pack(order + ocode, blobs[i])
            else:
                value = e.raw.ljust(inline, b"\0")
            out += head + value
        fixups.append(len(out))
        out += bytes(inline)
    for i, at in enumerate(fixups):
        nxt = starts[i + 1] if i + 1 < len(starts) else tiff.next_of_last
        wanted = nexts[i] if nexts is not None and i < len(nexts) else None
        if wanted is not None:
            nxt = starts[0] if wanted == LOOP_FIRST else starts[i] if wanted == LOOP_SELF else wanted
        out[at : at + inline] = struct.pack(order + ocode, nxt & limit)
    first = starts[0] if starts else 0
    if big:
        out[8:16] = struct.pack(order + "Q", first)
    else:
        out[4:8] = struct.pack(order + "I", first)
    return bytes(out)


# --------------------------------------------------------------------------------------------------
# What the mutations put in
# --------------------------------------------------------------------------------------------------

BASELINE_TAGS = [
    254,
    256,
    257,
    258,
    259,
    262,
    273,
    277,
    278,
    279,
    284,
    317,
    322,
    323,
    324,
    325,
    330,
    338,
    339,
    340,
    341,
    347,
    532,
    33550,
    33922,
    34264,
    34735,
    34736,
    34737,
    42112,
    42113,
    50674,
    32997,
    530,
    529,
]
COMPRESSIONS = [
    0,
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    32773,
    32946,
    34676,
    34677,
    34712,
    34887,
    34925,
    34926,
    34927,
    50000,
    50001,
    50002,
    65535,
]
BITS = [0, 1, 2, 4, 7, 8, 12, 16, 24, 31, 32, 33, 64, 128, 255, 65535]
HUGE = [0, 1, 2**15, 2**16 - 1, 2**16, 2**24, 2**31 - 1, 2**31, 2**32 - 1]
FLOATS = [
    0.0,
    -0.0,
    1e-300,
    5e-324,
    1e308,
    -1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    1.0,
    -10.0,
    10.0,
]

_GEOG1 = (
    'GEOGCS["GCS_X",DATUM["D_X",SPHEROID["WGS_1984",6378137.0,298.257223563]{ext}],'
    'PRIMEM["Greenwich",0.0],UNIT["Degree",0.0174532925199433]]'
)
_PROJ1 = (
    'PROJCS["X_UTM",{geog},PROJECTION["Transverse_Mercator"],PARAMETER["False_Easting",500000.0],'
    'PARAMETER["False_Northing",0.0],PARAMETER["Central_Meridian",15.0],PARAMETER["Scale_Factor",0.9996],'
    'PARAMETER["Latitude_Of_Origin",0.0],UNIT["Meter",{unit}]]'
)
_GEOG2 = (
    'GEOGCRS["X",DATUM["X",ELLIPSOID["WGS 84",6378137,298.257223563]],CS[ellipsoidal,2],'
    'AXIS["lat",north],AXIS["lon",east],ANGLEUNIT["degree",0.0174532925199433]]'
)


def grid_wkts(grid: str) -> list[str]:
    """CRS texts that make GDAL or PROJ open `grid` while the CRS is built (or a spelling of one)."""
    return [
        _PROJ1.format(geog=_GEOG1.format(ext=f',EXTENSION["PROJ4_GRIDS","{grid}"]'), unit="1.0"),
        _GEOG1.format(ext=f',EXTENSION["PROJ4_GRIDS","{grid}"]'),
        _GEOG1.format(ext="").replace("UNIT[", f'EXTENSION["PROJ4","+proj=longlat +nadgrids={grid}"],UNIT['),
        f'BOUNDCRS[SOURCECRS[{_GEOG2}],TARGETCRS[{_GEOG2}],ABRIDGEDTRANSFORMATION["t",METHOD["NTv2",'
        f'ID["EPSG",9615]],PARAMETERFILE["Latitude and longitude difference file","{grid}"]]]',
        f"+proj=longlat +ellps=WGS84 +nadgrids={grid} +type=crs",
        f"+proj=longlat +ellps=WGS84 +nadgrids=@{grid} +type=crs",
        f'GEOGTRAN["X_To_WGS_1984",METHOD["NTv2"],PARAMETER["Dataset_{grid}",0.0]]',
        _GEOG1.format(ext=f',extension [ "proj4_grids" , "{grid}" ]'),
        _GEOG1.format(ext=f',EXTENSION\t("PROJ4_GRIDS","{grid}")'),
        f'BOUNDCRS[SOURCECRS[{_GEOG2}],TARGETCRS[{_GEOG2}],ABRIDGEDTRANSFORMATION["t",METHOD["PROJ-based '
        f'operation method: +proj=hgridshift +grids={grid}"]]]',
    ]


def plain_wkts() -> list[str]:
    """CRS texts naming no file, some with values that place nothing."""
    return [
        _PROJ1.format(geog=_GEOG1.format(ext=""), unit="1.0"),
        _PROJ1.format(geog=_GEOG1.format(ext=""), unit="0.0"),
        _PROJ1.format(geog=_GEOG1.format(ext=""), unit="nan"),
        _GEOG1.format(ext=",TOWGS84[1e308,0,0,0,0,0,0]"),
        _GEOG1.format(ext="").replace("6378137.0", "0.0"),
        _GEOG1.format(ext="").replace("6378137.0", "-1e308"),
        _GEOG2,
        "PROJCS[" * 200,
        "",
        'GEOGCS["x"' + ',AUTHORITY["EPSG","4326"]' * 300 + "]",
    ]


# GeoKey ids GDAL and libgeotiff know, and what they hold
GEOKEY_IDS = [1024, 1025, 1026, 2048, 2049, 2050, 2051, 2052, 2054, 2056, 2057, 2058, 2059, 2060, 2061, 2062,
              3072, 3073, 3074, 3075, 3076, 3077, 3078, 3079, 3080, 3081, 3082, 3083, 3084, 3085, 3086, 3087,
              3088, 3089, 3090, 3091, 3092, 3093, 3094, 3095, 3096, 4096, 4097, 4098, 4099, 5120]  # fmt: skip
GEOKEY_CODES = [
    0,
    1,
    2,
    3,
    4326,
    4267,
    4269,
    32633,
    3857,
    2154,
    27700,
    32767,
    65535,
    9001,
    9102,
    9122,
    5773,
    7019,
    6326,
    8901,
    9999,
    1,
    1,
]


@dataclass
class Context:
    grids: list[str]  # paths a CRS may name: FIFOs outside the allowed folder, devices, missing files


def _ascii(text: str) -> bytes:
    return text.encode("latin-1", "replace") + b"\0"


class Mutation:
    """One file's structural mutations: the parsed TIFF they rewrite, with the helpers they share."""

    def __init__(self, rng: random.Random, tiff: Tiff, ctx: Context) -> None:
        self.rng, self.tiff, self.ctx = rng, tiff, ctx
        self.order = tiff.order
        self.first = tiff.ifds[0]
        self.nexts: list[int | None] | None = None  # the directories' next offsets, when a mutation sets them

    def get(self, tag: int, ifd: list[Entry] | None = None) -> Entry | None:
        return next((e for e in (ifd if ifd is not None else self.first) if e.tag == tag), None)

    def put(
        self, tag: int, kind: int, vals: list, ifd: list[Entry] | None = None, count: int | None = None
    ) -> None:
        ifd = ifd if ifd is not None else self.first
        raw = pack(self.order, kind, vals)
        n = len(vals) if count is None else count
        entry = Entry(tag, kind, n, raw)
        for i, e in enumerate(ifd):
            if e.tag == tag:
                ifd[i] = entry
                break
        else:
            ifd.append(entry)
            ifd.sort(key=lambda e: e.tag)

    def geokeys(
        self, keys: list[tuple[int, int, int, int]], version: tuple[int, int, int] = (1, 1, 0)
    ) -> None:
        flat = [*version, len(keys)]
        for k in keys:
            flat.extend(k)
        self.put(34735, 3, [v & 0xFFFF for v in flat])

    def citation_crs(self, text: str) -> None:
        """A user-defined CRS whose citation GDAL imports (an ESRI PE string, or the text as is)."""
        rng = self.rng
        cite = rng.choice(["ESRI PE String = ", "ESRI PE String = ", "", "PCS Name = "]) + text + "|"
        where = rng.choice([3073, 2049, 1026])
        # a user-defined model type with the citation alone (what ArcGIS writes), or a user-defined CRS
        model = rng.choice([32767, 32767, 1 if where == 3073 else rng.choice([1, 2])])
        keys = [(1024, 0, 1, model), (1025, 0, 1, 1)]
        if model != 32767:
            keys.append((3072 if where == 3073 else 2048, 0, 1, 32767))
        keys.append((where, 34737, len(cite), 0))
        self.geokeys(sorted(keys))
        text_bytes = list(_ascii(cite))
        # the text as ASCII mostly; else as another integer type, one character a value (libtiff converts)
        kind = rng.choice([2, 2, 2, 2, 1, 7, 6, 3, 4, 8, 9, 16 if self.tiff.big else 4])
        self.put(
            34737, kind, text_bytes if kind in (1, 2, 6, 7) else [b if b < 128 else 63 for b in text_bytes]
        )
        if rng.random() < 0.2:  # a second GeoAsciiParams entry, before or after the first
            e = self.get(34737)
            assert e is not None
            twin = Entry(34737, 2, 2, b"|\0")
            self.first.insert(self.first.index(e) + rng.choice([0, 1]), twin)


def _random_tag(m: Mutation) -> None:
    rng, tiff = m.rng, m.tiff
    for _ in range(rng.randint(1, 4)):
        tag = rng.choice(BASELINE_TAGS) if rng.random() < 0.7 else rng.randrange(65536)
        t = rng.choice(list(TYPE_SIZES)) if rng.random() < 0.9 else rng.randrange(65536)
        n = rng.choice([0, 1, 2, 3, 4, 6, 16, 100, 2**16, 2**31, 2**32 - 1])
        raw = rng.randbytes(min(n * TYPE_SIZES.get(t, 1), rng.choice([0, 4, 64, 4096])))
        ifd = rng.choice(tiff.ifds)
        entry = Entry(tag, t, n, raw, rng.randrange(len(tiff.data) * 2) if rng.random() < 0.3 else None)
        ifd.append(entry)
        if rng.random() < 0.8:
            ifd.sort(key=lambda e: e.tag)


def _drop_tag(m: Mutation) -> None:
    ifd = m.rng.choice(m.tiff.ifds)
    if ifd:
        ifd.pop(m.rng.randrange(len(ifd)))


def _duplicate_tag(m: Mutation) -> None:
    """A second entry of a tag, before or after the first."""
    rng = m.rng
    ifd = rng.choice(m.tiff.ifds)
    if ifd:
        e = rng.choice(ifd)
        twin = Entry(e.tag, e.kind, e.count, rng.randbytes(len(e.raw)) if rng.random() < 0.5 else e.raw)
        ifd.insert(ifd.index(e) + rng.choice([0, 1]), twin)


def _huge_size(m: Mutation) -> None:
    rng = m.rng
    v = rng.choice(HUGE)
    t = 3 if v <= 0xFFFF and rng.random() < 0.3 else 16 if m.tiff.big and rng.random() < 0.3 else 4
    m.put(rng.choice([256, 257]), t, [v])


def _blocks(m: Mutation) -> None:
    """Tile/strip sizes."""
    rng = m.rng
    if m.get(322) is not None or rng.random() < 0.3:
        m.put(322, rng.choice([3, 4]), [rng.choice([0, 1, 8, 15, 16, 17, 256, 2**15, 65535])])
        m.put(323, rng.choice([3, 4]), [rng.choice([0, 1, 8, 16, 256, 2**15, 65535])])
    else:
        m.put(278, 4, [rng.choice(HUGE + [3, 7])])


def _offsets(m: Mutation) -> None:
    """Strip/tile offsets and byte counts pointing anywhere."""
    rng, tiff = m.rng, m.tiff
    size = len(tiff.data)
    for tag in (273, 279, 324, 325):
        strips = m.get(tag)
        if strips is None or rng.random() < 0.4:
            continue
        vals = values(tiff, strips)
        if not vals:
            continue
        choice = rng.randrange(5)
        new = [
            rng.choice([0, 8, size - 1, size, size * 10, 2**31, 2**32 - 1, rng.randrange(size)])
            if choice < 3 or rng.random() < 0.5
            else v
            for v in vals
        ]
        if choice == 3:
            new = new[: rng.randrange(len(new) + 1)]  # fewer than blocks
        if choice == 4:
            new = new + [rng.randrange(size)] * rng.choice([1, 1000])  # more than blocks
        code = 16 if tiff.big and rng.random() < 0.5 else 4
        m.put(tag, code, [v & (2**64 - 1 if code == 16 else 2**32 - 1) for v in new])


def _compression(m: Mutation) -> None:
    m.put(259, 3, [m.rng.choice(COMPRESSIONS)])
    if m.rng.random() < 0.3:
        m.put(317, 3, [m.rng.choice([1, 2, 3, 4, 34892, 65535])])  # predictor


def _bits(m: Mutation) -> None:
    rng = m.rng
    spp = rng.choice([0, 1, 2, 3, 4, 5, 255, 65535])
    m.put(277, 3, [spp])
    n = rng.choice([1, spp & 0xFF or 1])
    m.put(258, 3, [rng.choice(BITS) for _ in range(n)])
    if rng.random() < 0.5:
        m.put(339, 3, [rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 65535]) for _ in range(n)])


def _format(m: Mutation) -> None:
    """Sample format, photometric, planar, extra samples."""
    rng = m.rng
    m.put(339, 3, [rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 65535])])
    m.put(262, 3, [rng.choice([0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 32803, 32844, 32845, 34892, 65535])])
    if rng.random() < 0.5:
        m.put(284, 3, [rng.choice([0, 1, 2, 3])])
    if rng.random() < 0.3:
        m.put(338, 3, [rng.choice([0, 1, 2, 3]) for _ in range(rng.choice([1, 2, 40]))])
    if rng.random() < 0.3:
        m.put(530, 3, [rng.choice([0, 1, 2, 4]), rng.choice([0, 1, 2, 4])])  # YCbCr subsampling


def _ifd_chain(m: Mutation) -> None:
    rng, tiff = m.rng, m.tiff
    n = len(tiff.ifds)
    how = rng.randrange(5)
    if how == 0:  # a loop back to the first directory, or to itself
        m.nexts = [None] * (n - 1) + [rng.choice([LOOP_FIRST, LOOP_SELF])]
    elif how == 1:  # the next offset anywhere
        m.nexts = [
            rng.choice([1, 7, len(tiff.data) - 2, 2**31, 2**32 - 1, rng.randrange(len(tiff.data))])
        ] * n
    elif how == 2:  # thousands of small directories (a few past the 4 096 limit)
        copies = rng.choice([100, 1000, 4095, 4097, 5000])
        small = [Entry(256, 3, 1, pack(m.order, 3, [1])), Entry(257, 3, 1, pack(m.order, 3, [1]))]
        tiff.ifds.extend([list(small) for _ in range(copies)])
    elif how == 3:  # copies of the first directory as overviews
        tiff.ifds.extend([list(m.first) for _ in range(rng.choice([1, 10, 200]))])
    else:  # SubIFDs: the first directory's children, pointing anywhere or back to it
        m.put(
            330,
            rng.choice([4, 13]),
            [
                rng.choice([8, 0, len(tiff.data) - 1, rng.randrange(len(tiff.data))])
                for _ in range(rng.choice([1, 3, 1000]))
            ],
        )


def _geokeys_random(m: Mutation) -> None:
    rng = m.rng
    keys = []
    for _ in range(rng.choice([0, 1, 3, 8, 40])):
        key = rng.choice(GEOKEY_IDS) if rng.random() < 0.8 else rng.randrange(65536)
        loc = rng.choice([0, 0, 0, 34736, 34737, 34735, rng.randrange(65536)])
        cnt = rng.choice([0, 1, 1, 2, 7, 1000, 65535])
        keys.append((key, loc, cnt, rng.choice(GEOKEY_CODES) if loc == 0 else rng.randrange(65536)))
    if rng.random() < 0.8:
        keys.sort()
    m.geokeys(keys, (rng.choice([1, 1, 1, 0, 2, 65535]), rng.choice([1, 0, 9]), rng.choice([0, 1, 9])))
    if rng.random() < 0.7:
        m.put(34736, 12, [rng.choice(FLOATS) for _ in range(rng.choice([0, 1, 7, 30]))] or [0.0])
    if rng.random() < 0.7:
        m.put(34737, 2, list(_ascii(rng.choice(["", "|", "x|" * 50, "ESRI PE String = |", *plain_wkts()]))))
    if rng.random() < 0.2:  # the directory claims more keys than the tag holds
        directory = m.get(34735)
        if directory is not None:
            directory.count = rng.choice([0, 1, 3, 4, 2**16 - 1])


def _crs_grid(m: Mutation) -> None:
    m.citation_crs(m.rng.choice(grid_wkts(m.rng.choice(m.ctx.grids))))


def _crs_plain(m: Mutation) -> None:
    m.citation_crs(m.rng.choice(plain_wkts()))


def _geotransform(m: Mutation) -> None:
    rng = m.rng
    how = rng.randrange(3)
    if how == 0:
        m.put(33550, 12, [rng.choice(FLOATS), rng.choice(FLOATS), rng.choice(FLOATS)])
        m.put(33922, 12, [rng.choice(FLOATS) for _ in range(6)])
    elif how == 1:
        m.put(34264, 12, [rng.choice(FLOATS) for _ in range(16)])
    else:  # several tie points (a GCP list) with wild values
        m.put(33922, 12, [rng.choice(FLOATS) for _ in range(6 * rng.choice([2, 3, 100]))])
        m.first[:] = [e for e in m.first if e.tag != 33550]


def _gdal_metadata(m: Mutation) -> None:
    rng = m.rng
    text = rng.choice(
        [
            '<GDALMetadata><Item name="SCALE" sample="0">nan</Item><Item name="OFFSET" sample="0">1e400</Item></GDALMetadata>',
            "<GDALMetadata>" + "<Item name='x'>" * 500 + "</GDALMetadata>",
            '<GDALMetadata><Item name="x" domain="xml:XMP">' + "a" * 100_000 + "</Item></GDALMetadata>",
            "not xml",
        ]
    )
    m.put(42112, 2, list(_ascii(text)))
    if rng.random() < 0.5:
        m.put(42113, 2, list(_ascii(rng.choice(["nan", "1e999", "-inf", "x", ""]))))  # nodata


# The structural mutations, by kind (flip_bytes and truncate work on the written bytes: make_file)
STRUCTURAL: dict[str, Callable[[Mutation], None]] = {
    "random_tag": _random_tag,
    "drop_tag": _drop_tag,
    "duplicate_tag": _duplicate_tag,
    "huge_size": _huge_size,
    "blocks": _blocks,
    "offsets": _offsets,
    "compression": _compression,
    "bits": _bits,
    "format": _format,
    "ifd_chain": _ifd_chain,
    "geokeys_random": _geokeys_random,
    "crs_grid": _crs_grid,
    "crs_plain": _crs_plain,
    "geotransform": _geotransform,
    "gdal_metadata": _gdal_metadata,
}


def mutate(rng: random.Random, tiff: Tiff, ctx: Context, kinds: list[str]) -> bytes:
    m = Mutation(rng, tiff, ctx)
    for kind in kinds:
        if kind in STRUCTURAL:
            STRUCTURAL[kind](m)
    return serialize(tiff, m.nexts)


MUTATIONS = [*STRUCTURAL, "flip_bytes", "truncate"]


def base_geotiff(rng: random.Random, path: Path) -> dict[str, Any]:
    """A valid GeoTIFF written by rasterio; returns what the ask's window is made from."""
    from rasterio.transform import from_origin

    width, height = rng.choice([1, 7, 16, 33, 64, 96]), rng.choice([1, 9, 16, 40, 64, 96])
    count = rng.choice([1, 1, 3, 3, 4, 5])
    dtype = rng.choice(["uint8", "uint8", "uint16", "int16", "float32", "int32", "float64", "int8"])
    compress = rng.choice([None, None, "deflate", "lzw", "packbits", "zstd", "lerc", "jpeg", "webp", "lzma"])
    if compress == "jpeg" and (dtype != "uint8" or count not in (1, 3)):
        compress = "deflate"
    if compress == "webp" and (dtype != "uint8" or count not in (3, 4)):
        compress = "lzw"
    if compress == "lerc" and dtype == "int8":
        compress = None
    profile: dict[str, Any] = dict(driver="GTiff", width=width, height=height, count=count, dtype=dtype)
    res = rng.choice([0.5, 10.0, 30.0, 0.0001])
    x0, y0 = (500_000.0, 4_000_000.0) if res >= 0.5 else (14.0, 45.0)
    profile["crs"] = (
        rng.choice(["EPSG:32633", "EPSG:32633", "EPSG:3857", None]) if res >= 0.5 else "EPSG:4326"
    )
    profile["transform"] = from_origin(x0, y0, res, res)
    if rng.random() < 0.5:
        block = rng.choice([16, 32])
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    elif rng.random() < 0.5:
        profile["blockysize"] = rng.choice([1, 3, 16])
    if compress:
        profile["compress"] = compress
    if rng.random() < 0.3:
        profile["interleave"] = "band"
    if rng.random() < 0.15:
        profile["BIGTIFF"] = "YES"
    if rng.random() < 0.2:
        profile["ENDIANNESS"] = "BIG"
    if rng.random() < 0.3:
        profile["nodata"] = 0
    if compress == "jpeg" and profile.get("blockysize") in (1, 3):
        profile["blockysize"] = 16  # JPEG strips are multiples of 8 rows
    rs = np.random.default_rng(rng.randrange(2**32))
    data = (rs.random((count, height, width)) * 200).astype(dtype)
    overviews = rng.random() < 0.2 and min(width, height) >= 16
    try:
        _write(path, profile, data, overviews)
    except Exception:  # noqa: BLE001 - a codec this GDAL lacks, or refuses for these options or overviews
        profile.pop("compress", None)
        _write(path, profile, data, False)
    win = min(32, width, height)
    return {"bounds": [x0, y0 - win * res, x0 + win * res, y0]}


def _write(path: Path, profile: dict[str, Any], data: np.ndarray, overviews: bool) -> None:
    import rasterio

    with rasterio.Env(GDAL_PAM_ENABLED="NO"), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if overviews:
            dst.build_overviews([2, 4])


def make_file(seed: int, index: int, path: Path, ctx: Context) -> tuple[list[str], dict[str, Any]]:
    """File `index` of run `seed` at `path`; returns its mutation kinds and the ask's window."""
    rng = random.Random(f"{seed}:{index}")
    path.unlink(missing_ok=True)  # else rasterio opens the file there (a mutated one) to delete it
    window = base_geotiff(rng, path)
    data = path.read_bytes()
    kinds = rng.sample(MUTATIONS, rng.choice([0, 1, 1, 2, 2, 3, 4]))
    structural = [k for k in kinds if k in STRUCTURAL]
    try:
        tiff = parse(data)
    except (struct.error, IndexError):
        tiff = None
    if tiff is not None and tiff.ifds and structural:
        data = mutate(rng, tiff, ctx, structural)
    if "flip_bytes" in kinds:
        buf = bytearray(data)
        for _ in range(rng.choice([1, 4, 32])):
            at = rng.randrange(min(len(buf), 512)) if rng.random() < 0.5 else rng.randrange(len(buf))
            buf[at] = rng.randrange(256)
        data = bytes(buf)
    if "truncate" in kinds:
        data = data[: rng.randrange(8, len(data))]
    path.write_bytes(data)
    return kinds or ["none"], window


# --------------------------------------------------------------------------------------------------
# The server, the probe, the run
# --------------------------------------------------------------------------------------------------


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of `pid` in KiB; (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    got = {
        line.split(":")[0]: int(line.split()[1])
        for line in text.splitlines()
        if line.startswith(("VmRSS", "VmHWM"))
    }
    return got.get("VmRSS", 0), got.get("VmHWM", 0)


class Server:
    def __init__(self, folder: Path, as_gb: float, log: Path, extra: list[str]) -> None:
        self.folder, self.as_bytes, self.log_path, self.extra = folder, int(as_gb * 2**30), log, extra
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        self.starts = 0

    def start(self) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"tcp://127.0.0.1:{port}"
        limit = self.as_bytes

        def cap() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        log = open(self.log_path, "a")  # noqa: SIM115 - the server's log, open as long as it runs
        cmd = [
            sys.executable,
            "-m",
            "earthdial.cli.main",
            "serve",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--endpoint",
            self.endpoint,
            "--allow-dir",
            str(self.folder),
            *self.extra,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=cap,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        self.starts += 1
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"earthdial serve exited with {self.proc.returncode}; see {self.log_path}")
            if "earthdial: serving" in self.log_path.read_text(errors="replace").split("--- start")[-1]:
                return
            time.sleep(0.2)
        raise RuntimeError(f"earthdial serve did not start within 120 s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        with open(self.log_path, "a") as f:
            f.write("--- start\n")
        self.start()


class Probe:
    """`status` every 0.2 s on its own connection; notes the worst latency and each one over FREEZE_S,
    and whether the server holds the grid FIFO open (then unblocks it)."""

    def __init__(self, fifo: str) -> None:
        self.fifo = fifo
        self.fifo_opens: list[int] = []  # files during which the server held the grid FIFO open
        self.endpoint = ""
        self.current = -1  # the file being sent
        self.worst = 0.0
        self.count = 0
        self.slow: list[tuple[int, float]] = []  # (file, latency) over FREEZE_S or missed (inf)
        self.paused = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    def _run(self) -> None:
        from earthdial.contract.client import Client

        client = None
        while not self._stop.is_set():
            if self.paused.is_set() or not self.endpoint:
                if client is not None:
                    client.close()
                    client = None
                self._stop.wait(0.05)
                continue
            if client is None:
                client = Client(self.endpoint, timeout_s=5.0)
            t = time.monotonic()
            try:
                client.status(timeout_s=5.0)
                latency = time.monotonic() - t
            except Exception:  # noqa: BLE001 - any failure is a missed probe
                latency = float("inf")
                client.close()
                client = None
            if not self.paused.is_set():
                self.count += 1
                self.worst = max(self.worst, latency)
                if latency > FREEZE_S:
                    self.slow.append((self.current, latency))
            self._stop.wait(STATUS_EVERY_S)

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            if fifo_opened(self.fifo):  # a reader blocked on it gets its end of file now
                self.fifo_opens.append(self.current)

    def start(self) -> None:
        self._thread.start()
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._watcher.join(10)


def fifo_opened(fifo: str) -> bool:
    """True when some process (the server) holds `fifo` open for reading; opening it for writing then
    also gives that reader its end of file, so it is unblocked."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return False  # ENXIO: no reader
    os.close(fd)
    return True


def send(client: Any, index: int, path: Path, window: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    from earthdial.contract.wire import EarthDialError, source_by_reference

    rec: dict[str, Any] = {}
    task, prompt = rng.choice([("refer", "ships"), ("caption", ""), ("chat", "what is this?")])
    for op in ("plan", "ask"):
        bounds = window["bounds"] if rng.random() < 0.6 else None
        source = source_by_reference(str(path), bounds=bounds)
        wait = PLAN_WAIT_S if op == "plan" else ASK_WAIT_S
        header = {
            "op": op,
            "task": task,
            "prompt": prompt,
            "source": source,
            "options": {"max_new_tokens": 6},
        }
        t = time.monotonic()
        try:
            client.request(header, timeout_s=wait)
            code = "ok"
        except EarthDialError as exc:
            code = exc.code
            if code == "internal":
                rec[f"{op}_message"] = exc.message[:500]
        rec[op] = code
        rec[f"{op}_s"] = round(time.monotonic() - t, 3)
        if code in ("timeout", "disconnected"):
            break  # the server is stuck or gone: the ask would tell nothing more
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000, help="files (default 10 000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="first file index (to resume a run)")
    p.add_argument("--only", type=int, action="append", help="make and send only these file indexes")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: a new one in /tmp)")
    p.add_argument("--as-gb", type=float, default=6.0, help="the server's address-space limit, GiB")
    p.add_argument(
        "--rss-budget-gb",
        type=float,
        default=2.0,
        help="peak RSS the server may reach (its queue budget, 1 GiB, over a baseline under 1 GiB)",
    )
    p.add_argument("--make-only", action="store_true", help="write the files; start no server")
    p.add_argument("--keep", action="store_true", help="keep every file, not only the failing ones")
    args = p.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix=f"earthdial-fuzz-{args.seed}-"))
    folder, failures = out / "files", out / "failures"
    folder.mkdir(parents=True, exist_ok=True)
    failures.mkdir(exist_ok=True)
    gridroot = Path(tempfile.mkdtemp(prefix="earthdial-fuzz-grids-"))  # outside the allowed folder
    fifo = str(gridroot / "grid.gsb")
    os.mkfifo(fifo)
    regular = gridroot / "ntv2.gsb"
    regular.write_bytes(b"NUM_OREC" + bytes(200))
    ctx = Context(
        [
            fifo,
            fifo,
            fifo,
            str(regular),
            "/dev/zero",
            "/dev/stdin",
            str(gridroot / "missing.gsb"),
            str(folder / "in-allowed.gsb"),
        ]
    )
    indexes = args.only or list(range(args.start, args.start + args.n))

    if args.make_only:
        for i in indexes:
            make_file(args.seed, i, folder / f"{i:05d}.tif", ctx)
        print(f"wrote {len(indexes)} files to {folder}; the grids their CRSs name are in {gridroot}")
        return 0
    atexit.register(shutil.rmtree, gridroot, True)  # also when the run stops on an error

    from earthdial.contract.client import Client

    server = Server(folder, args.as_gb, out / "server.log", [])
    (out / "server.log").write_text("--- start\n")
    server.start()
    assert server.proc is not None
    probe = Probe(fifo)
    probe.endpoint = server.endpoint
    probe.start()
    client = Client(server.endpoint, timeout_s=ASK_WAIT_S)
    records = open(out / "records.jsonl", "a")  # noqa: SIM115
    counts: dict[str, Counter] = {"plan": Counter(), "ask": Counter()}
    kinds_seen: Counter = Counter()
    failed: list[dict[str, Any]] = []
    peak_rss = 0
    base_rss = rss_kib(server.proc.pid)[0]
    loads: list[float] = []
    t0 = time.monotonic()
    cpu0 = os.times()
    for n, i in enumerate(indexes):
        path = folder / f"{i:05d}.tif"
        kinds, window = make_file(args.seed, i, path, ctx)
        kinds_seen.update(kinds)
        slow_before, fifo_before = len(probe.slow), len(probe.fifo_opens)
        probe.current = i
        rec: dict[str, Any] = {"i": i, "kinds": kinds}
        rec.update(send(client, i, path, window, random.Random(f"{args.seed}:{i}:send")))
        time.sleep(0)  # let the probe run
        opened = fifo_opened(fifo) or len(probe.fifo_opens) > fifo_before
        rss, hwm = rss_kib(server.proc.pid)
        peak_rss = max(peak_rss, hwm)
        rec.update(rss_mib=rss // 1024, hwm_mib=hwm // 1024)
        flags = []
        if server.proc.poll() is not None:
            flags.append(f"death(rc={server.proc.returncode})")
        if "internal" in (rec.get("plan"), rec.get("ask")):
            flags.append("internal")
        if "timeout" in (rec.get("plan"), rec.get("ask")) or len(probe.slow) > slow_before:
            flags.append("freeze")
        if opened:
            flags.append("fifo_opened")
        if hwm > args.rss_budget_gb * 2**20:
            flags.append("memory")
        for op in ("plan", "ask"):
            if op in rec:
                counts[op][rec[op]] += 1
        rec["flags"] = flags
        records.write(json.dumps(rec) + "\n")
        if flags:
            shutil.copy(path, failures / f"seed{args.seed}-{i:05d}.tif")
            failed.append(rec)
            print(f"FAIL file {i}: {flags} {rec}", flush=True)
            if "death" in " ".join(flags) or "freeze" in flags or "memory" in flags or "internal" in flags:
                probe.paused.set()
                client.close()
                server.restart()
                assert server.proc is not None
                probe.endpoint = server.endpoint
                client = Client(server.endpoint, timeout_s=ASK_WAIT_S)
                probe.paused.clear()
        if not args.keep and not flags:
            path.unlink(missing_ok=True)
        if n % 50 == 0:
            loads.append(os.getloadavg()[0])
            done = n + 1
            rate = done / (time.monotonic() - t0)
            print(
                f"{done}/{len(indexes)} files, {rate:.2f}/s, worst status {probe.worst * 1000:.0f} ms, "
                f"RSS {rss // 1024} MiB (peak {peak_rss // 1024}), load {loads[-1]:.2f}, "
                f"failures {len(failed)}",
                flush=True,
            )
    wall = time.monotonic() - t0
    probe.stop()
    client.close()
    server.stop()
    records.close()
    flag_counts = Counter(f.split("(")[0] for r in failed for f in r["flags"])
    summary = {
        "files": len(indexes),
        "seed": args.seed,
        "first_index": indexes[0],
        "plan": dict(counts["plan"].most_common()),
        "ask": dict(counts["ask"].most_common()),
        "mutations": dict(kinds_seen.most_common()),
        "failures": dict(flag_counts),
        "failed_files": [r["i"] for r in failed],
        "status_probes": probe.count,
        "worst_status_ms": round(probe.worst * 1000, 1),
        "baseline_rss_mib": base_rss // 1024,
        "peak_rss_mib": peak_rss // 1024,
        "rss_budget_mib": int(args.rss_budget_gb * 1024),
        "rlimit_as_gib": args.as_gb,
        "server_starts": server.starts,
        "wall_s": round(wall, 1),
        "client_cpu_s": round(sum(os.times()[:2]) - sum(cpu0[:2]), 1),
        "load_mean": round(sum(loads) / max(1, len(loads)), 2),
        "load_max": round(max(loads, default=0.0), 2),
        "cores": os.cpu_count(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(
        f"\nfuzz run: {summary['files']} files, seed {args.seed}, {wall:.0f} s, load {summary['load_mean']} "
        f"(max {summary['load_max']}) on {summary['cores']} cores"
    )
    print(f"{'reply':<16}{'plan':>8}{'ask':>8}")
    for code in sorted(set(counts["plan"]) | set(counts["ask"])):
        print(f"{code:<16}{counts['plan'][code]:>8}{counts['ask'][code]:>8}")
    print(f"failures: {dict(flag_counts) or 'none'}; files kept in {failures}")
    print(f"status: {probe.count} probes, worst {summary['worst_status_ms']} ms")
    print(
        f"server RSS: baseline {summary['baseline_rss_mib']} MiB, peak {summary['peak_rss_mib']} MiB "
        f"(budget {summary['rss_budget_mib']} MiB, RLIMIT_AS {args.as_gb:g} GiB); {server.starts} server start(s)"
    )
    print(f"records: {out / 'records.jsonl'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
