"""The shared contract under one name: the wire format (wire.py) and the client (client.py).

Kept so that `from earthdial.contract.protocol import ...` (and `from .protocol import ...` in the plugin) goes on
working; new code may import wire or client directly. The three modules are shared with the QGIS plugin:
scripts/build_plugin.py copies them into it (docs/protocol.md).
"""

from __future__ import annotations

from .client import (
    HEARTBEAT_IVL_MS,
    HEARTBEAT_TIMEOUT_MS,
    RECONNECT_IVL_MAX_MS,
    RECONNECT_IVL_MS,
    Client,
    client_name,
)
from .wire import (
    ALLOWED_DTYPES,
    DEFAULT_ENDPOINT,
    MAX_ARRAY_BYTES,
    MAX_ARRAY_NDIM,
    MAX_FRAMES,
    MAX_HEADER_BYTES,
    MAX_ID_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_TOTAL_BYTES,
    OPS,
    PEEK_ID_MAX_BYTES,
    PROTOCOL_VERSION,
    RESULT_MARK,
    REVIEWS,
    EarthDialError,
    ErrorCode,
    Message,
    decode,
    encode,
    error_codes,
    error_reply,
    new_request_id,
    ok_reply,
    peek_id,
    plan_window,
    read_shape,
    snap_ceil,
    snap_floor,
    source_by_reference,
    source_by_value,
)

__all__ = [
    "ALLOWED_DTYPES", "DEFAULT_ENDPOINT", "HEARTBEAT_IVL_MS", "HEARTBEAT_TIMEOUT_MS", "MAX_ARRAY_BYTES",
    "MAX_ARRAY_NDIM", "MAX_FRAMES", "MAX_HEADER_BYTES", "MAX_ID_CHARS", "MAX_MESSAGE_BYTES", "MAX_TOTAL_BYTES",
    "OPS", "PEEK_ID_MAX_BYTES", "PROTOCOL_VERSION", "RECONNECT_IVL_MAX_MS", "RECONNECT_IVL_MS", "RESULT_MARK", "REVIEWS",
    "Client", "EarthDialError", "ErrorCode", "Message", "client_name", "decode", "encode", "error_codes", "error_reply",
    "new_request_id", "ok_reply", "peek_id", "plan_window", "read_shape", "snap_ceil", "snap_floor",
    "source_by_reference", "source_by_value",
]  # fmt: skip
