"""The pixels of a request: a window of a raster file read with rasterio, or an array sent by value.

A window is found by carrying the requested bounds (densified, so curved edges after reprojection are
covered) into the raster's pixel space through the inverse of its geotransform. Unlike
``rasterio.windows.from_bounds`` this also holds for rotated or skewed geotransforms. The window is
snapped outwards to whole pixels and clipped to the raster.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyproj
import rasterio
import rasterio.windows
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import CRSError, RasterioError
from rasterio.warp import transform as warp_transform

from earthdial import limits
from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.contract.wire import snap_ceil as _ceil
from earthdial.contract.wire import snap_floor as _floor
from earthdial.geo import file_access, geokeys

__all__ = [
    "Chip",
    "RasterInfo",
    "chip_from_array",
    "crop",
    "describe",
    "ground_resolution",
    "open_raster",
    "read_chip",
    "read_on_grid",
]

EDGE_POINTS = 21  # points per edge of the bounds rectangle when it is reprojected
MIN_GSD, MAX_GSD = 0.01, 1e6  # metres per pixel a window may be read at
FAR_PIXELS = 2.0**62  # a pixel coordinate beyond any raster: where bounds far out under a fine pixel land
# A server's reader processes (readers.ReaderPool): when set, the functions below that open a file run
# in one of them. None in the readers themselves and in the in-process CLI.
_readers: Any = None


def use_readers(pool: Any) -> Any:
    """Route this process's file reads through `pool` (None: read here); returns the previous pool."""
    global _readers
    previous, _readers = _readers, pool
    return previous


@dataclass
class Chip:
    data: np.ndarray  # (bands, rows, cols), the raster's dtype
    transform: Affine  # affine of data's pixel grid
    crs: str  # "EPSG:n" when the CRS has an EPSG code, else WKT; "" when the pixels have no CRS
    band_indexes: list[int]  # 1-based indexes read (1..n for arrays sent by value)
    nodata: float | None
    source: str  # file path or "<array>"
    valid: np.ndarray | None = None  # (rows, cols) True where pixels hold data; None: all of them

    @property
    def width(self) -> int:
        return int(self.data.shape[2])

    @property
    def height(self) -> int:
        return int(self.data.shape[1])


def read_chip(
    path: str,
    bands: list[int] | None = None,
    bounds: tuple[float, float, float, float] | None = None,
    bounds_crs: str | None = None,
    max_size: int | None = 2048,
    gsd: float | None = None,
) -> Chip:
    """Read ``bands`` (1-based; default the first three, or all when fewer) of the raster at ``path``
    inside ``bounds`` (minx, miny, maxx, maxy in ``bounds_crs``, default the raster's CRS; None: the
    whole raster), at native resolution or at ``gsd`` metres per pixel. A window whose long side would
    exceed ``max_size`` is read resampled to that size."""
    if _readers is not None:  # a server: in a reader process it can kill (readers.py)
        return _readers.read_chip(
            os.fspath(path), bands=bands, bounds=bounds, bounds_crs=bounds_crs, max_size=max_size, gsd=gsd
        )
    path = os.fspath(path)
    if bounds is not None:
        bounds = _check_bounds(bounds)
    if max_size is not None and (not isinstance(max_size, numbers.Integral) or max_size < 1):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"max_size must be a positive integer or None, got {max_size!r}"
        )
    with open_raster(path) as src:
        indexes, window, (out_h, out_w), transform = _read_plan(
            src, path, bands, bounds, bounds_crs, max_size, gsd
        )
        data = read_window(src, indexes, window, out_w, out_h, path)
        nodata = src.nodatavals[indexes[0] - 1]
        return Chip(
            data=data,
            transform=transform,
            crs=crs_string(src.crs),
            band_indexes=indexes,
            nodata=None if nodata is None else float(nodata),
            source=path,
        )


@dataclass(frozen=True)
class ChipPlan:
    """What `read_chip` would read, worked out from the raster's metadata alone (no pixels)."""

    band_indexes: list[int]
    width: int
    height: int
    transform: Affine
    crs: str


def plan_chip(
    path: str,
    bands: list[int] | None = None,
    bounds: tuple[float, float, float, float] | None = None,
    bounds_crs: str | None = None,
    max_size: int | None = 2048,
    gsd: float | None = None,
) -> ChipPlan:
    """The bands, size and grid `read_chip` with the same arguments reads, without reading pixels."""
    if _readers is not None:
        return _readers.plan_chip(
            os.fspath(path), bands=bands, bounds=bounds, bounds_crs=bounds_crs, max_size=max_size, gsd=gsd
        )
    path = os.fspath(path)
    if bounds is not None:
        bounds = _check_bounds(bounds)
    with open_raster(path) as src:
        indexes, _, (rows, cols), transform = _read_plan(src, path, bands, bounds, bounds_crs, max_size, gsd)
        return ChipPlan(indexes, cols, rows, transform, crs_string(src.crs))


def _read_plan(
    src: Any,
    path: str,
    bands: list[int] | None,
    bounds: tuple[float, float, float, float] | None,
    bounds_crs: str | None,
    max_size: int | None,
    gsd: float | None,
) -> tuple[list[int], rasterio.windows.Window, tuple[int, int], Affine]:
    """Bands, window, output (rows, cols) and the output grid's transform of a read (`read_chip`)."""
    if src.count < 1:
        raise EarthDialError(ErrorCode.NOT_A_RASTER, f"{path} has no raster bands")
    indexes = check_bands(bands, src.count, path)
    window = window_for(src, bounds, bounds_crs, path)
    win_w, win_h = int(window.width), int(window.height)
    out_w, out_h = win_w, win_h
    if gsd is not None:
        if not isinstance(gsd, numbers.Real) or not MIN_GSD <= gsd <= MAX_GSD:
            raise EarthDialError(
                ErrorCode.BAD_REQUEST, f"gsd must be {MIN_GSD} to {MAX_GSD:g} metres, got {gsd!r}"
            )
        native = ground_resolution(
            src.transform, src.crs, window.col_off + win_w / 2, window.row_off + win_h / 2
        )
        if native is not None:
            out_w = max(1, round(win_w * native / gsd))
            out_h = max(1, round(win_h * native / gsd))
    if max_size is not None and max(out_w, out_h) > max_size:
        scale = max_size / max(out_w, out_h)
        out_w = max(1, min(max_size, round(out_w * scale)))
        out_h = max(1, min(max_size, round(out_h * scale)))
    # The window's transform (rasterio.windows.transform) scaled to the grid actually read, spelled
    # out because affine 2 and 3 disagree on how composition is written.
    a, b, c, d, e, f = src.transform[:6]
    col0, row0 = int(window.col_off), int(window.row_off)
    sx, sy = win_w / out_w, win_h / out_h
    transform = Affine(a * sx, b * sy, a * col0 + b * row0 + c, d * sx, e * sy, d * col0 + e * row0 + f)
    return indexes, window, (out_h, out_w), transform


@contextlib.contextmanager
def open_raster(path: str) -> Iterator[Any]:
    """Open a raster for reading. In a server that restricts reads (a file_access.policy() installed) the
    file is opened by descriptor (FilePolicy.open_file: no link followed, a regular file with one link) and
    GDAL reads that descriptor, never the name again; only through RASTER_DRIVERS (no VRT or other
    format that names more files), with GDAL reading no sidecar files and no network, and a raster
    whose own CRS names a grid file is refused before anything is transformed with it."""
    path = os.fspath(path)
    policy = file_access.policy()  # read once: the whole open follows one policy
    fd = None
    if policy is not None:
        fd = policy.open_file(path)  # held open for the dataset's life: GDAL may open its name again
    elif not path.startswith("/vsi") and not os.path.exists(path):
        raise EarthDialError(ErrorCode.FILE_NOT_FOUND, f"no such file: {path}")
    try:
        with rasterio.Env(**(file_access.GDAL_READ_OPTIONS if policy is not None else {})):
            yield from _opened(path, fd)
    finally:
        if fd is not None:
            os.close(fd)


def _opened(path: str, fd: int | None) -> Iterator[Any]:
    """The dataset of `path` (by descriptor `fd` when given), checked, for open_raster."""
    name = path if fd is None else file_access.fd_path(fd)
    try:
        if fd is not None:
            from rasterio.io import DatasetReader  # takes a list of allowed drivers; open() one name

            src = DatasetReader(name, driver=list(file_access.RASTER_DRIVERS))
        else:
            src = rasterio.open(path)
    except RasterioError as exc:
        formats = (
            f" (this server opens {', '.join(file_access.RASTER_DRIVERS)} files only: no VRT, WMS XML or other format that names more files)"
            if fd is not None
            else ""
        )
        raise EarthDialError(
            ErrorCode.NOT_A_RASTER,
            f"{path} cannot be opened as a raster{formats}: {str(exc).replace(name, path)}",
        ) from None
    except UnicodeDecodeError:  # rasterio decodes the CRS's WKT as it opens; a citation's bytes pass into it
        raise EarthDialError(
            ErrorCode.BAD_CRS, f"the CRS of {path} holds text that is not UTF-8 (in its GeoKeys' citation)"
        ) from None
    with src:
        check_geotransform(src.transform, src.width, src.height, path)
        if any(dtype.startswith("complex") for dtype in src.dtypes):  # numpy has no complex_int16 either
            raise EarthDialError(
                ErrorCode.NOT_A_RASTER,
                f"{path} holds complex samples ({src.dtypes[0]}); the model reads real values: convert "
                "it to intensity or amplitude first",
            )
        if src.crs is not None:
            try:
                why = _crs_values_refusal(src.crs)
            except (CRSError, TypeError, ValueError) as exc:
                why = f"it cannot be read back ({exc})"
            if why is not None:
                raise EarthDialError(ErrorCode.BAD_CRS, f"the CRS of {path} is refused: {why}")
        if fd is not None and src.crs is not None:
            why = file_access.crs_refusal(src.crs.to_wkt(version="WKT2_2019"))  # WKT1 adds EXTENSION[PROJ4]
            if why is not None:
                raise EarthDialError(ErrorCode.BAD_CRS, f"the CRS of {path} is refused: {why}")
        yield src


def check_geotransform(transform: Affine, width: int, height: int, path: str) -> None:
    """`not_a_raster` for a raster whose geotransform cannot place its pixels: a NaN or infinite term,
    a singular (not invertible) one, corners beyond finite coordinates (scales like 1e308), or an inverse
    that is not finite (no coordinate could be found in pixel space)."""
    a, b, c, d, e, f = transform[:6]
    corners = [(a * x + b * y + c, d * x + e * y + f) for x in (0, width) for y in (0, height)]
    det = a * e - b * d
    ok = all(math.isfinite(v) for v in (a, b, c, d, e, f, det)) and det != 0
    if ok:
        ia, ib, id_, ie = e / det, -b / det, -d / det, a / det  # the linear part of ~transform
        inverse = (
            ia,
            ib,
            id_,
            ie,
            -(ia * c + ib * f),
            -(id_ * c + ie * f),
        )  # and its offset (1e308 / 1e-300)
        ok = all(math.isfinite(v) for xy in corners for v in xy) and all(math.isfinite(v) for v in inverse)
    if not ok:
        raise EarthDialError(
            ErrorCode.NOT_A_RASTER,
            f"{path} has a geotransform {tuple(round(v, 6) if math.isfinite(v) else v for v in (a, b, c, d, e, f))} "
            "that does not place its pixels (not finite, or not invertible); fix its georeferencing",
        )


def decoded_block(src: Any, path: str, band: int) -> tuple[tuple[int, int], bool]:
    """The (rows, cols) GDAL decodes at least for one pixel, and whether the file is decoded from its
    top (PNG, JPEG, a GeoTIFF of one compressed strip): GDAL's block, except for a GeoTIFF stored in
    compressed strips taller than GDAL shows (geokeys.stored_block reads them from the file)."""
    block = src.block_shapes[band - 1] if src.block_shapes else (1, src.width)
    if src.driver in ("PNG", "JPEG"):
        return block, True
    if src.driver == "GTiff" and not src.name.startswith("/vsi"):
        try:  # src.name: the descriptor's name in a restricted server (the file GDAL has open)
            fd = os.open(src.name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return block, False
        try:
            stored = geokeys.stored_block(fd)
        finally:
            os.close(fd)
        if stored is not None and stored[0] > block[0]:
            return stored, stored[0] >= src.height  # one strip: decoded from its top to the rows read
    return block, False


def read_window(src: Any, indexes: list[int], window: Any, out_w: int, out_h: int, path: str) -> np.ndarray:
    """Read a window of `src` into out_w x out_h pixels: averaged when the source pixels that decodes
    (through GDAL's overviews) fit the server's budget, else decimated (nearest), else `too_large`. A
    large read goes in strips of output rows, with the job's cancel flag and deadline checked between
    them (strips of an averaged read cover whole output rows, so the result equals one read)."""
    win_w, win_h = int(window.width), int(window.height)
    overviews = src.overviews(indexes[0]) if src.count else []
    block, sequential = decoded_block(src, path, indexes[0])
    # pixel-interleaved blocks hold every band of the file: GDAL decodes them all for any one
    interleaved = src.tags(ns="IMAGE_STRUCTURE").get("INTERLEAVE") == "PIXEL"
    touched = limits.blocks_cost(
        (int(window.col_off), int(window.row_off), win_w, win_h),
        (src.width, src.height),
        block,
        src.count if interleaved else len(indexes),
        sequential,
    )
    average, cost = limits.plan_read(
        win_w, win_h, out_w, out_h, len(indexes), overviews, block, path, touched, sequential
    )
    # Average (a box filter) when shrinking: it does not alias fine texture the way nearest does, works
    # for integer and float imagery alike, and GDAL leaves nodata pixels out of it.
    resampling = Resampling.average if average else Resampling.nearest
    strips = max(1, min(out_h, math.ceil(cost / limits.STRIP_PIXELS)))
    limits.checkpoint("reading")
    try:
        if strips == 1:
            return src.read(
                indexes, window=window, out_shape=(len(indexes), out_h, out_w), resampling=resampling
            )
        data = np.empty((len(indexes), out_h, out_w), dtype=src.dtypes[indexes[0] - 1])
        rows_per = math.ceil(out_h / strips)
        scale = win_h / out_h
        for r0 in range(0, out_h, rows_per):
            r1 = min(out_h, r0 + rows_per)
            strip = rasterio.windows.Window(
                window.col_off, window.row_off + r0 * scale, win_w, (r1 - r0) * scale
            )
            data[:, r0:r1, :] = src.read(
                indexes, window=strip, out_shape=(len(indexes), r1 - r0, out_w), resampling=resampling
            )
            limits.checkpoint(f"reading {r1} of {out_h} rows")
        return data
    except RasterioError as exc:
        raise EarthDialError(ErrorCode.NOT_A_RASTER, f"reading {path} failed: {exc}") from None


SAMPLE_PIXELS = 4 * 1024 * 1024  # source pixels a sample may decode: `plan` takes it on the I/O loop


def sample_band(path: str, band: int = 1, size: int = 64) -> np.ndarray | None:
    """A coarse (at most size x size) nearest-neighbour sample of one band: its values as stored (no
    averaging, which would hide the speckle that tells linear SAR power apart). Of the whole raster when
    it is small or has overviews, else of its central 1024 x 1024 pixels: a nearest read of a whole large
    tiled raster without overviews decodes every tile it samples (billions of pixels). A file decoded
    from its top (PNG, JPEG, one strip) is sampled in its first rows; None when even that, or the blocks
    under the sample, would decode more than SAMPLE_PIXELS (a 65 500 px PNG froze `plan` for 5 s)."""
    if _readers is not None:
        return _readers.sample_band(os.fspath(path), band, size)
    with open_raster(os.fspath(path)) as src:
        index = check_bands([band], src.count, path)
        width, height = src.width, src.height
        block, sequential = decoded_block(src, path, index[0])
        if src.overviews(index[0]) or max(width, height) <= 1024:
            window = rasterio.windows.Window(0, 0, width, height)
        elif sequential:
            rows = max(1, min(height, 1024, SAMPLE_PIXELS // max(width, 1)))
            window = rasterio.windows.Window(0, 0, width, rows)
        else:
            w, h = min(width, 1024), min(height, 1024)
            window = rasterio.windows.Window((width - w) // 2, (height - h) // 2, w, h)
        scale = max(1.0, max(window.width, window.height) / size)
        overviews = src.overviews(index[0])
        if not overviews or scale < min(
            overviews
        ):  # read at full resolution (a raster under the sample's size)
            bands = src.count if src.tags(ns="IMAGE_STRUCTURE").get("INTERLEAVE") == "PIXEL" else 1
            touched = limits.blocks_cost(
                (int(window.col_off), int(window.row_off), int(window.width), int(window.height)),
                (width, height),
                block,
                bands,
                sequential,
            )
            if touched > SAMPLE_PIXELS:
                return None
        shape = (max(1, round(window.height / scale)), max(1, round(window.width / scale)))
        try:
            return src.read(index[0], window=window, out_shape=shape, resampling=Resampling.nearest)
        except RasterioError as exc:
            raise EarthDialError(ErrorCode.NOT_A_RASTER, f"reading {path} failed: {exc}") from None


@dataclass(frozen=True)
class RasterInfo:
    path: str
    count: int
    dtype: str
    descriptions: list[str]
    crs: str
    width: int
    height: int
    gsd_m: float | None  # ground metres per pixel at the raster's centre


def describe(path: str) -> RasterInfo:
    """What a raster says about itself, without reading its pixels."""
    if _readers is not None:
        return _readers.describe(os.fspath(path))
    path = os.fspath(path)
    try:
        with open_raster(path) as src:
            return RasterInfo(
                path=path,
                count=src.count,
                dtype=src.dtypes[0] if src.count else "",
                descriptions=[d or "" for d in src.descriptions],
                crs=crs_string(src.crs),
                width=src.width,
                height=src.height,
                gsd_m=ground_resolution(src.transform, src.crs, src.width / 2, src.height / 2),
            )
    except RasterioError as exc:
        raise EarthDialError(ErrorCode.NOT_A_RASTER, f"{path} cannot be opened as a raster: {exc}") from None


@dataclass(frozen=True)
class ScanGrid:
    """Where a scan reads: the bands, the region (col, row, width, height) of the first raster's pixels,
    and that raster's CRS and transform."""

    band_indexes: list[int]
    region: tuple[int, int, int, int]
    crs: str
    transform: Affine

    @property
    def window(self) -> rasterio.windows.Window:
        return rasterio.windows.Window(*self.region)


def scan_grid(
    path: str, bands: list[int] | None, bounds: Sequence[float] | None, bounds_crs: str | None
) -> ScanGrid:
    """The grid a scan of `path` reads: its bands, and the window of `bounds` (None: all of it)."""
    if _readers is not None:
        return _readers.scan_grid(os.fspath(path), bands, bounds, bounds_crs)
    with open_raster(path) as src:
        if src.crs is None:
            raise EarthDialError(
                ErrorCode.BAD_CRS, f"{path} has no CRS: a scan's boxes could not be placed on a map"
            )
        indexes = check_bands(bands, src.count, path)
        w = window_for(src, tuple(bounds) if bounds else None, bounds_crs, path)
        region = (int(w.col_off), int(w.row_off), int(w.width), int(w.height))
        return ScanGrid(indexes, region, crs_string(src.crs), src.transform)


def common_grid(paths: list[str], names: list[str]) -> ScanGrid:
    """The region of the first raster's grid that every raster of a sequence covers (no bands chosen)."""
    if _readers is not None:
        return _readers.common_grid([os.fspath(p) for p in paths], names)
    from rasterio.warp import transform_bounds

    with open_raster(paths[0]) as src:
        left, bottom, right, top = src.bounds
        for name, path in zip(names[1:], paths[1:], strict=True):
            with open_raster(path) as other:
                b = transform_bounds(other.crs, src.crs, *other.bounds, densify_pts=21)
            left, bottom, right, top = max(left, b[0]), max(bottom, b[1]), min(right, b[2]), min(top, b[3])
            if left >= right or bottom >= top:
                raise EarthDialError(
                    ErrorCode.NO_OVERLAP, f"{name} does not overlap {names[0]} (nor their common extent)"
                )
        w = window_for(src, (left, bottom, right, top), None, paths[0])
        region = (int(w.col_off), int(w.row_off), int(w.width), int(w.height))
        return ScanGrid([], region, crs_string(src.crs), src.transform)


def tile_chip(
    src: Any,
    path: str,
    indexes: list[int],
    window: rasterio.windows.Window,
    out_w: int,
    out_h: int,
    crs: str | None = None,
) -> Chip:
    """One tile of a scan from an open raster: `window` read averaged at out_w x out_h pixels."""
    data = src.read(
        indexes, window=window, out_shape=(len(indexes), out_h, out_w), resampling=Resampling.average
    )
    a, b, c, d, e, f = src.transform[:6]
    sx, sy = window.width / out_w, window.height / out_h
    col0, row0 = window.col_off, window.row_off
    transform = Affine(a * sx, b * sy, a * col0 + b * row0 + c, d * sx, e * sy, d * col0 + e * row0 + f)
    nodata = src.nodatavals[indexes[0] - 1]
    return Chip(
        data,
        transform,
        crs_string(src.crs) if crs is None else crs,
        indexes,
        None if nodata is None else float(nodata),
        path,
    )


def read_tile(path: str, indexes: list[int], window: rasterio.windows.Window, out_w: int, out_h: int) -> Chip:
    """One tile of a scan of `path` (tile_chip), the file opened for it; in a server, in a reader process,
    which keeps the file open from one tile to the next."""
    if _readers is not None:
        region = (int(window.col_off), int(window.row_off), int(window.width), int(window.height))
        return _readers.read_tile(os.fspath(path), indexes, region, out_w, out_h)
    with open_raster(path) as src:
        return tile_chip(src, path, indexes, window, out_w, out_h)


def reads_elsewhere() -> bool:
    """Whether this process reads files through reader processes (a server), not itself."""
    return _readers is not None


def ground_resolution(transform: Affine, crs: CRS | str | None, col: float, row: float) -> float | None:
    """Metres on the ground per pixel near (col, row): the mean of the pixel's two sides. Geographic CRSs
    are measured on the WGS84 ellipsoid; None when the raster has no CRS."""
    if crs is None or crs == "":
        return None
    pcrs = _pyproj_crs(crs.to_wkt() if isinstance(crs, CRS) else crs)
    a, b, c, d, e, f = transform[:6]

    def to_map(cc: float, rr: float) -> tuple[float, float]:
        return a * cc + b * rr + c, d * cc + e * rr + f

    x0, y0 = to_map(col, row)
    x1, y1 = to_map(col + 1, row)
    x2, y2 = to_map(col, row + 1)
    if pcrs.is_geographic:
        geod = pyproj.Geod(ellps="WGS84")
        # axis order of the raster's grid is (lon, lat) for GDAL's traditional GIS order
        side_x = geod.inv(x0, y0, x1, y1)[2]
        side_y = geod.inv(x0, y0, x2, y2)[2]
    else:
        factor = pcrs.axis_info[0].unit_conversion_factor if pcrs.axis_info else 1.0
        side_x = math.hypot(x1 - x0, y1 - y0) * factor
        side_y = math.hypot(x2 - x0, y2 - y0) * factor
    gsd = (side_x + side_y) / 2
    return gsd if math.isfinite(gsd) else None  # e.g. degrees far beyond the globe: no ground size


@functools.lru_cache(maxsize=64)
def _pyproj_crs(text: str) -> Any:
    """Parsing a CRS costs milliseconds; requests on one raster repeat the same one."""
    return pyproj.CRS.from_user_input(text)


def read_on_grid(path: str, bands: list[int] | None, grid: Chip) -> Chip:
    """Read a raster warped onto another chip's grid (CRS, transform, size), e.g. the later image of a
    before/after pair onto the first. Pixels the raster does not cover are marked invalid."""
    if _readers is not None:
        return _readers.read_on_grid(os.fspath(path), bands, grid)
    from rasterio.vrt import WarpedVRT

    path = os.fspath(path)
    if not grid.crs:
        raise EarthDialError(
            ErrorCode.BAD_CRS, "the first image has no CRS, so later images cannot be aligned to it"
        )
    with open_raster(path) as src:
        if src.crs is None:
            raise EarthDialError(
                ErrorCode.BAD_CRS, f"{path} has no CRS, so it cannot be aligned to the first image"
            )
        if limits.current() is not None:  # the warp decodes the source pixels under the grid
            a, b, c, d, e, f = grid.transform[:6]
            corners = [
                (a * x + b * y + c, d * x + e * y + f) for x in (0, grid.width) for y in (0, grid.height)
            ]
            xs, ys = [p[0] for p in corners], [p[1] for p in corners]
            try:
                under = window_for(src, (min(xs), min(ys), max(xs), max(ys)), grid.crs, path)
                pixels = int(under.width) * int(under.height) * max(1, len(bands or [1, 2, 3]))
            except EarthDialError:
                pixels = 0  # no overlap: the warp reads nothing, and the caller says so
            limits.check_source_pixels(
                pixels, f"warping {path} onto the first image's grid decodes {pixels:,} source pixels"
            )
        indexes = check_bands(bands, src.count, path)
        resampling = Resampling.bilinear if src.dtypes[0].startswith("float") else Resampling.nearest
        # an alpha band marks the grid pixels the raster covers (without it, outside reads as data)
        with WarpedVRT(
            src,
            crs=grid.crs,
            transform=grid.transform,
            width=grid.width,
            height=grid.height,
            resampling=resampling,
            add_alpha=True,
        ) as vrt:
            data = vrt.read(indexes)
            valid = vrt.read(vrt.count) > 0
        nodata = src.nodatavals[indexes[0] - 1]
        return Chip(
            data, grid.transform, grid.crs, indexes, None if nodata is None else float(nodata), path, valid
        )


def warp_to_grid(chip: Chip, grid: Chip) -> Chip:
    """A chip sent by value, warped onto another chip's grid (the by-value twin of `read_on_grid`)."""
    from rasterio.warp import reproject

    if not chip.crs or not grid.crs:
        raise EarthDialError(ErrorCode.BAD_CRS, "both images of a pair need a CRS to be aligned")
    float_data = chip.data.dtype.kind == "f"
    out = np.zeros((chip.data.shape[0], grid.height, grid.width), dtype=chip.data.dtype)
    coverage = np.zeros((grid.height, grid.width), dtype=np.uint8)
    resampling = Resampling.bilinear if float_data else Resampling.nearest
    try:
        reproject(
            chip.data,
            out,
            src_transform=chip.transform,
            src_crs=chip.crs,
            dst_transform=grid.transform,
            dst_crs=grid.crs,
            resampling=resampling,
            src_nodata=chip.nodata,
            dst_nodata=chip.nodata,
        )
        reproject(
            np.ones(chip.data.shape[1:], np.uint8),
            coverage,
            src_transform=chip.transform,
            src_crs=chip.crs,
            dst_transform=grid.transform,
            dst_crs=grid.crs,
            resampling=Resampling.nearest,
            dst_nodata=0,
        )
    except Exception as exc:  # e.g. a transform GDAL cannot invert
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"the image cannot be warped onto the first image's grid: {exc}"
        ) from None
    return Chip(out, grid.transform, grid.crs, chip.band_indexes, chip.nodata, chip.source, coverage > 0)


def valid_mask(chip: Chip) -> np.ndarray:
    """(rows, cols) True where every band holds data: not nodata, not NaN, and inside the source."""
    data = chip.data
    valid = np.ones(data.shape[1:], dtype=bool) if chip.valid is None else chip.valid.copy()
    if data.dtype.kind == "f":
        valid &= np.isfinite(data).all(axis=0)
    if chip.nodata is not None and not math.isnan(chip.nodata):
        valid &= (data != chip.nodata).all(axis=0)
    return valid


def crop(chip: Chip, row0: int, row1: int, col0: int, col1: int) -> Chip:
    """The part of a chip between rows [row0, row1) and columns [col0, col1), with its transform."""
    a, b, c, d, e, f = chip.transform[:6]
    transform = Affine(a, b, a * col0 + b * row0 + c, d, e, d * col0 + e * row0 + f)
    valid = chip.valid[row0:row1, col0:col1] if chip.valid is not None else None
    return Chip(
        chip.data[:, row0:row1, col0:col1],
        transform,
        chip.crs,
        chip.band_indexes,
        chip.nodata,
        chip.source,
        valid,
    )


def chip_from_array(
    array: np.ndarray,
    transform: Sequence[float] | Affine,
    crs: str | None,
    nodata: float | None = None,
) -> Chip:
    """A Chip for pixels sent by value: ``array`` is (rows, cols) or (bands, rows, cols) and
    ``transform`` its affine (a, b, c, d, e, f)."""
    if not isinstance(array, np.ndarray):
        raise EarthDialError(ErrorCode.BAD_ARRAY, f"pixels must be a numpy array, got {type(array).__name__}")
    if array.dtype.kind not in "uif":
        raise EarthDialError(ErrorCode.BAD_ARRAY, f"pixels must be numeric, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[np.newaxis]
    elif array.ndim != 3:
        raise EarthDialError(
            ErrorCode.BAD_ARRAY,
            f"pixels must be (rows, cols) or (bands, rows, cols), got shape {array.shape}",
        )
    if array.size == 0:
        raise EarthDialError(ErrorCode.BAD_ARRAY, f"pixels are empty: shape {array.shape}")
    aff = affine_from(transform)
    a, b, c, d, e, f = aff[:6]
    rows, cols = array.shape[1:]
    corners = [(a * x + b * y + c, d * x + e * y + f) for x in (0, cols) for y in (0, rows)]
    if not all(math.isfinite(v) for xy in corners for v in xy):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"transform {tuple(aff[:6])} puts the pixels at non-finite coordinates"
        )
    if crs is None or crs == "":
        crs_text = ""
    else:
        crs_text = crs_string(parse_crs(crs, "pixels"))
    if nodata is not None:
        if not isinstance(nodata, numbers.Real) or isinstance(nodata, bool):
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"nodata must be a number or None, got {nodata!r}")
        try:
            nodata = float(nodata)
        except OverflowError:
            raise EarthDialError(
                ErrorCode.BAD_REQUEST, f"nodata {nodata:.3g} is beyond any pixel value"
            ) from None
    return Chip(
        data=array,
        transform=aff,
        crs=crs_text,
        band_indexes=list(range(1, array.shape[0] + 1)),
        nodata=nodata,
        source="<array>",
    )


# --------------------------------------------------------------------------------------------------


def _check_bounds(bounds: Sequence[float]) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in bounds)
    except (TypeError, ValueError, OverflowError):
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"bounds must be 4 finite numbers (minx, miny, maxx, maxy), got {bounds!r}"
        )
    minx, miny, maxx, maxy = values
    if minx >= maxx or miny >= maxy:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"bounds {values} need minx < maxx and miny < maxy")
    return minx, miny, maxx, maxy


def check_bands(bands: Sequence[int] | None, count: int, path: str) -> list[int]:
    if not bands:
        return list(range(1, min(count, 3) + 1))
    indexes: list[int] = []
    for b in bands:
        if not isinstance(b, numbers.Integral) or isinstance(b, bool):
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"band indexes must be integers, got {b!r}")
        if not 1 <= b <= count:
            raise EarthDialError(
                ErrorCode.BAND_OUT_OF_RANGE, f"band {b} does not exist in {path}: valid bands are 1..{count}"
            )
        indexes.append(int(b))
    return indexes


def parse_crs(text: str, what: str) -> CRS:
    file_access.check_crs(text, what)  # before PROJ sees it: some forms make PROJ open files
    try:
        crs = CRS.from_user_input(text)
        crs_string(crs)  # PROJ parses units of 0 but cannot write the CRS out again
        why = _crs_values_refusal(crs)
    except (CRSError, TypeError, ValueError) as exc:
        raise EarthDialError(
            ErrorCode.BAD_CRS, f"CRS of the {what} {text!r:.200} is not understood: {exc}"
        ) from None
    if why is not None:
        raise EarthDialError(ErrorCode.BAD_CRS, f"CRS of the {what} {text!r:.200} is refused: {why}")
    return crs


MAX_TOWGS84 = 1e7  # metres, arc-seconds or ppm of a datum shift; Earth's size is 1.3e7 m


def _crs_values_refusal(crs: CRS) -> str | None:
    """Why a parsed CRS cannot place coordinates, or None: an axis unit of 0 or not finite, an
    ellipsoid that is not, or a datum shift (TOWGS84) whose terms are not finite or are absurd."""
    pcrs = _pyproj_crs(crs.to_wkt())
    for axis in pcrs.axis_info:
        factor = axis.unit_conversion_factor
        if not (math.isfinite(factor) and factor > 0):
            return f"axis {axis.name!r} has a unit of {factor} (it must be a positive number)"
    ellipsoid = pcrs.ellipsoid
    if ellipsoid is not None and not (
        math.isfinite(ellipsoid.semi_major_metre) and 0 < ellipsoid.semi_major_metre < 1e12
    ):
        return f"its ellipsoid's semi-major axis is {ellipsoid.semi_major_metre}"
    wkt1 = crs.to_wkt()
    for terms in re.findall(r"TOWGS84\[([^\]]*)\]", wkt1):
        try:
            values = [float(v) for v in terms.split(",")]
        except ValueError:
            return "its TOWGS84 terms are not numbers"
        if not all(math.isfinite(v) and abs(v) < MAX_TOWGS84 for v in values):
            return f"its TOWGS84 terms [{terms[:80]}] are not finite or beyond {MAX_TOWGS84:g}"
    return None


def crs_string(crs: CRS | None) -> str:
    if crs is None:
        return ""
    wkt = crs.to_wkt()
    try:
        epsg = _epsg_code(wkt)
    except CRSError:  # a definition that does not read back: identify the object itself
        epsg = crs.to_epsg(confidence_threshold=100)
    return f"EPSG:{epsg}" if epsg else wkt


@functools.lru_cache(maxsize=256)
def _epsg_code(wkt: str) -> int | None:
    """The EPSG code of a CRS definition, when one matches it exactly (a close but different CRS keeps
    its own definition). Remembered: PROJ compares a CRS without a code against its whole database (an
    ArcGIS PE string's UTM took 0.3 to 0.6 s), and `plan`, answered on the I/O loop, asks twice."""
    code = CRS.from_wkt(wkt).to_epsg(confidence_threshold=100)
    return None if code is None else int(code)


def window_for(src, bounds, bounds_crs, path) -> rasterio.windows.Window:
    if bounds is None:
        return rasterio.windows.Window(0, 0, src.width, src.height)
    xs, ys = _densified_ring(bounds)
    if bounds_crs is not None and bounds_crs != "":
        target = parse_crs(bounds_crs, "bounds")
        if src.crs is None:
            raise EarthDialError(
                ErrorCode.BAD_CRS, f"bounds are in {bounds_crs} but {path} has no CRS to relate them to"
            )
        if target != src.crs:
            try:
                xs, ys = warp_transform(target, src.crs, xs, ys)
            except Exception as exc:  # PROJ raises several types for points outside a CRS's domain
                raise EarthDialError(
                    ErrorCode.BAD_CRS,
                    f"bounds cannot be carried from {bounds_crs} to the CRS of {path}: {exc}",
                ) from None
    a, b, c, d, e, f = (~src.transform)[:6]
    cols, rows = [], []
    for x, y in zip(xs, ys, strict=True):
        if math.isfinite(x) and math.isfinite(y):  # points outside a projection's domain come back inf
            col, row = a * x + b * y + c, d * x + e * y + f
            if not (math.isnan(col) or math.isnan(row)):  # far bounds under a fine pixel overflow: clamped,
                cols.append(min(max(col, -FAR_PIXELS), FAR_PIXELS))  # the window is clipped to the raster
                rows.append(min(max(row, -FAR_PIXELS), FAR_PIXELS))
    if cols:
        col0, col1 = max(_floor(min(cols)), 0), min(_ceil(max(cols)), src.width)
        row0, row1 = max(_floor(min(rows)), 0), min(_ceil(max(rows)), src.height)
        if col1 > col0 and row1 > row0:
            return rasterio.windows.Window(col0, row0, col1 - col0, row1 - row0)
    raster_crs = crs_string(src.crs) or "no CRS"
    raise EarthDialError(
        ErrorCode.BOUNDS_OUTSIDE,
        f"bounds {tuple(bounds)} (in {bounds_crs or raster_crs}) do not overlap {path}, "
        f"whose extent is {tuple(src.bounds)} (in {raster_crs})",
    )


def _densified_ring(bounds: tuple[float, float, float, float]) -> tuple[list[float], list[float]]:
    minx, miny, maxx, maxy = bounds
    steps = [i / (EDGE_POINTS - 1) for i in range(EDGE_POINTS)]
    xs: list[float] = []
    ys: list[float] = []
    for t in steps:
        x, y = minx + t * (maxx - minx), miny + t * (maxy - miny)
        xs += [x, x, minx, maxx]
        ys += [miny, maxy, y, y]
    return xs, ys


def affine_from(transform: Sequence[float] | Affine) -> Affine:
    if isinstance(transform, Affine):
        values = list(transform[:6])
    else:
        try:
            values = [float(v) for v in transform]
        except (TypeError, ValueError, OverflowError):
            values = []
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"transform must be 6 finite numbers (a, b, c, d, e, f), got {transform!r}"
        )
    aff = Affine(*values)
    if aff.is_degenerate:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"transform {tuple(values)} is degenerate (not invertible)"
        )
    return aff
