"""Keeping the panel's status line true: a thread of its own asks the backend for its `status` every few
seconds with a short timeout (the server's I/O loop answers it at once, even while the model works) and
reports each answer, or that none came, to the main thread through a Qt signal. The UI thread never
waits on the network, so a backend that is killed, restarted or unplugged never freezes QGIS."""

from __future__ import annotations

import threading
from typing import Any

from .qt import QtCore

INTERVAL_S = 2.0
TIMEOUT_S = 1.5

_Signal = QtCore.pyqtSignal if hasattr(QtCore, "pyqtSignal") else QtCore.Signal


class StatusWatcher(QtCore.QObject):
    """``answered(endpoint, reply, error)``: the status reply (a dict) or None with the error's text."""

    answered = _Signal(str, object, str)

    def __init__(
        self, parent: Any = None, interval_s: float = INTERVAL_S, timeout_s: float = TIMEOUT_S
    ) -> None:
        super().__init__(parent)
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self._endpoint = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, endpoint: str) -> None:
        """Follow ``endpoint`` (from now on; asks it at once)."""
        with self._lock:
            self._endpoint = endpoint
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="earthdial-status", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 2)
            self._thread = None

    def _run(self) -> None:
        from ..contract.client import Client
        from ..contract.wire import EarthDialError

        client, current = None, ""
        try:
            while not self._stop.is_set():
                with self._lock:
                    endpoint = self._endpoint
                if client is None or endpoint != current:
                    if client is not None:
                        client.close()
                    client, current = Client(endpoint, timeout_s=self.timeout_s), endpoint
                try:
                    reply: dict[str, Any] | None = client.status(timeout_s=self.timeout_s)
                    error = ""
                except EarthDialError as exc:
                    reply, error = None, exc.code
                except Exception as exc:  # a malformed endpoint, a missing pyzmq: say so, keep going
                    reply, error = None, f"{type(exc).__name__}: {exc}"
                    client.close()
                    client = None
                if self._stop.is_set():
                    break
                self.answered.emit(endpoint, reply, error)
                self._wake.wait(self.interval_s)
                self._wake.clear()
        finally:
            if client is not None:
                client.close()
