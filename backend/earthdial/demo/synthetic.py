"""Synthetic overhead scenes for the demo model: land and water with ships, airplanes, storage tanks and
buildings, and before/after pairs in which objects appear or disappear.

A scene is laid out in unit coordinates ((0, 0) top-left, (1, 1) bottom-right, x right, y down) and
rendered at any pixel size, so the same layout can be drawn twice for a pair or at several resolutions.
Everything is deterministic in (seed, index): `make_scene(seed, i)` is the same scene on every machine.

What each class looks like from above:

* ship: an elongated bright (sometimes dark) hull with a pointed bow and a superstructure block,
  often trailing a pale wake; always on water;
* airplane: a cross - fuselage, straight wings a little ahead of the middle, a small tail plane;
  light grey, on land;
* storage tank: a light disc with a darker rim and a shadow crescent; on land;
* building: a rectangle with a roof tone (red, orange, brown, slate, grey) split by a ridge; on land.

A fifth class the shipped demo model never saw, for the fine-tuning proof (docs/demo-model.md):

* tree: a large round crown, lumpy at the edge, green with a lit side and a long shadow; on land. It is
  not in `CLASSES`, so `make_scene` and `make_pair` draw exactly what they drew before;
  `make_scene_with(seed, index, NEW_CLASS)` adds one to a scene of its own stream.

Clutter that is none of these: rocks and shrubs on land, light specks (debris, foam) on water, roads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

CLASSES = ("ship", "airplane", "storage tank", "building")
NEW_CLASS = "tree"  # never in the demo model's training (see the module docstring)

# Size ranges, as a fraction of the scene side: (length or diameter) and width / length.
_SIZE = {
    "ship": ((0.20, 0.34), (0.28, 0.38)),
    "airplane": ((0.18, 0.30), (0.85, 1.0)),  # width = wing span
    "storage tank": ((0.12, 0.20), (1.0, 1.0)),
    "building": ((0.13, 0.24), (0.45, 1.0)),
    NEW_CLASS: ((0.14, 0.22), (1.0, 1.0)),  # crown diameter
}
_ROUND = ("storage tank", NEW_CLASS)  # outlines that are discs
MARGIN = 0.02  # objects keep this far from the scene edge (unit coordinates)


@dataclass(frozen=True)
class SceneObject:
    cls: str
    cx: float  # centre, unit coordinates
    cy: float
    length: float  # along the object's own axis (unit coordinates)
    width: float
    angle: float  # degrees, clockwise on screen (x right, y down), of the object's long axis
    color: tuple[float, float, float]
    variant: int = 0  # a per-object style switch (dark ship, wake, ...)

    def parts(self) -> list[tuple[float, float, float, float]]:
        """The object's outline as rectangles (u offset, v offset, half length, half width) in its own
        frame (u along the long axis, towards the bow/nose; v across); a tank is one square-ish part."""
        L, W = self.length, self.width
        if self.cls == "airplane":
            return [
                (0.0, 0.0, L / 2, 0.06 * L),  # fuselage
                (0.08 * L, 0.0, 0.09 * L, W / 2),  # wings
                (-0.40 * L, 0.0, 0.06 * L, 0.19 * L),  # tail plane
            ]
        return [(0.0, 0.0, L / 2, W / 2)]

    def corners(self) -> np.ndarray:
        """All corner points of the outline in unit scene coordinates, (n, 2)."""
        if self.cls in _ROUND:
            r = self.length / 2
            return np.array([[self.cx - r, self.cy - r], [self.cx + r, self.cy + r]])
        a = math.radians(self.angle)
        ca, sa = math.cos(a), math.sin(a)
        uv = []
        if self.cls == "ship":  # the hull's outline: a pointed bow, a slightly narrower stern
            u = np.linspace(-self.length / 2, self.length / 2, 25)
            half = _hull_half_width(u, self.length, self.width)
            uv = list(zip(u, half, strict=True)) + list(zip(u, -half, strict=True))
        else:
            for du, dv, hl, hw in self.parts():
                uv += [(du + su * hl, dv + sv * hw) for su, sv in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
        return np.array([(self.cx + u * ca - v * sa, self.cy + u * sa + v * ca) for u, v in uv])

    def bounds(self) -> tuple[float, float, float, float]:
        """Axis-aligned (x1, y1, x2, y2) of the outline, unit coordinates."""
        c = self.corners()
        return float(c[:, 0].min()), float(c[:, 1].min()), float(c[:, 0].max()), float(c[:, 1].max())

    def box100(self) -> tuple[int, int, int, int, int]:
        """The object's box as the model writes it: [x1, y1, x2, y2, 0] on the 0-100 scale (axis-aligned,
        angle 0)."""
        x1, y1, x2, y2 = self.bounds()
        return (_to100(x1), _to100(y1), _to100(x2), _to100(y2), 0)


def _hull_half_width(u: np.ndarray, length: float, width: float) -> np.ndarray:
    """A ship hull's half width along its axis u (-length/2 stern .. +length/2 bow)."""
    hl = length / 2
    taper = np.clip((hl - u) / (0.35 * length), 0.0, 1.0)  # the bow narrows to a point
    stern = np.clip((u + hl) / (0.08 * length), 0.0, 1.0) * 0.3 + 0.7
    return (width / 2) * np.minimum(taper, stern) ** 0.7


def _to100(v: float) -> int:
    return int(min(max(round(v * 100.0), 0), 100))


@dataclass
class Scene:
    """A layout: background parameters plus objects. `render` draws it."""

    seed: tuple[int, ...]
    objects: list[SceneObject]
    water_level: float  # threshold on the terrain field below which there is water (-inf: no water)
    terrain: dict = field(default_factory=dict)  # background parameters (colours, fields' coefficients)

    def of_class(self, cls: str) -> list[SceneObject]:
        return [o for o in self.objects if o.cls == cls]

    def main_object(self) -> SceneObject:
        """The largest object (by outline area), the answer to "classify the main object"."""
        return max(self.objects, key=_area)


def _area(o: SceneObject) -> float:
    if o.cls in _ROUND:
        return math.pi * (o.length / 2) ** 2
    return sum(4 * hl * hw for _, _, hl, hw in o.parts())


# ------------------------------------------------------------------------------------------------
# Terrain
# ------------------------------------------------------------------------------------------------


def _field(terrain: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth terrain height: a tilted plane plus a few random sinusoids."""
    gx, gy = terrain["tilt"]
    f = gx * (x - 0.5) + gy * (y - 0.5)
    for kx, ky, ph, amp in terrain["waves"]:
        f = f + amp * np.sin(2 * math.pi * (kx * x + ky * y) + ph)
    return f


def _lowres_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Smooth noise (channels, size, size): a cells x cells random grid upsampled bilinearly."""
    grid = rng.normal(0.0, 1.0, (channels, cells + 1, cells + 1))
    t = np.linspace(0, cells, size, endpoint=False) + cells / (2 * size)
    i0 = np.floor(t).astype(int)
    f = t - i0
    rows = grid[:, i0, :] * (1 - f)[None, :, None] + grid[:, i0 + 1, :] * f[None, :, None]
    return rows[:, :, i0] * (1 - f)[None, None, :] + rows[:, :, i0 + 1] * f[None, None, :]


def _new_terrain(rng: np.random.Generator) -> tuple[dict, float]:
    kind = rng.choice(["coast", "coast", "coast", "land", "harbour_water"], p=[0.3, 0.25, 0.2, 0.15, 0.1])
    angle = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(2.0, 5.0)
    terrain = {
        "tilt": (strength * math.cos(angle), strength * math.sin(angle)),
        "waves": [
            (
                rng.uniform(-2.5, 2.5),
                rng.uniform(-2.5, 2.5),
                rng.uniform(0, 2 * math.pi),
                rng.uniform(0.1, 0.5),
            )
            for _ in range(3)
        ],
        "land": tuple(rng.choice(_LAND_COLOURS) + rng.normal(0, 8, 3)),
        "land2": tuple(rng.choice(_LAND_COLOURS) + rng.normal(0, 8, 3)),
        "water": tuple(rng.choice(_WATER_COLOURS) + rng.normal(0, 5, 3)),
        "patch_cells": int(rng.integers(3, 8)),
        "texture": float(rng.uniform(4.0, 10.0)),
        "roads": [
            (rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0, 180), rng.uniform(0.012, 0.03))
            for _ in range(int(rng.choice([0, 0, 1, 2])))
        ],
        "clutter": int(rng.integers(4, 20)),
        "specks": int(rng.integers(0, 12)),
    }
    # water level: a quantile of the field over a coarse grid, for the share of water wanted
    g = np.linspace(0, 1, 32)
    f = _field(terrain, *np.meshgrid(g, g)).ravel()
    if kind == "land":
        level = -math.inf
    else:
        share = rng.uniform(0.3, 0.6) if kind == "coast" else rng.uniform(0.65, 0.85)
        level = float(np.quantile(f, share))
    return terrain, level


_LAND_COLOURS = np.array(
    [
        (96, 112, 70),
        (120, 124, 80),
        (140, 128, 96),
        (110, 100, 78),
        (150, 146, 120),
        (88, 104, 66),
        (130, 118, 92),
        (104, 108, 100),
    ],
    dtype=np.float64,
)
_WATER_COLOURS = np.array(
    [(28, 58, 88), (34, 70, 96), (22, 48, 70), (40, 78, 90), (30, 62, 78)], dtype=np.float64
)
_ROOFS = np.array(
    [(170, 70, 56), (196, 110, 64), (120, 84, 64), (86, 92, 104), (150, 150, 150), (110, 56, 50)],
    dtype=np.float64,
)


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------


def is_water(scene: Scene, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
    return (
        _field(scene.terrain, np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        < scene.water_level
    )


_GRID = 48  # cells per side of the coarse water map used to place objects


def water_grid(scene: Scene) -> np.ndarray:
    """Water on a coarse 48 x 48 grid (cell centres, row-major from the top left), cached in the terrain
    dict (a turned scene carries its turned grid there)."""
    grid = scene.terrain.get("_wet")
    if grid is None:
        g = (np.arange(_GRID) + 0.5) / _GRID
        grid = is_water(scene, g[None, :], g[:, None])
        scene.terrain["_wet"] = grid
    return grid


def _footprint_ok(scene: Scene, obj: SceneObject, want_water: bool) -> bool:
    x1, y1, x2, y2 = obj.bounds()
    if x1 < MARGIN or y1 < MARGIN or x2 > 1 - MARGIN or y2 > 1 - MARGIN:
        return False
    # sample the outline's bounding box (plus a rim) on a grid: all water for ships, all land otherwise
    pad = 0.02  # the outline's box plus a rim, on the coarse water map
    c0, c1 = max(int((x1 - pad) * _GRID), 0), min(int((x2 + pad) * _GRID) + 1, _GRID)
    r0, r1 = max(int((y1 - pad) * _GRID), 0), min(int((y2 + pad) * _GRID) + 1, _GRID)
    wet = water_grid(scene)[r0:r1, c0:c1]
    if want_water and not wet.all():
        return False
    if not want_water and wet.any():
        return False
    for other in scene.objects:  # no overlaps, and a little room between objects
        ox1, oy1, ox2, oy2 = other.bounds()
        if x1 < ox2 + 0.02 and ox1 < x2 + 0.02 and y1 < oy2 + 0.02 and oy1 < y2 + 0.02:
            return False
    return True


def _random_object(rng: np.random.Generator, cls: str) -> SceneObject:
    (lo, hi), (wlo, whi) = _SIZE[cls]
    length = float(rng.uniform(lo, hi))
    width = length * float(rng.uniform(wlo, whi))
    angle = float(rng.uniform(0, 180)) if cls != "airplane" else float(rng.uniform(0, 360))
    variant = int(rng.integers(0, 4))
    if cls == "ship":
        grey = rng.uniform(200, 245) if variant != 3 else rng.uniform(70, 110)
        color = (grey + rng.normal(0, 6), grey + rng.normal(0, 6), grey + rng.normal(0, 6))  # the same draws
    elif cls == "airplane":
        g = rng.uniform(190, 235)
        color = (g, g, g + rng.uniform(-5, 8))
    elif cls == "storage tank":
        g = rng.uniform(200, 240)
        color = (g, g, g)
        width = length
        angle = 0.0
    elif cls == NEW_CLASS:
        color = (rng.uniform(40, 70), rng.uniform(95, 135), rng.uniform(30, 55))
        width, angle = length, float(rng.uniform(0, 360))  # the angle turns the crown's lumps
    else:
        r, g, b = rng.choice(_ROOFS) + rng.normal(0, 8, 3)
        color = (r, g, b)
        if rng.random() < 0.5:  # buildings mostly square to the street grid
            angle = float(rng.choice([0.0, 90.0]) + rng.normal(0, 4))
    return SceneObject(
        cls,
        0.5,
        0.5,
        length,
        width,
        angle % 360 if cls == "airplane" else angle % 180,
        (float(color[0]), float(color[1]), float(color[2])),
        variant,
    )


def place(scene: Scene, rng: np.random.Generator, cls: str, tries: int = 40) -> SceneObject | None:
    """A new object of `cls` at a free, legal spot of the scene (not added), or None when none was found."""
    wet = water_grid(scene)
    inner = slice(_GRID // 10, _GRID - _GRID // 10)
    cells = np.argwhere((wet if cls == "ship" else ~wet)[inner, inner]) + _GRID // 10
    if len(cells) == 0:
        return None
    for _ in range(tries):
        obj = _random_object(rng, cls)
        r, c = cells[int(rng.integers(0, len(cells)))]
        u, v = rng.uniform(0.0, 1.0, 2)
        obj = replace(obj, cx=float((c + u) / _GRID), cy=float((r + v) / _GRID))
        if _footprint_ok(scene, obj, want_water=cls == "ship"):
            return obj
    return None


def make_scene(seed: int, index: int, min_objects: int = 1, max_objects: int = 4) -> Scene:
    """Scene `index` of the stream `seed`: a background and 1-4 objects, at most one of each class."""
    rng = np.random.default_rng([seed, index, 0x5CE])
    terrain, level = _new_terrain(rng)
    scene = Scene((seed, index), [], level, terrain)
    terrain["layout_seed"] = int(rng.integers(0, 2**31))  # patches, clutter, texture
    terrain["noise_seed"] = int(rng.integers(0, 2**31))  # pixel noise: new for each image of a pair
    want = int(rng.integers(min_objects, max_objects + 1))
    classes = list(rng.permutation(CLASSES))
    for cls in classes:
        if len(scene.objects) >= want:
            break
        obj = place(scene, rng, str(cls))
        if obj is not None:
            scene.objects.append(obj)
    if not scene.objects:  # all-water scene with no room, or bad luck: fall back to one object anywhere legal
        for cls in CLASSES:
            obj = place(scene, rng, cls, tries=200)
            if obj is not None:
                scene.objects.append(obj)
                break
    return scene


def make_scene_with(seed: int, index: int, cls: str = NEW_CLASS, max_objects: int = 3) -> Scene:
    """Scene `index` of the stream `seed` (`make_scene`, at most `max_objects` objects) plus one object of
    `cls`, placed with a random stream of its own; None of the other objects change. Returns the scene
    even when no spot was found (then without `cls`): callers check `scene.of_class(cls)`."""
    scene = make_scene(seed, index, max_objects=max_objects)
    rng = np.random.default_rng([seed, index, 0x7EE])
    obj = place(scene, rng, cls, tries=200)
    if obj is not None:
        scene.objects.append(obj)
    return scene


def _remove_one(before: Scene, after: Scene, rng: np.random.Generator, changed: list) -> bool:
    """An object of the earlier image goes (never one that just appeared)."""
    present = [o for o in after.objects if o in before.objects]
    if not present:
        return False
    obj = present[int(rng.integers(0, len(present)))]
    after.objects = [o for o in after.objects if o is not obj]
    changed.append(("disappeared", obj))
    return True


def _add_one(before: Scene, after: Scene, rng: np.random.Generator, changed: list) -> bool:
    """A new object of a class in neither image (so the pair never swaps one object for a look-alike)."""
    free = [c for c in CLASSES if not before.of_class(c) and not after.of_class(c)]
    for cls in rng.permutation(free) if free else []:
        obj = place(after, rng, str(cls))
        if obj is not None:
            after.objects.append(obj)
            changed.append(("appeared", obj))
            return True
    return False


@dataclass
class Pair:
    before: Scene
    after: Scene
    changed: list[tuple[str, SceneObject]]  # ("appeared" | "disappeared", object)


def make_pair(seed: int, index: int, max_objects: int = 4) -> Pair:
    """A before/after pair of one layout: half the pairs have no change (same objects; new noise and a
    slight change of light), the others have one or two objects appearing or disappearing."""
    rng = np.random.default_rng([seed, index, 0xC4A])
    base = make_scene(seed, index, max_objects=max_objects)
    before = Scene(base.seed, list(base.objects), base.water_level, dict(base.terrain))
    after = Scene(base.seed, list(base.objects), base.water_level, dict(base.terrain))
    changed: list[tuple[str, SceneObject]] = []
    if rng.random() < 0.5:
        for _ in range(1 if rng.random() < 0.75 else 2):
            go = bool(rng.random() < 0.5)
            for attempt in (go, not go):  # if one kind of change is impossible, try the other
                if attempt and _remove_one(before, after, rng, changed):
                    break
                if not attempt and _add_one(before, after, rng, changed):
                    break
    # the later image has its own noise and light
    after.terrain["noise_seed"] = int(rng.integers(0, 2**31))
    after.terrain["light"] = float(rng.uniform(0.92, 1.08))
    return Pair(before, after, changed)


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------


def _coverage(d: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased coverage from a distance-like field d (unit coordinates, negative inside)."""
    return np.clip(0.5 - d / px, 0.0, 1.0)


def _paint(img: np.ndarray, cov: np.ndarray, color, r0: int, c0: int) -> None:
    h, w = cov.shape
    region = img[:, r0 : r0 + h, c0 : c0 + w]
    col = np.asarray(color, dtype=np.float64)[:, None, None]
    region += (col - region) * cov[None]


def _draw_object(img: np.ndarray, obj: SceneObject, size: int, labels: np.ndarray | None = None) -> None:
    """Draw one object; with `labels`, also mark the pixels it covers (at least half) with 1 + its class."""
    px = 1.0 / size
    x1, y1, x2, y2 = obj.bounds()
    pad = (0.32 if obj.cls == "ship" else 0.06) * obj.length + 3 * px
    c0, c1 = max(int((x1 - pad) * size), 0), min(int(math.ceil((x2 + pad) * size)), size)
    r0, r1 = max(int((y1 - pad) * size), 0), min(int(math.ceil((y2 + pad) * size)), size)
    if c1 <= c0 or r1 <= r0:
        return
    xs = (np.arange(c0, c1) + 0.5) * px
    ys = (np.arange(r0, r1) + 0.5) * px
    X, Y = np.meshgrid(xs - obj.cx, ys - obj.cy)
    a = math.radians(obj.angle)
    U = X * math.cos(a) + Y * math.sin(a)  # along the long axis
    V = -X * math.sin(a) + Y * math.cos(a)
    L, W = obj.length, obj.width
    color = np.asarray(obj.color)
    if obj.cls == "ship":
        if obj.variant in (0, 1):  # a pale wake behind the stern, drawn first (under the hull)
            wake = np.maximum(
                np.abs(V) - (W / 2) * (1 + (-U - L / 2) / L), np.maximum(-U - 0.8 * L, U + L / 2)
            )
            wake_col = img[:, r0:r1, c0:c1].mean(axis=(1, 2)) + 30.0
            _paint(img, 0.4 * _coverage(wake, px), wake_col, r0, c0)
        hull = np.maximum(np.abs(V) - _hull_half_width(U, L, W), np.abs(U) - L / 2)
        body = _coverage(hull, px)
        _paint(img, body, color, r0, c0)
        block = np.maximum(np.abs(U + 0.15 * L) - 0.12 * L, np.abs(V) - 0.28 * W)  # superstructure
        _paint(img, _coverage(block, px), color * 0.75 + 20, r0, c0)
    elif obj.cls == "airplane":
        parts = [np.maximum(np.abs(U - du) - hl, np.abs(V - dv) - hw) for du, dv, hl, hw in obj.parts()]
        d = np.minimum.reduce(parts)
        # nose and wing tips slightly rounded by a shadow copy offset to the bottom-right first
        shadow = np.roll(np.roll(d, 2, axis=0), 2, axis=1)
        _paint(img, 0.35 * _coverage(shadow, px), (40, 40, 40), r0, c0)
        body = _coverage(d, px)
        _paint(img, body, color, r0, c0)
    elif obj.cls == "storage tank":
        R = L / 2
        dist = np.hypot(X, Y)
        shadow = np.hypot(X - 0.12 * R, Y - 0.12 * R) - R
        _paint(img, 0.45 * _coverage(shadow, px), (35, 35, 35), r0, c0)
        body = _coverage(dist - R, px)
        _paint(img, body, color * 0.78, r0, c0)  # rim
        _paint(img, _coverage(dist - 0.86 * R, px), color, r0, c0)  # roof
        if obj.variant % 2:
            _paint(img, 0.6 * _coverage(dist - 0.15 * R, px), color * 0.85, r0, c0)  # roof vent
    elif obj.cls == NEW_CLASS:
        R = L / 2
        theta = np.arctan2(Y, X) - a
        edge = R * (1 + 0.07 * np.sin(5 * theta) + 0.04 * np.sin(9 * theta + 1.0))  # a lumpy crown
        dist = np.hypot(X, Y)
        shadow = np.hypot(X - 0.22 * R, Y - 0.22 * R) - edge
        _paint(img, 0.55 * _coverage(shadow, px), (25, 32, 20), r0, c0)
        body = _coverage(dist - edge, px)
        _paint(img, body, color * 0.7, r0, c0)  # the shaded side
        lit = np.hypot(X + 0.2 * R, Y + 0.2 * R) - 0.7 * R
        _paint(img, 0.8 * _coverage(lit, px), color, r0, c0)
        _paint(img, 0.5 * _coverage(np.hypot(X + 0.35 * R, Y + 0.3 * R) - 0.25 * R, px), color * 1.25, r0, c0)
    else:  # building
        body = np.maximum(np.abs(U) - L / 2, np.abs(V) - W / 2)
        shadow = np.maximum(np.abs(U - 0.06 * L) - L / 2, np.abs(V - 0.06 * L) - W / 2)
        _paint(img, 0.4 * _coverage(shadow, px), (30, 30, 30), r0, c0)
        body = _coverage(body, px)
        _paint(img, body, color, r0, c0)
        roof = np.maximum(np.maximum(np.abs(U) - L / 2, np.abs(V) - W / 2), -V)  # one slope lit, one in shade
        _paint(img, 0.5 * _coverage(roof, px), color * 0.72, r0, c0)
    if labels is not None:
        region = labels[r0 : r0 + body.shape[0], c0 : c0 + body.shape[1]]
        region[body >= 0.5] = 1 + (CLASSES + (NEW_CLASS,)).index(obj.cls)


def _disc(img: np.ndarray, cx: float, cy: float, r: float, color, alpha: float = 1.0) -> None:
    """A small anti-aliased disc, drawn in its own patch."""
    size = img.shape[-1]
    px = 1.0 / size
    c0, c1 = max(int((cx - r) * size) - 1, 0), min(int((cx + r) * size) + 2, size)
    r0, r1 = max(int((cy - r) * size) - 1, 0), min(int((cy + r) * size) + 2, size)
    if c1 <= c0 or r1 <= r0:
        return
    xs = (np.arange(c0, c1) + 0.5) * px - cx
    ys = (np.arange(r0, r1) + 0.5) * px - cy
    d = np.sqrt(xs[None, :] ** 2 + ys[:, None] ** 2) - r
    _paint(img, alpha * _coverage(d, px), color, r0, c0)


def render(scene: Scene, size: int = 112, objects: bool = True) -> np.ndarray:
    """The scene as a (3, size, size) uint8 image; `objects=False` draws the background only."""
    return render_with_labels(scene, size, objects)[0]


def render_with_labels(scene: Scene, size: int = 112, objects: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The image and a (size, size) uint8 label map: 0 background, 1 + class index where an object is."""
    t = scene.terrain
    px = 1.0 / size
    g = (np.arange(size) + 0.5) * px
    X, Y = g[None, :], g[:, None]
    land = np.asarray(t["land"])[:, None, None]
    land2 = np.asarray(t["land2"])[:, None, None]
    patches = _lowres_noise(np.random.default_rng([t["layout_seed"], 7]), size, t["patch_cells"], 1)[0]
    img = np.where(patches > 0.3, land2, land) + 6.0 * patches[None]
    for rx, ry, rdeg, rw in t["roads"]:
        a = math.radians(rdeg)
        d = np.abs(-(X - rx) * math.sin(a) + (Y - ry) * math.cos(a)) - rw / 2
        _paint(img, _coverage(d, px), (118, 116, 110), 0, 0)
    crng = np.random.default_rng([t["layout_seed"], 11])
    for _ in range(t["clutter"]):  # rocks and shrubs: small dark or greenish blobs
        cx, cy, r = crng.uniform(0, 1), crng.uniform(0, 1), crng.uniform(0.006, 0.02)
        _disc(img, cx, cy, r, (50, 70, 40) if crng.random() < 0.6 else (80, 76, 70))
    if scene.water_level > -math.inf:
        f = _field(t, X, Y)
        shore = np.clip((scene.water_level - f) / 0.04, 0.0, 1.0)  # a soft shoreline
        water = np.asarray(t["water"])[:, None, None] + 3.0 * np.sin(40 * (X * 0.7 + Y * 0.3))[None]
        img = img + (water - img) * shore[None]
        for _ in range(t["specks"]):  # foam and debris: light specks on the water
            cx, cy, r = crng.uniform(0, 1), crng.uniform(0, 1), crng.uniform(0.003, 0.008)
            if f[min(int(cy * size), size - 1), min(int(cx * size), size - 1)] < scene.water_level:
                _disc(img, cx, cy, r, (170, 175, 175), 0.8)
    texture = _lowres_noise(np.random.default_rng([t["layout_seed"], 13]), size, 24, 1)[0]
    img += (t["texture"] * 0.5) * texture[None]
    labels = np.zeros((size, size), dtype=np.uint8)
    if objects:
        for obj in scene.objects:
            _draw_object(img, obj, size, labels)
    noise = np.random.default_rng([t["noise_seed"], size]).standard_normal(img.shape, dtype=np.float32)
    img = img * t.get("light", 1.0) + 3.0 * noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels


# ------------------------------------------------------------------------------------------------
# Objects across a scan's tile seams
# ------------------------------------------------------------------------------------------------


@dataclass
class SeamScene:
    """Open sea the size of cols x rows scan tiles, drawn as the top-left corner of a `side` px layout."""

    image: np.ndarray  # (3, height, width) uint8
    ships: list[SceneObject]  # in the layout's unit coordinates
    side: int

    def boxes(self) -> list[tuple[float, float, float, float]]:
        """Each ship's axis-aligned (x1, y1, x2, y2) in the image's pixels."""
        return [
            (x1 * self.side, y1 * self.side, x2 * self.side, y2 * self.side)
            for x1, y1, x2, y2 in (o.bounds() for o in self.ships)
        ]


# ten pairs of neighbouring tiles of a 4 x 5 plan, no tile in two: ((col, row), side by side, not one above)
SEAM_PAIRS = (
    ((0, 0), True),
    ((2, 0), True),
    ((0, 1), True),
    ((2, 1), True),
    ((0, 4), True),
    ((2, 4), True),
    ((0, 2), False),
    ((1, 2), False),
    ((2, 2), False),
    ((3, 2), False),
)


def ships_across_seams(
    seed: int, tile: int = 448, overlap: float = 0.1, lengths: tuple[float, float] = (100.0, 150.0)
) -> SeamScene:
    """Open sea covering 4 x 5 tiles of a scan's plan (`tile` px, `overlap`), with one ship across the
    seam of each pair in SEAM_PAIRS: the ship's centre within 20 px of the middle of the strip both tiles
    see, along the seam inside both tiles (clear of the crossing seams), `lengths` px long, heading within
    45 degrees of square to the seam. No tile sees more than one ship, and none sees its ship whole."""
    stride = max(1, int(tile * (1 - overlap)))  # as scenes.plan_tiles lays tiles out
    width, height = tile + 3 * stride, tile + 4 * stride
    side = max(width, height)
    rng = np.random.default_rng([seed, 0x5EA])
    terrain, _ = _new_terrain(rng)
    terrain.update(layout_seed=int(rng.integers(0, 2**31)), noise_seed=int(rng.integers(0, 2**31)), roads=[])
    ships = []
    for (c, r), beside in SEAM_PAIRS:
        ship = _random_object(rng, "ship")
        length = float(rng.uniform(*lengths))
        across = stride * ((c if beside else r) + 1) + (tile - stride) / 2 + float(rng.uniform(-20, 20))
        along = (
            stride * (r if beside else c)
            + (tile - stride)
            + float(rng.uniform(0.2, 0.8)) * (2 * stride - tile - length)
        )
        cx, cy = (across, along + length / 2) if beside else (along + length / 2, across)
        angle = (0.0 if beside else 90.0) + float(rng.uniform(-45, 45))
        ships.append(
            replace(
                ship,
                cx=cx / side,
                cy=cy / side,
                length=length / side,
                angle=angle % 180,
                width=length / side * ship.width / ship.length,
            )
        )
    scene = Scene((seed,), ships, math.inf, terrain)  # water everywhere
    image = np.ascontiguousarray(render(scene, side)[:, :height, :width])
    return SeamScene(image, ships, side)


# ------------------------------------------------------------------------------------------------
# GeoTIFFs
# ------------------------------------------------------------------------------------------------

SCENE_METRES = 112.0  # every scene covers 112 m x 112 m of ground, whatever its pixel size
ORIGIN = (500_000.0, 4_000_000.0)  # upper-left corner in UTM 33N (EPSG:32633)


def write_geotiff(
    path: str | Path,
    image: np.ndarray,
    crs: str = "EPSG:32633",
    origin=ORIGIN,
    pixel_m: float | None = None,
) -> Path:
    """Write a (3, rows, cols) uint8 image as an RGB GeoTIFF covering SCENE_METRES square, or with square
    pixels of `pixel_m` metres."""
    import rasterio
    from rasterio.transform import from_origin

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bands, rows, cols = image.shape
    size_x, size_y = (pixel_m, pixel_m) if pixel_m else (SCENE_METRES / cols, SCENE_METRES / rows)
    transform = from_origin(origin[0], origin[1], size_x, size_y)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=cols,
        height=rows,
        count=bands,
        dtype="uint8",
        crs=crs,
        transform=transform,
        photometric="RGB",
    ) as dst:
        dst.write(image)
    return path


__all__ = [
    "CLASSES",
    "NEW_CLASS",
    "Pair",
    "Scene",
    "SceneObject",
    "is_water",
    "make_pair",
    "make_scene",
    "make_scene_with",
    "place",
    "render",
    "render_with_labels",
    "ships_across_seams",
    "water_grid",
    "write_geotiff",
]
