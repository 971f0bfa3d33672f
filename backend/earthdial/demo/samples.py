"""A sample scene to try the tool on: one of the demo model's synthetic scenes (land, water, a ship and a
few other objects) as a GeoTIFF, with the objects' true footprints beside it as GeoJSON, so that what the
model returns can be checked on the map."""

from __future__ import annotations

import json
from pathlib import Path

from earthdial.demo import synthetic

SAMPLE_SEED = 7_000_001  # a scene stream used neither by train-demo nor by eval-demo
# where a sample scene is put on the map, per CRS (its upper-left corner, in that CRS's units)
ORIGINS = {
    "EPSG:32633": synthetic.ORIGIN,  # UTM 33N, near the Gulf of Taranto
    "EPSG:3857": (1_930_000.0, 4_950_000.0),  # Web Mercator, the same area
}


def sample_scene(index: int = 0) -> synthetic.Scene:
    """Scene `index` of the sample stream, or the first one after it that has a ship."""
    for i in range(index, index + 1000):
        scene = synthetic.make_scene(SAMPLE_SEED, i)
        if scene.of_class("ship"):
            return scene
    raise RuntimeError("no sample scene with a ship")  # pragma: no cover - the stream has many


def footprint(obj: synthetic.SceneObject, origin: tuple[float, float], metres: float) -> list[list[float]]:
    """The object's outline (convex hull of its drawn shape) as a closed ring in map coordinates."""
    from shapely.geometry import MultiPoint, Point

    if obj.cls == "storage tank":
        hull = Point(obj.cx, obj.cy).buffer(obj.length / 2, 16)
    else:
        hull = MultiPoint([tuple(p) for p in obj.corners()]).convex_hull
    return [[origin[0] + x * metres, origin[1] - y * metres] for x, y in hull.exterior.coords]


def write_sample_scene(path: str | Path, crs: str = "EPSG:32633", index: int = 0, size: int = 448) -> Path:
    """Write a 3-band uint8 GeoTIFF of `size` x `size` pixels covering 112 m x 112 m (0.25 m pixels at
    the default size) and `<name>.truth.geojson` beside it: each object's class, its true outline and the
    0-100 box the demo model is trained to answer. Returns the GeoTIFF's path."""
    key = crs.upper()
    if key not in ORIGINS:
        raise ValueError(f"sample scenes can be written in {', '.join(ORIGINS)}, not {crs}")
    origin = ORIGINS[key]
    scene = sample_scene(index)
    path = synthetic.write_geotiff(path, synthetic.render(scene, size), crs=key, origin=origin)
    features = [
        {
            "type": "Feature",
            "properties": {"class": o.cls, "box": list(o.box100())},
            "geometry": {"type": "Polygon", "coordinates": [footprint(o, origin, synthetic.SCENE_METRES)]},
        }
        for o in scene.objects
    ]
    # The outlines stay in the scene's CRS (they overlay it as they are); the GeoJSON 2008 `crs` member is
    # how GDAL, and so QGIS, learns that CRS (RFC 7946 would force WGS84).
    epsg = key.split(":")[1]
    named = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}"}}
    truth = {"type": "FeatureCollection", "crs": named, "features": features}
    truth_path(path).write_text(json.dumps(truth, indent=1) + "\n")
    return path


def truth_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".truth.geojson")


__all__ = ["ORIGINS", "SAMPLE_SEED", "footprint", "sample_scene", "truth_path", "write_sample_scene"]
