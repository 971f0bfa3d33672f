"""A picture of exactly what was sent, with the answer's boxes drawn on it.

By value the picture is the array that went out; by reference it is the same window (the reply's `chip`:
width, height, transform) read again here through a clone of the layer's provider, on the task thread.
Pixels become 8-bit RGB (a 2-98 percentile stretch for anything but 8-bit data), then a QImage; the
boxes (0-100 of the window, rotated by `angle` counter-clockwise about their centre, as georef does) are painted with QPainter
in the same colours as the result layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from qgis.core import QgsRasterDataProvider

from .qt import QtCore, QtGui
from .sources import PixelGrid, read_pixels
from .styling import colour_for

MAX_PREVIEW = 512  # long side of the preview picture, pixels


def chip_grid(chip: dict[str, Any], max_size: int = MAX_PREVIEW) -> PixelGrid | None:
    """The grid of a reply's ``chip`` (north-up only), at most ``max_size`` pixels on its long side."""
    try:
        a, b, c, d, e, f = (float(v) for v in chip["transform"])
        width, height = int(chip["width"]), int(chip["height"])
    except (KeyError, TypeError, ValueError):
        return None
    if b != 0 or d != 0 or width <= 0 or height <= 0:
        return None
    minx, maxx = sorted((c, c + a * width))
    miny, maxy = sorted((f, f + e * height))
    scale = min(1.0, max_size / max(width, height))
    return PixelGrid((minx, miny, maxx, maxy), max(1, round(width * scale)), max(1, round(height * scale)))


def read_window(
    provider: QgsRasterDataProvider,
    chip: dict[str, Any],
    bands: list[int],
    cancelled: Callable[[], bool] | None = None,
) -> np.ndarray | None:
    """The reply's window read locally (for a by-reference request), or None when it cannot be."""
    grid = chip_grid(chip)
    if grid is None or provider is None:
        return None
    count = provider.bandCount()
    bands = [b for b in bands if 1 <= b <= count][:3] or list(range(1, min(count, 3) + 1))
    try:
        return read_pixels(provider, grid, bands, cancelled)
    except Exception:
        return None


def shrink(array: np.ndarray, max_size: int = MAX_PREVIEW) -> np.ndarray:
    """Every n-th pixel, so that the long side is at most ``max_size``."""
    step = max(1, int(np.ceil(max(array.shape[-2:]) / max_size)))
    return array[..., ::step, ::step]


def to_rgb8(array: np.ndarray, nodata: float | None = None) -> np.ndarray:
    """(bands, rows, cols) of any type -> (rows, cols, 3) uint8: three bands as RGB, one as grey."""
    data = array if array.ndim == 3 else array[None]
    data = data[:3] if data.shape[0] >= 3 else np.repeat(data[:1], 3, axis=0)
    if data.dtype == np.uint8:
        out = data
    else:
        values = data.astype(np.float64)
        valid = np.isfinite(values)
        if nodata is not None:
            valid &= values != nodata
        out = np.zeros(values.shape, dtype=np.uint8)
        for i in range(3):
            good = values[i][valid[i]]
            if good.size == 0:
                continue
            lo, hi = np.percentile(good, (2, 98))
            span = hi - lo if hi > lo else 1.0
            out[i] = np.clip((values[i] - lo) / span * 255, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(out, 0, -1))


def to_qimage(rgb: np.ndarray) -> QtGui.QImage:
    rows, cols = rgb.shape[:2]
    data = np.ascontiguousarray(rgb, dtype=np.uint8)
    image = QtGui.QImage(data.tobytes(), cols, rows, 3 * cols, QtGui.QImage.Format.Format_RGB888)
    return image.copy()  # own the pixels: the bytes above are temporary


def boxes_of(reply: dict[str, Any]) -> list[tuple[str, list[float]]]:
    """(label, [x1, y1, x2, y2, angle]) of each box in a reply, on 0-100 of the window."""
    out = []
    for feature in (reply.get("features") or {}).get("features") or []:
        props = feature.get("properties") or {}
        box = props.get("box")
        if isinstance(box, list) and len(box) >= 4:
            out.append((str(props.get("label") or ""), [float(v) for v in box[:5]] + [0.0] * (5 - len(box))))
    return out


def draw_boxes(image: QtGui.QImage, boxes: list[tuple[str, list[float]]]) -> QtGui.QImage:
    """A copy of ``image`` with each box outlined in its label's colour and the label written beside it."""
    out = image.convertToFormat(QtGui.QImage.Format.Format_ARGB32)
    width, height = out.width(), out.height()
    painter = QtGui.QPainter(out)
    try:
        painter.setRenderHint(QtGui.QPainter.RenderHint.Antialiasing)
        font = painter.font()
        font.setPixelSize(max(10, min(width, height) // 28))
        painter.setFont(font)
        for label, (x1, y1, x2, y2, angle) in boxes:
            colour = colour_for(label)
            pen = QtGui.QPen(colour)
            pen.setWidthF(max(2.0, min(width, height) / 200))
            painter.setPen(pen)
            painter.setBrush(QtCore.Qt.BrushStyle.NoBrush)
            px1, px2 = x1 / 100 * width, x2 / 100 * width
            py1, py2 = y1 / 100 * height, y2 / 100 * height
            painter.save()
            painter.translate((px1 + px2) / 2, (py1 + py2) / 2)
            painter.rotate(-angle)  # Qt turns clockwise on screen; EarthDial's angle turns the other way
            w, h = abs(px2 - px1), abs(py2 - py1)
            painter.drawRect(QtCore.QRectF(-w / 2, -h / 2, w, h))
            painter.restore()
            if label:  # upright, on a plate of the box's colour, above the box's top-left corner
                metrics = painter.fontMetrics()
                x, y = min(px1, px2), min(py1, py2)
                plate = QtCore.QRectF(
                    x, y - metrics.height() - 2, metrics.horizontalAdvance(label) + 6, metrics.height() + 2
                )
                if plate.top() < 0:
                    plate.moveTop(y + 2)
                painter.fillRect(plate, colour)
                painter.setPen(QtGui.QColor("black"))
                painter.drawText(plate, int(QtCore.Qt.AlignmentFlag.AlignCenter), label)
    finally:
        painter.end()
    return out


def preview_image(pixels: np.ndarray, reply: dict[str, Any], nodata: float | None = None) -> QtGui.QImage:
    return draw_boxes(to_qimage(to_rgb8(shrink(pixels), nodata)), boxes_of(reply))
