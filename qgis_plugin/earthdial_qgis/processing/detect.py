"""earthdial:detect — find objects over a whole layer (or an extent) with the backend's streaming scan.

The backend tiles the area, runs the tiles through the model in batches and merges the boxes found in
overlapping tiles; this algorithm sends one `detect` request (by reference for a file, tiles streamed by
value for other layers), follows its progress events, and writes the merged boxes: one styled layer
named for the request.
"""

from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsFeatureSink,
    QgsProcessingException,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputNumber,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
)

from ..contract.wire import EarthDialError
from ..core import scanning
from ..core.styling import style_result_layer
from .common import ANSWER, INPUT, OUTPUT, PROMPT, EarthDialAlgorithm, advanced, connected, fail, number_type

TILE_SIZE, OVERLAP, TILES, BATCH, MIN_SCORE = "TILE_SIZE", "OVERLAP", "TILES", "BATCH", "MIN_SCORE"
TASK_NAME = "refer"


class Styled(QgsProcessingLayerPostProcessorInterface):
    """Names and styles a result layer once Processing has loaded it into the project."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def postProcessLayer(self, layer: Any, context: Any, feedback: Any) -> None:  # noqa: N802
        layer.setName(self.name)
        style_result_layer(layer)


_KEEP: list[Styled] = []  # Processing holds post-processors by pointer only; they must outlive the run


def style_on_load(context: Any, dest: str, name: str) -> None:
    if context.willLoadLayerOnCompletion(dest):
        details = context.layerToLoadOnCompletionDetails(dest)
        details.name = name
        del _KEEP[:-16]
        _KEEP.append(Styled(name))
        details.setPostProcessor(_KEEP[-1])


# The scan's numeric parameters: (parameter, option sent to the backend, label, type, default, min, max,
# advanced). One table serves both the parameter definitions and the options read back from them.
_SCAN_NUMBERS: tuple[tuple[str, str, str, str, float, float, float, bool], ...] = (
    (TILE_SIZE, "tile_size", "Tile size, pixels", "Integer", 448, 32, 8192, False),
    (OVERLAP, "overlap", "Tile overlap (share of a tile)", "Double", 0.1, 0.0, 0.5, True),
    (BATCH, "batch", "Tiles per model batch", "Integer", 8, 1, 64, True),
    (MIN_SCORE, "min_score", "Minimum box score (0-1)", "Double", 0.0, 0.0, 1.0, True),
)  # fmt: skip


def add_scan_parameters(algorithm: EarthDialAlgorithm) -> None:
    for name, _option, label, kind, default, low, high, is_advanced in _SCAN_NUMBERS:
        parameter = QgsProcessingParameterNumber(
            name, algorithm.tr(label), number_type(kind), defaultValue=default, minValue=low, maxValue=high
        )
        algorithm.addParameter(advanced(parameter) if is_advanced else parameter)
    algorithm.addOutput(QgsProcessingOutputNumber(TILES, algorithm.tr("Tiles scanned")))


def scan_options(algorithm: EarthDialAlgorithm, parameters: dict[str, Any], context: Any) -> dict[str, Any]:
    options = algorithm.options(parameters, context)
    for name, option, _label, kind, default, _low, _high, _advanced in _SCAN_NUMBERS:
        read = algorithm.parameterAsInt if kind == "Integer" else algorithm.parameterAsDouble
        options[option] = default if parameters.get(name) is None else read(parameters, name, context)
    return options


def follow(feedback: Any) -> Any:
    """A scan's events -> Processing progress."""

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "plan":
            feedback.pushInfo(f"{event['total']} tile(s) of {event['plan']['tile_size']} pixels")
        elif event.get("event") == "progress":
            feedback.setProgress(100.0 * event["done"] / max(event["total"], 1))

    return on_event


class DetectAlgorithm(EarthDialAlgorithm):
    def name(self) -> str:
        return "detect"

    def displayName(self) -> str:
        return self.tr("Detect objects over a raster (tiled)")

    def shortHelpString(self) -> str:
        return self.tr(
            "Finds what the prompt names (e.g. 'ships') over the whole layer or the extent. The backend cuts "
            "the area into overlapping tiles, runs them through the model in batches and merges boxes found "
            "in two tiles (same label, rotated-polygon IoU ≥ 0.5). Output: one styled polygon layer, named "
            "for the request, with each box's score and tile."
        )

    def initAlgorithm(self, config: Any = None) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(INPUT, self.tr("Raster layer")))
        self.task_names = (TASK_NAME,)
        self.add_common(prompt_optional=False)
        add_scan_parameters(self)

    def prepareAlgorithm(self, parameters: dict[str, Any], context: Any, feedback: Any) -> bool:
        layer = self.layer(parameters, INPUT, context)
        self.scan_layer = scanning.ScanLayer.of(layer, self.bands(parameters, context))
        self.rect = self.area(parameters, context, layer)
        if self.rect.intersect(self.scan_layer.extent).isEmpty():
            raise QgsProcessingException(self.tr("The extent does not overlap the layer."))
        return True

    def processAlgorithm(self, parameters: dict[str, Any], context: Any, feedback: Any) -> dict[str, Any]:
        endpoint = self.endpoint(parameters, context)
        prompt = self.parameterAsString(parameters, PROMPT, context) or ""
        layer = self.scan_layer
        try:
            with connected(endpoint, self.timeout(parameters, context), feedback) as client:
                scan, reply = scanning.run_layer(
                    client,
                    layer,
                    self.rect,
                    TASK_NAME,
                    prompt,
                    scan_options(self, parameters, context),
                    feedback.isCanceled,
                    follow(feedback),
                )
        except EarthDialError as exc:
            raise fail(exc, endpoint) from None
        sink, dest = self.sink(parameters, context, layer.crs)
        kept = scanning.features(scan.merged, scan, layer.crs)
        sink.addFeatures(kept, QgsFeatureSink.Flag.FastInsert)
        feedback.pushInfo(
            self.tr("{found} box(es) found, {kept} after merging overlaps").format(
                found=len(scan.found), kept=len(kept)
            )
        )
        self.result_name = f"{prompt} — {layer.name}"
        style_on_load(context, dest, self.result_name)
        answers = [f"{i}: {t.get('answer', '')}" for i, t in sorted(scan.tiles.items())]
        return {OUTPUT: dest, TILES: reply["tiles"], ANSWER: "\n".join(answers)}

    def postProcessAlgorithm(self, context: Any, feedback: Any) -> dict[str, Any]:
        self.scan_layer.provider = None
        return {}
