"""Faults: a server killed mid-job and restarted, model errors and out-of-memory, cancellation, clients
that go away, oversized messages. The server must answer every request once, with a typed error when it
fails, and go on serving."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from conftest import dealer, free_port, serving, start_server, stop_server
from earthdial.contract.client import Client
from earthdial.contract.wire import EarthDialError, decode, encode, source_by_value
from earthdial.serving import server as server_mod
from earthdial.serving import service
from earthdial.serving.scheduling import Pending, cancel_check, is_cancelled
from earthdial.serving.server import Server

ANSWER = "<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box>"
PIXELS = np.zeros((3, 16, 16), np.uint8)
BY_VALUE = source_by_value([10.0, 0.0, 500_000.0, 0.0, -10.0, 4_000_000.0], "EPSG:32633")

# `earthdial serve` whose georef of the answer "slow" takes a minute: a job to kill the server in.
SLOW_SERVE = [sys.executable, "-c", """
import sys, time
from earthdial.serving import service
real = service.prepare
def prepare(header, arrays, engine, request=None):
    if header.get("answer") == "slow":
        time.sleep(60)
    return real(header, arrays, engine, request)
service.prepare = prepare
from earthdial.cli.main import main
sys.exit(main(sys.argv[1:]))
"""]  # fmt: skip


def test_killed_server_is_reported_at_once_and_a_restarted_one_serves_the_same_client() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(None, endpoint, command=SLOW_SERVE)
    client = Client(endpoint, timeout_s=20)
    try:
        first = client.ping()["server"]
        outcome: dict[str, object] = {}

        def slow_request() -> None:
            try:
                client.georef(BY_VALUE, "slow", pixels=PIXELS)
            except EarthDialError as exc:
                outcome["error"], outcome["at"] = exc, time.monotonic()

        waiter = threading.Thread(target=slow_request)
        waiter.start()
        with Client(endpoint, timeout_s=5) as probe:
            deadline = time.monotonic() + 10
            while probe.status()["running"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
        killed = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of the job
        proc.wait(10)
        waiter.join(25)
        error = outcome["error"]
        assert isinstance(error, EarthDialError) and error.code == "disconnected", error
        noticed = outcome["at"] - killed
        assert noticed < 5, noticed
        print(f"\nkill: the waiting client got `{error.code}` {noticed * 1000:.0f} ms after SIGKILL")

        # while nothing listens: a clear, typed timeout, and nothing queued for later
        t = time.monotonic()
        with pytest.raises(EarthDialError) as err:
            client.ping(timeout_s=0.5)
        assert err.value.code == "timeout" and time.monotonic() - t < 2
        assert "no connection" in err.value.message

        # a request sent while the server is down goes through once it is back
        restarted: dict[str, object] = {}
        starter = threading.Thread(target=lambda: restarted.update(proc=start_server(None, endpoint)))
        starter.start()
        reply = client.ping(timeout_s=30)
        starter.join(30)
        proc = restarted["proc"]
        assert reply["server"] != first  # a new server process, same Client
        # and the next request after the restart works on the same Client
        assert client.georef(BY_VALUE, ANSWER, pixels=PIXELS)["features"]["features"]
    finally:
        client.close()
        stop_server(proc)


# --------------------------------------------------------------------------------------------------
# Model errors and out-of-memory, through Server._answer with the tiny model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path):
    from earthdial.model.engine import Engine

    return Engine(str(tiny_checkpoint), device="cpu")


def _ask(rid: str, prompt: str = "what is here?") -> Pending:
    header = {
        "v": 1,
        "id": rid,
        "op": "ask",
        "task": "chat",
        "prompt": prompt,
        "source": BY_VALUE,
        "options": {"max_new_tokens": 4},
    }
    pixels = (np.random.default_rng(len(rid)).random((3, 32, 32)) * 255).astype(np.uint8)
    return Pending(rid.encode(), "c", header, [pixels])


def _fake_generate(engine, monkeypatch, fail) -> list[int]:
    """Replace the engine's generate: `fail(queries)` returns an exception to raise, or None."""
    calls: list[int] = []
    real = engine.generate

    def generate(queries, **kw):
        calls.append(len(queries))
        exc = fail(queries)
        if exc is not None:
            raise exc
        return real(queries, **kw)

    monkeypatch.setattr(engine, "generate", generate)
    return calls


def test_out_of_memory_on_a_batch_is_retried_one_by_one(engine, monkeypatch) -> None:
    freed = []
    monkeypatch.setattr(server_mod, "_free_device_memory", lambda: freed.append(1))
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    calls = _fake_generate(engine, monkeypatch, lambda qs: oom if len(qs) > 1 else None)
    server = Server(engine, "tcp://127.0.0.1:0")
    try:
        replies = server._answer([_ask("r1"), _ask("r2"), _ask("r3")])
    finally:
        server.close()
    assert calls == [3, 1, 1, 1] and freed
    assert [r["id"] for _, r in replies] == ["r1", "r2", "r3"]
    assert all(r["ok"] and isinstance(r["answer"], str) for _, r in replies)


def test_out_of_memory_alone_and_a_model_error_are_typed_errors_of_their_request(engine, monkeypatch) -> None:
    def fail(queries):
        if any("boom" in q.question for q in queries):
            return RuntimeError("boom: a kernel failed")
        if len(queries) == 1 and "huge" in queries[0].question:
            return RuntimeError("CUDA error: out of memory")
        return None

    _fake_generate(engine, monkeypatch, fail)
    server = Server(engine, "tcp://127.0.0.1:0")
    try:
        replies = {
            r["id"]: r for _, r in server._answer([_ask("ok1"), _ask("bad", "boom"), _ask("big", "huge")])
        }
    finally:
        server.close()
    assert replies["ok1"]["ok"]
    assert replies["bad"]["error"]["code"] == "model_error" and "boom" in replies["bad"]["error"]["message"]
    assert replies["big"]["error"]["code"] == "model_error"
    assert "out of memory" in replies["big"]["error"]["message"]


def test_the_server_goes_on_serving_after_a_model_error(engine, monkeypatch) -> None:
    _fake_generate(
        engine,
        monkeypatch,
        lambda qs: RuntimeError("boom") if len(qs) == 1 and "boom" in qs[0].question else None,
    )
    with serving(Server(engine, "tcp://127.0.0.1:0")) as endpoint, Client(endpoint, timeout_s=30) as c:
        with pytest.raises(EarthDialError) as err:
            c.ask(BY_VALUE, "boom", task="chat", pixels=PIXELS, options={"max_new_tokens": 4})
        assert err.value.code == "model_error"
        assert isinstance(
            c.ask(BY_VALUE, "fine?", task="chat", pixels=PIXELS, options={"max_new_tokens": 4})["answer"], str
        )


# --------------------------------------------------------------------------------------------------
# ping, cancel, clients that go away
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def gated(monkeypatch: pytest.MonkeyPatch):
    """Requests wait in the worker until the gate opens; yields (gate, started, seen cancelled flags)."""
    gate, started, flags = threading.Event(), threading.Event(), []
    real = service.prepare

    def prepare(header, arrays, engine, request=None):
        started.set()
        check = cancel_check(header)
        gate.wait(10)
        flags.append((header.get("id"), check()))
        return real(header, arrays, engine, request)

    monkeypatch.setattr(service, "prepare", prepare)
    yield gate, started, flags
    gate.set()


def _send(sock: zmq.Socket, rid: str, answer: str = ANSWER, **extra) -> None:
    sock.send_multipart(
        encode({"v": 1, "id": rid, "op": "georef", "answer": answer, "source": BY_VALUE, **extra}, [PIXELS])
    )


def _recv(sock: zmq.Socket, timeout_ms: int = 10_000) -> dict:
    assert sock.poll(timeout_ms), "no reply"
    return decode(sock.recv_multipart()).header


def _until(predicate, timeout_s: float = 10.0) -> bool:
    """Wait for a state (polled), never for a fixed time; True once it holds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_ping_is_answered_while_the_worker_is_busy(gated) -> None:
    gate, started, _ = gated
    with serving(Server(None, "tcp://127.0.0.1:0")) as endpoint, Client(endpoint, timeout_s=10) as c:
        sock = dealer(endpoint)
        _send(sock, "busy1")
        assert started.wait(5)
        t = time.monotonic()
        assert c.ping(timeout_s=2)["pong"] is True
        assert time.monotonic() - t < 0.5
        gate.set()
        assert _recv(sock)["ok"]
        sock.close()


def test_cancel_a_queued_a_running_and_an_unknown_request(gated) -> None:
    gate, started, flags = gated
    with serving(Server(None, "tcp://127.0.0.1:0", max_batch=1)) as endpoint:
        sock = dealer(endpoint)
        for rid in ("r1", "r2", "r3"):
            _send(sock, rid)
        assert started.wait(5)  # r1 runs, r2 and r3 wait

        def cancel(target: str) -> dict:
            sock.send_multipart(encode({"v": 1, "id": f"cancel-{target}", "op": "cancel", "target": target}))
            return {h["id"]: h for h in (_recv(sock) for _ in range(2 if target == "r3" else 1))}

        got = cancel("r3")  # queued: its own reply is a typed `cancelled` error, then the ack
        assert got["r3"]["error"]["code"] == "cancelled"
        assert got["cancel-r3"]["state"] == "queued"
        assert cancel("r1")["cancel-r1"]["state"] == "running"
        assert cancel("nope")["cancel-nope"]["state"] == "unknown"
        gate.set()
        replies = {h["id"]: h for h in (_recv(sock), _recv(sock))}
        assert replies["r1"]["error"]["code"] == "cancelled"  # honoured at the next boundary
        assert replies["r2"]["ok"]
        assert not sock.poll(300)  # nothing else: every request answered exactly once
        sock.close()
    assert ("r1", True) in flags  # service code saw it through scheduling.is_cancelled


def test_a_client_that_gives_up_cancels_its_request_on_the_server(gated) -> None:
    gate, started, _ = gated
    with (
        serving(Server(None, "tcp://127.0.0.1:0", max_batch=1)) as endpoint,
        Client(endpoint, timeout_s=10) as c,
    ):
        blocker = dealer(endpoint)
        _send(blocker, "first")
        assert started.wait(5)
        t0 = time.monotonic()
        with pytest.raises(EarthDialError) as err:
            c.georef(BY_VALUE, ANSWER, pixels=PIXELS, cancelled=lambda: time.monotonic() - t0 > 0.3)
        assert err.value.code == "cancelled"
        with Client(endpoint, timeout_s=5) as probe:
            deadline = time.monotonic() + 5
            while probe.status()["queue"] and time.monotonic() < deadline:
                time.sleep(0.02)
            assert probe.status()["queue"] == 0
        gate.set()
        assert _recv(blocker)["ok"]
        blocker.close()


def test_queued_work_of_a_client_that_went_away_is_dropped(gated) -> None:
    gate, started, flags = gated
    with (
        serving(Server(None, "tcp://127.0.0.1:0", max_batch=1)) as endpoint,
        Client(endpoint, timeout_s=5) as probe,
    ):
        sock = dealer(endpoint)
        for i in range(10):
            _send(sock, f"g{i}")
        assert started.wait(5)
        # the nine others reach the queue in their own time: wait for them, not for a fixed while
        assert _until(lambda: probe.status()["queue"] == 9), probe.status()["queue"]
        sock.close()  # the client process is gone; its socket closes with it
        assert _until(lambda: probe.status()["queue"] == 0), probe.status()["queue"]
        gate.set()
        assert _until(lambda: bool(flags))
        # nothing of that client is left to run: a request sent now is the next and only one to start
        probe.georef(BY_VALUE, ANSWER, pixels=PIXELS)
        assert [rid for rid, _ in flags[:1]] == ["g0"] and flags[0][1] is True  # the running one was flagged
        assert len(flags) == 2 and flags[1][1] is False  # g1..g9 never ran; the probe's request did


def test_is_cancelled_is_false_outside_the_server() -> None:
    assert is_cancelled({"id": "x"}) is False


# --------------------------------------------------------------------------------------------------
# Size limits
# --------------------------------------------------------------------------------------------------


def test_an_oversized_frame_drops_the_connection_and_the_server_goes_on() -> None:
    server = Server(None, "tcp://127.0.0.1:0", max_message_bytes=256 * 1024)
    with serving(server) as endpoint, Client(endpoint, timeout_s=10) as c:
        big = np.zeros((5, 256, 256), np.uint8)  # a 320 KiB array frame: over the limit
        t = time.monotonic()
        with pytest.raises(EarthDialError) as err:
            c.georef(BY_VALUE, ANSWER, pixels=big)
        assert err.value.code == "disconnected" and time.monotonic() - t < 5
        assert c.georef(BY_VALUE, ANSWER, pixels=PIXELS)["ok"]  # the same client reconnects
        sock = dealer(endpoint)
        sock.send_multipart([b'{"v": 1, "id": "h", "op": "status", "pad": "' + b"x" * 70_000 + b'"}'])
        reply = _recv(sock)
        assert reply["error"]["code"] == "bad_header" and reply["id"] == "h"  # the id is still read
        sock.send_multipart(encode({"v": 1, "id": "f", "op": "georef"}) + [b""] * 70)
        assert _recv(sock)["error"]["code"] == "bad_request"
        sock.close()


def test_total_array_bytes_are_limited(monkeypatch) -> None:
    from earthdial.contract import wire

    monkeypatch.setattr(wire, "MAX_TOTAL_BYTES", 1000)
    frames = encode({"id": "t", "op": "georef"}, [np.zeros(600, np.uint8), np.zeros(600, np.uint8)])
    with pytest.raises(EarthDialError) as err:
        wire.decode(frames)
    assert err.value.code == "bad_array"
