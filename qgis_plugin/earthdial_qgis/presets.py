"""The band presets the backend knows (backend/earthdial/presets.py). The backend's status does not list
them yet, so the plugin keeps this list; "auto" (no preset sent) lets the backend pick from the raster."""

from __future__ import annotations

AUTO = "auto"
PRESETS: dict[str, str] = {
    "rgb8": "8-bit RGB (bands 1,2,3)",
    "rgb16": "16-bit or float RGB, percentile stretch (bands 1,2,3)",
    "grey": "one band as grey (thermal, infrared, panchromatic)",
    "s2_l2a": "Sentinel-2 L2A, 12 bands",
    "s2_l1c": "Sentinel-2 L1C, 13 bands",
    "s2_rgb": "Sentinel-2 true colour (B4, B3, B2) from a 12/13-band stack",
    "landsat8": "Landsat-8, 8 bands",
    "s1_vh_db": "Sentinel-1 VH backscatter in dB",
    "s1_vh_linear": "Sentinel-1 VH backscatter, linear power (converted to dB)",
    "rgbn": "RGB + near infrared, 8-bit (bands 1-4)",
}


# the bands each preset reads (1-based), sent when the user names a preset and no bands of their own
PRESET_BANDS: dict[str, tuple[int, ...]] = {
    "rgb8": (1, 2, 3),
    "rgb16": (1, 2, 3),
    "grey": (1,),
    "s2_l2a": tuple(range(1, 13)),
    "s2_l1c": (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13),
    "s2_rgb": (4, 3, 2),
    "landsat8": tuple(range(1, 9)),
    "s1_vh_db": (1,),
    "s1_vh_linear": (1,),
    "rgbn": (1, 2, 3, 4),
}


def bands_for(name: str) -> list[int] | None:
    bands = PRESET_BANDS.get(name)
    return list(bands) if bands else None


def names(status: dict | None = None) -> list[str]:
    """Preset names: the backend's own list when its status carries one, else the built-in list."""
    reported = (status or {}).get("presets")
    if isinstance(reported, list) and reported:
        return [str(p.get("name") if isinstance(p, dict) else p) for p in reported]
    return list(PRESETS)
