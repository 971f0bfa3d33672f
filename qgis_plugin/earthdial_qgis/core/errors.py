"""Plain-words messages for the errors a request can end with.

The backend's typed codes (ErrorCode, in the shared wire module) come with a message written for people;
this module adds the wording per code: what the plugin knows (which endpoint, what to do next). It
defines only the few codes that exist in the plugin alone; every backend code has wording here
(tests/plugin/test_errors.py checks it against the backend's status).
"""

from __future__ import annotations

from ..contract.wire import EarthDialError, ErrorCode
from .qt import QtCore

# Codes of the plugin alone, next to ErrorCode's.
BAD_ENDPOINT = "bad_endpoint"
BACKEND_SLOW = "backend_slow"  # the backend answers status but not our request in time
NO_LAYER = "no_layer"
NO_CRS = "no_crs"  # a layer without a coordinate reference system
NO_AREA = "no_area"  # no rectangle drawn, nothing selected, a region off the area
BAD_INPUT = "bad_input"
UNREACHABLE = "unreachable"  # nothing answered the ping sent before a request

# the backend could not read the layer's file itself (it runs on another machine or in a container, may not
# read that folder, does not open that format, e.g. a VRT, or the read is over its pixel budget): QGIS can,
# so the plugin sends the pixels instead
UNREADABLE_FILE = {
    ErrorCode.FILE_NOT_FOUND,
    ErrorCode.FORBIDDEN_PATH,
    ErrorCode.NOT_A_RASTER,
    ErrorCode.TOO_LARGE,
}


def tr(text: str) -> str:
    return QtCore.QCoreApplication.translate("EarthDial", text)


def _templates() -> dict[str, str]:
    refused = tr("The backend refused the request ({code}): {message}")
    return {
        **dict.fromkeys(
            (
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
            ),
            refused,
        ),
        ErrorCode.TIMEOUT: tr(
            "EarthDial backend not reachable at {endpoint}: no answer in time. "
            "Start it with the panel's Start button or `earthdial serve --model DIR --endpoint {endpoint}`, "
            "or check the endpoint."
        ),
        ErrorCode.TOO_LARGE: tr(
            "The request is over one of the backend's limits: {message}. Ask about a smaller area, or start "
            "the backend with the option the message names."
        ),
        ErrorCode.DEADLINE: tr(
            "The backend gave up on the request at its time limit ({message}); ask about a smaller area or "
            "start the backend with a longer --deadline."
        ),
        ErrorCode.OUTPUT_EXISTS: tr("A result of that name exists already: {message}"),
        ErrorCode.FOREIGN_OUTPUT: tr(
            "That file or layer is not an EarthDial result and is left as it is: {message}"
        ),
        ErrorCode.DISK_FULL: tr("Nothing was written: the disk is full ({message})."),
        ErrorCode.READ_ONLY: tr("Nothing was written: the folder or file is read-only ({message})."),
        ErrorCode.DISCONNECTED: tr(  # the client's message says the same again: not repeated
            "The connection to the EarthDial backend at {endpoint} dropped before the answer came (was it "
            "stopped or restarted?); send the request again once it runs."
        ),
        BACKEND_SLOW: tr(
            "The EarthDial backend at {endpoint} is running but did not answer in time: {message}"
        ),
        ErrorCode.CANCELLED: tr("Request cancelled."),
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
        ErrorCode.NO_OVERLAP: tr(
            "The layers of the pair do not overlap in the area asked about ({message}); pick layers that cover the same ground."
        ),
        ErrorCode.EMPTY_WINDOW: tr(
            "The area holds no data, only nodata pixels ({message}); move the map or pick another area."
        ),
        ErrorCode.WRONG_VARIANT: tr(
            "The loaded model cannot take this request: {message}. Start the backend with that checkpoint."
        ),
        UNREACHABLE: tr(
            "EarthDial backend not reachable at {endpoint}: {message}. Start one with the panel's Start local "
            "button or `earthdial serve --endpoint {endpoint}`, or check the endpoint."
        ),
        ErrorCode.FORBIDDEN_PATH: tr(
            "The backend may not read this file ({message}); start it with --allow-dir for the folder, "
            "or the plugin sends the pixels instead."
        ),
        NO_CRS: tr("{message}"),
        NO_AREA: tr("{message}"),
        ErrorCode.MISSING_DEPENDENCY: tr(
            "A Python module is missing ({message}). Use Plugins → EarthDial → Install dependencies… to install them into the plugin's own folder."
        ),
    }


def plain_message(error: EarthDialError, endpoint: str) -> str:
    """One or two sentences for the answer view and the message bar."""
    code, message = error.code, error.message
    text = _templates().get(code)
    if text is None:
        return message or code
    return text.format(endpoint=endpoint, code=code, message=message.rstrip("."))
