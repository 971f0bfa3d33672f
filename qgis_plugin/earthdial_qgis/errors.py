"""Plain-words messages for the errors a request can end with.

The backend's typed codes (protocol.ErrorCode) come with a message written for people; this module adds
what the plugin knows (which endpoint, what to do next) and the few errors that only happen here.
"""

from __future__ import annotations

from .protocol import EarthDialError, ErrorCode
from .qt import QtCore

# Client-side codes, next to protocol.ErrorCode's (the protocol's Client itself raises "cancelled").
CANCELLED = "cancelled"
BAD_ENDPOINT = "bad_endpoint"
BACKEND_SLOW = "backend_slow"  # the backend answers status but not our request in time
MISSING_DEPENDENCY = "missing_dependency"
NO_LAYER = "no_layer"
BAD_INPUT = "bad_input"

_REFUSED = {
    ErrorCode.BAD_HEADER,
    ErrorCode.BAD_REQUEST,
    ErrorCode.UNKNOWN_OP,
    ErrorCode.UNKNOWN_TASK,
    ErrorCode.MISSING_FRAMES,
    ErrorCode.BAD_ARRAY,
    ErrorCode.FILE_NOT_FOUND,
    ErrorCode.NOT_A_RASTER,
    ErrorCode.BAD_CRS,
    ErrorCode.BOUNDS_OUTSIDE,
    ErrorCode.BAND_OUT_OF_RANGE,
    # codes of newer backends, spelled out so that this module also loads with an older protocol.py
    "wrong_variant",  # the loaded checkpoint cannot do the task
    "no_overlap",
    "empty_window",
    "forbidden_path",
}
_DISCONNECTED = getattr(ErrorCode, "DISCONNECTED", "disconnected")


def tr(text: str) -> str:
    return QtCore.QCoreApplication.translate("EarthDial", text)


def plain_message(error: EarthDialError, endpoint: str) -> str:
    """One or two sentences for the answer view and the message bar."""
    code, message = error.code, error.message
    if code == ErrorCode.TIMEOUT:
        return tr(
            "EarthDial backend not reachable at {endpoint}: no answer in time. "
            "Start it with `earthdial serve --model DIR --endpoint {endpoint}`, or check the endpoint."
        ).format(endpoint=endpoint)
    if code == _DISCONNECTED:
        text = tr(
            "The connection to the EarthDial backend at {endpoint} dropped before the answer came "
            "(was it stopped or restarted?): {message}"
        )
    elif code == BACKEND_SLOW:
        text = tr("The EarthDial backend at {endpoint} is running but did not answer in time: {message}")
    elif code == CANCELLED:
        text = tr("Request cancelled.")
    elif code == ErrorCode.BUSY:
        text = tr("The EarthDial backend at {endpoint} is busy: {message}")
    elif code == ErrorCode.VERSION_MISMATCH:
        text = tr(
            "The backend at {endpoint} speaks another protocol version ({message}); update the plugin or the backend."
        )
    elif code == ErrorCode.MODEL_ERROR:
        text = tr("The model failed on this request ({code}): {message}")
    elif code == ErrorCode.INTERNAL:
        text = tr("Internal error ({code}): {message}")
    elif code in _REFUSED:
        text = tr("The backend refused the request ({code}): {message}")
    else:
        return message or code
    return text.format(endpoint=endpoint, code=code, message=message)
