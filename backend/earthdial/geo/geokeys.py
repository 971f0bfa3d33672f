"""The text a GeoTIFF's own CRS is built from, read from its bytes before GDAL opens the file.

GDAL builds a GeoTIFF's CRS while it opens the file (rasterio's open asks for it at once), and a CRS can
name files: an ESRI PE citation (`PCSCitationGeoKey`, `ESRI PE String = ...`) is imported as WKT, whose
`EXTENSION["PROJ4_GRIDS", ...]`, `PARAMETERFILE[...]` or ESRI `GEOGTRAN` names a grid that PROJ then
opens by its path: a FIFO there blocks the opening thread for good, past any check of the built CRS.
Every citation and other free text of the GeoKeys lives in the first image's GeoAsciiParams tag
(34737), so that tag is read here (header, first IFD, one tag value; bounded reads, by descriptor) and
refused when it names a file, or when it could be read otherwise than here: stored as numbers (libtiff
turns SHORT or LONG values into characters) or twice (libtiff keeps the first entry). Numeric GeoKeys (EPSG codes, TOWGS84 values) name no file.
"""

from __future__ import annotations

import os
import re
import struct

GEO_ASCII_PARAMS = 34737
MAX_IFD_ENTRIES = 65_535  # a classic TIFF's count is 16 bits; a BigTIFF's beyond this is refused
MAX_ASCII_BYTES = 1 << 20  # GDAL reads at most a few KB of a citation; more is no CRS we accept
# constructs that make GDAL or PROJ open a file: WKT1's EXTENSION["PROJ4"...]/["PROJ4_GRIDS"...], WKT2's
# PARAMETERFILE, ESRI's GEOGTRAN and its grid `Dataset_`, PROJ string keys, PROJ pipelines as methods
_NAMES_FILES = re.compile(
    r"EXTENSION\s*[\[(]|PARAMETERFILE\s*[\[(]|GEOGTRAN\s*[\[(]|Dataset_|PROJ-based|"
    r"\b(nadgrids|geoidgrids|grids|init|file|proj|pipeline)\s*=",
    re.I,
)
_TEXT_TYPES = {1, 2, 6, 7}  # BYTE, ASCII, SBYTE, UNDEFINED: one byte a character, read as is
_SHORT_OR_LONG = {256, 257, 259, 277, 278, 322}  # tags stored as SHORT, LONG or LONG8
# TIFF field types: bytes per value
TYPE_SIZES = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
    16: 8,
    17: 8,
    18: 8,
}


class NotTiff(Exception):
    """The bytes are not a TIFF (the caller lets GDAL decide what they are)."""


def first_ifd(fd: int, wanted: set[int]) -> dict[int, bytes]:
    """The raw values of the `wanted` tags of the first image of the TIFF open at `fd`, with the byte
    order prefixed ("<" or ">") under key -1; NotTiff when the file is no TIFF; ValueError when its
    structure is broken or over the bounds above."""
    head = os.pread(fd, 16, 0)
    if head[:4] in (b"II*\0", b"MM\0*"):
        big, order = False, "<" if head[:2] == b"II" else ">"
        (ifd,) = struct.unpack(order + "I", head[4:8])
    elif head[:4] in (b"II+\0", b"MM\0+"):
        big, order = True, "<" if head[:2] == b"II" else ">"
        if len(head) < 16:
            raise ValueError("a truncated BigTIFF header")
        (ifd,) = struct.unpack(order + "Q", head[8:16])
    else:
        raise NotTiff
    count_size, entry_size, offset_code = (8, 20, "Q") if big else (2, 12, "I")
    raw = os.pread(fd, count_size, ifd)
    if len(raw) < count_size:
        raise ValueError("the first image directory lies past the end of the file")
    (count,) = struct.unpack(order + ("Q" if big else "H"), raw)
    if count > MAX_IFD_ENTRIES:
        raise ValueError(f"the first image directory claims {count} entries")
    entries = os.pread(fd, count * entry_size, ifd + count_size)
    if len(entries) < count * entry_size:
        raise ValueError("the first image directory is cut short")
    found: dict[int, bytes] = {-1: order.encode()}
    for i in range(count):
        entry = entries[i * entry_size : (i + 1) * entry_size]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag not in wanted:
            continue
        if tag in found:  # libtiff keeps the first entry of a tag: a second one could hide it
            raise ValueError(f"its tag {tag} appears twice")
        if tag == GEO_ASCII_PARAMS and kind not in _TEXT_TYPES:
            # libtiff turns SHORT, LONG ... values into text, one a character: the raw bytes hide it
            raise ValueError(f"its GeoAsciiParams tag is stored as TIFF type {kind}, not as text")
        inline = 8 if big else 4  # the value (or its offset) follows the count, both this wide
        (n,) = struct.unpack(order + offset_code, entry[4 : 4 + inline])
        size = n * TYPE_SIZES.get(kind, 1)
        if size > MAX_ASCII_BYTES:
            raise ValueError(f"its tag {tag} holds {size} bytes")
        value_at = entry[4 + inline :]
        if size <= inline:
            found[tag] = value_at[:size]
        else:
            (offset,) = struct.unpack(order + offset_code, value_at[:inline])
            found[tag] = os.pread(fd, size, offset)
        if tag in _SHORT_OR_LONG:
            found[tag] = kind.to_bytes(2, "little") + found[tag]  # the type decides 2- or 4-byte values
    return found


def geo_ascii_params(fd: int) -> str | None:
    """The GeoAsciiParams text of the first image of the TIFF open at `fd` (None when it has none)."""
    data = first_ifd(fd, {GEO_ASCII_PARAMS}).get(GEO_ASCII_PARAMS)
    return None if data is None else data.decode("latin-1")


def _first_value(tags: dict[int, bytes], tag: int, default: int) -> int:
    """The first value of a SHORT, LONG or LONG8 tag read by first_ifd (its type prefixed)."""
    raw = tags.get(tag)
    if raw is None or len(raw) < 4:
        return default
    kind, data = int.from_bytes(raw[:2], "little"), raw[2:]
    code = "H" if kind == 3 else "Q" if kind == 16 else "I"
    size = struct.calcsize(code)
    return int(struct.unpack(tags[-1].decode() + code, data[:size])[0]) if len(data) >= size else default


def stored_block(fd: int) -> tuple[int, int] | None:
    """The (rows, cols) GDAL decodes at least for any pixel of the first image of the TIFF at `fd`, where
    GDAL reports less: a compressed strip of many rows (GDAL shows 1-row blocks for one strip, yet
    decodes every row above the one read). Tiles are reported right and uncompressed strips are read
    row by row, so None for those, and for a file that is no TIFF or is broken."""
    try:
        tags = first_ifd(fd, {256, 257, 259, 278, 322})
    except (NotTiff, ValueError, struct.error, OverflowError, OSError):
        return None
    width, height = _first_value(tags, 256, 0), _first_value(tags, 257, 0)
    if width <= 0 or height <= 0 or 322 in tags or _first_value(tags, 259, 1) == 1:
        return None
    return min(height, max(1, _first_value(tags, 278, height))), width


MAX_IFDS = 4096  # images in one TIFF: a COG has its overviews and masks, some dozens; GDAL lists all at open


def ifd_count_refusal(fd: int) -> str | None:
    """Why a TIFF has too many images for GDAL to open (it reads every image directory as it opens the
    file, holding the GIL: a 138 MB file of 1 M 1 x 1 directories froze the server for 36 s), or None.
    The chain of directories is walked from the header, a few bytes a directory, up to MAX_IFDS."""
    head = os.pread(fd, 16, 0)
    if head[:4] in (b"II*\0", b"MM\0*"):
        big, order = False, "<" if head[:2] == b"II" else ">"
        (ifd,) = struct.unpack(order + "I", head[4:8])
    elif head[:4] in (b"II+\0", b"MM\0+") and len(head) >= 16:
        big, order = True, "<" if head[:2] == b"II" else ">"
        (ifd,) = struct.unpack(order + "Q", head[8:16])
    else:
        return None
    try:
        return _walk_ifds(fd, ifd, big, order)
    except (OverflowError, OSError, struct.error):  # an offset past any file: GDAL stops there too
        return None


def _walk_ifds(fd: int, ifd: int, big: bool, order: str) -> str | None:
    count_size, entry_size, next_code = (8, 20, "Q") if big else (2, 12, "I")
    seen: set[int] = set()
    while ifd and ifd not in seen:
        if len(seen) >= MAX_IFDS:
            return f"it holds more than {MAX_IFDS} images (TIFF directories)"
        seen.add(ifd)
        raw = os.pread(fd, count_size, ifd)
        if len(raw) < count_size:
            return None  # a broken chain: GDAL stops there too
        (count,) = struct.unpack(order + ("Q" if big else "H"), raw)
        if count > MAX_IFD_ENTRIES:
            return f"an image directory claims {count} entries"
        raw = os.pread(fd, struct.calcsize(next_code), ifd + count_size + count * entry_size)
        if len(raw) < struct.calcsize(next_code):
            return None
        (ifd,) = struct.unpack(order + next_code, raw)
    return None


MAX_SAMPLES = 1024  # bands of one image: hyperspectral sensors have some hundreds


def samples_refusal(fd: int) -> str | None:
    """Why a TIFF has too many bands for GDAL to open, or None. GDAL and rasterio make an object for
    every band as they open the file, holding the GIL (65 535 took 1.3 s an open, and `plan` opens a
    file 4 times); the first image's SamplesPerPixel is read from its bytes."""
    try:
        tags = first_ifd(fd, {277})
    except (NotTiff, ValueError, struct.error, OverflowError, OSError):
        return None  # no TIFF, or one refused or left to GDAL by the other checks
    samples = _first_value(tags, 277, 1)
    return f"it holds {samples} bands (at most {MAX_SAMPLES})" if samples > MAX_SAMPLES else None


def refusal(fd: int) -> str | None:
    """Why the file open at `fd` must not reach GDAL for its CRS, or None: a TIFF whose GeoKeys' text
    names a file (a grid, an init file, a PROJ pipeline), or whose first directory cannot be read within
    the bounds above. Files that are not TIFFs pass (their drivers build no CRS from their contents)."""
    try:
        text = geo_ascii_params(fd)
    except NotTiff:
        return None
    except (ValueError, struct.error, OverflowError, OSError) as exc:
        return f"its TIFF structure cannot be checked ({exc})"
    if text is not None and _NAMES_FILES.search(text):
        return "its GeoTIFF CRS names a file (a grid or init file in its GeoKeys' citation or WKT)"
    return None
