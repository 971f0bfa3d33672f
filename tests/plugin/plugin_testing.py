"""Shared values and helpers of the plugin tests (fixtures are in conftest.py)."""

from __future__ import annotations

import math
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from osgeo import gdal, osr
from qgis.core import QgsRectangle
from qgis.PyQt.QtCore import QCoreApplication, QEvent, QPoint, Qt

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import build_plugin  # noqa: E402

sys.path.pop(0)
build_plugin.sync_shared()  # the contract modules, copied from the backend as the build copies them
if str(ROOT / "qgis_plugin") not in sys.path:
    sys.path.insert(0, str(ROOT / "qgis_plugin"))  # the plugin package, as QGIS would find it

EARTHDIAL = ROOT / ".venv" / "bin" / "earthdial"

# The test raster: 200 x 100 pixels of 10 m in UTM 33N, top-left corner at (500000, 4000000).
EPSG = 32633
ORIGIN = (500000.0, 4000000.0)
PIXEL = 10.0
SIZE = (200, 100)  # cols, rows
# What the canvas shows: 50 x 50 pixels inside the raster, on its pixel edges.
VIEW = QgsRectangle(500100.0, 3999200.0, 500600.0, 3999700.0)
VIEW_BOUNDS = (500100.0, 3999200.0, 500600.0, 3999700.0)
VIEW_PIXELS = (slice(30, 80), slice(10, 60))  # rows, cols of the view in the raster

ANSWER = "<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box>"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_geotiff(path: str, bands: int = 3, seed: int = 0, epsg: int | None = EPSG) -> np.ndarray:
    """The test raster at ``path`` (a file, or /vsimem/...): random uint8 pixels. Returns them.
    ``epsg=None`` writes a raster without a CRS."""
    data = np.random.default_rng(seed).integers(0, 256, size=(bands, SIZE[1], SIZE[0]), dtype=np.uint8)
    write_raster(path, data, gdal.GDT_Byte, epsg)
    return data


def write_raster(path: str, data: np.ndarray, gdal_type: int, epsg: int | None = EPSG) -> None:
    """`data` (bands, rows, cols) as a GeoTIFF of `gdal_type` at the test grid's origin and pixel size."""
    count, rows, cols = data.shape
    ds = gdal.GetDriverByName("GTiff").Create(path, cols, rows, count, gdal_type)
    ds.SetGeoTransform((ORIGIN[0], PIXEL, 0.0, ORIGIN[1], 0.0, -PIXEL))
    if epsg is not None:
        srs = osr.SpatialReference()
        srs.ImportFromEPSG(epsg)
        ds.SetProjection(srs.ExportToWkt())
    for i in range(count):
        ds.GetRasterBand(i + 1).WriteArray(data[i])
    ds.FlushCache()
    ds = None


def wait_until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Run the Qt event loop until ``condition`` holds (QgsTask results arrive through it)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        QCoreApplication.processEvents()
        time.sleep(0.01)


def expected_ring(extent: QgsRectangle, box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """Corners of an unrotated 0-100 box on the view, worked out from the extent alone (y runs down)."""
    x1, y1, x2, y2 = box
    minx, maxx, maxy = extent.xMinimum(), extent.xMaximum(), extent.yMaximum()
    w, h = maxx - minx, maxy - extent.yMinimum()
    xa, xb = minx + x1 / 100 * w, minx + x2 / 100 * w
    ya, yb = maxy - y1 / 100 * h, maxy - y2 / 100 * h
    return [(xa, ya), (xb, ya), (xb, yb), (xa, yb)]


def same_corners(
    ring: list[tuple[float, float]], expected: list[tuple[float, float]], tol: float = 1e-6
) -> bool:
    """Whether a closed 5-point ring has the 4 expected corners (in any order)."""
    if len(ring) != 5 or tuple(ring[0]) != tuple(ring[-1]):
        return False
    got, want = sorted(map(tuple, ring[:4])), sorted(map(tuple, expected))
    return all(abs(g[0] - w[0]) <= tol and abs(g[1] - w[1]) <= tol for g, w in zip(got, want, strict=True))


def canvas_pixel(canvas: Any, x: float, y: float) -> QPoint:
    """The canvas pixel showing map point (x, y) (canvas CRS)."""
    point = canvas.getCoordinateTransform().transform(x, y)
    return QPoint(round(point.x()), round(point.y()))


def mouse(canvas: Any, kind: Any, pixel: QPoint, buttons: Any = None) -> Any:
    from qgis.gui import QgsMapMouseEvent

    button = Qt.MouseButton.LeftButton
    if kind == QEvent.Type.MouseMove:
        return QgsMapMouseEvent(canvas, kind, pixel, Qt.MouseButton.NoButton, buttons or button)
    return QgsMapMouseEvent(canvas, kind, pixel, button, buttons if buttons is not None else button)


def drag(canvas: Any, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Press, move and release the left button on the canvas's current map tool, from map point ``start``
    to ``end``, as a user dragging a box."""
    tool = canvas.mapTool()
    assert tool is not None, "no map tool is active"
    a, b = canvas_pixel(canvas, *start), canvas_pixel(canvas, *end)
    tool.canvasPressEvent(mouse(canvas, QEvent.Type.MouseButtonPress, a))
    middle = QPoint((a.x() + b.x()) // 2, (a.y() + b.y()) // 2)
    tool.canvasMoveEvent(mouse(canvas, QEvent.Type.MouseMove, middle))
    tool.canvasMoveEvent(mouse(canvas, QEvent.Type.MouseMove, b))
    tool.canvasReleaseEvent(mouse(canvas, QEvent.Type.MouseButtonRelease, b, Qt.MouseButton.NoButton))


def click(canvas: Any, at: tuple[float, float]) -> None:
    tool = canvas.mapTool()
    pixel = canvas_pixel(canvas, *at)
    tool.canvasPressEvent(mouse(canvas, QEvent.Type.MouseButtonPress, pixel))
    tool.canvasReleaseEvent(mouse(canvas, QEvent.Type.MouseButtonRelease, pixel, Qt.MouseButton.NoButton))


def snap_out(rect: QgsRectangle, pixel: float = PIXEL) -> QgsRectangle:
    """A rectangle widened to the test raster's pixel edges (which are multiples of ``pixel``)."""
    return QgsRectangle(
        math.floor(rect.xMinimum() / pixel) * pixel,
        math.floor(rect.yMinimum() / pixel) * pixel,
        math.ceil(rect.xMaximum() / pixel) * pixel,
        math.ceil(rect.yMaximum() / pixel) * pixel,
    )


def random_raster_layer(path: Any, size: int, seed: int) -> Any:
    """A size x size random RGB GeoTIFF at ``path`` (1 m pixels, EPSG:32633), added to the project."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer

    ds = gdal.GetDriverByName("GTiff").Create(str(path), size, size, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((500000, 1.0, 0.0, 4000000, 0.0, -1.0))
    ds.SetProjection(QgsCoordinateReferenceSystem("EPSG:32633").toWkt())
    data = np.random.default_rng(seed).integers(0, 256, size=(3, size, size), dtype=np.uint8)
    for b in range(3):
        ds.GetRasterBand(b + 1).WriteArray(data[b])
    ds = None
    layer = QgsRasterLayer(str(path), Path(path).stem, "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    return layer
