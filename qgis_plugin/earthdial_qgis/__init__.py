"""EarthDial for QGIS: ask the EarthDial remote-sensing vision-language model about the visible part of a
raster layer, through a local `earthdial serve` backend, and get its boxes back as map features."""

from __future__ import annotations

from typing import Any

from .core.deps import add_vendor_to_path

add_vendor_to_path()  # pyzmq / qtpy installed into the plugin's own folder, when the user chose that


def classFactory(iface: Any) -> Any:
    """The entry point QGIS calls when it loads the plugin."""
    from .plugin import EarthDialPlugin  # imported late so that QGIS can list the plugin cheaply

    return EarthDialPlugin(iface)
