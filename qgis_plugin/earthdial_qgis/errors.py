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
NO_CRS = "no_crs"  # a layer without a coordinate reference system
NO_AREA = "no_area"  # no rectangle drawn, nothing selected, a region off the area
BAD_INPUT = "bad_input"
UNREACHABLE = "unreachable"  # nothing answered the ping sent before a request

# codes of newer backends, spelled out so that this module also loads with an older protocol.py
NO_OVERLAP = getattr(ErrorCode, "NO_OVERLAP", "no_overlap")
EMPTY_WINDOW = getattr(ErrorCode, "EMPTY_WINDOW", "empty_window")
WRONG_VARIANT = getattr(ErrorCode, "WRONG_VARIANT", "wrong_variant")
FORBIDDEN_PATH = getattr(ErrorCode, "FORBIDDEN_PATH", "forbidden_path")
DISCONNECTED = getattr(ErrorCode, "DISCONNECTED", "disconnected")

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
}


def tr(text: str) -> str:
    return QtCore.QCoreApplication.translate("EarthDial", text)


def _templates() -> dict[str, str]:
    return {
        DISCONNECTED: tr(
            "The connection to the EarthDial backend at {endpoint} dropped before the answer came "
            "(was it stopped or restarted?): {message}"
        ),
        BACKEND_SLOW: tr(
            "The EarthDial backend at {endpoint} is running but did not answer in time: {message}"
        ),
        CANCELLED: tr("Request cancelled."),
        ErrorCode.BUSY: tr(
            "The EarthDial backend at {endpoint} is busy with other requests and cannot take this one now; "
            "try again in a moment ({message})."
        ),
        ErrorCode.VERSION_MISMATCH: tr(
            "The backend at {endpoint} speaks another protocol version ({message}); update the plugin or the backend."
        ),
        ErrorCode.MODEL_ERROR: tr("The model failed on this request ({code}): {message}"),
        ErrorCode.INTERNAL: tr("Internal error ({code}): {message}"),
        ErrorCode.BAND_OUT_OF_RANGE: tr(
            "The band mapping does not fit this layer: {message}. Pick another preset or list bands the layer has."
        ),
        NO_OVERLAP: tr(
            "The layers of the pair do not overlap in the area asked about ({message}); pick layers that cover the same ground."
        ),
        EMPTY_WINDOW: tr(
            "The area holds no data, only nodata pixels ({message}); move the map or pick another area."
        ),
        WRONG_VARIANT: tr(
            "The loaded model cannot take this request: {message}. Start the backend with that checkpoint."
        ),
        UNREACHABLE: tr(
            "EarthDial backend not reachable at {endpoint}: {message}. Start one with the panel's Start local "
            "button or `earthdial serve --endpoint {endpoint}`, or check the endpoint."
        ),
        FORBIDDEN_PATH: tr(
            "The backend may not read this file ({message}); start it with --allow-dir for the folder, "
            "or the plugin sends the pixels instead."
        ),
        NO_CRS: tr("{message}"),
        NO_AREA: tr("{message}"),
        MISSING_DEPENDENCY: tr(
            "{message}. Use Plugins → EarthDial → Install dependencies… to install them into the plugin's folder."
        ),
    }


def plain_message(error: EarthDialError, endpoint: str) -> str:
    """One or two sentences for the answer view and the message bar."""
    code, message = error.code, error.message
    if code == ErrorCode.TIMEOUT:
        return tr(
            "EarthDial backend not reachable at {endpoint}: no answer in time. "
            "Start it with the panel's Start button or `earthdial serve --model DIR --endpoint {endpoint}`, "
            "or check the endpoint."
        ).format(endpoint=endpoint)
    text = _templates().get(code)
    if text is None and code in _REFUSED:
        text = tr("The backend refused the request ({code}): {message}")
    if text is None:
        return message or code
    return text.format(endpoint=endpoint, code=code, message=message.rstrip("."))
