"""The server's connection policy: a cap on open connections, an idle timeout, and the open-file limit.

libzmq accepts every TCP connection a ROUTER socket's listener gets, and has no call to close one peer.
So the server watches its socket's monitor (ACCEPTED and DISCONNECTED events carry the connection's file
descriptor) and the descriptor each message came on (ZMQ_SRCFD), and ends a connection by shutting its
socket down (shutdown(2), not close: libzmq sees the end of the stream, closes the descriptor itself and
reports DISCONNECTED, so no descriptor is reused under it):

- idle: no message for `idle_s` and no request queued or running on it (a client waiting for its reply
  is never dropped; a dropped client's DEALER reconnects by itself on its next request);
- over the cap: quiet connections first (none of its messages yet, or none for QUIET_S), the longest
  quiet first, so a flood of connections that send nothing cannot lock a new client out; then, among
  the ones that talk, the newest first, so a flood of DEALERs that reconnect as soon as they are ended
  and ping at once ends itself and not the clients that were there before it.

- unfinished messages: libzmq buffers every frame of a multipart message until its last one arrives,
  and its size limit (ZMQ_MAXMSGSIZE) is per frame, so a peer sending large frames with MORE set and
  never the last one made the server buffer without bound. A TCP connection's kernel counts the bytes
  it received (TCP_INFO); the server counts the bytes of the messages it got from it; the difference is
  what libzmq holds for that connection (its unfinished message, plus whole ones not yet read). When
  the sum over all connections passes the budget, the connections holding the most are ended (libzmq
  then frees their partial messages).

Connections that never finish the ZMTP handshake are also dropped by libzmq after HANDSHAKE_IVL_MS.
"""

from __future__ import annotations

import logging
import resource
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("earthdial.serving.server")

HANDSHAKE_IVL_MS = 5000  # a connection must finish its ZMTP greeting in this time (libzmq: 30 s)
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_IDLE_S = 300.0
QUIET_S = 1.0  # past the cap, a connection silent this long goes before the ones that talk
FD_RESERVE = 64  # descriptors kept free for the model's files, sockets of the worker, logs
# bytes a connection may have sent beyond its delivered messages without holding an unfinished message:
# ZMTP greeting, handshake, heartbeats and frame headers
FRAMING_SLACK = 1 << 20
_TCP_INFO_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received in Linux's struct tcp_info (since 4.1)


def tcp_bytes_received(fd: int) -> int | None:
    """Bytes the kernel received on this TCP socket, None where that is not known (not TCP, or not Linux)."""
    if not hasattr(socket, "TCP_INFO"):
        return None
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    finally:
        sock.detach()
    if len(info) < _TCP_INFO_BYTES_RECEIVED + 8:
        return None
    return int(struct.unpack_from("=Q", info, _TCP_INFO_BYTES_RECEIVED)[0])


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # a platform that refuses: keep what there is
            pass
    return soft


def connection_cap(wanted: int) -> int:
    """The cap actually used: what was asked for, but never more than the open-file limit leaves."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(1, min(wanted, soft - FD_RESERVE))


@dataclass
class Connection:
    fd: int
    opened: float
    last: float  # last message (or the accept)
    delivered: int = 0  # bytes of the messages libzmq handed over from this connection


def _quiet(conn: Connection, now: float) -> bool:
    """Nothing came on it since its accept, or nothing for QUIET_S."""
    return conn.last == conn.opened or now - conn.last > QUIET_S


class Connections:
    def __init__(self, cap: int = DEFAULT_MAX_CONNECTIONS, idle_s: float = DEFAULT_IDLE_S) -> None:
        self.cap = cap
        self.idle_s = idle_s
        self.open: dict[int, Connection] = {}
        self.dropped = 0  # connections this policy ended (for status)

    def accepted(self, fd: int, now: float) -> None:
        self.open[fd] = Connection(fd, now, now)

    def closed(self, fd: int) -> None:
        self.open.pop(fd, None)

    def message(self, fd: int, now: float, nbytes: int = 0) -> None:
        conn = self.open.get(fd)
        if conn is not None:
            conn.last = now
            conn.delivered += nbytes

    def over_buffer(self, budget: int) -> list[int]:
        """Connections to end because libzmq holds more of their bytes than `budget` in all: the
        largest holders first, until the rest fit (see the module's text)."""
        held = []
        for conn in self.open.values():
            received = tcp_bytes_received(conn.fd)
            if received is not None:
                held.append((max(0, received - conn.delivered - FRAMING_SLACK), conn.fd))
        total = sum(h for h, _ in held)
        ending = []
        for h, fd in sorted(held, reverse=True):
            if total <= budget or h == 0:
                break
            ending.append(fd)
            total -= h
        return ending

    def to_end(self, now: float, busy: Callable[[int], bool]) -> list[int]:
        """Descriptors to shut down now: idle ones, then the longest idle beyond the cap."""
        idle = [c for c in self.open.values() if not busy(c.fd)]
        ending = {c.fd for c in idle if self.idle_s > 0 and now - c.last > self.idle_s}
        excess = len(self.open) - len(ending) - self.cap
        if excess > 0:
            rest = [c for c in idle if c.fd not in ending]
            quiet = sorted((c for c in rest if _quiet(c, now)), key=lambda c: c.last)
            talking = sorted((c for c in rest if not _quiet(c, now)), key=lambda c: c.opened, reverse=True)
            ending.update(c.fd for c in (quiet + talking)[:excess])
        return sorted(ending)

    def end(self, fd: int) -> None:
        """Shut a connection's socket down; libzmq then closes it and reports the disconnect."""
        self.open.pop(fd, None)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            return  # not a socket (any more)
        try:
            sock.shutdown(socket.SHUT_RDWR)
            self.dropped += 1
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor stays libzmq's

    def counts(self) -> dict[str, int]:
        return {"open": len(self.open), "max": self.cap, "ended": self.dropped}
