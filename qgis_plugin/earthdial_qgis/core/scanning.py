"""A whole-layer scan as the plugin runs it: the backend's streaming `detect` / `detect_changes` ops.

The backend lays the tiles and merges the boxes; the plugin has no tiling or merge rules of its own.
A layer the backend can read is scanned by reference; any other (WMS, XYZ, memory, or a file the backend
may not open) is streamed by value: the backend's `plan` event says which windows to read (the
protocol's `plan_window` / `read_shape`), and `Client.scan` reads them here, tile by tile, and sends
them as the model asks for more. Made on the main thread (`ScanLayer.of`), used from a task's thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from qgis.core import QgsCoordinateReferenceSystem, QgsRasterLayer, QgsRectangle

from ..contract.client import Client
from ..contract.result_features import change_map, with_tile_fields
from ..contract.wire import EarthDialError, ErrorCode, source_by_reference
from .layers import reply_features, result_fields
from .sources import (
    PixelGrid,
    crs_text,
    displayed_bands,
    file_path,
    native_resolution,
    pixel_grid,
    read_pixels,
)

WEB_SCAN_SIZE = 4096  # long side, in pixels, a layer without its own pixel grid (WMS, XYZ) is scanned at
UNREADABLE = {ErrorCode.FILE_NOT_FOUND, "forbidden_path"}


@dataclass
class ScanLayer:
    name: str
    path: str | None
    crs: QgsCoordinateReferenceSystem
    extent: QgsRectangle
    resolution: tuple[float, float] | None
    bands: list[int] | None
    provider: Any  # a clone for the task's thread
    band_count: int

    @classmethod
    def of(cls, layer: QgsRasterLayer, bands: list[int] | None = None) -> ScanLayer:
        provider = layer.dataProvider()
        return cls(
            layer.name(),
            file_path(layer),
            layer.crs(),
            QgsRectangle(layer.extent()),
            native_resolution(layer),
            bands or displayed_bands(layer),
            provider.clone() if provider is not None else None,
            provider.bandCount() if provider is not None else 0,
        )


@dataclass
class Scan:
    """What a scan request is and what it has returned so far (filled from its events)."""

    header: dict[str, Any]
    read_tile: Callable[..., np.ndarray] | None = None
    plan: dict[str, Any] | None = None
    tiles: dict[int, dict[str, Any]] = field(default_factory=dict)  # finished tiles, by index
    found: list[dict[str, Any]] = field(default_factory=list)  # boxes as tiles finish (before merging)
    merged: list[dict[str, Any]] = field(default_factory=list)
    crs: str = ""
    properties: dict[str, Any] = field(default_factory=dict)  # what every box shares (the plan event's)
    done: int = 0
    total: int = 0

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "plan":
            self.plan, self.total, self.crs = event["plan"], int(event["total"]), str(event.get("crs") or "")
            self.properties = dict(event.get("properties") or {})
        elif kind == "progress":
            self.tiles.update({int(t["index"]): t for t in event.get("tiles", [])})
            self.found += event.get("features", [])
            self.done, self.total = int(event["done"]), int(event["total"])
        elif kind == "merged":
            self.merged += event.get("features", [])


def finished_boxes(
    boxes: list[dict[str, Any]], finished: dict[int, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``boxes`` split into those whose tile has finished (its entry, with the answer and request each box
    records, has arrived) and those still waiting for it: events are cut by size, so a tile's boxes may
    arrive an event before its entry."""
    ready: list[dict[str, Any]] = []
    waiting: list[dict[str, Any]] = []
    for box in boxes:
        tile = (box.get("properties") or {}).get("tile")
        (ready if isinstance(tile, int) and tile in finished else waiting).append(box)
    return ready, waiting


def detect_request(
    layer: ScanLayer,
    rect: QgsRectangle,
    task: str,
    prompt: str,
    options: dict[str, Any],
    by_value: bool = False,
) -> Scan:
    """A `detect` of ``rect`` (in the layer's CRS): by reference when the layer is a file, else streamed."""
    header: dict[str, Any] = {"op": "detect", "task": task, "prompt": prompt, "options": dict(options)}
    if layer.path is not None and not by_value:
        bounds = (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum())
        header["source"] = source_by_reference(layer.path, layer.bands, bounds, crs_text(layer.crs))
        return Scan(header)
    if layer.provider is None:
        raise EarthDialError(ErrorCode.NOT_A_RASTER, f"layer '{layer.name}' has no readable data")
    if not layer.crs.isValid():
        raise EarthDialError(
            ErrorCode.BAD_CRS, f"layer '{layer.name}' has no CRS: set one in its properties first"
        )
    size = (
        10**9 if layer.resolution is not None else WEB_SCAN_SIZE
    )  # native pixels; web layers at a fixed size
    grid = pixel_grid(layer.extent, rect, layer.resolution, max_size=size)
    bands = layer.bands or list(range(1, min(layer.band_count, 3) + 1))
    sample = read_pixels(layer.provider, PixelGrid(grid.bounds, 4, 4), bands)
    header["source"] = {"kind": "stream", "width": grid.cols, "height": grid.rows, "band_count": int(sample.shape[0]),
                        "transform": list(grid.transform), "crs": crs_text(layer.crs) or "",
                        "dtype": sample.dtype.name, "name": layer.path or layer.name, "path": layer.path}  # fmt: skip
    return Scan(header, _tile_reader(layer, grid, bands))


def _tile_reader(layer: ScanLayer, grid: PixelGrid, bands: list[int]) -> Callable[..., np.ndarray]:
    a, _, c, _, e, f = grid.transform

    def read_tile(index: int, window: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
        col, row, width, height = window
        bounds = (c + col * a, f + (row + height) * e, c + (col + width) * a, f + row * e)
        return read_pixels(layer.provider, PixelGrid(bounds, shape[0], shape[1]), bands)

    return read_tile


def run(
    client: Client,
    scan: Scan,
    cancelled: Callable[[], bool] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    earlier: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``scan``; ``earlier`` (a resumed scan): the stopped scan's tiles and boxes, which the backend
    merges with the new ones (their tiles are the request's `options.skip`)."""

    def event(ev: dict[str, Any]) -> None:
        scan.on_event(ev)
        if on_event is not None:
            on_event(ev)

    if earlier is not None:  # the earlier boxes get their tiles' answer and request as the new ones do
        scan.tiles.update({int(t["index"]): t for t in earlier["tiles"]})
        scan.found += earlier["features"]
    return client.scan(
        scan.header, read_tile=scan.read_tile, on_event=event, cancelled=cancelled, earlier=earlier
    )


def run_layer(
    client: Client,
    layer: ScanLayer,
    rect: QgsRectangle,
    task: str,
    prompt: str,
    options: dict[str, Any],
    cancelled: Callable[[], bool] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    earlier: dict[str, Any] | None = None,
) -> tuple[Scan, dict[str, Any]]:
    """Scan by reference; a file the backend may not read is streamed by value instead."""
    scan = detect_request(layer, rect, task, prompt, options)
    try:
        return scan, run(client, scan, cancelled, on_event, earlier)
    except EarthDialError as exc:
        if exc.code not in UNREADABLE or layer.provider is None or scan.read_tile is not None:
            raise
    scan = detect_request(layer, rect, task, prompt, options, by_value=True)
    return scan, run(client, scan, cancelled, on_event, earlier)


def collection(found: list[dict[str, Any]], scan: Scan) -> dict[str, Any]:
    """Boxes (from progress or merged events) as a reply for `layers`, each with the answer and request of
    the tile that found it (events carry those once, in the tile's entry)."""
    features = with_tile_fields(found, scan.tiles)
    return {"answer": "", "features": {"type": "FeatureCollection", "crs": scan.crs, "features": features}}


def features(found: list[dict[str, Any]], scan: Scan, crs: QgsCoordinateReferenceSystem) -> list[Any]:
    """The boxes as QGIS features in the output schema (for sinks)."""
    return reply_features(collection(found, scan), result_fields(), crs)


def tile_collection(scan: Scan) -> dict[str, Any]:
    """The per-tile change map (result_features.change_map): each tile pair's footprint, changed or unchanged."""
    return {
        "answer": "",
        "features": {
            "type": "FeatureCollection",
            "crs": scan.crs,
            "features": change_map(scan.tiles, scan.properties),
        },
    }


def tile_features(scan: Scan, crs: QgsCoordinateReferenceSystem) -> list[Any]:
    return reply_features(tile_collection(scan), result_fields(), crs)


def changes_request(layers: list[ScanLayer], options: dict[str, Any], by_value: bool = False) -> Scan:
    """A `detect_changes` over BEFORE AFTER [LATER ...]: files the backend reads and aligns itself, or,
    for layers it cannot read (WMS, XYZ, memory, a file it may not open), every layer read here on the
    first one's grid over their common extent and streamed, each tile's pair stacked band-wise."""
    if not by_value and all(layer.path is not None for layer in layers):
        sources = [source_by_reference(layer.path) for layer in layers]  # type: ignore[arg-type]
        return Scan({"op": "detect_changes", "task": "change", "sources": sources, "options": dict(options)})
    first = layers[0]
    area = QgsRectangle(first.extent)
    for layer in layers:
        if layer.provider is None:
            raise EarthDialError(ErrorCode.NOT_A_RASTER, f"layer '{layer.name}' has no readable data")
        if not layer.crs.isValid():
            raise EarthDialError(
                ErrorCode.BAD_CRS, f"layer '{layer.name}' has no CRS: set one in its properties first"
            )
        if layer.crs != first.crs:
            raise EarthDialError(
                ErrorCode.BAD_CRS,
                f"layer '{layer.name}' is in {layer.crs.authid()} and '{first.name}' in "
                f"{first.crs.authid()}: a change scan of layers the backend cannot read needs one CRS "
                "(save them as GeoTIFFs, or reproject one)",
            )
        area = area.intersect(layer.extent)
        if area.isEmpty():
            raise EarthDialError(ErrorCode.NO_OVERLAP, f"layer '{layer.name}' does not overlap the others")
    size = 10**9 if first.resolution is not None else WEB_SCAN_SIZE
    grid = pixel_grid(first.extent, area, first.resolution, max_size=size)
    bands = [layer.bands or list(range(1, min(layer.band_count, 3) + 1)) for layer in layers]
    sample = read_pixels(first.provider, PixelGrid(grid.bounds, 4, 4), bands[0])
    header: dict[str, Any] = {"op": "detect_changes", "task": "change", "options": dict(options)}
    header["source"] = {"kind": "stream", "width": grid.cols, "height": grid.rows, "band_count": int(sample.shape[0]),
                        "transform": list(grid.transform), "crs": crs_text(first.crs) or "", "dtype": sample.dtype.name,
                        "layers": [layer.name for layer in layers], "paths": [layer.path for layer in layers]}  # fmt: skip
    scan = Scan(header)
    a, _, c, _, e, f = grid.transform

    def read_tile(index: int, window: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
        if scan.plan is None:  # the backend asks for tiles only after its plan event
            raise EarthDialError(
                ErrorCode.INTERNAL, f"the backend asked for tile {index} before sending its plan"
            )
        k = index // int(scan.plan["tiles"])  # pair k: layers k and k + 1 (protocol: k x tiles + i)
        col, row, width, height = window
        bounds = (c + col * a, f + (row + height) * e, c + (col + width) * a, f + row * e)
        return np.concatenate(
            [
                read_pixels(layers[j].provider, PixelGrid(bounds, shape[0], shape[1]), bands[j])
                for j in (k, k + 1)
            ]
        )

    scan.read_tile = read_tile
    return scan


def run_changes(
    client: Client,
    layers: list[ScanLayer],
    options: dict[str, Any],
    cancelled: Callable[[], bool] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Scan, dict[str, Any]]:
    """Change detection by reference; layers the backend may not read are streamed by value instead."""
    scan = changes_request(layers, options)
    try:
        return scan, run(client, scan, cancelled, on_event)
    except EarthDialError as exc:
        if (
            exc.code not in UNREADABLE
            or scan.read_tile is not None
            or any(x.provider is None for x in layers)
        ):
            raise
    scan = changes_request(layers, options, by_value=True)
    return scan, run(client, scan, cancelled, on_event)
