"""The scenes of an archive run (`earthdial detect-many`): raster paths given as arguments, in list files
(one path a line), or as assets of the items of a STAC ItemCollection (a local JSON file).

Only local files are read: the machines a run goes to have no network at run time, so an asset at an
http(s) or cloud URL, or a GDAL virtual file system path (`/vsicurl/...`, `/vsicurl?url=...`, any `/vsi`
prefix), is refused for that scene with a typed error before any worker opens it, and the other scenes
go on. A relative
path or href is resolved against the folder of the file that names it (STAC's rule for relative links;
the same for list files). Plain data: each scene is a `Scene`; its `error` is set when it cannot be run.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.geo import file_access

# An asset is taken when --asset does not name one: `visual` (STAC's true-colour asset, EarthDial's RGB
# input), else the first asset that says it is a GeoTIFF (media type or file extension).
DEFAULT_ASSETS = ("visual",)
GEOTIFF_TYPES = ("image/tiff", "image/geotiff", "application=geotiff")
GEOTIFF_EXTENSIONS = (".tif", ".tiff")
MAX_CATALOG_BYTES = 256 << 20  # a larger JSON file is refused rather than parsed
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass
class Scene:
    name: str  # the STAC item's id, else the file's name: layer names are made from it
    path: str  # absolute local path
    origin: str  # where the scene was named: "argument", "LIST:LINE" or "STAC-FILE:item ID"
    error: EarthDialError | None = None


def scenes_of(paths: list[str], lists: list[str], stacs: list[str], asset: str | None = None) -> list[Scene]:
    """Every scene named, in the order given (arguments, then list files, then STAC files); a path named
    twice is run once. A list or STAC file that cannot be read raises; a bad item only marks its scene."""
    found = [Scene(os.path.basename(p), os.path.abspath(p), "argument") for p in paths]
    for path in lists:
        found += _from_list(path)
    for path in stacs:
        found += _from_stac(path, asset)
    for scene in found:  # `/vsicurl/http://...` is an absolute path to Python, and a URL to GDAL
        why = file_access.remote_path_refusal(scene.path) if scene.error is None else None
        if why is not None:
            scene.error = _remote(scene.path, f"{scene.origin} ({why})")
    seen: set[str] = set()
    unique = []
    for scene in found:
        key = scene.path if scene.error is None else f"{scene.origin}\x00{scene.path}"
        if key not in seen:
            seen.add(key)
            unique.append(scene)
    return unique


def _read_text(path: str, what: str) -> str:
    try:
        if os.path.getsize(path) > MAX_CATALOG_BYTES:
            raise EarthDialError(ErrorCode.TOO_LARGE, f"{what} {path} is over {MAX_CATALOG_BYTES >> 20} MiB")
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise EarthDialError(ErrorCode.FILE_NOT_FOUND, f"no such {what}: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"{what} {path} cannot be read: {exc}") from None


def _from_list(path: str) -> list[Scene]:
    """One raster path a line; blank lines and lines starting with # are skipped."""
    folder = os.path.dirname(os.path.abspath(path))
    scenes = []
    for n, line in enumerate(_read_text(path, "list file").splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        origin = f"{path}:{n}"
        if _URL.match(entry) and not entry.startswith("file://"):
            scenes.append(Scene(entry, entry, origin, _remote(entry, origin)))
            continue
        local = _local_path(entry, folder)
        scenes.append(Scene(os.path.basename(local), local, origin))
    return scenes


def _from_stac(path: str, asset: str | None) -> list[Scene]:
    """The chosen asset of each item of an ItemCollection (or of one Item)."""
    try:
        data = json.loads(_read_text(path, "STAC file"))
    except ValueError as exc:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"STAC file {path} is not JSON: {exc}") from None
    if isinstance(data, dict) and data.get("type") == "Feature":
        items: Any = [data]
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        items = data.get("features")
    else:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"{path} is not a STAC ItemCollection or Item (a GeoJSON FeatureCollection of items with assets)",
        )
    if not isinstance(items, list):
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"{path}: 'features' must be a list of STAC items")
    folder = os.path.dirname(os.path.abspath(path))
    return [_item_scene(item, k, path, folder, asset) for k, item in enumerate(items)]


def _item_scene(item: Any, k: int, path: str, folder: str, asset: str | None) -> Scene:
    item_id = item.get("id") if isinstance(item, dict) else None
    name = str(item_id) if isinstance(item_id, (str, int)) and str(item_id) else f"item{k}"
    origin = f"{path}:item {name}"
    assets = item.get("assets") if isinstance(item, dict) else None
    if not isinstance(assets, dict) or not assets:
        return Scene(name, "", origin, EarthDialError(ErrorCode.BAD_REQUEST, f"{origin} has no assets"))
    key = asset or pick_asset(assets)
    chosen = assets.get(key) if key else None
    if not isinstance(chosen, dict) or not isinstance(chosen.get("href"), str) or not chosen["href"]:
        what = f"no asset {key!r} with an href" if asset else "no GeoTIFF asset (name one with --asset)"
        names = ", ".join(sorted(map(str, assets)))[:200]
        return Scene(
            name,
            "",
            origin,
            EarthDialError(ErrorCode.BAD_REQUEST, f"{origin} has {what}; its assets: {names}"),
        )
    href = chosen["href"]
    if _URL.match(href) and not href.startswith("file://"):
        return Scene(name, href, origin, _remote(href, f"{origin} (asset {key!r})"))
    return Scene(name, _local_path(href, folder), origin)


def pick_asset(assets: dict[str, Any]) -> str | None:
    """`visual` when the item has it, else the first asset that is a GeoTIFF."""
    for key in DEFAULT_ASSETS:
        if isinstance(assets.get(key), dict):
            return key
    for key, value in assets.items():
        if not isinstance(value, dict):
            continue
        media = str(value.get("type") or "").lower()
        href = str(value.get("href") or "").lower().split("?")[0]
        if any(t in media for t in GEOTIFF_TYPES) or href.endswith(GEOTIFF_EXTENSIONS):
            return str(key)
    return None


def _local_path(entry: str, folder: str) -> str:
    if entry.startswith("file://"):
        parsed = urlparse(entry)
        entry = unquote(parsed.path)
    return os.path.normpath(os.path.join(folder, os.path.expanduser(entry)))


def _remote(href: str, where: str) -> EarthDialError:
    return EarthDialError(
        ErrorCode.FORBIDDEN_PATH,
        f"{where} is a remote asset ({href[:200]}): detect-many "
        "reads local files only (no network at run time); download it and point the "
        "item's href (or the list) at the copy",
    )
