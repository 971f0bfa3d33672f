"""Who may talk to the server.

- Binds: loopback endpoints are served as they are; any other bind needs CURVE (encryption plus server
  authentication), optionally with an allow-list of client public keys checked over ZAP.
- Keys: `keygen` writes Z85 key pairs made by libzmq; secret key files are created with mode 0600.

Which files the server may read is earthdial.geo.file_access.
"""

from __future__ import annotations

import os
import stat
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import zmq
from zmq.utils import z85

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification (RFC 27)
ZAP_DOMAIN = b"earthdial"

# --------------------------------------------------------------------------------------------------
# Binds
# --------------------------------------------------------------------------------------------------


def is_loopback(endpoint: str) -> bool:
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = urlparse(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def bind_refusal(endpoint: str, curve: bool) -> str | None:
    """Why `endpoint` must not be bound, or None when it may."""
    if is_loopback(endpoint) or curve:
        return None
    return (
        f"refusing to bind {endpoint}: without CURVE only loopback endpoints are served (a network bind "
        "would expose the model and files to other machines). Make keys with `earthdial keygen DIR` and "
        "pass --curve-secret-key DIR/server.secret (and --curve-clients DIR to admit only listed clients)"
    )


# --------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------


def _write_key(path: Path, key: bytes, secret: bool) -> None:
    # O_EXCL: never overwrite a key that clients may already trust; 0600 before a byte is written
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(key.decode("ascii") + "\n")


def keygen(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Write a server and a client CURVE key pair into `directory` (created if missing):
    server.public, server.secret, client.public, client.secret. Refuses to overwrite existing keys."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        f"{who}.{part}": out / f"{who}.{part}"
        for who in ("server", "client")
        for part in ("public", "secret")
    }
    taken = [str(p) for p in paths.values() if p.exists()]
    if taken:
        raise FileExistsError(f"keys exist already (remove them first): {', '.join(taken)}")
    for who in ("server", "client"):
        public, secret = zmq.curve_keypair()
        _write_key(paths[f"{who}.public"], public, secret=False)
        _write_key(paths[f"{who}.secret"], secret, secret=True)
    return paths


def read_key(path: str | os.PathLike[str], secret: bool = False) -> bytes:
    """A Z85 key from a file `keygen` wrote; a secret key readable by group or others is refused."""
    path = Path(path)
    if secret and os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"{path} is readable by other users; `chmod 600 {path}` first")
    text = path.read_text(encoding="ascii").strip()
    if len(text) != 40:
        raise ValueError(f"{path} does not hold a Z85 CURVE key (40 characters)")
    try:
        z85.decode(text)
    except (ValueError, KeyError, IndexError):
        raise ValueError(f"{path} does not hold a Z85 CURVE key") from None
    return text.encode("ascii")


def public_key_of(secret: bytes) -> bytes:
    return zmq.curve_public(secret)


def read_client_keys(directory: str | os.PathLike[str]) -> set[bytes]:
    """The Z85 public keys of the clients allowed in: every `*.public` file of `directory`."""
    files = sorted(Path(directory).glob("*.public"))
    if not files:
        raise FileNotFoundError(f"no *.public key files in {directory}")
    return {read_key(p) for p in files}


class ZapHandler:
    """A ZAP handler (RFC 27) admitting only the listed CURVE client keys (or any), and naming each
    connection's key as its User-Id (the server's identity of that client). It is polled by the server's
    I/O loop (one REP socket, no thread of its own); it must be bound before the server socket."""

    def __init__(self, ctx: zmq.Context, allowed: set[bytes] | None) -> None:
        # raw 32-byte keys, as ZAP sends them; None admits any CURVE key (the handler then only tells the
        # server each connection's key, which is the client's identity)
        self.allowed = None if allowed is None else {z85.decode(k) for k in allowed}
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)

    def handle(self) -> None:
        request = self.sock.recv_multipart()
        # version, request id, domain, address, routing id, mechanism, credentials...
        version, request_id = request[0], request[1]
        mechanism = request[5] if len(request) > 5 else b""
        key = request[6] if len(request) > 6 else b""
        ok = version == b"1.0" and mechanism == b"CURVE" and (self.allowed is None or key in self.allowed)
        status, text = (b"200", b"OK") if ok else (b"400", b"client key not allowed")
        user = z85.encode(key) if ok else b""
        self.sock.send_multipart([b"1.0", request_id, status, text, user, b""])

    def close(self) -> None:
        self.sock.close(0)


def enable_curve(sock: zmq.Socket, secret: bytes) -> None:
    """Make `sock` a CURVE server with this secret key (call before bind)."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public_key_of(secret))
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)


def describe(curve: Any, clients: set[bytes] | None) -> str:
    if curve is None:
        return "no CURVE (loopback only)"
    who = f"{len(clients)} allowed client key(s)" if clients else "any client that knows the public key"
    return f"CURVE, server public key {public_key_of(curve).decode()}, {who}"
