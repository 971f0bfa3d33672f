"""What commands write: boxes as a GeoPackage layer or a GeoJSON file (-o), a preview PNG (--preview);
refused before any model runs."""

from __future__ import annotations

import argparse
import os
from datetime import datetime, timezone
from typing import Any

from earthdial.contract.wire import EarthDialError


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse unwritable outputs before any model runs (write_features and write_png check again)."""
    if getattr(args, "output", None):
        from earthdial.outputs.files import check_target

        check_target(args.output, getattr(args, "layer", None), getattr(args, "overwrite", False))
    elif getattr(args, "layer", None):
        raise EarthDialError(
            "bad_request", "--layer names a layer of the -o GeoPackage: pass -o FILE.gpkg too"
        )
    if getattr(args, "preview", None):
        from earthdial.outputs.preview import check_target as check_preview

        check_preview(args.preview)


def write_output(path: str | None, reply: dict[str, Any], args: argparse.Namespace | None = None) -> None:
    """Write the reply's boxes where -o says: a new layer of a GeoPackage, or a GeoJSON file."""
    features = reply["features"]
    n = len(features["features"])
    if not path:
        print(f"{n} grounded box(es); pass -o OUT.gpkg to write them")
        return
    from earthdial.contract.result_features import layer_name as result_layer_name
    from earthdial.outputs.files import layer_name, write_features

    # named from what the backend recorded (task, the prompt it kept, source, time; scans say so)
    shared = reply.get("properties") or (features["features"][0]["properties"] if n else None)
    base = result_layer_name(shared, scan=bool(reply.get("scan"))) if shared else None
    if base is None and args is not None:
        rasters = getattr(args, "rasters", None) or [getattr(args, "raster", None)]
        task = getattr(args, "task", None) or getattr(args, "command", None)
        base = layer_name(task, getattr(args, "prompt", None), rasters, datetime.now(timezone.utc))
    layer = write_features(
        path,
        features,
        getattr(args, "layer", None),
        overwrite=getattr(args, "overwrite", False),
        base_name=base,
    )
    print(
        f"wrote {n} feature(s) to {os.path.realpath(path)} (layer {layer!r}, CRS {str(features['crs'])[:60]})"
    )


def write_preview(args: argparse.Namespace, reply: dict[str, Any]) -> None:
    """The window that was asked about, as the server read it, with the returned boxes drawn on it."""
    from earthdial.geo.imagery import read_chip
    from earthdial.outputs import preview

    chip = read_chip(
        os.path.abspath(args.raster),
        bands=reply["chip"]["bands"],
        bounds=args.bounds,
        bounds_crs=args.bounds_crs,
    )
    path = preview.write_png(args.preview, preview.draw(chip, reply["features"]))
    print(f"wrote a preview with the boxes drawn to {path.resolve()}")
