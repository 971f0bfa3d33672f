"""A file the server may not open, read by the command line and sent by value, as the plugin does.

A server started with `--allow-dir` (or in a container, or on another machine) refuses a path it may not or
cannot open (`forbidden_path`, `file_not_found`, `not_a_raster`). The file is readable here, so the client
reads what the server would have read and sends the pixels: an `ask`'s window as a source of kind `value`
(docs/protocol.md), a scan's tiles streamed (`kind` 'stream') as the model asks for them. Each source
carries the file's path as its `name`, so results still name the file in their `source` field. The band
preset is the one the server picks for the file, sent by name: the pixels alone could look like another
(three of twelve Sentinel-2 bands look like plain 16-bit RGB).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from earthdial.contract.client import Client
from earthdial.contract.wire import EarthDialError, ErrorCode, source_by_value
from earthdial.geo import imagery, presets
from earthdial.serving import requests, service
from earthdial.serving.service import MAX_CHIP_SIZE  # the long side the server reads a window at

# what a server answers for a file it cannot read itself; the plugin sends the pixels for the same codes
UNREADABLE_FILE = frozenset({ErrorCode.FILE_NOT_FOUND, ErrorCode.FORBIDDEN_PATH, ErrorCode.NOT_A_RASTER})

Note = Callable[[str], None]


def _refs(header: dict[str, Any]) -> list[requests.Ref]:
    """The request's sources when they are all files (as the server checks them), else none."""
    try:
        sources = requests.sources(header)
    except EarthDialError:
        return []
    refs = [s for s in sources if isinstance(s, requests.Ref)]
    return refs if len(refs) == len(sources) else []


def _unreadable(exc: EarthDialError, header: dict[str, Any]) -> bool:
    return exc.code in UNREADABLE_FILE and bool(_refs(header))


def _note(note: Note, exc: EarthDialError, header: dict[str, Any]) -> None:
    paths = ", ".join(s.path for s in _refs(header))
    note(f"the server cannot read {paths} ({exc.code}); its pixels are read here and sent instead")


def preset_for(path: str, options: dict[str, Any]) -> presets.Preset:
    """The preset named in the options, else the one the server picks for the file (service's rule)."""
    if options.get("preset"):
        return presets.get(str(options["preset"]))
    return service.choose_preset(None, requests.Options(), imagery.describe(path))[0]


def ask_request(header: dict[str, Any]) -> tuple[dict[str, Any], list[np.ndarray], list[list[int]]]:
    """An `ask` whose sources (files, by reference) are read here: the first one's window as the server
    reads it (bounds, bands, GSD, at most MAX_CHIP_SIZE a side), later ones over the same bounds at their
    own resolution (the server warps them onto the first one's grid, as it does the plugin's). Also
    returns the file bands read for each source."""
    refs = _refs(header)
    options = dict(header.get("options") or {})
    window = service.window(refs[0], None, requests.options(header))  # the server's window, read here
    options["preset"] = window.preset.name
    default = list(window.preset.bands) if window.preset.bands else None
    sources, arrays, read = [], [], []
    first: imagery.Chip | None = None
    for ref in refs:
        if first is None:
            chip = window.read([])
            first = chip
        else:
            a, _, c, _, e, f = first.transform[:6]
            extent = (c, f + e * first.height, c + a * first.width, f)
            chip = imagery.read_chip(
                ref.path,
                bands=list(ref.bands) if ref.bands else default,
                bounds=extent,
                bounds_crs=first.crs or None,
                max_size=MAX_CHIP_SIZE,
            )
        source = source_by_value(tuple(chip.transform[:6]), chip.crs, chip.nodata)
        sources.append({**source, "name": ref.path, "path": ref.path})  # path: for export
        arrays.append(chip.data)
        read.append(chip.band_indexes)
    out = {k: v for k, v in header.items() if k not in ("source", "sources")}
    out["options"] = options
    if "source" in header:
        out["source"] = sources[0]
    else:
        out["sources"] = sources
    return out, arrays, read


def ask(client: Client, header: dict[str, Any], note: Note) -> dict[str, Any]:
    """Send an `ask`; when the server cannot read its file(s), read them here and send the pixels."""
    try:
        return client.request(header).header
    except EarthDialError as exc:
        if not _unreadable(exc, header):
            raise
        _note(note, exc, header)
    value, arrays, read = ask_request(header)
    reply = client.request(value, arrays).header
    # what was read, as the file's bands (the server saw bands 1..n of the array): `--preview` reads them again
    for chip, bands in zip([reply.get("chip"), *(reply.get("chips") or [])], [read[0], *read], strict=False):
        if isinstance(chip, dict):
            chip["bands"] = bands
    return reply


def scan(
    client: Client,
    header: dict[str, Any],
    on_event: Callable[[dict[str, Any]], None],
    cancelled: Callable[[], bool],
    note: Note,
) -> dict[str, Any]:
    """Run a `detect` / `detect_changes`; when the server cannot read the file(s), stream the tiles."""
    try:
        return client.request(header, progress=on_event, cancelled=cancelled).header
    except EarthDialError as exc:
        if not _unreadable(exc, header):
            raise
        _note(note, exc, header)
    with streamed(header) as (stream, read_tile, seen):

        def event(ev: dict[str, Any]) -> None:
            seen(ev)
            on_event(ev)

        return client.scan(stream, read_tile=read_tile, on_event=event, cancelled=cancelled)


@contextlib.contextmanager
def streamed(
    header: dict[str, Any],
) -> Iterator[tuple[dict[str, Any], Any, Callable[[dict[str, Any]], None]]]:
    """A scan's header with its files as one streamed source, the tile reader, and a callback that must
    see the scan's events (the plan tells which pair a tile index belongs to). The grid is the one the
    server reads by reference: the first file's window (`detect`'s bounds, or the layers' common extent
    for `detect_changes`); later layers are warped onto it tile by tile."""
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    refs = _refs(header)
    paths = [r.path for r in refs]
    options = dict(header.get("options") or {})
    preset = preset_for(paths[0], options)
    options["preset"] = preset.name
    changes = header.get("op") == "detect_changes"
    bands = (None if changes else list(refs[0].bands or ())) or (list(preset.bands) if preset.bands else None)
    state = {"tiles": 0}

    def seen(ev: dict[str, Any]) -> None:
        if ev.get("event") == "plan":
            state["tiles"] = int(ev["plan"]["tiles"])

    with imagery.open_raster(paths[0]) as src:
        indexes = imagery.check_bands(bands, src.count, paths[0])
        bounds = _common_bounds(src, paths) if changes else refs[0].bounds
        crs_of_bounds = None if changes else refs[0].crs
        region = imagery.window_for(src, bounds, crs_of_bounds, paths[0])
        region = Window(int(region.col_off), int(region.row_off), int(region.width), int(region.height))
        grid = window_transform(region, src.transform)
        crs = imagery.crs_string(src.crs)
        nodata = src.nodatavals[indexes[0] - 1]
        source: dict[str, Any] = {"kind": "stream", "width": int(region.width), "height": int(region.height),
                                  "band_count": len(indexes), "transform": list(grid)[:6], "crs": crs,
                                  "dtype": src.dtypes[indexes[0] - 1], "nodata": nodata, "name": paths[0],
                                  "path": paths[0]}  # fmt: skip
        if changes:
            source["layers"] = source["paths"] = paths

        def first_layer(col: int, row: int, width: int, height: int, shape: tuple[int, int]) -> np.ndarray:
            window = Window(region.col_off + col, region.row_off + row, width, height)
            return imagery.read_window(src, indexes, window, shape[0], shape[1], paths[0])

        def layer(k: int, window: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
            col, row, width, height = window
            if k == 0:
                return first_layer(col, row, width, height, shape)
            a, b, c, d, e, f = grid[:6]
            sx, sy = width / shape[0], height / shape[1]  # layer pixels per tile pixel
            affine = type(grid)(a * sx, b * sy, a * col + b * row + c, d * sx, e * sy, d * col + e * row + f)
            tile_grid = imagery.Chip(np.empty((0, shape[1], shape[0]), np.uint8), affine, crs, [], None, "")
            chip = imagery.read_on_grid(paths[k], indexes, tile_grid)
            if nodata is not None and chip.valid is not None and not chip.valid.all():
                chip.data[:, ~chip.valid] = nodata  # outside the later layer
            return chip.data

        def read_tile(index: int, window: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
            if not changes:
                return layer(0, window, shape)
            k = index // max(state["tiles"], 1)
            before, after = layer(k, window, shape), layer(k + 1, window, shape)
            dtype = np.result_type(before.dtype, after.dtype)
            return np.concatenate([before.astype(dtype, copy=False), after.astype(dtype, copy=False)])

        stream = {k: v for k, v in header.items() if k not in ("source", "sources")}
        yield {**stream, "source": source, "options": options}, read_tile, seen


def _common_bounds(src: Any, paths: list[str]) -> tuple[float, float, float, float]:
    """The layers' common extent in the first one's CRS (as the server's by-reference sequence)."""
    from rasterio.warp import transform_bounds

    left, bottom, right, top = src.bounds
    for path in paths[1:]:
        with imagery.open_raster(path) as other:
            b = transform_bounds(other.crs, src.crs, *other.bounds, densify_pts=21)
        left, bottom, right, top = max(left, b[0]), max(bottom, b[1]), min(right, b[2]), min(top, b[3])
        if left >= right or bottom >= top:
            raise EarthDialError(ErrorCode.NO_OVERLAP, f"{path} does not overlap {paths[0]}")
    return left, bottom, right, top
