"""What the panel does with a result: the chip preview and its caption, zooming to the result layer and
saving it to a GeoPackage (a mixin of EarthDialDock)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qgis.core import Qgis, QgsCoordinateTransform, QgsCsException, QgsProject
from qgis.PyQt import sip

from ..contract.wire import EarthDialError
from ..core import log, preview, resume
from ..core.layers import save_to_geopackage
from ..core.qt import QtWidgets
from ..core.request import GEOREF
from ..tasks.request import RequestTask
from .dock_ui import DockBase

if TYPE_CHECKING:
    from .scan import DockScan
    from .widgets import PreviewLabel


class ResultActions(DockBase):
    # made by EarthDialDock.__init__
    iface: Any
    scan: DockScan
    _task: RequestTask | None
    last_layer: Any
    last_preview: Any
    # made by DockLayout._build_ui (dock_ui.py)
    preview_label: PreviewLabel
    preview_caption: QtWidgets.QLabel
    result_label: QtWidgets.QLabel
    zoom_button: QtWidgets.QPushButton
    save_button: QtWidgets.QPushButton
    resume_button: QtWidgets.QPushButton

    if TYPE_CHECKING:  # the dock's own (dock.py)

        @property
        def endpoint(self) -> str: ...
        def _message(self, text: str, level: Any, duration: int = 8) -> None: ...
        def _show_error(self, error: EarthDialError, endpoint: str, note: str = "") -> None: ...

    def _show_preview(self, task: RequestTask, pending: dict[str, Any]) -> None:
        reply = task.reply or {}
        if task.preview is None:
            self.last_preview = None
            self.preview_label.set_image(None)
            self.preview_label.setText(self.tr("No preview for this request."))
            self.preview_caption.setText("")
            return
        image = preview.preview_image(task.preview, reply, task.preview_nodata)
        self.last_preview = image
        self.preview_label.set_image(image)
        chip, info = reply.get("chip") or {}, reply.get("input") or {}
        how = (
            self.tr("by value") if pending.get("by_value") or task.sent_by_value else self.tr("by reference")
        )
        parts = [
            self.tr("{w} × {h} px window sent {how}").format(
                w=chip.get("width", "?"), h=chip.get("height", "?"), how=how
            )
        ]
        if pending.get("task") == GEOREF:  # no model input was made: only the window counts
            info = {}
        if info.get("preset"):
            parts.append(
                self.tr("preset {preset} ({reason})").format(
                    preset=info["preset"], reason=info.get("reason", "")
                )
            )
        if info.get("sensor"):
            parts.append(self.tr("sensor {sensor}").format(sensor=info["sensor"]))
        if info.get("gsd_m"):
            parts.append(self.tr("GSD {gsd:.3g} m").format(gsd=float(info["gsd_m"])))
        if reply.get("tiles"):
            parts.append(self.tr("{n} model tile(s)").format(n=reply["tiles"]))
        self.preview_caption.setText("; ".join(parts))

    def _result_layer(self) -> Any:
        layer = self.last_layer
        if layer is None or sip.isdeleted(layer) or QgsProject.instance().mapLayer(layer.id()) is None:
            return None
        return layer

    def _set_result_buttons(self) -> None:
        has = self._result_layer() is not None
        self.zoom_button.setEnabled(has)
        self.save_button.setEnabled(has)
        self.resume_button.setEnabled(self._task is None and self.stopped_scan_layer() is not None)

    def stopped_scan_layer(self) -> Any:
        """The stopped scan "Resume scan" goes on with: the layer selected in the Layers panel when it is one
        (a project reopened), else the last result when it is one; None when neither is."""
        for layer in (self.iface.activeLayer(), self._result_layer()):
            if layer is not None and not sip.isdeleted(layer) and resume.recorded(layer) is not None:
                return layer
        return None

    def resume_scan(self) -> None:
        if self._task is not None:
            return
        try:
            self.scan.resume()
        except EarthDialError as exc:
            self._show_error(exc, self.endpoint)

    def zoom_to_results(self) -> None:
        layer = self._result_layer()
        if layer is None:
            return
        canvas = self.iface.mapCanvas()
        extent = layer.extent()
        target = canvas.mapSettings().destinationCrs()
        if layer.crs().isValid() and target.isValid() and layer.crs() != target:
            try:
                extent = QgsCoordinateTransform(
                    layer.crs(), target, QgsProject.instance()
                ).transformBoundingBox(extent)
            except QgsCsException:
                return
        extent.scale(1.2)
        canvas.setExtent(extent)
        canvas.refresh()

    def save_results(self, path: str | None = None) -> str | None:
        """Write the last result layer to a GeoPackage (asked for when not given); the layer then reads
        from the file."""
        layer = self._result_layer()
        if layer is None:
            return None
        if path is None:  # an existing file is added to, not replaced: no "overwrite?" question
            path, _ = QtWidgets.QFileDialog.getSaveFileName(
                self,
                self.tr("Add the EarthDial results to a GeoPackage"),
                "",
                self.tr("GeoPackage (*.gpkg)"),
                options=QtWidgets.QFileDialog.Option.DontConfirmOverwrite,
            )
            if not path:
                return None
            if not path.lower().endswith(".gpkg"):
                path += ".gpkg"
        try:
            table = save_to_geopackage(layer, path)
        except OSError as exc:
            self._message(str(exc), Qgis.MessageLevel.Critical)
            log.error(str(exc))
            return None
        text = self.tr("Saved “{name}” to {path} as layer “{table}”.").format(
            name=layer.name(), path=path, table=table
        )
        self.result_label.setText(text)
        self._message(text, Qgis.MessageLevel.Success)
        return path
