"""The arguments several commands share: a raster and its window, band presets, outputs, devices."""

from __future__ import annotations

import argparse
import os
from typing import Any

from earthdial.contract.wire import source_by_reference

DEVICES = ["auto", "cpu", "cuda", "mps"]  # engine.pick_device; mps: Apple silicon's GPU


def bands(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bands must be comma-separated 1-based integers, got {text!r}"
        ) from None


def add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("raster", help="raster file (anything GDAL reads)")
    p.add_argument("--bands", type=bands, help="1-based band indexes, e.g. 1,2,3 (default: the first three)")
    p.add_argument(
        "--bounds", type=float, nargs=4, metavar=("MINX", "MINY", "MAXX", "MAXY"), help="window to read"
    )
    p.add_argument("--bounds-crs", help="CRS of --bounds (default: the raster's CRS), e.g. EPSG:4326")


def add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", help="band preset, e.g. rgb8, rgb16, s2_l2a, s2_rgb, landsat8, s1_vh_linear, rgbn"
    )
    p.add_argument("--gsd", type=float, help="read at this many ground metres per pixel (default: native)")
    p.add_argument(
        "--sensor", help="EarthDial sensor tag, e.g. [s2_rgb_10] (default: from the preset and GSD)"
    )


def add_output_args(p: argparse.ArgumentParser, what: str = "the boxes") -> None:
    p.add_argument("-o", "--output", help=f"GeoPackage (.gpkg: adds a layer) or GeoJSON file for {what}")
    p.add_argument("--layer", help="layer name in the GeoPackage (default: task, prompt, source and time)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier EarthDial layer (or GeoJSON file) of that name; never another's",
    )


def ask_options(args: argparse.Namespace) -> dict[str, Any]:
    names = ("preset", "gsd", "sensor", "max_new_tokens")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def source_of(args: argparse.Namespace) -> dict[str, Any]:
    return source_by_reference(os.path.abspath(args.raster), args.bands, args.bounds, args.bounds_crs)
