"""What a user sees when things go wrong: backend not running, busy, too slow, a band mapping that does not
fit, a layer without a CRS. Each gives a clear message, and the panel stays usable afterwards."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from plugin_testing import ANSWER, free_port, wait_until, write_geotiff
from qgis.core import Qgis, QgsProject, QgsRasterLayer

from earthdial_qgis.contract.wire import EarthDialError, decode, encode, error_reply, ok_reply
from earthdial_qgis.core import errors
from earthdial_qgis.gui.dock import GEOREF


class FakeServer:
    """A ROUTER socket on a thread that answers `status` and `ping`, and answers everything else with ``behaviour``:
    an error code to reply with, or None to never answer (a backend stuck on other work)."""

    def __init__(self, behaviour: str | None) -> None:
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.behaviour = behaviour
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)
        self.stop = threading.Event()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            ident, *frames = self.sock.recv_multipart()
            header = decode(frames).header
            op = header.get("op")
            self.seen.append(op)
            if op == "status":
                reply = ok_reply(header["id"], protocol=1, model=None, queue=64, running=1, tasks=[])
            elif op == "cancel":
                reply = ok_reply(header["id"], target=header.get("target"), state="unknown")
            elif op == "ping":  # a real server's I/O loop answers it whatever its worker does
                reply = ok_reply(header["id"], pong=True, server="fake", uptime_s=1.0)
            elif self.behaviour is None:
                continue
            else:
                reply = error_reply(
                    header["id"], EarthDialError(self.behaviour, "the queue is full (64 requests waiting)")
                )
            self.sock.send_multipart([ident, *encode(reply)])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def fake_server() -> Iterator[Callable[[str | None], FakeServer]]:
    made: list[FakeServer] = []

    def make(behaviour: str | None) -> FakeServer:
        server = FakeServer(behaviour)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def send_and_wait(dock: Any, timeout_s: float = 60.0) -> None:
    dock.send_button.click()
    wait_until(lambda: not dock.is_busy(), timeout_s)


def still_usable(dock: Any, endpoint: str, layer: QgsRasterLayer | None = None) -> None:
    """Back to a working backend and a good layer, the same panel answers."""
    dock.endpoint_edit.setText(endpoint)
    dock.timeout_spin.setValue(60)
    if layer is not None:
        dock.layer_combo.setLayer(layer)
    dock.select_task(GEOREF)
    dock.prompt_edit.setPlainText(ANSWER)
    send_and_wait(dock)
    assert dock.last_error is None, dock.answer_view.toPlainText()
    assert dock.send_button.isEnabled() and not dock.cancel_button.isEnabled()


def critical(iface: Any) -> list[str]:
    return iface.messageBar().get_messages(Qgis.MessageLevel.Critical)


def test_backend_not_running(make_dock, raster_layer, show_view, backend, qgis_iface) -> None:
    show_view()
    dock = make_dock()
    dead = f"tcp://127.0.0.1:{free_port()}"
    dock.endpoint_edit.setText(dead)
    dock.timeout_spin.setValue(300)  # the request's own timeout is not what the user waits for
    dock.select_task(GEOREF)
    dock.prompt_edit.setPlainText(ANSWER)
    started = time.monotonic()
    send_and_wait(dock, 30)
    elapsed = time.monotonic() - started
    text = dock.answer_view.toPlainText()
    assert dock.last_error.code == errors.UNREACHABLE
    assert elapsed < 5, f"an endpoint where nothing runs took {elapsed:.1f} s to fail"
    assert f"not reachable at {dead}" in text and "ping" in text and "Start" in text
    assert any(dead in m for m in critical(qgis_iface))
    still_usable(dock, backend.endpoint)


def test_backend_busy(make_dock, raster_layer, show_view, backend, fake_server, qgis_iface) -> None:
    show_view()
    busy = fake_server("busy")
    dock = make_dock()
    dock.endpoint_edit.setText(busy.endpoint)
    dock.select_task(GEOREF)
    dock.prompt_edit.setPlainText(ANSWER)
    send_and_wait(dock)
    assert dock.last_error.code == "busy"
    text = dock.answer_view.toPlainText()
    assert "busy" in text and "try again" in text and "queue is full" in text
    assert any("busy" in m for m in critical(qgis_iface))
    still_usable(dock, backend.endpoint)


def test_backend_too_slow(make_dock, raster_layer, show_view, backend, fake_server) -> None:
    show_view()
    stuck = fake_server(None)  # answers status, never the request
    dock = make_dock()
    dock.endpoint_edit.setText(stuck.endpoint)
    dock.timeout_spin.setValue(1)
    dock.select_task(GEOREF)
    dock.prompt_edit.setPlainText(ANSWER)
    send_and_wait(dock, 30)
    assert dock.last_error.code == errors.BACKEND_SLOW
    text = dock.answer_view.toPlainText()
    assert "running but did not answer in time" in text and "64 request(s) queued" in text
    still_usable(dock, backend.endpoint)


def test_wrong_band_mapping(make_dock, raster_layer, show_view, backend, qgis_iface) -> None:
    show_view()
    dock = make_dock()
    dock.select_task("caption")
    dock.preset_combo.setCurrentIndex(dock.preset_combo.findData("s2_l2a"))  # 12 bands; the layer has 3
    send_and_wait(dock)
    assert dock.last_error.code == "band_out_of_range", dock.answer_view.toPlainText()
    text = dock.answer_view.toPlainText()
    assert text.startswith("The band mapping does not fit this layer") and "preset" in text
    dock.preset_combo.setCurrentIndex(dock.preset_combo.findData("auto"))
    still_usable(dock, backend.endpoint)


def test_layer_without_crs(make_dock, raster_layer, show_view, backend, tmp_path: Path, qgis_iface) -> None:
    show_view()
    path = tmp_path / "no_crs.tif"
    write_geotiff(str(path), epsg=None)
    bare = QgsRasterLayer(str(path), "no crs", "gdal")
    assert bare.isValid()
    from qgis.core import QgsCoordinateReferenceSystem

    bare.setCrs(QgsCoordinateReferenceSystem())  # whatever QGIS guessed on loading: none
    QgsProject.instance().addMapLayer(bare)
    dock = make_dock()
    dock.layer_combo.setLayer(bare)
    dock.select_task(GEOREF)
    dock.prompt_edit.setPlainText(ANSWER)
    dock.send_button.click()
    assert not dock.is_busy()
    assert dock.last_error.code == errors.NO_CRS
    text = dock.answer_view.toPlainText()
    assert "“no crs” has no coordinate reference system" in text and "Layer Properties" in text
    assert any("no coordinate reference system" in m for m in critical(qgis_iface))
    still_usable(dock, backend.endpoint, raster_layer)


def test_plain_words_for_every_server_code(backend) -> None:
    """Every code the running backend says it can send has its own wording: none falls through to the raw
    code or message (the list is the backend's status, not one written here)."""
    from earthdial_qgis.contract.client import Client

    with Client(backend.endpoint, timeout_s=10) as client:
        codes = client.status()["error_codes"]
    assert len(codes) >= 25 and "no_overlap" in codes and "missing_dependency" in codes
    for code in codes:
        text = errors.plain_message(EarthDialError(code, "details here"), "tcp://127.0.0.1:5557")
        assert not text.startswith(code) and text != "details here", (code, text)  # words, not codes
        assert text[0].isupper() and len(text.split()) >= 2
    # an unknown code (a newer backend's) still shows the backend's message
    assert errors.plain_message(EarthDialError("brand_new", "details here"), "e") == "details here"
    assert "details here" in errors.plain_message(EarthDialError("wrong_variant", "details here"), "e")
