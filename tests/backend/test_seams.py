"""A whole-scene scan returns one box per object, also for objects cut by the tiles' seams: the merge on
hand-built boxes (parts across a seam joined, a part inside a whole box dropped, distinct objects kept,
the result independent of arrival order), and `earthdial detect` with the demo model on open sea whose
ships all lie across seams."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio.raw
import shapely
from rasterio.transform import from_origin
from shapely.geometry import Polygon, box, shape

from conftest import demo_model_args, run_earthdial, write_geotiff
from earthdial.demo import synthetic
from earthdial.scenes import runner as scenes

# two tiles of 448 px at 10 % overlap, side by side; map units = pixels, y down (any affine would do)
TILE_0 = (0.0, 0.0, 448.0, 448.0)
TILE_1 = (403.0, 0.0, 851.0, 448.0)


def ring(x1: float, y1: float, x2: float, y2: float) -> list[list[float]]:
    return [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]]


def tiles(*bounds: tuple[float, float, float, float]) -> dict[int, dict[str, Any]]:
    """Tile entries as progress events carry them (the merge reads their footprints)."""
    return {i: {"index": i, "footprint": ring(*b)} for i, b in enumerate(bounds)}


def feature(
    tile: int,
    order: int,
    x1: float,
    y1: float,
    x2: float,
    y2: float,
    label: str = "ship",
    score: float = 0.5,
    edge: float = 30.0,
) -> dict[str, Any]:
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring(x1, y1, x2, y2)]},
        "properties": {"label": label, "tile": tile, "order": order, "score": score, "edge_distance": edge},
    }


def bounds(f: dict[str, Any]) -> tuple[float, ...]:
    return tuple(round(v, 6) for v in shape(f["geometry"]).bounds)


def test_two_halves_of_one_ship_cut_by_a_seam_come_back_as_one_box_around_both() -> None:
    # the demo model's way: each tile boxes the part it sees, stopping near the middle of the overlap
    halves = [feature(0, 0, 358, 282, 426, 336), feature(1, 0, 425, 287, 488, 336, score=0.6)]
    merged = scenes.finished(halves, tiles(TILE_0, TILE_1))
    assert [bounds(f) for f in merged] == [(358, 282, 488, 336)]
    assert merged[0]["properties"]["tile"] in (0, 1) and "edge_distance" not in merged[0]["properties"]
    # on a map far from the origin (UTM metres) the joined box is still the axis-aligned one
    far = [feature(0, 0, 358, 282, 426, 336), feature(1, 0, 425, 287, 488, 336)]
    for f in far:
        f["geometry"]["coordinates"] = [
            [[x + 500_000, y + 4_000_000] for x, y in f["geometry"]["coordinates"][0]]
        ]
    far_tiles = {
        i: {"footprint": [[x + 500_000, y + 4_000_000] for x, y in ring(*b)]}
        for i, b in enumerate((TILE_0, TILE_1))
    }
    (joined,) = scenes.finished(far, far_tiles)
    assert bounds(joined) == (500_358, 4_000_282, 500_488, 4_000_336)
    assert shape(joined["geometry"]).area == (488 - 358) * (336 - 282)
    # parts that stop a few pixels short of each other (within 2 % of a tile side) are joined too
    gap = [feature(0, 0, 340, 100, 423, 160), feature(1, 0, 428, 104, 500, 158)]
    assert [bounds(f) for f in scenes.finished(gap, tiles(TILE_0, TILE_1))] == [(340, 100, 500, 160)]


def test_a_part_one_tile_saw_inside_the_whole_box_another_tile_saw_is_dropped() -> None:
    whole = feature(0, 0, 330, 200, 440, 250, edge=25.0)  # the ship lies in tile 0
    part = feature(1, 0, 405, 205, 441, 248, edge=45.0)  # tile 1 sees its bow in its left margin
    merged = scenes.finished([part, whole], tiles(TILE_0, TILE_1))
    assert [bounds(f) for f in merged] == [(330, 200, 440, 250)]


def test_distinct_objects_near_a_seam_stay_distinct() -> None:
    t = tiles(TILE_0, TILE_1)
    # two ships moored side by side in the strip both tiles see: each tile boxes both
    moored = [
        feature(0, 0, 405, 100, 445, 160),
        feature(0, 1, 405, 165, 445, 225),
        feature(1, 0, 406, 101, 444, 161),
        feature(1, 1, 405, 166, 446, 224),
    ]
    assert sorted(bounds(f) for f in scenes.finished(moored, t)) == [
        (405, 100, 445, 160),
        (405, 165, 445, 225),
    ]
    # two ships meeting corner to corner at the seam, not lined up along it
    corner = [feature(0, 0, 330, 100, 426, 150), feature(1, 0, 424, 148, 520, 200)]
    assert len(scenes.finished(corner, t)) == 2
    # two ships end to end inside one tile: the model said two, so two
    one_tile = [feature(0, 0, 100, 100, 200, 140), feature(0, 1, 201, 100, 300, 140)]
    assert len(scenes.finished(one_tile, t)) == 2
    # other labels are other objects
    labels = [feature(0, 0, 358, 282, 426, 336), feature(1, 0, 425, 287, 488, 336, label="boat")]
    assert len(scenes.finished(labels, t)) == 2


def test_an_object_across_four_tiles_is_one_box_whatever_order_its_parts_arrive_in() -> None:
    t = tiles(TILE_0, TILE_1, (0, 403, 448, 851), (403, 403, 851, 851))
    parts = [feature(0, 0, 380, 380, 427, 426), feature(1, 0, 423, 385, 470, 428, score=0.7),
             feature(2, 0, 383, 424, 425, 470), feature(3, 0, 426, 425, 472, 468, score=0.4),
             feature(0, 1, 10, 10, 60, 40)]  # fmt: skip
    first = scenes.finished([dict(f, properties=dict(f["properties"])) for f in parts], t)
    assert sorted(bounds(f) for f in first) == [(10, 10, 60, 40), (380, 380, 472, 470)]
    rng = random.Random(0)
    for _ in range(5):
        shuffled = [dict(f, properties=dict(f["properties"])) for f in parts]
        rng.shuffle(shuffled)
        again = scenes.finished(shuffled, dict(reversed(list(t.items()))))
        assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)


def test_parts_of_a_rotated_raster_are_joined_into_a_rotated_box() -> None:
    """A rotated grid (its tiles and boxes turned 30 degrees on the map): the same rule, and the box
    around the parts is the rotated rectangle, not the map's axis-aligned one."""
    a = math.radians(30)

    def turn(b: tuple[float, float, float, float]) -> list[list[float]]:
        return [[x * math.cos(a) - y * math.sin(a), x * math.sin(a) + y * math.cos(a)] for x, y in ring(*b)]

    t = {0: {"footprint": turn(TILE_0)}, 1: {"footprint": turn(TILE_1)}}
    halves = []
    for k, b in enumerate([(358, 282, 426, 336), (425, 287, 488, 336)]):
        f = feature(k, 0, *b)
        f["geometry"]["coordinates"] = [turn(b)]
        halves.append(f)
    (merged,) = scenes.finished(halves, t)
    whole = Polygon(turn((358, 282, 488, 336)))
    got = shape(merged["geometry"])
    assert got.intersection(whole).area / got.union(whole).area > 0.99


# -- end to end: `earthdial detect` with the demo model ---------------------------------------------

SEAM_SEED = 9


def test_detect_on_a_sea_whose_ships_all_lie_across_seams_returns_one_box_per_ship(tmp_path: Path) -> None:
    """20 tiles of 448 px (the default tile and overlap), 10 ships, none seen whole by any tile."""
    sea = synthetic.ships_across_seams(SEAM_SEED)
    path = tmp_path / "sea.tif"
    transform = from_origin(500_000, 4_000_000, 0.25, 0.25)
    write_geotiff(path, sea.image, transform=transform)
    out = tmp_path / "ships.gpkg"
    run = run_earthdial(
        "detect",
        str(path),
        "--prompt",
        "ships",
        *demo_model_args(),
        "-o",
        str(out),
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "20 tiles" in run.stderr
    _, _, geometries, _ = pyogrio.raw.read(str(out))
    inverse = ~transform
    found = [Polygon([inverse @ xy for xy in g.exterior.coords]) for g in shapely.from_wkb(geometries)]
    ships = [box(*b) for b in sea.boxes()]
    on_ship = [0] * len(ships)
    for b in found:  # a box is on the ship that holds most of it (at least half)
        share = [b.intersection(s).area / b.area for s in ships]
        if max(share) >= 0.5:
            on_ship[int(np.argmax(share))] += 1
    assert sum(n == 1 for n in on_ship) >= 9, on_ship
    assert max(on_ship) == 1, on_ship  # no ship comes back in pieces or twice
