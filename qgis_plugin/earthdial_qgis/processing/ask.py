"""earthdial:ask — one question about a raster layer (an extent of it, or all of it)."""

from __future__ import annotations

from typing import Any

from qgis.core import QgsProcessingParameterRasterLayer

from ..contract.wire import EarthDialError
from .common import (
    ANSWER,
    INPUT,
    OUTPUT,
    PROMPT,
    EarthDialAlgorithm,
    LayerReader,
    ask_once,
    connected,
    fail,
)


class AskAlgorithm(EarthDialAlgorithm):
    def name(self) -> str:
        return "ask"

    def displayName(self) -> str:
        return self.tr("Ask EarthDial about a raster")

    def shortHelpString(self) -> str:
        return self.tr(
            "Sends the layer (or the extent) to the EarthDial backend with a task and prompt, writes the "
            "answer's boxes as polygons (GeoPackage) and returns the answer text as ANSWER."
        )

    def initAlgorithm(self, config: Any = None) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(INPUT, self.tr("Raster layer")))
        self.add_task(1, "refer")
        self.add_common()

    def prepareAlgorithm(self, parameters: dict[str, Any], context: Any, feedback: Any) -> bool:
        layer = self.layer(parameters, INPUT, context)
        self.reader = LayerReader(layer, self.bands(parameters, context), context)
        self.rect = self.area(parameters, context, layer)
        return True

    def processAlgorithm(self, parameters: dict[str, Any], context: Any, feedback: Any) -> dict[str, Any]:
        endpoint = self.endpoint(parameters, context)
        prompt = self.parameterAsString(parameters, PROMPT, context) or ""
        try:
            with connected(endpoint, self.timeout(parameters, context), feedback) as client:
                header = self.ask_header(parameters, context, client, prompt)
                sink, dest = self.sink(parameters, context, self.reader.crs)
                reply = ask_once(client, header, [(self.reader, self.rect, self.reader.crs)], feedback)
        except EarthDialError as exc:
            raise fail(exc, endpoint) from None
        count = self.write(sink, reply, self.reader.crs)
        answer = str(reply.get("answer", ""))
        feedback.pushInfo(self.tr("Answer: {answer}").format(answer=answer))
        feedback.pushInfo(self.tr("{n} box(es)").format(n=count))
        feedback.setProgress(100)
        return {OUTPUT: dest, ANSWER: answer}

    def postProcessAlgorithm(self, context: Any, feedback: Any) -> dict[str, Any]:
        self.reader.release()
        return {}
