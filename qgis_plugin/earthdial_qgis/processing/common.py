"""What the EarthDial algorithms share: standard parameters, reading a layer's windows (by reference,
or by value through a provider clone made on the main thread), one request, and the output sink."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCoordinateTransformContext,
    QgsFeatureSink,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputString,
    QgsProcessingParameterBand,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
)

from ..contract.client import Client
from ..contract.wire import EarthDialError, ErrorCode, source_by_reference
from ..core import settings
from ..core.errors import NO_CRS, plain_message
from ..core.layers import reply_features, result_fields
from ..core.qt import QtCore
from ..core.sources import SourcePlan, crs_text, displayed_bands, file_path, native_resolution, value_plan
from ..tasks.request import ping_first, request_with_fallback

INPUT, INPUT_2, PROMPT, TASK, EXTENT, BANDS = "INPUT", "INPUT_2", "PROMPT", "TASK", "EXTENT", "BANDS"
PRESET, GSD, ENDPOINT, TIMEOUT, OUTPUT, ANSWER = "PRESET", "GSD", "ENDPOINT", "TIMEOUT", "OUTPUT", "ANSWER"


def _flag(name: str) -> Any:
    flags = getattr(Qgis, "ProcessingParameterFlag", None)  # QGIS >= 3.36
    return (
        getattr(flags, name)
        if flags is not None
        else getattr(QgsProcessingParameterDefinition, f"Flag{name}")
    )


def advanced(parameter: QgsProcessingParameterDefinition) -> QgsProcessingParameterDefinition:
    parameter.setFlags(parameter.flags() | _flag("Advanced"))
    return parameter


def number_type(name: str) -> Any:
    """QgsProcessingParameterNumber's Integer/Double (moved to Qgis.ProcessingNumberParameterType in 3.36)."""
    kind = getattr(Qgis, "ProcessingNumberParameterType", None)
    return getattr(kind, name) if kind is not None else getattr(QgsProcessingParameterNumber.Type, name)


def polygon_type() -> Any:
    wkb = getattr(Qgis, "WkbType", None)  # QGIS >= 3.30
    if wkb is not None:
        return wkb.Polygon
    from qgis.core import QgsWkbTypes

    return QgsWkbTypes.Type.Polygon


def project_of(context: QgsProcessingContext | None) -> QgsProject:
    """The project an algorithm runs for: the context's (a model, a script or a second project may run it
    with one of its own), the current project only when the context has none."""
    project = context.project() if context is not None else None
    return project if project is not None else QgsProject.instance()


class LayerReader:
    """A raster layer's windows as protocol sources. Made in prepareAlgorithm (the main thread): it keeps
    the layer's facts and a provider clone, and is used from processAlgorithm's thread."""

    def __init__(
        self, layer: QgsRasterLayer, bands: list[int] | None, context: QgsProcessingContext | None = None
    ) -> None:
        if not layer.crs().isValid():
            raise QgsProcessingException(
                f"Layer '{layer.name()}' has no coordinate reference system: set one in its properties first."
            )
        self.name = layer.name()
        self.path = file_path(layer)
        self.crs = layer.crs()
        self.crs_text = crs_text(layer.crs())
        self.extent = QgsRectangle(layer.extent())
        self.resolution = native_resolution(layer)
        self.bands = bands or displayed_bands(layer)
        provider = layer.dataProvider()
        self.provider = provider.clone() if provider is not None else None
        self.band_count = provider.bandCount() if provider is not None else 0
        self.by_value = self.path is None
        self.label = self.path or layer.publicSource()
        # the project's datum transformations, taken here (main thread) for processAlgorithm's thread
        self.transforms = QgsCoordinateTransformContext(project_of(context).transformContext())

    def release(self) -> None:
        self.provider = None

    def source(
        self,
        rect: QgsRectangle,
        rect_crs: QgsCoordinateReferenceSystem | None = None,
        pixels: bool = True,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        """The source for ``rect`` (in ``rect_crs``, default the layer's)."""
        return self.plan(rect, rect_crs).resolve(pixels, cancelled)

    def plan(self, rect: QgsRectangle, rect_crs: QgsCoordinateReferenceSystem | None = None) -> SourcePlan:
        """How to send ``rect``: the panel's SourcePlan, by reference with the pixels as its fallback."""
        rect_crs = rect_crs or self.crs
        local = rect
        if rect_crs != self.crs:
            local = QgsCoordinateTransform(rect_crs, self.crs, self.transforms).transformBoundingBox(rect)
        value: SourcePlan | None = None
        if self.provider is not None:
            try:
                value = value_plan(
                    self.provider,
                    self.name,
                    self.label,
                    self.extent,
                    self.resolution,
                    local,
                    self.bands,
                    self.crs_text,
                    path=self.path,
                )
            except EarthDialError:
                if self.by_value:
                    raise
        if self.by_value or self.path is None:
            if value is None:
                raise EarthDialError(ErrorCode.NOT_A_RASTER, f"layer '{self.name}' has no readable data")
            return value
        bounds = (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum())
        reference = source_by_reference(self.path, self.bands, bounds, crs_text(rect_crs))
        return SourcePlan(crs=self.crs_text, label=self.label, reference=reference, fallback=value)


def ask_once(
    client: Client,
    header: dict[str, Any],
    readers: list[tuple[LayerReader, QgsRectangle, QgsCoordinateReferenceSystem]],
    feedback: QgsProcessingFeedback,
) -> dict[str, Any]:
    """One request over one or more layers; a referenced file the backend may not read goes by value."""
    plans = [reader.plan(rect, crs) for reader, rect, crs in readers]
    reply, _, fell_back = request_with_fallback(client, header, plans, feedback.isCanceled)
    if fell_back:
        feedback.pushInfo("The backend could not read the file; its pixels were sent instead.")
        for reader, _, _ in readers:  # the next requests of this run go by value at once
            if reader.provider is not None:
                reader.by_value = True
    return reply


@contextmanager
def connected(endpoint: str, timeout_s: float, feedback: QgsProcessingFeedback) -> Iterator[Client]:
    """A Client whose backend answered a short ping, as the panel's requests do: an endpoint where nothing
    runs fails within seconds (`unreachable`), not after TIMEOUT, which bounds the model's work and would
    cost minutes per item in the Modeler or a batch."""
    with Client(endpoint, timeout_s=timeout_s) as client:
        ping_first(client, endpoint, feedback.isCanceled)
        yield client


def fail(exc: EarthDialError, endpoint: str) -> QgsProcessingException:
    return QgsProcessingException(plain_message(exc, endpoint))


class EarthDialAlgorithm(QgsProcessingAlgorithm):
    """Shared parameters and helpers; subclasses add theirs and implement processAlgorithm."""

    def tr(self, text: str) -> str:
        return QtCore.QCoreApplication.translate("EarthDialProcessing", text)

    def group(self) -> str:
        return self.tr("Vision-language model")

    def groupId(self) -> str:
        return "earthdial"

    def createInstance(self) -> QgsProcessingAlgorithm:
        return type(self)()

    # parameters --------------------------------------------------------------------------------------
    def add_task(self, images: int, default: str) -> None:
        """The task, by name: the backend's status lists them (`earthdial status`); the plugin keeps no list,
        so the name is checked against the backend's when the algorithm runs."""
        self.task_images = images
        self.addParameter(
            QgsProcessingParameterString(
                TASK,
                self.tr(
                    "Task (one of the backend's tasks on {n} image(s); `earthdial status` lists them)"
                ).format(n=images),
                defaultValue=default,
            )
        )

    def ask_header(
        self, parameters: dict[str, Any], context: QgsProcessingContext, client: Any, prompt: str
    ) -> dict[str, Any]:
        """The `ask` request of this run: the task (checked with the backend), prompt and band options."""
        task = self.task(parameters, context, client)
        return {"op": "ask", "task": task, "prompt": prompt, "options": self.options(parameters, context)}

    def task(self, parameters: dict[str, Any], context: QgsProcessingContext, client: Any) -> str:
        """The task asked for, if the backend has it for this algorithm's number of images."""
        name = (self.parameterAsString(parameters, TASK, context) or "").strip()
        tasks = client.status().get("tasks") or []
        fitting = [str(t.get("name")) for t in tasks if int(t.get("images", 1) or 1) == self.task_images]
        if name not in fitting:
            raise QgsProcessingException(
                self.tr("Unknown task {name!r} for {n} image(s); the backend's are: {names}").format(
                    name=name, n=self.task_images, names=", ".join(fitting)
                )
            )
        return name

    def add_connection(self, timeout_label: str) -> None:
        """The backend's endpoint and how long to wait for it (advanced: the settings give both)."""
        self.addParameter(
            advanced(
                QgsProcessingParameterString(
                    ENDPOINT, self.tr("Backend endpoint"), defaultValue=settings.endpoint()
                )
            )
        )
        self.addParameter(
            advanced(
                QgsProcessingParameterNumber(
                    TIMEOUT,
                    timeout_label,
                    number_type("Integer"),
                    defaultValue=settings.timeout_s(),
                    minValue=1,
                )
            )
        )

    def add_common(self, prompt_optional: bool = True) -> None:
        self.addParameter(QgsProcessingParameterString(PROMPT, self.tr("Prompt"), optional=prompt_optional))
        self.addParameter(
            QgsProcessingParameterExtent(EXTENT, self.tr("Extent (default: the whole layer)"), optional=True)
        )
        self.addParameter(
            QgsProcessingParameterBand(
                BANDS,
                self.tr("Bands (default: the displayed ones)"),
                None,
                INPUT,
                optional=True,
                allowMultiple=True,
            )
        )
        self.addParameter(
            advanced(
                QgsProcessingParameterString(
                    PRESET,
                    self.tr("Band preset (empty: auto; `earthdial status` lists the backend's)"),
                    optional=True,
                )
            )
        )
        self.addParameter(
            advanced(
                QgsProcessingParameterNumber(
                    GSD,
                    self.tr("Ground sampling distance, metres (0: from the layer)"),
                    number_type("Double"),
                    defaultValue=0.0,
                    minValue=0.0,
                    optional=True,
                )
            )
        )
        self.add_connection(self.tr("Timeout per request, seconds"))
        self.addParameter(
            QgsProcessingParameterFeatureSink(OUTPUT, self.tr("Boxes"), type=_polygon_source_type())
        )
        self.addOutput(QgsProcessingOutputString(ANSWER, self.tr("Answer")))

    # reading parameters ------------------------------------------------------------------------------
    def layer(self, parameters: dict[str, Any], name: str, context: QgsProcessingContext) -> QgsRasterLayer:
        layer = self.parameterAsRasterLayer(parameters, name, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException(self.tr("Invalid raster layer for {name}").format(name=name))
        if not layer.crs().isValid():
            raise QgsProcessingException(
                self.tr("Layer '{layer}' has no coordinate reference system ({code}): set one first.").format(
                    layer=layer.name(), code=NO_CRS
                )
            )
        return layer

    def bands(self, parameters: dict[str, Any], context: QgsProcessingContext) -> list[int] | None:
        bands = self.parameterAsInts(parameters, BANDS, context)
        return [int(b) for b in bands if int(b) > 0] or None

    def area(
        self, parameters: dict[str, Any], context: QgsProcessingContext, layer: QgsRasterLayer
    ) -> QgsRectangle:
        if parameters.get(EXTENT) in (None, ""):
            return QgsRectangle(layer.extent())
        rect = self.parameterAsExtent(parameters, EXTENT, context, layer.crs())
        if rect.isNull() or rect.isEmpty():
            return QgsRectangle(layer.extent())
        return rect

    def options(self, parameters: dict[str, Any], context: QgsProcessingContext) -> dict[str, Any]:
        options: dict[str, Any] = {}
        preset = (self.parameterAsString(parameters, PRESET, context) or "").strip()
        if preset and preset != "auto":
            options["preset"] = preset  # the backend refuses a name it does not know, naming those it does
        gsd = self.parameterAsDouble(parameters, GSD, context) if parameters.get(GSD) is not None else 0.0
        if gsd > 0:
            options["gsd"] = gsd
        return options

    def endpoint(self, parameters: dict[str, Any], context: QgsProcessingContext) -> str:
        return (self.parameterAsString(parameters, ENDPOINT, context) or settings.endpoint()).strip()

    def timeout(self, parameters: dict[str, Any], context: QgsProcessingContext) -> int:
        return (
            self.parameterAsInt(parameters, TIMEOUT, context)
            if parameters.get(TIMEOUT) is not None
            else settings.timeout_s()
        )

    def sink(
        self, parameters: dict[str, Any], context: QgsProcessingContext, crs: QgsCoordinateReferenceSystem
    ) -> tuple[Any, str]:
        sink, dest = self.parameterAsSink(parameters, OUTPUT, context, result_fields(), polygon_type(), crs)
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, OUTPUT))
        return sink, dest

    def write(self, sink: Any, reply: dict[str, Any], crs: QgsCoordinateReferenceSystem) -> int:
        features = reply_features(reply, result_fields(), crs)
        sink.addFeatures(features, QgsFeatureSink.Flag.FastInsert)
        return len(features)


def _polygon_source_type() -> Any:
    from qgis.core import QgsProcessing

    kind = getattr(Qgis, "ProcessingSourceType", None)  # QGIS >= 3.36
    return kind.VectorPolygon if kind is not None else QgsProcessing.TypeVectorPolygon
