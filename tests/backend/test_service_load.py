"""The server under load: many client processes at once, fair order between clients, a bounded queue.

Loopback only; every test is bounded in requests and time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from conftest import dealer, serving, write_geotiff
from earthdial.contract.client import Client
from earthdial.contract.wire import EarthDialError, decode, encode, source_by_value
from earthdial.serving import service
from earthdial.serving.scheduling import FairQueue, Pending
from earthdial.serving.server import Server

ANSWER = "<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box>"
PIXELS = np.zeros((3, 16, 16), np.uint8)
BY_VALUE = source_by_value([10.0, 0.0, 500_000.0, 0.0, -10.0, 4_000_000.0], "EPSG:32633")

# One load client: pipelines its requests on one DEALER (up to WINDOW outstanding) and reports, per
# request id, how many replies came back and whether they were ok.
LOAD_CLIENT = r"""
import json, sys, time
import zmq
from earthdial.contract.wire import decode, encode, source_by_reference

endpoint, tif, name, count, window, asks = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
src = source_by_reference(tif)
requests = []
for i in range(count):
    rid = f"{name}-{i}"
    if i < asks:
        h = {"op": "ask", "task": "caption", "source": src, "options": {"max_new_tokens": 4}}
    elif i % 2:
        h = {"op": "ping"}
    else:
        h = {"op": "georef", "answer": "<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box>", "source": src}
    requests.append({**h, "v": 1, "id": rid, "client": name})
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(endpoint)
replies, foreign, ops, outstanding, nxt = {}, [], {}, 0, 0
deadline = time.monotonic() + 120
while (nxt < count or outstanding) and time.monotonic() < deadline:
    while nxt < count and outstanding < window:
        sock.send_multipart(encode(requests[nxt]))
        ops[requests[nxt]["id"]] = requests[nxt]["op"]
        nxt += 1
        outstanding += 1
    if sock.poll(1000):
        head = decode(sock.recv_multipart()).header
        rid = head.get("id")
        if rid not in ops:
            foreign.append(rid)
            continue
        replies.setdefault(rid, []).append(head["ok"] or head["error"]["code"])
        outstanding -= 1
while sock.poll(300):  # anything more would be a duplicate
    rid = decode(sock.recv_multipart()).header.get("id")
    (replies.setdefault(rid, []) if rid in ops else foreign).append("late")
print(json.dumps({"name": name, "ops": ops, "replies": replies, "foreign": foreign}))
"""


@pytest.fixture(scope="module")
def small_tif(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("load") / "small.tif"
    data = (np.random.default_rng(0).random((3, 64, 64)) * 255).astype(np.uint8)
    return write_geotiff(path, data, px=10)


def test_eight_client_processes_each_get_every_reply_once(server: str, small_tif: Path) -> None:
    processes, per_process, window, asks = 8, 50, 6, 2
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                LOAD_CLIENT,
                server,
                str(small_tif),
                f"load{i}",
                str(per_process),
                str(window),
                str(asks),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    reports = [json.loads(p.communicate(timeout=180)[0]) for p in procs]
    elapsed = time.monotonic() - started
    by_op: dict[str, int] = {}
    for report in reports:
        assert report["foreign"] == [], f"{report['name']} got replies meant for others"
        assert set(report["replies"]) == set(report["ops"]), f"{report['name']} lost replies"
        for rid, got in report["replies"].items():
            assert got == [True], f"{rid}: {got}"  # exactly one reply, and a success
            by_op[report["ops"][rid]] = by_op.get(report["ops"][rid], 0) + 1
    total = sum(by_op.values())
    assert total == processes * per_process
    print(
        f"\nload: {processes} processes x {per_process} requests = {total} answered once each "
        f"({by_op}) in {elapsed:.1f} s"
    )
    with Client(server, timeout_s=10) as c:
        status = c.status()
    assert status["queue"] == 0 and status["running"] == 0


# --------------------------------------------------------------------------------------------------
# Fair order and the bounded queue
# --------------------------------------------------------------------------------------------------


def _job(client: str, i: int) -> Pending:
    return Pending(client.encode(), client, {"id": f"{client}{i}", "op": "georef"}, [])


def test_round_robin_between_clients_not_fifo() -> None:
    q = FairQueue(maxsize=100, per_client=60)
    for i in range(50):
        q.put(_job("a", i))
    q.put(_job("b", 0))
    q.put(_job("c", 0))
    order = [job.request_id for _ in range(6) for job in q.take(1)]
    assert order == ["a0", "b0", "c0", "a1", "a2", "a3"]
    batch = q.take(8)  # a batch is filled round-robin as well
    assert [j.request_id for j in batch] == [f"a{i}" for i in range(4, 12)]
    assert q.counts()["queue"] == 50 + 2 - 6 - 8


def test_busy_past_the_queue_and_past_one_clients_share() -> None:
    q = FairQueue(maxsize=4, per_client=3)
    for i in range(3):
        q.put(_job("a", i))
    with pytest.raises(EarthDialError) as err:
        q.put(_job("a", 3))
    assert err.value.code == "busy" and "this client" in err.value.message
    q.put(_job("b", 0))  # another client still has room
    with pytest.raises(EarthDialError) as err:
        q.put(_job("c", 0))
    assert err.value.code == "busy" and "queue is full" in err.value.message


@pytest.fixture()
def slow_worker(monkeypatch: pytest.MonkeyPatch):
    """Every request takes `delay[0]` seconds in the worker (tests set it)."""
    delay = [0.02]
    real = service.prepare

    def slow_prepare(header, arrays, engine, request=None):
        time.sleep(delay[0])
        return real(header, arrays, engine, request)

    monkeypatch.setattr(service, "prepare", slow_prepare)
    return delay


def _georef(rid: str, client: str) -> list:
    return encode(
        {"v": 1, "id": rid, "op": "georef", "answer": ANSWER, "source": BY_VALUE, "client": client}, [PIXELS]
    )


def test_a_burst_of_fifty_does_not_starve_another_client(slow_worker) -> None:
    server = Server(None, "tcp://127.0.0.1:0", queue_size=64, client_queue=50, max_batch=1)
    with serving(server) as endpoint, Client(endpoint, timeout_s=10) as probe:
        a, b = dealer(endpoint), dealer(endpoint)
        for i in range(50):
            a.send_multipart(_georef(f"a{i}", "A"))
        deadline = time.monotonic() + 10
        while (status := probe.status())["queue"] < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        (mine,) = [c for c in status["clients"] if c["queued"]]  # per-client counts: A, by its connection
        assert mine["queued"] == status["queue"] >= 40
        b.send_multipart(_georef("b0", "B"))
        order: list[str] = []
        poller = zmq.Poller()
        poller.register(a, zmq.POLLIN)
        poller.register(b, zmq.POLLIN)
        while len(order) < 51 and time.monotonic() < deadline + 10:
            for sock in dict(poller.poll(1000)):
                head = decode(sock.recv_multipart()).header
                assert head["ok"], head
                order.append(head["id"])
        a.close()
        b.close()
    assert sorted(order) == sorted([f"a{i}" for i in range(50)] + ["b0"])
    position = order.index("b0")
    print(f"\nfairness: B's one request answered {position + 1}th of 51, behind a burst of 50 from A")
    assert position < 50 - 35  # FIFO would put it last; round-robin right after A's running one or two


def test_busy_reply_when_the_queue_is_full_and_every_request_answered_once(slow_worker) -> None:
    slow_worker[0] = 0.3
    server = Server(None, "tcp://127.0.0.1:0", queue_size=4, client_queue=3, max_batch=1)
    with serving(server) as endpoint:
        a, b = dealer(endpoint), dealer(endpoint)
        for i in range(7):
            a.send_multipart(_georef(f"a{i}", "A"))
        time.sleep(0.1)
        b.send_multipart(_georef("b0", "B"))  # A may not fill the whole queue: B still gets in
        got: dict[str, list] = {}
        for sock, n in ((a, 7), (b, 1)):
            for _ in range(n):
                assert sock.poll(10_000)
                head = decode(sock.recv_multipart()).header
                got.setdefault(head["id"], []).append(True if head["ok"] else head["error"]["code"])
        assert not a.poll(300)
        a.close()
        b.close()
    assert got["b0"] == [True]
    busy = [rid for rid, r in got.items() if r == ["busy"]]
    assert len(got) == 8 and all(len(r) == 1 for r in got.values())
    assert len(busy) >= 2, got  # 1 running + 3 queued at most for A
    print(f"\nbusy: {len(busy)} of A's 7 refused with `busy`; B's request served")


def test_many_threads_with_their_own_clients(slow_worker) -> None:
    slow_worker[0] = 0.0
    server = Server(None, "tcp://127.0.0.1:0")
    results: dict[int, list[str]] = {}
    with serving(server) as endpoint:

        def run(n: int) -> None:
            with Client(endpoint, timeout_s=30) as c:
                results[n] = [c.georef(BY_VALUE, ANSWER, pixels=PIXELS)["id"] for _ in range(10)]

        threads = [threading.Thread(target=run, args=(n,)) for n in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sorted(results) == list(range(12))
    assert all(len(set(ids)) == 10 for ids in results.values())
