"""earthdial:change — a before/after pair (INPUT, INPUT_2): the backend aligns the second layer to the
first one's grid and answers about both."""

from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsCoordinateTransform,
    QgsCsException,
    QgsProcessingException,
    QgsProcessingParameterRasterLayer,
)

from ..contract.wire import EarthDialError
from .common import (
    ANSWER,
    INPUT,
    INPUT_2,
    OUTPUT,
    PROMPT,
    EarthDialAlgorithm,
    LayerReader,
    ask_once,
    connected,
    fail,
    project_of,
)


class ChangeAlgorithm(EarthDialAlgorithm):
    def name(self) -> str:
        return "change"

    def displayName(self) -> str:
        return self.tr("Change between two rasters")

    def shortHelpString(self) -> str:
        return self.tr(
            "Asks EarthDial about a before/after pair (change, disaster type, damage at a box, objects in the "
            "later image). The later layer is aligned to the first one's grid by the backend. Boxes are "
            "written in the first layer's CRS; the answer text is returned as ANSWER."
        )

    def initAlgorithm(self, config: Any = None) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(INPUT, self.tr("Before (first) raster")))
        self.addParameter(QgsProcessingParameterRasterLayer(INPUT_2, self.tr("After (second) raster")))
        self.add_task(2, "change")
        self.add_common()

    def prepareAlgorithm(self, parameters: dict[str, Any], context: Any, feedback: Any) -> bool:
        first = self.layer(parameters, INPUT, context)
        second = self.layer(parameters, INPUT_2, context)
        bands = self.bands(parameters, context)
        self.readers = [LayerReader(first, bands, context), LayerReader(second, bands, context)]
        rect = self.area(parameters, context, first)
        try:  # default: where both layers are
            other = QgsCoordinateTransform(
                second.crs(), first.crs(), project_of(context)
            ).transformBoundingBox(second.extent())
        except QgsCsException as exc:
            raise QgsProcessingException(str(exc)) from None
        common = rect.intersect(other)
        if common.isEmpty():
            raise QgsProcessingException(self.tr("The two layers do not overlap in the extent asked about."))
        self.rect = common
        return True

    def processAlgorithm(self, parameters: dict[str, Any], context: Any, feedback: Any) -> dict[str, Any]:
        endpoint = self.endpoint(parameters, context)
        prompt = self.parameterAsString(parameters, PROMPT, context) or ""
        first = self.readers[0]
        pair = [(reader, self.rect, first.crs) for reader in self.readers]
        try:
            with connected(endpoint, self.timeout(parameters, context), feedback) as client:
                header = self.ask_header(parameters, context, client, prompt)
                sink, dest = self.sink(parameters, context, first.crs)
                reply = ask_once(client, header, pair, feedback)
        except EarthDialError as exc:
            raise fail(exc, endpoint) from None
        count = self.write(sink, reply, first.crs)
        answer = str(reply.get("answer", ""))
        for warning in (reply.get("input") or {}).get("warnings") or []:
            feedback.pushWarning(warning) if hasattr(feedback, "pushWarning") else feedback.pushInfo(warning)
        feedback.pushInfo(self.tr("Answer: {answer}").format(answer=answer))
        feedback.pushInfo(self.tr("{n} box(es)").format(n=count))
        feedback.setProgress(100)
        return {OUTPUT: dest, ANSWER: answer}

    def postProcessAlgorithm(self, context: Any, feedback: Any) -> dict[str, Any]:
        for reader in self.readers:
            reader.release()
        return {}
