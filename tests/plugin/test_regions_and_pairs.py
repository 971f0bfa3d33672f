"""Region questions picked on the map (a dragged box, a clicked feature) and before/after pairs."""

from __future__ import annotations

import pytest
from plugin_testing import VIEW, click, drag, wait_until, write_geotiff
from qgis.core import (
    QgsFeature,
    QgsGeometry,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)

from earthdial_qgis.contract.wire import EarthDialError
from earthdial_qgis.core.area import box_text, region_box


@pytest.fixture
def later_layer(raster_layer: QgsRasterLayer, tmp_path_factory: pytest.TempPathFactory) -> QgsRasterLayer:
    """A second GeoTIFF of the same ground (other pixels), as the 'after' image of a pair."""
    path = tmp_path_factory.getbasetemp() / "after.tif"
    if not path.exists():
        write_geotiff(str(path), seed=7)
    layer = QgsRasterLayer(str(path), "after", "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    return layer


def test_region_box_arithmetic() -> None:
    window = QgsRectangle(0, 0, 200, 100)
    assert region_box(QgsRectangle(40, 70, 80, 100), window) == [[20, 0, 40, 30, 0]]
    assert region_box(QgsRectangle(-50, -50, 500, 500), window) == [[0, 0, 100, 100, 0]]  # clipped
    assert region_box(QgsRectangle(100, 50, 100, 50), window) == [[50, 50, 51, 51, 0]]  # a point: 1 unit
    assert box_text([[20, 0, 40, 30, 0]]) == "[[20, 0, 40, 30, 0]]"
    with pytest.raises(EarthDialError, match="outside"):
        region_box(QgsRectangle(300, 0, 400, 10), window)


def _expected(rect: QgsRectangle) -> str:
    def pct(v: float, lo: float, size: float) -> int:
        return round((v - lo) / size * 100)

    return box_text(
        [
            [
                pct(rect.xMinimum(), VIEW.xMinimum(), VIEW.width()),
                pct(VIEW.yMaximum() - rect.yMaximum(), 0, VIEW.height()),
                pct(rect.xMaximum(), VIEW.xMinimum(), VIEW.width()),
                pct(VIEW.yMaximum() - rect.yMinimum(), 0, VIEW.height()),
                0,
            ]
        ]
    )


def test_region_question_from_a_dragged_box(make_dock, raster_layer, show_view, qgis_iface) -> None:
    show_view()
    dock = make_dock()
    canvas = qgis_iface.mapCanvas()
    picked: list[QgsRectangle] = []
    dock.region_tool.rectangleDrawn.connect(lambda r: picked.append(QgsRectangle(r)))

    dock.region_button.click()
    assert canvas.mapTool() is dock.region_tool
    drag(canvas, (500200.0, 3999600.0), (500300.0, 3999450.0))
    assert len(picked) == 1
    assert dock.task_combo.currentData() == "identify"
    assert dock.prompt_edit.toPlainText() == _expected(picked[0])
    assert dock.is_busy()
    assert dock._task.header["prompt"] == _expected(picked[0])
    wait_until(lambda: not dock.is_busy(), 120)
    assert dock.last_error is None, dock.answer_view.toPlainText()
    assert dock.last_reply["answer"] == dock.answer_view.toPlainText()
    assert not dock.region_button.isChecked()


def test_region_question_from_a_clicked_feature(make_dock, raster_layer, show_view, qgis_iface) -> None:
    buildings = QgsVectorLayer("Polygon?crs=EPSG:32633", "buildings", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(500350, 3999250, 500450, 3999400)))
    buildings.dataProvider().addFeatures([feature])
    QgsProject.instance().addMapLayer(buildings)
    canvas = qgis_iface.mapCanvas()
    canvas.setLayers([buildings, raster_layer])
    show_view()
    dock = make_dock()

    dock.region_button.click()
    click(canvas, (500400.0, 3999300.0))
    assert dock.prompt_edit.toPlainText() == "[[50, 60, 70, 90, 0]]"
    wait_until(lambda: not dock.is_busy(), 120)
    assert dock.last_error is None, dock.answer_view.toPlainText()

    # A click on nothing asks nothing.
    dock.region_button.click()
    click(canvas, (500150.0, 3999650.0))
    assert not dock.is_busy()


def test_pair_sends_sources_in_order(make_dock, raster_layer, later_layer, show_view, geotiff) -> None:
    show_view()
    dock = make_dock()
    wait_until(lambda: dock.status_label.text().startswith("Connected"), 30)
    assert not dock.later_layers.isVisible()
    dock.select_task("change")
    assert dock.layer_label.text() == "Before"
    dock.later_layers.set_layers([])
    dock.send_button.click()
    assert not dock.is_busy() and "later layer" in dock.answer_view.toPlainText()

    dock.layer_combo.setLayer(raster_layer)
    dock.later_layers.set_layers([later_layer])
    dock.send_button.click()
    header = dock._task.header
    wait_until(lambda: not dock.is_busy(), 120)
    assert dock.last_error is None, dock.answer_view.toPlainText()
    paths = [str(geotiff[0]), later_layer.source()]
    reply = dock.last_reply
    assert [c["source"] for c in reply["chips"]] == paths
    assert header["task"] == "change"
    assert dock.last_preview is not None

    # A region question about a pair is a damage question.
    dock.region_button.click()
    drag(dock.iface.mapCanvas(), (500200.0, 3999600.0), (500300.0, 3999450.0))
    assert dock.task_combo.currentData() == "damage"
    wait_until(lambda: not dock.is_busy(), 120)
    assert dock.last_error is None or dock.last_error.code == "wrong_variant", dock.answer_view.toPlainText()


def test_area_modes(raster_layer, qgis_iface) -> None:
    from qgis.core import QgsCoordinateReferenceSystem

    from earthdial_qgis.core.area import DRAWN, MAP_EXTENT, SELECTION, WHOLE_LAYER, area_for

    crs = QgsCoordinateReferenceSystem("EPSG:32633")
    view = QgsRectangle(500101.0, 3999201.0, 500599.0, 3999699.0)
    assert area_for(MAP_EXTENT, raster_layer, view, crs) == QgsRectangle(500100, 3999200, 500600, 3999700)
    assert area_for(WHOLE_LAYER, raster_layer, view, crs) == raster_layer.extent()
    with pytest.raises(EarthDialError, match="No rectangle drawn"):
        area_for(DRAWN, raster_layer, view, crs)
    drawn = (QgsRectangle(500005, 3999005, 500015, 3999015), crs)
    assert area_for(DRAWN, raster_layer, view, crs, drawn) == QgsRectangle(500000, 3999000, 500020, 3999020)
    with pytest.raises(EarthDialError, match="No features are selected"):
        area_for(SELECTION, raster_layer, view, crs)
    fields = QgsVectorLayer("Polygon?crs=EPSG:4326", "fields", "memory")  # another CRS: carried over
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(15.0003, 36.137, 15.0013, 36.138)))
    fields.dataProvider().addFeatures([feature])
    QgsProject.instance().addMapLayer(fields)
    fields.selectAll()
    area = area_for(SELECTION, raster_layer, view, crs)
    assert area.width() > 80 and area.height() > 100 and area.xMinimum() % 10 == 0
    assert raster_layer.extent().contains(area)
