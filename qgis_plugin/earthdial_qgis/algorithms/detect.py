"""earthdial:detect — find objects over a whole layer (or an extent), tile by tile.

The area is cut into windows of TILE_SIZE layer pixels overlapping by OVERLAP; each window is one `ask`
(task `refer`) by reference with its bounds (by value for layers the backend cannot open); boxes found
twice in overlapping windows (same label, IoU >= 0.5) are merged. This needs nothing from the backend
beyond `ask`.
"""

from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
)

from ..layers import reply_features, result_fields
from ..protocol import Client, EarthDialError
from ..tiling import merge_boxes, tiles
from .common import (
    ANSWER,
    INPUT,
    OUTPUT,
    PROMPT,
    EarthDialAlgorithm,
    LayerReader,
    _now,
    advanced,
    ask_once,
    fail,
    number_type,
)

TILE_SIZE, OVERLAP, TILES = "TILE_SIZE", "OVERLAP", "TILES"
TASK_NAME = "refer"


class DetectAlgorithm(EarthDialAlgorithm):
    def name(self) -> str:
        return "detect"

    def displayName(self) -> str:
        return self.tr("Detect objects over a raster (tiled)")

    def shortHelpString(self) -> str:
        return self.tr(
            "Finds what the prompt names (e.g. 'ships') over the whole layer or the extent: the area is cut "
            "into overlapping tiles, each asked about with the refer task, and boxes found in two tiles are "
            "merged (same label, IoU ≥ 0.5). Output: one polygon per object (GeoPackage), with the tile it "
            "came from."
        )

    def initAlgorithm(self, config: Any = None) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(INPUT, self.tr("Raster layer")))
        self.task_names = (TASK_NAME,)
        self.add_common(prompt_optional=False)
        self.addParameter(
            QgsProcessingParameterNumber(
                TILE_SIZE, self.tr("Tile size, pixels"), number_type("Integer"),
                defaultValue=448, minValue=16, maxValue=4096,
            )
        )  # fmt: skip
        self.addParameter(
            advanced(QgsProcessingParameterNumber(
                OVERLAP, self.tr("Tile overlap (share of a tile)"), number_type("Double"),
                defaultValue=0.1, minValue=0.0, maxValue=0.5,
            ))
        )  # fmt: skip
        self.addOutput(QgsProcessingOutputNumber(TILES, self.tr("Tiles asked")))

    def prepareAlgorithm(self, parameters: dict[str, Any], context: Any, feedback: Any) -> bool:
        layer = self.layer(parameters, INPUT, context)
        self.reader = LayerReader(layer, self.bands(parameters, context))
        if self.reader.resolution is None:
            raise QgsProcessingException(
                self.tr("Layer '{layer}' has no pixel grid to tile (a web layer?).").format(
                    layer=layer.name()
                )
            )
        self.rect = self.area(parameters, context, layer)
        return True

    def processAlgorithm(self, parameters: dict[str, Any], context: Any, feedback: Any) -> dict[str, Any]:
        endpoint = self.endpoint(parameters, context)
        prompt = self.parameterAsString(parameters, PROMPT, context) or ""
        size = self.parameterAsInt(parameters, TILE_SIZE, context)
        overlap = (
            self.parameterAsDouble(parameters, OVERLAP, context)
            if parameters.get(OVERLAP) is not None
            else 0.1
        )
        reader = self.reader
        windows = tiles(reader.extent, reader.resolution, self.rect, size, overlap)
        if not windows:
            raise QgsProcessingException(self.tr("The extent does not overlap the layer."))
        header = {
            "op": "ask",
            "task": TASK_NAME,
            "prompt": prompt,
            "options": self.options(parameters, context),
        }
        sink, dest = self.sink(parameters, context, reader.crs)
        fields, created, found, answers = result_fields(), _now(), [], []
        feedback.pushInfo(self.tr("{n} tile(s) of {size} pixels").format(n=len(windows), size=size))
        try:
            with Client(endpoint, timeout_s=self.timeout(parameters, context)) as client:
                for i, tile in enumerate(windows):
                    if feedback.isCanceled():
                        break
                    reply = ask_once(client, header, [(reader, tile.rect, reader.crs)], feedback)
                    answers.append(f"{tile.name}: {reply.get('answer', '')}")
                    found += reply_features(
                        reply, fields, reader.crs, TASK_NAME, prompt, reader.label, created, tile.name
                    )
                    feedback.setProgress(100.0 * (i + 1) / len(windows))
        except EarthDialError as exc:
            raise fail(exc, endpoint) from None
        kept = merge_boxes(found)
        for feature in kept:
            sink.addFeature(feature)
        feedback.pushInfo(
            self.tr("{found} box(es) found, {kept} after merging overlaps").format(
                found=len(found), kept=len(kept)
            )
        )
        return {OUTPUT: dest, TILES: len(windows), ANSWER: "\n".join(answers)}

    def postProcessAlgorithm(self, context: Any, feedback: Any) -> dict[str, Any]:
        self.reader.release()
        return {}
