"""One request of the panel, as one typed value: what the controls asked for when Send (or the summary
of what Send would send) was made.

The panel builds a `Request` in one place (`EarthDialDock.request`) and hands it to a task: `RequestTask`
for one window, `ScanTask` for a tiled scan. The names in it (the task, the preset in `options`) are the
backend's, as its status listed them: nothing here lists them again. The request names its layers by
their ids in the project, so that it holds no QGIS object and can be kept, compared and logged; the
tasks find the layers, and clone what their thread reads, on the main thread when they are made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from qgis.core import QgsProject, QgsRasterLayer, QgsRectangle

from ..contract.wire import EarthDialError
from .errors import NO_LAYER
from .scanning import WEB_SCAN_SIZE
from .sources import MAX_VALUE_SIZE, SourcePlan, area_in_layer_crs, native_resolution, plan_source

GEOREF = "georef"  # the panel's entry that imports a pasted answer instead of asking the model (an op)


@dataclass(frozen=True)
class Request:
    endpoint: str
    timeout_s: float
    task: str  # a task the backend listed, or GEOREF
    prompt: str
    # layer ids in the project: the first layer, then a pair's or sequence's later ones
    layers: tuple[str, ...]
    area: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax in the first layer's CRS
    bands: tuple[int, ...] | None = None  # None: the bands the layer displays
    # as sent: the preset, GSD and chat history of one window; the preset and tile_size of a scan
    options: Mapping[str, Any] = field(default_factory=dict)
    scan: bool = False  # a tiled scan (`detect`; `detect_changes` for several layers); else one window

    def __post_init__(self) -> None:
        if not self.layers:
            raise EarthDialError(NO_LAYER, "a request needs a layer")
        # frozen all the way down: the options cannot change under a task that holds the request
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "area", tuple(float(v) for v in self.area))
        if self.bands is not None:
            object.__setattr__(self, "bands", tuple(int(b) for b in self.bands))

    @property
    def rect(self) -> QgsRectangle:
        return QgsRectangle(*self.area)

    @property
    def band_list(self) -> list[int] | None:
        return list(self.bands) if self.bands is not None else None

    def header(self) -> dict[str, Any]:
        """The request's header as the protocol has it (without its sources, which the task adds)."""
        options = dict(self.options)
        if self.task == GEOREF:
            return {"op": "georef", "answer": self.prompt}
        if self.scan and len(self.layers) > 1:
            return {"op": "detect_changes", "task": self.task, "options": options}
        if self.scan:
            return {"op": "detect", "task": self.task, "prompt": self.prompt, "options": options}
        return {"op": "ask", "task": self.task, "prompt": self.prompt, "options": options}

    def plan_header(self) -> dict[str, Any]:
        """The `plan` request that asks the backend what this request would send."""
        options = {k: v for k, v in self.options.items() if k != "tile_size"}
        header: dict[str, Any] = {"op": "plan", "task": self.task, "prompt": self.prompt, "options": options}
        if self.scan:  # the scan's own options: a tile size, the band preset (it takes no GSD)
            header["scan"] = {k: v for k, v in self.options.items() if k == "tile_size"}
            header["options"] = {k: v for k, v in options.items() if k == "preset"}
        return header

    def map_layers(self, project: QgsProject | None = None) -> list[QgsRasterLayer]:
        """The request's layers in ``project`` (default: the current one); a clear error for one gone."""
        project = project or QgsProject.instance()
        found = []
        for layer_id in self.layers:
            layer = project.mapLayer(layer_id)
            if not isinstance(layer, QgsRasterLayer) or not layer.isValid():
                raise EarthDialError(
                    NO_LAYER, f"the layer {layer_id} asked about is no longer in the project"
                )
            found.append(layer)
        return found

    def plans(self, project: QgsProject | None = None) -> list[SourcePlan]:
        """Each layer's source plan for the area (main thread: the plans clone the layers' providers;
        release them when they are not sent). A scan's are of the area at the layers' own resolution, as
        the scan reads them."""
        layers = self.map_layers(project)
        first = layers[0]

        def size(layer: QgsRasterLayer) -> int:
            if not self.scan:
                return MAX_VALUE_SIZE
            return 10**9 if native_resolution(layer) is not None else WEB_SCAN_SIZE

        rect, bands = self.rect, self.band_list
        plans = [plan_source(first, rect, bands, size(first))]
        try:
            for other in layers[1:]:
                area = area_in_layer_crs(rect, first.crs(), other, project)
                plans.append(plan_source(other, area, bands, size(other)))
        except EarthDialError:
            for plan in plans:  # provider clones go now, on this thread, not whenever Python collects them
                plan.release()
            raise
        return plans
