"""A local stand-in for the few Hugging Face hub endpoints `earthdial download` uses, serving one folder
as one repository at one commit: the file listing with sizes and checksums
(``/api/models/{repo}/revision/{rev}?blobs=true``) and the files (``/{repo}/resolve/{rev}/{path}``,
LFS files through a redirect as the hub does, with Range). It can stall a file after N bytes, serve
damaged bytes, or publish a false size, and it counts what it served. Standard library only: the plugin
tests (QGIS's Python) use it too."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")  # stored in LFS on the hub (tokenizer.json is not, in these repos)


@dataclass
class FakeHub:
    repo_id: str
    folder: Path
    commit: str = hashlib.sha1(b"fake commit").hexdigest()
    stall_after: dict[str, int] = field(default_factory=dict)  # file -> send this many bytes, wait, drop
    corrupt: set[str] = field(default_factory=set)  # files served with one byte changed
    missing: set[str] = field(default_factory=set)  # files listed but answered 404
    published_size: dict[str, int] = field(default_factory=dict)  # file -> a size to publish instead
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    served: dict[str, int] = field(default_factory=dict)  # file -> body bytes sent
    release: threading.Event = field(default_factory=threading.Event)  # ends a stall
    endpoint: str = ""

    def files(self) -> dict[str, bytes]:
        return {
            p.relative_to(self.folder).as_posix(): p.read_bytes()
            for p in sorted(self.folder.rglob("*"))
            if p.is_file()
        }

    def listing(self) -> dict[str, Any]:
        siblings = []
        for name, data in self.files().items():
            size = self.published_size.get(name, len(data))
            entry: dict[str, Any] = {"rfilename": name, "size": size}
            if name.endswith(LFS_SUFFIXES):
                entry["blobId"] = hashlib.sha1(name.encode()).hexdigest()  # the pointer's blob: unused
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": size, "pointerSize": 134}
            else:
                entry["blobId"] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            siblings.append(entry)
        return {"id": self.repo_id, "sha": self.commit, "siblings": siblings}

    def resolve_requests(self) -> list[tuple[str, str | None]]:
        return [
            (path, rng) for method, path, rng in self.requests if "/resolve/" in path or "/lfs-cdn/" in path
        ]


class _HubHandler(BaseHTTPRequestHandler):
    """The hub's endpoints over one FakeHub (``hub``: set on a subclass per server by _handler)."""

    hub: FakeHub

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        hub = self.hub
        path = unquote(urlsplit(self.path).path)
        hub.requests.append((self.command, path, self.headers.get("Range")))
        listing = re.fullmatch(rf"/api/models/{re.escape(hub.repo_id)}/revision/([^/]+)", path)
        if listing:
            if listing.group(1) not in ("main", hub.commit):
                return self._status(404, "RevisionNotFound")
            return self._json(hub.listing())
        if path.startswith("/api/models/"):
            return self._status(404, "RepoNotFound")
        files = hub.files()
        resolve = re.fullmatch(rf"/{re.escape(hub.repo_id)}/resolve/([^/]+)/(.+)", path)
        if resolve:
            name = resolve.group(2)
            if resolve.group(1) not in ("main", hub.commit) or name not in files or name in hub.missing:
                return self._status(404, "EntryNotFound")
            if name.endswith(LFS_SUFFIXES):  # the hub redirects LFS files to its storage
                self.send_response(302)
                self.send_header("Location", f"/lfs-cdn/{name}")
                self._hub_headers(name, files[name])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            return self._file(name, files[name], body)
        cdn = re.fullmatch(r"/lfs-cdn/(.+)", path)
        if cdn and cdn.group(1) in files:
            return self._file(cdn.group(1), files[cdn.group(1)], body)
        return self._status(404, "EntryNotFound")

    def _hub_headers(self, name: str, data: bytes) -> None:
        self.send_header("X-Repo-Commit", self.hub.commit)
        if name.endswith(LFS_SUFFIXES):
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')

    def _file(self, name: str, data: bytes, body: bool) -> None:
        if name in self.hub.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        rng = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if match:
            start = int(match.group(1))
            if start >= len(data):
                return self._status(416, "RangeNotSatisfiable")
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self._hub_headers(name, data)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if not body:
            return
        rest = data[start:]
        try:
            stall = self.hub.stall_after.get(name)
            if stall is not None and stall < len(rest):
                self._send(name, rest[:stall])
                self.hub.release.wait(120)  # the test kills the client meanwhile
                return  # then the connection drops with the rest unsent
            self._send(name, rest)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, name: str, chunk: bytes) -> None:
        self.wfile.write(chunk)
        self.wfile.flush()
        self.hub.served[name] = self.hub.served.get(name, 0) + len(chunk)

    def _json(self, data: dict[str, Any]) -> None:
        raw = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(raw)

    def _status(self, code: int, error: str) -> None:
        raw = json.dumps({"error": error}).encode()
        self.send_response(code)
        self.send_header("X-Error-Code", error)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(raw)


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (_HubHandler,), {"hub": hub})


@contextmanager
def serving(hub: FakeHub) -> Iterator[FakeHub]:
    """Serve ``hub`` on a free loopback port (hub.endpoint: the value for HF_ENDPOINT) until the block ends."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)
