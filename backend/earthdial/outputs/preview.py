"""A PNG of what the model saw with the boxes it returned drawn on it, for a quick look without QGIS."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.geo import imagery
from earthdial.model import pixels
from earthdial.outputs import atomic

COLOURS = ((255, 40, 40), (40, 220, 255), (255, 220, 0), (60, 255, 60), (255, 80, 255))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SOFTWARE_TEXT = b"Software\x00EarthDial preview"


def draw(chip: imagery.Chip, features: dict[str, Any], line_px: int = 2) -> np.ndarray:
    """(3, rows, cols) uint8: the chip stretched for display, each box's outline in a colour per label."""
    from rasterio.features import rasterize
    from shapely.geometry import shape
    from shapely.ops import transform as shp_transform

    rgb = (pixels.to_unit_rgb(chip.data, chip.nodata) * 255).astype(np.uint8)
    inverse = ~chip.transform
    labels: dict[str, int] = {}
    for feat in features.get("features", []):
        label = str(feat.get("properties", {}).get("label") or "")
        colour = COLOURS[labels.setdefault(label, len(labels)) % len(COLOURS)]
        poly = shp_transform(lambda x, y, inv=inverse: inv * (x, y), shape(feat["geometry"]))
        outline = poly.exterior.buffer(line_px / 2)
        mask = rasterize([(outline, 1)], out_shape=rgb.shape[1:], fill=0, dtype="uint8").astype(bool)
        for band, value in enumerate(colour):
            rgb[band][mask] = value
    return rgb


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write ``image`` ((3, rows, cols) uint8) as a PNG at ``path``, atomically. An existing file is
    replaced only when it is a preview of ours (``foreign_output`` otherwise); the name must end in
    ``.png``. Written without GDAL, so that no side file (``.aux.xml``) is ever made beside it."""
    check_target(path)
    return Path(atomic.replace_file(path, png_bytes(image), is_our_png, "preview"))


def check_target(path: str | Path) -> None:
    """The refusals of ``write_png`` that need no picture yet (a command checks before it runs a model)."""
    text = atomic.user_path(path)
    if not text.lower().endswith(".png"):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"a preview is a PNG: its name must end in .png, got {text}"
        )
    real = os.path.realpath(text)
    if not os.path.isdir(os.path.dirname(real)):
        raise EarthDialError(
            ErrorCode.FILE_NOT_FOUND, f"folder {os.path.dirname(real)} does not exist (writing {real})"
        )
    atomic.refuse_foreign(real, is_our_png, "preview")


def png_bytes(image: np.ndarray) -> bytes:
    """A PNG file (8-bit RGB, no filter) with our ``Software`` text chunk: how a preview is known as ours."""
    bands, rows, cols = image.shape
    if bands != 3 or image.dtype != np.uint8:
        raise ValueError(f"a preview is (3, rows, cols) uint8, got {image.shape} {image.dtype}")
    lines = np.zeros((rows, 1 + cols * 3), np.uint8)  # each line: filter type 0, then R G B per pixel
    lines[:, 1:] = np.ascontiguousarray(image.transpose(1, 2, 0)).reshape(rows, cols * 3)
    head = struct.pack(">IIBBBBB", cols, rows, 8, 2, 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", head),
            _chunk(b"tEXt", SOFTWARE_TEXT),
            _chunk(b"IDAT", zlib.compress(lines.tobytes(), 6)),
            _chunk(b"IEND", b""),
        )
    )


def is_our_png(path: str) -> bool:
    """A PNG whose text chunks, before its pixels, say it is an EarthDial preview."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                return False
            for _ in range(64):  # the chunks before the first IDAT
                head = f.read(8)
                if len(head) < 8:
                    return False
                size, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND") or size > 1 << 20:
                    return False
                data = f.read(size)
                f.read(4)  # CRC
                if kind == b"tEXt" and data == SOFTWARE_TEXT:
                    return True
    except OSError:
        return False
    return False


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )
