"""The EarthDial client: a ZeroMQ DEALER socket that sends requests and matches replies by id.

Shared with the QGIS plugin like wire.py (scripts/build_plugin.py copies both); needs the standard
library, numpy and pyzmq (imported when a Client is made, so that wire.py alone works without it).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any

import numpy as np

from .wire import (
    DEFAULT_ENDPOINT,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    EarthDialError,
    ErrorCode,
    Message,
    decode,
    encode,
    json_frame,
    new_request_id,
    plan_window,
    read_shape,
)

# Client sockets: reconnect fast to a restarted server, notice a vanished one within seconds (milliseconds).
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 1000
HEARTBEAT_IVL_MS = 1000  # ZMTP pings: a peer gone without closing its socket is dropped after the timeout
HEARTBEAT_TIMEOUT_MS = 3000

_client_name: tuple[int, str] = (0, "")


def client_name() -> str:
    """This process's name in the `client` field of its requests: the server shares its queue fairly
    between names (per process, so that the many short-lived Clients of one QGIS count as one)."""
    global _client_name
    if _client_name[0] != os.getpid():  # a forked child is a client of its own
        _client_name = (os.getpid(), uuid.uuid4().hex[:16])
    return _client_name[1]


def _z85_key(key: str | bytes, what: str) -> bytes:
    text = (key.decode("ascii", "replace") if isinstance(key, bytes) else str(key)).strip()
    if len(text) != 40:
        raise ValueError(f"{what} must be a 40-character Z85 CURVE key, got {len(text)} characters")
    return text.encode("ascii")


class Client:
    """A DEALER-socket client. Replies are matched by request id, so a reply that arrives after its
    request timed out is dropped instead of being taken for the answer to the next one.

    The socket reconnects by itself: after a server restart the next request goes through on the same
    Client. Nothing is queued while no server is connected (ZMQ_IMMEDIATE): a request sent then waits
    for a connection until its timeout (`timeout`), and a connection that drops while a reply is awaited
    ends the request at once (`disconnected`), because a restarted server knows nothing of it.

    CURVE: pass the server's public key (Z85 text, from `earthdial keygen`) as ``server_public_key``;
    ``client_keys`` (public, secret) identifies this client to a server with an allow-list, otherwise a
    fresh key pair is made."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout_s: float = 120.0,
        context: Any = None,
        *,
        server_public_key: str | bytes | None = None,
        client_keys: tuple[str | bytes, str | bytes] | None = None,
    ) -> None:
        import zmq  # imported here so that encode/decode work where pyzmq is missing

        self._zmq = zmq
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._ctx = context or zmq.Context.instance()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        if hasattr(zmq, "HEARTBEAT_IVL"):  # libzmq >= 4.2
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if server_public_key is not None:
            public, secret = client_keys if client_keys is not None else zmq.curve_keypair()
            sock.setsockopt(zmq.CURVE_SERVERKEY, _z85_key(server_public_key, "server_public_key"))
            sock.setsockopt(zmq.CURVE_PUBLICKEY, _z85_key(public, "the client public key"))
            sock.setsockopt(zmq.CURVE_SECRETKEY, _z85_key(secret, "the client secret key"))
        self._sock = sock
        self._monitor = self._open_monitor()
        self._up = False  # a connection is up: its handshake was the last event seen
        self._lost = False  # the connection dropped (since the last request was sent)
        self._refused = False  # a handshake failed: wrong CURVE key, or not on the server's allow-list
        self._poller = zmq.Poller()  # replies and connection events, waited for together
        self._poller.register(sock, zmq.POLLIN)
        if self._monitor is not None:
            self._poller.register(self._monitor, zmq.POLLIN)
        sock.connect(endpoint)

    def _open_monitor(self) -> Any:
        zmq = self._zmq
        # a connection counts as up once its handshake is done (libzmq >= 4.3), else once TCP connects
        self._up_event = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", zmq.EVENT_CONNECTED)
        events = zmq.EVENT_DISCONNECTED | self._up_event
        for name in (
            "EVENT_HANDSHAKE_FAILED_NO_DETAIL",
            "EVENT_HANDSHAKE_FAILED_PROTOCOL",
            "EVENT_HANDSHAKE_FAILED_AUTH",
        ):
            events |= getattr(zmq, name, 0)
        if self.endpoint.startswith("inproc://"):
            return None  # no handshake events in-process: rely on POLLOUT and the timeout alone
        try:
            return self._sock.get_monitor_socket(events)
        except (zmq.ZMQError, AttributeError, NotImplementedError):
            return None  # without events a dead server is noticed by the timeout alone

    def _read_events(self) -> bool:
        """Take the monitor's pending events; True when one was a disconnect."""
        zmq, dropped = self._zmq, False
        while self._monitor is not None:
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            event = int.from_bytes(frames[0][:2], sys.byteorder)  # native uint16 event id, then a value
            if event == zmq.EVENT_DISCONNECTED:
                dropped = self._lost = True
                self._up = False
            elif event == self._up_event:
                self._up, self._refused = True, False
            else:
                self._refused = True
        return dropped

    def close(self) -> None:
        if self._monitor is not None:
            try:
                self._sock.disable_monitor()
            except self._zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
            self._monitor = None
        self._sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        header: dict[str, Any],
        arrays: list[np.ndarray] | tuple[np.ndarray, ...] = (),
        timeout_s: float | None = None,
        cancelled: Any = None,
        progress: Any = None,
    ) -> Message:
        """Send one request and wait for its reply. Long jobs (`detect`) send progress events before their
        reply: each is passed to ``progress`` (a callable taking the event's header) and restarts the
        timeout, so the timeout bounds silence, not the whole job. Raises EarthDialError for error replies, timeouts
        (`timeout`) and connections lost while waiting (`disconnected`). ``cancelled`` is an optional
        callable polled while waiting (a QgsTask's isCanceled); when it turns true the server is asked to
        drop the request and `cancelled` is raised."""
        header = dict(header)
        header.setdefault("id", new_request_id())
        header.setdefault("v", PROTOCOL_VERSION)
        header.setdefault("client", client_name())
        frames = encode(header, arrays)
        if len(frames[0]) > MAX_HEADER_BYTES:  # the server would refuse it: say so now, not after a wait
            raise EarthDialError(
                ErrorCode.BAD_HEADER,
                f"the request header is {len(frames[0])} bytes; the protocol's limit is {MAX_HEADER_BYTES} "
                "(a long chat history or prompt? shorten it)",
            )
        wait = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait
        self._send(frames, deadline, wait, cancelled)
        return self._receive(header["id"], deadline, wait, cancelled, progress)

    def _send(self, frames: list[Any], deadline: float, wait: float, cancelled: Any) -> None:
        zmq = self._zmq
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why = (
                    " (the CURVE handshake failed: wrong server key, or this client's key is not allowed)"
                    if self._refused
                    else " (is `earthdial serve` running there?)"
                )
                raise EarthDialError(
                    ErrorCode.TIMEOUT,
                    f"no connection to the EarthDial backend at {self.endpoint} within {wait:g} s{why}",
                )
            if cancelled is not None and cancelled():
                raise EarthDialError(ErrorCode.CANCELLED, "request cancelled by the user")
            writable = self._sock.poll(max(1, int(min(remaining, 0.2) * 1000)), zmq.POLLOUT)
            self._read_events()
            if not writable:
                continue
            # A dropped connection's pipe can look writable until the socket has processed its end; a
            # message written then is lost. So send only once the newest event is a handshake, and after
            # one more poll, which processes every command issued before that handshake.
            if self._monitor is not None and not self._up:
                time.sleep(0.001)
                continue
            if not self._sock.poll(0, zmq.POLLOUT):
                continue
            self._lost = False
            try:
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                continue

    def _receive(
        self, request_id: str, deadline: float, wait: float, cancelled: Any, progress: Any = None
    ) -> Message:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EarthDialError(
                    ErrorCode.TIMEOUT,
                    f"no reply from the EarthDial backend at {self.endpoint} within {wait:g} s",
                )
            if cancelled is not None and cancelled():
                self._send_cancel(request_id)
                raise EarthDialError(ErrorCode.CANCELLED, "request cancelled by the user")
            events = dict(self._poller.poll(max(1, int(min(remaining, 0.2) * 1000))))
            if self._sock in events:
                reply = decode(self._sock.recv_multipart(copy=False))
                unread = reply.header.get("id") is None and not reply.header.get("ok", True)
                if reply.header.get("id") != request_id and not unread:
                    continue  # a late reply to an earlier, timed-out or cancelled request
                # (an error without an id: the server could not read our header's id, and this Client
                # has one request in flight at a time, so it is this request's error)
                if reply.header.get("event"):  # progress, and a scan's plan and merged-box chunks
                    deadline = time.monotonic() + wait
                    if progress is not None:
                        progress(reply.header)
                    continue
                if not reply.header.get("ok", False):
                    err = reply.header.get("error") or {}
                    raise EarthDialError(
                        str(err.get("code", ErrorCode.INTERNAL)), str(err.get("message", ""))
                    )
                return reply
            if self._read_events() or self._lost:  # checked only when no reply is waiting
                raise EarthDialError(
                    ErrorCode.DISCONNECTED,
                    f"the connection to the EarthDial backend at {self.endpoint} dropped while waiting for "
                    "the reply (the server stopped, restarted or refused the message); send it again",
                )

    def _send_cancel(self, target: str) -> None:
        """Best effort: ask the server to drop a request we no longer wait for; its reply is ignored."""
        header = {
            "v": PROTOCOL_VERSION,
            "id": new_request_id(),
            "op": "cancel",
            "target": target,
            "client": client_name(),
        }
        try:
            self._sock.send_multipart(encode(header), flags=self._zmq.NOBLOCK)
        except self._zmq.ZMQError:
            pass

    def scan(
        self,
        header: dict[str, Any],
        read_tile: Any = None,
        on_event: Any = None,
        cancelled: Any = None,
        timeout_s: float | None = None,
        ahead: int = 2,
        earlier: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A whole-scene `detect` / `detect_changes`: every event (plan, progress, merged) goes to
        ``on_event``; returns the reply. For a layer streamed by value (``source.kind`` 'stream'),
        ``read_tile(index, (col, row, width, height), (out_w, out_h))`` returns the tile's pixels
        ((bands, rows, cols) array); tiles are read and sent as the plan and progress events come, at
        most ``ahead`` batches ahead of the model. A streamed `detect_changes` numbers the tiles of its
        k-th pair from k x the plan's tiles: ``read_tile`` returns layers k and k + 1 over the window,
        stacked band-wise. ``earlier`` (a resumed scan): `{"tiles": [...], "features": [...]}` as the stopped
        scan's progress events carried them, its tiles listed in `options.skip`; the merged boxes then
        cover the whole scan."""
        header = dict(header)
        header.setdefault("id", new_request_id())
        arrays = []
        if earlier is not None:
            header["earlier"] = True
            arrays.append(json_frame(earlier))
        options = header.get("options") or {}
        batch = int(options.get("batch", 8))
        state: dict[str, Any] = {"plan": None, "todo": [], "sent": 0, "read_size": 0}

        def feed(done: int) -> None:
            while state["todo"] and state["sent"] - done < ahead * batch:
                part, state["todo"] = state["todo"][:batch], state["todo"][batch:]
                arrays = []
                for i in part:
                    window = plan_window(state["plan"], i % state["plan"]["tiles"])  # pair k: k x tiles + i
                    arrays.append(read_tile(i, window, read_shape(window[2], window[3], state["read_size"])))
                tiles = {
                    "op": "scan_tiles",
                    "scan": header["id"],
                    "tiles": part,
                    "id": new_request_id(),
                    "v": PROTOCOL_VERSION,
                    "client": header.get("client") or client_name(),
                }
                self._sock.send_multipart(encode(tiles, arrays), copy=False)
                state["sent"] += len(part)

        def event(ev: dict[str, Any]) -> None:
            if ev.get("event") == "plan":
                state["plan"] = ev["plan"]
                state["read_size"] = int(ev["plan"].get("read_size") or 448)
                skip = set(options.get("skip") or [])
                state["todo"] = [i for i in range(ev["total"]) if i not in skip]
                state["base"] = ev["total"] - len(state["todo"])
            if on_event is not None:  # first: a reader may need what the event tells (the plan)
                on_event(ev)
            if read_tile is not None and state["plan"] is not None:
                done = int(ev.get("done", state.get("base", 0))) - state.get("base", 0)
                feed(done)

        return self.request(header, arrays, timeout_s=timeout_s, cancelled=cancelled, progress=event).header

    # Convenience wrappers ------------------------------------------------------------------------

    def status(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self.request({"op": "status"}, timeout_s=timeout_s).header

    def ping(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """A cheap liveness check the server's I/O loop answers even while the model is busy."""
        return self.request({"op": "ping"}, timeout_s=timeout_s).header

    def cancel(self, target: str, timeout_s: float | None = None) -> dict[str, Any]:
        """Cancel a request of this client by id; the reply's `state` says what happened to it
        (`queued`: removed, its reply is a `cancelled` error; `running`: stopped at its next batch
        boundary; `unknown`: finished already, or never seen)."""
        return self.request({"op": "cancel", "target": target}, timeout_s=timeout_s).header

    def plan(
        self,
        header: dict[str, Any],
        arrays: list[np.ndarray] | tuple[np.ndarray, ...] = (),
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """What an `ask` with this header would send (preset, bands, sensor, GSD, tiles), from metadata."""
        return self.request({**header, "op": "plan"}, arrays, timeout_s=timeout_s).header["plan"]

    def ask(
        self,
        source: dict[str, Any],
        prompt: str,
        task: str = "chat",
        pixels: np.ndarray | None = None,
        options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        header = {"op": "ask", "task": task, "prompt": prompt, "source": source, "options": options or {}}
        arrays = [pixels] if pixels is not None else []
        return self.request(header, arrays, **kwargs).header

    def georef(
        self, source: dict[str, Any], answer: str, pixels: np.ndarray | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        header = {"op": "georef", "answer": answer, "source": source}
        arrays = [pixels] if pixels is not None else []
        return self.request(header, arrays, **kwargs).header
