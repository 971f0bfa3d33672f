"""Where a request's pixels come from: a raster layer and an area of it -> a protocol source.

A layer backed by a GDAL-readable file on disk goes *by reference*: the backend opens the file itself,
so nothing but a path and bounds travel. Anything else (WMS, XYZ, /vsimem, virtual rasters, files of
other providers) goes *by value*: its pixels are read from a clone of the layer's data provider, on
the task thread, and sent as one (bands, rows, cols) array with the affine of that grid.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCsException,
    QgsMultiBandColorRenderer,
    QgsProject,
    QgsRasterDataProvider,
    QgsRasterLayer,
    QgsRectangle,
    QgsSingleBandGrayRenderer,
)

from ..contract.wire import ALLOWED_DTYPES, EarthDialError, ErrorCode, source_by_reference, source_by_value
from ..contract.wire import snap_ceil as _ceil
from ..contract.wire import snap_floor as _floor

MAX_VALUE_SIZE = 1024  # long side, in pixels, of an array sent by value

_NUMPY_TYPES = {
    getattr(Qgis.DataType, name): dtype
    for name, dtype in (
        ("Byte", np.uint8),
        ("Int8", np.int8),  # QGIS >= 3.30
        ("UInt16", np.uint16),
        ("Int16", np.int16),
        ("UInt32", np.uint32),
        ("Int32", np.int32),
        ("Float32", np.float32),
        ("Float64", np.float64),
    )
    if hasattr(Qgis.DataType, name)
}
_ARGB_TYPES = (Qgis.DataType.ARGB32, Qgis.DataType.ARGB32_Premultiplied)  # what WMS/XYZ providers deliver
# the "has a native pixel size" capability (moved to Qgis.RasterInterfaceCapability in QGIS 3.38)
_SIZE_CAPABILITY = getattr(QgsRasterDataProvider, "Size", None) or Qgis.RasterInterfaceCapability.Size


# --------------------------------------------------------------------------------------------------
# Layer facts (main thread)
# --------------------------------------------------------------------------------------------------


def file_path(layer: QgsRasterLayer) -> str | None:
    """The file a layer reads, when the backend can open it by that path: a GDAL layer whose source is
    a plain file on disk. Sub-datasets ("GPKG:...:table"), /vsi paths and other providers give None."""
    if layer.providerType() != "gdal":
        return None
    source = layer.source()
    return source if os.path.isfile(source) else None


def crs_text(crs: QgsCoordinateReferenceSystem) -> str | None:
    """An EPSG code when the CRS has one, WKT otherwise (QGIS's USER:n ids mean nothing to the backend)."""
    if not crs.isValid():
        return None
    authid = crs.authid()
    if authid.upper().startswith("EPSG:"):
        return authid
    return crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED)


def displayed_bands(layer: QgsRasterLayer) -> list[int] | None:
    """The bands the layer's renderer shows (red, green, blue or the grey band), so that the model sees
    what the analyst sees; None when the renderer does not say (the backend then takes bands 1-3)."""
    renderer = layer.renderer()
    if isinstance(renderer, QgsMultiBandColorRenderer):
        bands = [renderer.redBand(), renderer.greenBand(), renderer.blueBand()]
        return bands if all(b > 0 for b in bands) else None
    if isinstance(renderer, QgsSingleBandGrayRenderer):
        # inputBand: QGIS >= 3.38, where grayBand() is deprecated
        band = renderer.inputBand() if hasattr(renderer, "inputBand") else renderer.grayBand()
        return [band] if band > 0 else None
    return None


def area_in_layer_crs(
    extent: QgsRectangle,
    extent_crs: QgsCoordinateReferenceSystem,
    layer: QgsRasterLayer,
    project: QgsProject | None = None,
) -> QgsRectangle:
    """The map view's extent as a rectangle in the layer's CRS (its bounding box, when reprojected)."""
    layer_crs = layer.crs()
    if not extent_crs.isValid() or not layer_crs.isValid() or extent_crs == layer_crs:
        return QgsRectangle(extent)
    transform = QgsCoordinateTransform(extent_crs, layer_crs, project or QgsProject.instance())
    try:
        return transform.transformBoundingBox(extent)
    except QgsCsException as exc:
        raise EarthDialError(
            ErrorCode.BAD_CRS, f"the map view cannot be carried into the CRS of layer '{layer.name()}': {exc}"
        ) from None


# --------------------------------------------------------------------------------------------------
# The grid of pixels sent by value
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelGrid:
    """A north-up grid of ``cols`` x ``rows`` pixels covering ``bounds`` (minx, miny, maxx, maxy)."""

    bounds: tuple[float, float, float, float]
    cols: int
    rows: int

    @property
    def transform(self) -> tuple[float, float, float, float, float, float]:
        minx, miny, maxx, maxy = self.bounds
        return ((maxx - minx) / self.cols, 0.0, minx, 0.0, -(maxy - miny) / self.rows, maxy)

    @property
    def rectangle(self) -> QgsRectangle:
        return QgsRectangle(*self.bounds)


def pixel_grid(
    layer_extent: QgsRectangle,
    area: QgsRectangle,
    resolution: tuple[float, float] | None,
    max_size: int = MAX_VALUE_SIZE,
) -> PixelGrid:
    """The grid to read for ``area`` of a layer: the area clipped to the layer, snapped outwards to the
    layer's own pixels when it has a native ``resolution`` (x, y pixel size), so that nothing is
    resampled unless the long side exceeds ``max_size``. Without a native resolution (web layers) the
    long side is ``max_size``."""
    clip = area.intersect(layer_extent)
    if clip.isEmpty() or clip.width() <= 0 or clip.height() <= 0:
        raise EarthDialError(
            ErrorCode.BOUNDS_OUTSIDE,
            f"the map view {_fmt(area)} does not overlap the layer, whose extent is {_fmt(layer_extent)}",
        )
    if resolution is not None:
        bounds, (cols, rows) = pixel_edges(clip, layer_extent, resolution)
    else:
        bounds = (clip.xMinimum(), clip.yMinimum(), clip.xMaximum(), clip.yMaximum())
        cols, rows = max_size, max_size
        aspect = clip.width() / clip.height()
        if aspect >= 1:
            rows = max(1, round(max_size / aspect))
        else:
            cols = max(1, round(max_size * aspect))
    if max(cols, rows) > max_size:
        scale = max_size / max(cols, rows)
        cols, rows = max(1, min(max_size, round(cols * scale))), max(1, min(max_size, round(rows * scale)))
    return PixelGrid(bounds, int(cols), int(rows))


def native_resolution(layer: QgsRasterLayer) -> tuple[float, float] | None:
    provider = layer.dataProvider()
    if provider is None or not provider.capabilities() & _SIZE_CAPABILITY:
        return None
    xres, yres = layer.rasterUnitsPerPixelX(), layer.rasterUnitsPerPixelY()
    if not (math.isfinite(xres) and math.isfinite(yres)) or xres <= 0 or yres <= 0:
        return None
    return xres, yres


def read_pixels(
    provider: QgsRasterDataProvider,
    grid: PixelGrid,
    bands: list[int],
    cancelled: Callable[[], bool] | None = None,
) -> np.ndarray:
    """``bands`` (1-based) of ``provider`` on ``grid`` as one (bands, rows, cols) array. A colour band
    (ARGB32, from WMS/XYZ) becomes three uint8 bands R, G, B. Safe on a worker thread when ``provider``
    is a clone made for it (QGIS providers are not shared across threads)."""
    planes: list[np.ndarray] = []
    for band in bands:
        if cancelled is not None and cancelled():
            raise EarthDialError(ErrorCode.CANCELLED, "request cancelled by the user")
        block = provider.block(band, grid.rectangle, grid.cols, grid.rows)
        if block is None or not block.isValid() or block.isEmpty():
            raise EarthDialError(ErrorCode.NOT_A_RASTER, f"band {band} could not be read from the layer")
        kind = block.dataType()
        raw = bytes(block.data())
        if kind in _ARGB_TYPES:
            argb = _plane(raw, np.uint32, grid, band)
            planes += [((argb >> shift) & 0xFF).astype(np.uint8) for shift in (16, 8, 0)]
        elif kind in _NUMPY_TYPES:
            planes.append(_plane(raw, _NUMPY_TYPES[kind], grid, band))
        else:
            raise EarthDialError(
                ErrorCode.BAD_ARRAY,
                f"band {band} has a data type EarthDial cannot use (Qgis.DataType {int(kind)})",
            )
    dtype = np.result_type(*planes)
    if dtype.name not in ALLOWED_DTYPES:  # e.g. uint32 with int32 promotes to int64
        dtype = np.dtype(np.float64)
    return np.stack([p.astype(dtype, copy=False) for p in planes])


def _plane(raw: bytes, dtype: Any, grid: PixelGrid, band: int) -> np.ndarray:
    expected = grid.rows * grid.cols * np.dtype(dtype).itemsize
    if len(raw) != expected:
        raise EarthDialError(
            ErrorCode.BAD_ARRAY,
            f"band {band}: the provider gave {len(raw)} bytes for {grid.cols}x{grid.rows} pixels",
        )
    return np.frombuffer(raw, dtype=dtype).reshape(grid.rows, grid.cols)


# --------------------------------------------------------------------------------------------------
# The plan a task carries
# --------------------------------------------------------------------------------------------------


@dataclass
class SourcePlan:
    """What a task needs to build a request's source without touching the layer: made on the main
    thread by `plan_source`, resolved on the task thread by `resolve`."""

    crs: str | None
    label: str  # what the result layer's "source" field says
    reference: dict[str, Any] | None = None  # by reference: the finished source
    provider: QgsRasterDataProvider | None = None  # by value: a clone for the task thread
    grid: PixelGrid | None = None
    bands: list[int] | None = None
    nodata: float | None = None
    path: str | None = None  # by value: the file the layer reads, if any (recorded for export-training)
    # By reference: the same area by value, for when the backend cannot read the file (it runs
    # elsewhere, or the file is outside the directories it may read).
    fallback: SourcePlan | None = None

    @property
    def by_value(self) -> bool:
        return self.reference is None

    def release(self) -> None:
        """Drop the provider clones (on the main thread: see RequestTask.finished)."""
        self.provider = None
        if self.fallback is not None:
            self.fallback.release()

    def resolve(
        self, pixels_needed: bool = True, cancelled: Callable[[], bool] | None = None
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        """The protocol source and its array frames. Georeferencing an answer needs only the grid's
        shape, so ``pixels_needed=False`` sends a blank one-band array instead of reading (web) pixels."""
        if self.reference is not None:
            return self.reference, []
        if self.grid is None or self.provider is None or not self.bands:
            raise ValueError("a by-value source plan needs a grid, a provider and bands")  # a bug, not input
        if pixels_needed:
            pixels = read_pixels(self.provider, self.grid, self.bands, cancelled)
            nodata = self.nodata
        else:
            pixels, nodata = np.zeros((1, self.grid.rows, self.grid.cols), dtype=np.uint8), None
        return source_by_value(self.grid.transform, self.crs or "", nodata, self.label, self.path), [pixels]


PLAN_SAMPLE_SIZE = 64  # long side, in pixels, of the sample a `plan` request carries for a by-value source


def planning_source(
    plan: SourcePlan, cancelled: Callable[[], bool] | None = None
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The source of a `plan` request: the reference as it is; by value, the grid's shape with a coarse
    sample of the pixels (enough for the backend to tell the band preset), not the whole window."""
    if plan.reference is not None:
        return plan.reference, []
    if plan.grid is None or plan.provider is None or not plan.bands:
        raise ValueError("a by-value source plan needs a grid, a provider and bands")  # a bug, not input
    grid = plan.grid
    scale = max(1.0, max(grid.cols, grid.rows) / PLAN_SAMPLE_SIZE)
    coarse = PixelGrid(grid.bounds, max(1, round(grid.cols / scale)), max(1, round(grid.rows / scale)))
    sample = read_pixels(plan.provider, coarse, plan.bands, cancelled)
    source = source_by_value(grid.transform, plan.crs or "", plan.nodata)
    source["shape"] = [grid.rows, grid.cols]
    return source, [sample]


def plan_source(
    layer: QgsRasterLayer,
    area: QgsRectangle,
    bands: list[int] | None = None,
    max_size: int = MAX_VALUE_SIZE,
    by_value: bool | None = None,
) -> SourcePlan:
    """How to send ``area`` (in the layer's CRS) of ``layer``. ``bands`` default to the displayed ones.
    ``by_value`` forces a way (None: by reference exactly when the backend can open the file)."""
    crs = crs_text(layer.crs())
    bands = bands or displayed_bands(layer)
    path = file_path(layer)
    if by_value is None:
        by_value = path is None
    if not by_value:
        if path is None:
            raise EarthDialError(
                ErrorCode.FILE_NOT_FOUND, f"layer '{layer.name()}' is not a file the backend can open"
            )
        bounds = (area.xMinimum(), area.yMinimum(), area.xMaximum(), area.yMaximum())
        try:
            fallback: SourcePlan | None = _value_plan(layer, area, bands, max_size, crs)
        except EarthDialError:
            fallback = None  # e.g. the area is off the layer: the backend will say so by reference
        reference = source_by_reference(path, bands, bounds, crs)
        return SourcePlan(crs=crs, label=path, reference=reference, fallback=fallback)
    return _value_plan(layer, area, bands, max_size, crs)


def _value_plan(
    layer: QgsRasterLayer, area: QgsRectangle, bands: list[int] | None, max_size: int, crs: str | None
) -> SourcePlan:
    provider = layer.dataProvider()
    if provider is None or not provider.isValid():
        raise EarthDialError(ErrorCode.NOT_A_RASTER, f"layer '{layer.name()}' has no readable data")
    clone = provider.clone()  # the task thread reads its own copy: providers are not thread-safe
    if clone is None:
        raise EarthDialError(
            ErrorCode.NOT_A_RASTER, f"layer '{layer.name()}' cannot be read in the background"
        )
    # publicSource: without passwords a WMS URI may hold
    return value_plan(
        clone,
        layer.name(),
        layer.publicSource(),
        layer.extent(),
        native_resolution(layer),
        area,
        bands,
        crs,
        max_size,
        path=file_path(layer),
    )


def value_plan(
    provider: QgsRasterDataProvider,
    name: str,
    label: str,
    extent: QgsRectangle,
    resolution: tuple[float, float] | None,
    area: QgsRectangle,
    bands: list[int] | None,
    crs: str | None,
    max_size: int = MAX_VALUE_SIZE,
    path: str | None = None,
) -> SourcePlan:
    """The by-value plan for ``area`` (layer CRS) of a layer read through ``provider`` (a clone for the
    thread that reads it): the one way from a layer's pixels to a source, for the panel and Processing."""
    count = provider.bandCount()
    bands = bands or list(range(1, min(count, 3) + 1))
    for band in bands:
        if not 1 <= band <= count:
            raise EarthDialError(
                ErrorCode.BAND_OUT_OF_RANGE,
                f"band {band} does not exist in layer '{name}': valid bands are 1..{count}",
            )
    grid = pixel_grid(extent, area, resolution, max_size)
    nodata = None
    first = bands[0]
    if provider.sourceHasNoDataValue(first) and provider.useSourceNoDataValue(first):
        value = provider.sourceNoDataValue(first)
        nodata = float(value) if math.isfinite(value) else None
    return SourcePlan(
        crs=crs, label=label, provider=provider, grid=grid, bands=bands, nodata=nodata, path=path
    )


def pixel_edges(
    clip: QgsRectangle, extent: QgsRectangle, resolution: tuple[float, float]
) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """``clip`` grown out to the pixel edges of a layer with this ``extent`` and (x, y) pixel size:
    its bounds (minx, miny, maxx, maxy) and its size in pixels (cols, rows). An edge within wire.SNAP of a
    pixel edge is that edge, so that a float error never adds a row or column."""
    xres, yres = resolution
    x0, ytop = extent.xMinimum(), extent.yMaximum()
    col0 = _floor((clip.xMinimum() - x0) / xres)
    col1 = _ceil((clip.xMaximum() - x0) / xres)
    row0 = _floor((ytop - clip.yMaximum()) / yres)
    row1 = _ceil((ytop - clip.yMinimum()) / yres)
    bounds = (x0 + col0 * xres, ytop - row1 * yres, x0 + col1 * xres, ytop - row0 * yres)
    return bounds, (col1 - col0, row1 - row0)


def _fmt(rect: QgsRectangle) -> str:
    return f"({rect.xMinimum():.6g}, {rect.yMinimum():.6g}, {rect.xMaximum():.6g}, {rect.yMaximum():.6g})"
