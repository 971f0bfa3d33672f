"""earthdial:detect_changes — change detection over whole layers: BEFORE, AFTER and any LATER layers are
aligned by the backend on the first one's grid, tiled, and every tile pair is asked EarthDial's change
question. Two outputs: the merged change boxes (labelled with what appeared or disappeared, with a score)
and the per-tile change map (a layer whose name contains "tiles": changed or not, the answer, the score).
"""

from __future__ import annotations

from typing import Any

from qgis.core import (
    Qgis,
    QgsFeatureSink,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterRasterLayer,
)

from ..contract.wire import EarthDialError
from ..core import scanning
from ..core.layers import result_fields
from .common import (
    INPUT,
    INPUT_2,
    OUTPUT,
    EarthDialAlgorithm,
    _polygon_source_type,
    connected,
    fail,
    polygon_type,
)
from .detect import TILES, add_scan_parameters, follow, scan_options, style_on_load

LATER, OUTPUT_TILES = "LATER", "OUTPUT_TILES"


def _raster_source_type() -> Any:
    kind = getattr(
        Qgis, "ProcessingSourceType", None
    )  # QGIS >= 3.36; QgsProcessing.TypeRaster is gone in QGIS 4
    return kind.Raster if kind is not None else QgsProcessing.TypeRaster


class DetectChangesAlgorithm(EarthDialAlgorithm):
    def name(self) -> str:
        return "detect_changes"

    def displayName(self) -> str:
        return self.tr("Detect changes over whole layers (tiled)")

    def shortHelpString(self) -> str:
        return self.tr(
            "Compares BEFORE with AFTER (and each LATER layer with the one before it) over their whole common "
            "extent: the backend aligns the layers on the first one's grid, tiles them, asks EarthDial's change "
            "question of every tile pair and merges the change boxes. Outputs: the change boxes (label: what "
            "appeared or disappeared; score) and a per-tile change map (changed or not, the answer, the score)."
        )

    def initAlgorithm(self, config: Any = None) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(INPUT, self.tr("Before (first) raster")))
        self.addParameter(QgsProcessingParameterRasterLayer(INPUT_2, self.tr("After (second) raster")))
        self.addParameter(
            QgsProcessingParameterMultipleLayers(
                LATER, self.tr("Later rasters (in time order)"), _raster_source_type(), optional=True
            )
        )
        add_scan_parameters(self)
        self.add_connection(self.tr("Timeout without progress, seconds"))
        self.addParameter(
            QgsProcessingParameterFeatureSink(OUTPUT, self.tr("Changes"), type=_polygon_source_type())
        )
        self.addParameter(
            QgsProcessingParameterFeatureSink(
                OUTPUT_TILES, self.tr("Change map tiles"), type=_polygon_source_type()
            )
        )

    def prepareAlgorithm(self, parameters: dict[str, Any], context: Any, feedback: Any) -> bool:
        layers = [self.layer(parameters, INPUT, context), self.layer(parameters, INPUT_2, context)]
        layers += list(self.parameterAsLayerList(parameters, LATER, context) or [])
        self.layers = [scanning.ScanLayer.of(layer) for layer in layers]
        return True

    def processAlgorithm(self, parameters: dict[str, Any], context: Any, feedback: Any) -> dict[str, Any]:
        endpoint = self.endpoint(parameters, context)
        first = self.layers[0]
        try:
            with connected(endpoint, self.timeout(parameters, context), feedback) as client:
                scan, reply = scanning.run_changes(
                    client,
                    self.layers,
                    scan_options(self, parameters, context),
                    feedback.isCanceled,
                    follow(feedback),
                )
        except EarthDialError as exc:
            raise fail(exc, endpoint) from None
        boxes = scanning.features(scan.merged, scan, first.crs)
        tiles = scanning.tile_features(scan, first.crs)
        outputs = {}
        names = {OUTPUT: f"changes — {first.name}", OUTPUT_TILES: f"change tiles — {first.name}"}
        for key, features in ((OUTPUT, boxes), (OUTPUT_TILES, tiles)):
            sink, dest = self.parameterAsSink(
                parameters, key, context, result_fields(), polygon_type(), first.crs
            )
            if sink is None:
                raise QgsProcessingException(self.invalidSinkError(parameters, key))
            sink.addFeatures(features, QgsFeatureSink.Flag.FastInsert)
            outputs[key] = dest
            style_on_load(context, dest, names[key])
        changed = sum(1 for t in scan.tiles.values() if t.get("changed"))
        feedback.pushInfo(
            self.tr("{changed} of {n} tile pair(s) changed; {boxes} change box(es)").format(
                changed=changed, n=len(scan.tiles), boxes=len(boxes)
            )
        )
        return {**outputs, TILES: reply["tiles"]}

    def postProcessAlgorithm(self, context: Any, feedback: Any) -> dict[str, Any]:
        for layer in self.layers:
            layer.provider = None
        return {}
