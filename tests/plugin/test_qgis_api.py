"""Plugin code that calls QGIS API which changed between QGIS 3.22 and today's LTRs: it gives the same
answer on each, and calls nothing the running QGIS deprecates (QGIS warns on each deprecated call; here a
warning is an error). The suite runs on QGIS 3.22 and on 3.40 (scripts/qgis_chroot.sh)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from plugin_testing import EPSG, write_geotiff
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsGeometry,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsSingleBandGrayRenderer,
    QgsVectorLayer,
)

from earthdial_qgis.contract.wire import EarthDialError
from earthdial_qgis.core.area import selection_extent
from earthdial_qgis.core.sources import displayed_bands

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning")


def boxes_layer(name: str, epsg: int, boxes: list[tuple[float, float, float, float]]) -> QgsVectorLayer:
    layer = QgsVectorLayer(f"Polygon?crs=EPSG:{epsg}", name, "memory")
    features = []
    for box in boxes:
        feature = QgsFeature()
        feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(*box)))
        features.append(feature)
    assert layer.dataProvider().addFeatures(features)[0]
    layer.updateExtents()
    return layer


def test_a_grey_layer_is_asked_about_the_band_it_shows(tmp_path: Path) -> None:
    path = tmp_path / "three.tif"
    write_geotiff(str(path), bands=3)
    layer = QgsRasterLayer(str(path), "three", "gdal")
    assert layer.isValid()
    layer.setRenderer(QgsSingleBandGrayRenderer(layer.dataProvider(), 2))
    assert displayed_bands(layer) == [2]
    layer.setRenderer(QgsSingleBandGrayRenderer(layer.dataProvider(), -1))  # no band: the backend's default
    assert displayed_bands(layer) is None


def test_the_selection_area_spans_the_selected_features_of_every_layer(qgis_new_project: Any) -> None:
    project = QgsProject.instance()
    a = boxes_layer("a", EPSG, [(500000, 3999000, 500100, 3999100), (500500, 3999500, 500600, 3999600)])
    b = boxes_layer("b", EPSG, [(499000, 3998000, 499100, 3998100)])
    project.addMapLayers([a, b])
    a.selectByIds([feature.id() for feature in a.getFeatures()][:1])
    b.selectAll()
    extent = selection_extent(QgsCoordinateReferenceSystem(f"EPSG:{EPSG}"))
    got = (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum())
    assert got == pytest.approx((499000, 3998000, 500100, 3999100))
    a.removeSelection()
    b.removeSelection()
    with pytest.raises(EarthDialError, match="No features are selected"):
        selection_extent(QgsCoordinateReferenceSystem(f"EPSG:{EPSG}"))
