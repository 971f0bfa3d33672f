"""The band presets, as the backend's status lists them (backend/earthdial/geo/presets.py is their one source).

The plugin keeps no list of its own: until a backend has answered, only "auto" (no preset sent: the
backend picks one from the raster) is offered.
"""

from __future__ import annotations

from typing import Any

AUTO = "auto"


def presets(status: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The status's presets that have a name: {"name", "bands" (1-based or None), "description"}."""
    reported = (status or {}).get("presets")
    if not isinstance(reported, list):
        return []
    return [p for p in reported if isinstance(p, dict) and isinstance(p.get("name"), str) and p["name"]]


def names(status: dict[str, Any] | None) -> list[str]:
    return [p["name"] for p in presets(status)]


def bands_for(name: str, status: dict[str, Any] | None) -> list[int] | None:
    """The bands a preset reads, sent when the user names it and no bands of their own."""
    for preset in presets(status):
        bands = preset.get("bands")
        if preset["name"] == name and isinstance(bands, list) and bands:
            return [int(b) for b in bands]
    return None
