"""The text a GeoTIFF's own CRS is built from, read from its bytes before GDAL opens the file.

GDAL builds a GeoTIFF's CRS while it opens the file (rasterio's open asks for it at once), and a CRS can
name files: an ESRI PE citation (`PCSCitationGeoKey`, `ESRI PE String = ...`) is imported as WKT, whose
`EXTENSION["PROJ4_GRIDS", ...]`, `PARAMETERFILE[...]` or ESRI `GEOGTRAN` names a grid that PROJ then
opens by its path: a FIFO there blocks the opening thread for good, past any check of the built CRS.
Every citation and other free text of the GeoKeys lives in the first image's GeoAsciiParams tag
(34737), so that tag is read here (header, first IFD, one tag value; bounded reads, by descriptor) and
refused when it names a file. Numeric GeoKeys (EPSG codes, TOWGS84 values) name no file.
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
# field types: (size of one value, struct code)
_TYPES = {
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


def geo_ascii_params(fd: int) -> str | None:
    """The GeoAsciiParams text of the first image of the TIFF open at `fd` (None when it has none);
    NotTiff when the file is no TIFF; ValueError when its structure is broken or over the bounds."""
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
    for i in range(count):
        entry = entries[i * entry_size : (i + 1) * entry_size]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag != GEO_ASCII_PARAMS:
            continue
        inline = 8 if big else 4  # the value (or its offset) follows the count, both this wide
        (n,) = struct.unpack(order + offset_code, entry[4 : 4 + inline])
        size = n * _TYPES.get(kind, 1)
        if size > MAX_ASCII_BYTES:
            raise ValueError(f"its GeoAsciiParams tag holds {size} bytes")
        value_at = entry[4 + inline :]
        if size <= inline:
            data = value_at[:size]
        else:
            (offset,) = struct.unpack(order + offset_code, value_at[:inline])
            data = os.pread(fd, size, offset)
        return data.decode("latin-1")
    return None


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
