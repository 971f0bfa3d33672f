"""Sources of requests: by reference for files on disk, by value (pixels read in QGIS) for the rest."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from osgeo import gdal
from plugin_testing import (
    ANSWER,
    EPSG,
    VIEW,
    VIEW_BOUNDS,
    VIEW_PIXELS,
    expected_ring,
    same_corners,
    wait_until,
    write_geotiff,
)
from qgis.core import QgsProject, QgsRasterDataProvider, QgsRasterLayer, QgsRectangle
from qgis.PyQt import sip
from qgis.PyQt.QtGui import QColor

from earthdial_qgis.contract.client import Client
from earthdial_qgis.contract.wire import EarthDialError, ErrorCode
from earthdial_qgis.core.scanning import ScanLayer, changes_request
from earthdial_qgis.core.sources import PixelGrid, SourcePlan, plan_source, read_pixels
from earthdial_qgis.gui.dock import GEOREF

EXPECTED_TRANSFORM = (10.0, 0.0, 500100.0, 0.0, -10.0, 3999700.0)


@pytest.fixture
def plans() -> Iterator[Callable[..., SourcePlan]]:
    """plan_source, with the provider clones of its plans destroyed when the test ends: a failed test's
    traceback keeps its locals alive, and a clone outliving QGIS crashes the interpreter at exit."""
    made: list[Any] = []

    def plan(*args: Any, **kwargs: Any) -> SourcePlan:
        result = plan_source(*args, **kwargs)
        made.extend([result.provider, result.fallback.provider if result.fallback else None])
        return result

    yield plan
    for provider in made:
        if provider is not None and not sip.isdeleted(provider):
            sip.delete(provider)


def rings(reply: dict[str, Any]) -> list[list[tuple[float, float]]]:
    return [[tuple(p) for p in f["geometry"]["coordinates"][0]] for f in reply["features"]["features"]]


def flat(reply: dict[str, Any]) -> list[float]:
    return [v for ring in rings(reply) for point in ring for v in point]


def test_file_layer_goes_by_reference(raster_layer, geotiff, plans) -> None:
    plan = plans(raster_layer, VIEW)
    assert not plan.by_value
    source, arrays = plan.resolve()
    assert arrays == []
    assert source == {
        "kind": "ref",
        "path": str(geotiff[0]),
        "bands": [1, 2, 3],  # what the layer's RGB renderer shows
        "bounds": list(VIEW_BOUNDS),
        "crs": f"EPSG:{EPSG}",
    }
    # ready in case the backend cannot read the file: the same view by value
    assert plan.fallback is not None and plan.fallback.by_value
    assert plan.fallback.grid.transform == pytest.approx(EXPECTED_TRANSFORM)


def test_by_value_pixels_of_a_gdal_provider(raster_layer, geotiff, plans) -> None:
    plan = plans(raster_layer, VIEW, by_value=True)
    assert plan.by_value and plan.bands == [1, 2, 3]
    assert (plan.grid.cols, plan.grid.rows) == (50, 50)
    assert plan.grid.transform == pytest.approx(EXPECTED_TRANSFORM)
    source, (pixels,) = plan.resolve()
    assert source["kind"] == "value" and source["crs"] == f"EPSG:{EPSG}"
    assert source["transform"] == pytest.approx(list(EXPECTED_TRANSFORM))
    assert pixels.shape == (3, 50, 50) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, geotiff[1][(slice(None), *VIEW_PIXELS)])

    # Georeferencing needs only the grid: a blank array of its shape.
    source2, (blank,) = plan.resolve(pixels_needed=False)
    assert source2["transform"] == source["transform"] and blank.shape == (1, 50, 50)


def test_by_value_grid_snaps_clips_and_caps(raster_layer, geotiff, plans) -> None:
    off_grid = plans(raster_layer, QgsRectangle(500103, 3999195, 500597, 3999704), by_value=True).grid
    assert off_grid.bounds == pytest.approx((500100, 3999190, 500600, 3999710))  # outwards to whole pixels
    assert (off_grid.cols, off_grid.rows) == (50, 52)

    clipped = plans(raster_layer, QgsRectangle(499900, 3999500, 500100, 4000100), by_value=True).grid
    assert clipped.bounds == pytest.approx((500000, 3999500, 500100, 4000000))
    assert (clipped.cols, clipped.rows) == (10, 50)

    capped = plans(raster_layer, raster_layer.extent(), by_value=True, max_size=40)
    assert (capped.grid.cols, capped.grid.rows) == (40, 20)
    assert capped.grid.transform == pytest.approx((50.0, 0.0, 500000.0, 0.0, -50.0, 4000000.0))
    _, (pixels,) = capped.resolve()
    assert pixels.shape == (3, 20, 40)

    with pytest.raises(EarthDialError) as outside:
        plans(raster_layer, QgsRectangle(0, 0, 10, 10), by_value=True)
    assert outside.value.code == "bounds_outside"
    with pytest.raises(EarthDialError) as band:
        plans(raster_layer, VIEW, bands=[4], by_value=True)
    assert band.value.code == "band_out_of_range"


def test_read_pixels_single_band_and_cancel(raster_layer, geotiff, plans) -> None:
    provider = plans(raster_layer, VIEW, by_value=True).provider  # a clone, as tasks read
    grid = PixelGrid(VIEW_BOUNDS, 50, 50)
    pixels = read_pixels(provider, grid, [2])
    np.testing.assert_array_equal(pixels[0], geotiff[1][1][VIEW_PIXELS])
    with pytest.raises(EarthDialError) as cancelled:
        read_pixels(provider, grid, [1], cancelled=lambda: True)
    assert cancelled.value.code == "cancelled"


def test_by_value_round_trip_matches_by_reference(raster_layer, backend, plans) -> None:
    by_ref = plans(raster_layer, VIEW)
    by_value = plans(raster_layer, VIEW, by_value=True)
    with Client(backend.endpoint, timeout_s=60) as client:
        ref_source, _ = by_ref.resolve()
        ref_georef = client.georef(ref_source, ANSWER)
        for pixels_needed in (False, True):
            source, arrays = by_value.resolve(pixels_needed)
            georef = client.georef(source, ANSWER, pixels=arrays[0])
            assert georef["chip"]["width"] == ref_georef["chip"]["width"] == 50
            assert georef["features"]["crs"] == ref_georef["features"]["crs"] == f"EPSG:{EPSG}"
            assert flat(georef) == pytest.approx(flat(ref_georef), abs=1e-6)
        assert same_corners(rings(ref_georef)[0], expected_ring(VIEW, (20, 30, 40, 60)))

        # The model sees the same pixels either way, so it says the same thing.
        source, (pixels,) = by_value.resolve()
        by_value_answer = client.ask(source, "ship", task="refer", pixels=pixels)["answer"]
        assert by_value_answer == client.ask(ref_source, "ship", task="refer")["answer"]


@pytest.fixture
def vsimem_layer(qgis_new_project, qgis_iface) -> Any:
    """The test raster in GDAL's memory file system: a GDAL layer the backend cannot open by path."""
    path = "/vsimem/earthdial-test/scene.tif"
    write_geotiff(path)
    layer = QgsRasterLayer(path, "in memory", "gdal")
    assert layer.isValid() and layer.providerType() == "gdal"
    QgsProject.instance().addMapLayer(layer)
    qgis_iface.setActiveLayer(layer)
    yield layer
    QgsProject.instance().removeMapLayer(layer.id())
    gdal.Unlink(path)


def send_from(dock: Any, task: str, prompt: str, timeout_s: float = 60.0) -> list[QgsRasterLayer]:
    """Ask through the dock as a user does, wait for the answer (which must not be an error), and return the
    layers the answer added to the project."""
    before = set(QgsProject.instance().mapLayers())
    dock.select_task(task)
    dock.prompt_edit.setPlainText(prompt)
    dock.send_button.click()
    wait_until(lambda: not dock.is_busy(), timeout_s)
    assert dock.last_error is None, dock.answer_view.toPlainText()
    return [lyr for lid, lyr in QgsProject.instance().mapLayers().items() if lid not in before]


def test_memory_raster_through_the_dock(vsimem_layer, make_dock, show_view, geotiff, backend, plans) -> None:
    extent = show_view()
    dock = make_dock()
    assert dock.layer_combo.currentLayer() is vsimem_layer
    assert plans(vsimem_layer, VIEW).by_value

    (layer,) = send_from(dock, GEOREF, ANSWER)
    (feature,) = list(layer.getFeatures())
    assert layer.crs().authid() == f"EPSG:{EPSG}"
    assert feature["source"] == vsimem_layer.source()
    ring = [(p.x(), p.y()) for p in feature.geometry().asPolygon()[0]]
    assert same_corners(ring, expected_ring(extent, (20, 30, 40, 60)))

    send_from(dock, "refer", "ship", 120)
    with Client(backend.endpoint, timeout_s=60) as client:
        ref_source = {
            "kind": "ref",
            "path": str(geotiff[0]),
            "bands": None,
            "bounds": list(VIEW_BOUNDS),
            "crs": None,
        }
        assert dock.answer_view.toPlainText() == client.ask(ref_source, "ship", task="refer")["answer"]
    # The preview is the array that was sent: the view's pixels, unchanged (8-bit).
    image, (rows, cols), data = dock.last_preview, VIEW_PIXELS, geotiff[1]
    assert (image.width(), image.height()) == (50, 50) and "by value" in dock.preview_caption.text()
    same = sum(
        QColor(image.pixel(x, y)).getRgb()[:3]
        == tuple(int(v) for v in data[:, rows.start + y, cols.start + x])
        for x in range(0, 50, 7)
        for y in range(0, 50, 7)
    )
    assert same >= 40  # of 49 (the answer's boxes, if any, are drawn over some)


def test_virtual_raster_provider_goes_by_value(qgis_new_project, geotiff, backend, plans) -> None:
    """A raster of a provider other than GDAL (QGIS's on-the-fly raster calculator)."""
    params = QgsRasterDataProvider.VirtualRasterParameters()
    params.crs = QgsRasterLayer(str(geotiff[0]), "s", "gdal").crs()
    params.extent = QgsRectangle(500000, 3999000, 502000, 4000000)
    params.width, params.height = 200, 100
    params.formula = '"scene@2" * 2'
    scene = QgsRasterDataProvider.VirtualRasterInputLayers()
    scene.name, scene.uri, scene.provider = "scene", str(geotiff[0]), "gdal"
    params.rInputLayers = [scene]
    layer = QgsRasterLayer(
        QgsRasterDataProvider.encodeVirtualRasterProviderUri(params), "doubled", "virtualraster"
    )
    assert layer.isValid() and layer.providerType() == "virtualraster"
    QgsProject.instance().addMapLayer(layer)  # owned by the project, not by this test's frame

    plan = plans(layer, VIEW)
    assert plan.by_value and plan.bands == [1]
    source, (pixels,) = plan.resolve()
    assert pixels.shape == (1, 50, 50) and pixels.dtype.kind == "f"
    np.testing.assert_array_equal(pixels[0], geotiff[1][1][VIEW_PIXELS].astype(np.float64) * 2)
    with Client(backend.endpoint, timeout_s=60) as client:
        reply = client.georef(source, ANSWER, pixels=pixels)
    assert same_corners(rings(reply)[0], expected_ring(VIEW, (20, 30, 40, 60)))


@pytest.fixture
def xyz_layer(qgis_new_project, qgis_iface, tmp_path) -> Any:
    """A web-map (XYZ) layer served from local tiles: one zoom-0 tile of a single colour."""
    tile = tmp_path / "tiles" / "0" / "0" / "0.png"
    tile.parent.mkdir(parents=True)
    mem = gdal.GetDriverByName("MEM").Create("", 256, 256, 3, gdal.GDT_Byte)
    for band, value in enumerate(XYZ_COLOUR, start=1):
        mem.GetRasterBand(band).Fill(value)
    gdal.GetDriverByName("PNG").CreateCopy(str(tile), mem)
    mem = None
    url = (tmp_path / "tiles").as_uri() + "/%7Bz%7D/%7Bx%7D/%7By%7D.png"
    layer = QgsRasterLayer(f"type=xyz&url={url}&zmin=0&zmax=0", "tiles", "wms")
    assert layer.isValid() and layer.crs().authid() == "EPSG:3857"
    QgsProject.instance().addMapLayer(layer)
    qgis_iface.setActiveLayer(layer)
    return layer


XYZ_COLOUR = (200, 100, 50)
XYZ_VIEW = QgsRectangle(-1e6, -1e6, 1e6, 1e6)  # EPSG:3857


def test_web_layer_colours_become_rgb_bands(xyz_layer, backend, plans) -> None:
    plan = plans(xyz_layer, XYZ_VIEW)
    assert plan.by_value and plan.crs == "EPSG:3857"
    assert plan.grid.bounds == pytest.approx((-1e6, -1e6, 1e6, 1e6))  # no native pixels: the view itself
    assert (plan.grid.cols, plan.grid.rows) == (1024, 1024)  # at the size cap
    source, (pixels,) = plan.resolve()
    assert pixels.shape == (3, 1024, 1024) and pixels.dtype == np.uint8  # ARGB32 split into R, G, B
    for band, value in enumerate(XYZ_COLOUR):
        assert (pixels[band] == value).all()


def test_web_layer_through_the_dock(xyz_layer, make_dock, show_view) -> None:
    extent = show_view(XYZ_VIEW, "EPSG:3857")
    dock = make_dock()
    assert dock.layer_combo.currentLayer() is xyz_layer
    (layer,) = send_from(dock, GEOREF, ANSWER)
    assert layer.crs().authid() == "EPSG:3857"
    ring = [(p.x(), p.y()) for p in next(layer.getFeatures()).geometry().asPolygon()[0]]
    assert same_corners(ring, expected_ring(extent, (20, 30, 40, 60)), tol=1e-3)

    send_from(dock, "caption", "", 120)  # pixels read from the web layer on the task's thread
    # pixels by value name the layer they came from (its public source), not "<array>"
    assert dock.last_reply["chip"]["width"] == 1024 and dock.last_reply["chip"]["source"].startswith(
        "type=xyz"
    )


def test_file_the_backend_may_not_read_is_sent_as_pixels(
    qgis_new_project, qgis_iface, make_dock, show_view, backend
):
    if backend.allowed_dir is None:
        pytest.skip("this backend reads any file")
    outside = Path(tempfile.mkdtemp(prefix="earthdial-outside-"))  # not under the allowed directory
    try:
        path = outside / "scene.tif"
        write_geotiff(str(path))
        layer = QgsRasterLayer(str(path), "elsewhere", "gdal")
        QgsProject.instance().addMapLayer(layer)
        qgis_iface.setActiveLayer(layer)
        with Client(backend.endpoint, timeout_s=60) as client, pytest.raises(EarthDialError) as refused:
            client.georef(
                {"kind": "ref", "path": str(path), "bands": None, "bounds": None, "crs": None}, ANSWER
            )
        assert refused.value.code == "forbidden_path"

        extent = show_view()
        dock = make_dock()
        (result,) = send_from(dock, GEOREF, ANSWER)
        assert "pixels were sent instead" in dock.result_label.text()
        assert dock.last_reply["chip"]["source"] == str(path)  # the pixels name the file they came from
        (feature,) = list(result.getFeatures())
        assert feature["source"] == str(path)
        ring = [(p.x(), p.y()) for p in feature.geometry().asPolygon()[0]]
        assert same_corners(ring, expected_ring(extent, (20, 30, 40, 60)))
    finally:
        QgsProject.instance().removeAllMapLayers()
        shutil.rmtree(outside, ignore_errors=True)


def test_a_vrt_layer_the_backend_does_not_open_is_sent_as_pixels(
    qgis_new_project, qgis_iface, make_dock, show_view, backend, tmp_path
):
    """A backend that opens only plain raster formats (a VRT can name files outside its
    folders) refuses a VRT with not_a_raster; QGIS reads it, so its pixels go instead."""
    tif = tmp_path / "scene.tif"
    write_geotiff(str(tif))
    vrt = tmp_path / "scene.vrt"
    gdal.Translate(str(vrt), str(tif), format="VRT")
    layer = QgsRasterLayer(str(vrt), "virtual", "gdal")
    QgsProject.instance().addMapLayer(layer)
    qgis_iface.setActiveLayer(layer)
    try:
        with Client(backend.endpoint, timeout_s=60) as client:
            try:
                client.georef(
                    {"kind": "ref", "path": str(vrt), "bands": None, "bounds": None, "crs": None}, ANSWER
                )
                pytest.skip("this backend reads VRTs")
            except EarthDialError as refused:
                assert refused.code == "not_a_raster"
        extent = show_view()
        dock = make_dock()
        (result,) = send_from(dock, GEOREF, ANSWER)
        assert dock.last_reply["chip"]["source"] == str(vrt)  # the pixels name the layer they came from
        ring = [(p.x(), p.y()) for p in next(result.getFeatures()).geometry().asPolygon()[0]]
        assert same_corners(ring, expected_ring(extent, (20, 30, 40, 60)))
    finally:
        QgsProject.instance().removeAllMapLayers()


def test_a_change_tile_asked_for_before_the_plan_is_a_typed_error(raster_layer: QgsRasterLayer) -> None:
    """The backend asks for tiles only after its plan event (which says how many tiles a pair has); a tile
    asked for earlier is a protocol error with a code, not a TypeError from the missing plan."""
    layers = [ScanLayer.of(raster_layer), ScanLayer.of(raster_layer)]
    try:
        scan = changes_request(layers, {}, by_value=True)
        assert scan.read_tile is not None and scan.plan is None
        with pytest.raises(EarthDialError) as caught:
            scan.read_tile(0, (0, 0, 4, 4), (4, 4))
        assert caught.value.code == ErrorCode.INTERNAL and "before sending its plan" in caught.value.message
    finally:
        for layer in layers:
            if layer.provider is not None and not sip.isdeleted(layer.provider):
                sip.delete(layer.provider)
