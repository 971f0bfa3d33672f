"""Band presets: which bands of a raster the model sees, how their values are converted, and the sensor tag.

A preset is picked from what the raster says about itself (band count, data type, band descriptions,
ground resolution) only where that is safe; the reason is reported to the client and any preset can be
named explicitly instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.model import sensors


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    bands: tuple[int, ...] | None  # 1-based bands to read; None: the first three (or all if fewer)
    sensor: str | None  # sensor tag; None: an RGB tag chosen by ground resolution
    band_count: int | None = None  # bands the raster must have for `bands` to make sense
    to_db: bool = False  # convert linear SAR power to decibels


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("rgb8", "8-bit RGB (bands 1,2,3)", (1, 2, 3), None),
        Preset("rgb16", "16-bit or float RGB, 2-98 percentile stretch (bands 1,2,3)", (1, 2, 3), None),
        Preset(
            "grey",
            "one band shown as grey, 2-98 percentile stretch (thermal, infrared, panchromatic)",
            (1,),
            None,
        ),
        Preset(
            "s2_l2a",
            "Sentinel-2 L2A, 12 bands B1-B9, B8A, B11, B12 in EarthDial's order",
            tuple(range(1, 13)),
            "[s2_ms_10]",
            band_count=12,
        ),
        Preset(
            "s2_l1c",
            "Sentinel-2 L1C, 13 bands (B10 cirrus dropped for EarthDial's 12)",
            (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13),
            "[s2_ms_10]",
            band_count=13,
        ),
        Preset(
            "s2_rgb", "Sentinel-2 true colour from a 12/13-band stack (B4, B3, B2)", (4, 3, 2), "[s2_rgb_10]"
        ),
        Preset("landsat8", "Landsat-8, 8 bands", tuple(range(1, 9)), "[l8_ms_30]", band_count=8),
        Preset("s1_vh_db", "Sentinel-1 VH backscatter already in dB", (1,), "[s1_vh_10]"),
        Preset(
            "s1_vh_linear",
            "Sentinel-1 VH backscatter in linear power (converted to dB)",
            (1,),
            "[s1_vh_10]",
            to_db=True,
        ),
        Preset("rgbn", "RGB + near infrared, 8-bit (bands 1-4)", (1, 2, 3, 4), "[hr_rgbi_0.5]", band_count=4),
    )
}


def rgb_tag_for(gsd_m: float | None) -> str:
    """The RGB sensor tag nearest a ground resolution: sub-metre imagery, Sentinel-2 or Landsat."""
    if gsd_m is None or gsd_m < 4:
        return "[hr_rgb_0.5]"
    return "[s2_rgb_10]" if gsd_m < 20 else "[l8_rgb_30]"


def get(name: str) -> Preset:
    if name not in PRESETS:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"unknown band preset {name!r}; known: {', '.join(PRESETS)}"
        )
    return PRESETS[name]


def choose(
    count: int, dtype: str, descriptions: list[str], sample: np.ndarray | None = None
) -> tuple[Preset, str]:
    """A preset for a raster and the reason, from its band count, data type and band descriptions.
    `sample` (a few pixels of band 1) tells linear from dB SAR."""
    text = " ".join(d.lower() for d in descriptions if d)
    if count == 1 and re.search(r"\b(vh|vv|sigma0?|backscatter|sar)\b", text):
        return _sar(sample, f"one band described as SAR ({text.strip()[:40]!r})")
    if count == 1 and np.dtype(dtype).kind == "f" and sample is not None and _looks_like_db(sample):
        return PRESETS["s1_vh_db"], "one float band with values like SAR decibels (mostly -35 to 5)"
    if count == 1 and np.dtype(dtype).kind == "f" and sample is not None and _looks_like_linear(sample):
        return PRESETS["s1_vh_linear"], (
            "one float band with values like SAR linear power (non-negative, mostly below 1, over 10 dB of "
            "contrast): "
            "converted to dB"
        )
    if count == 1:
        return PRESETS["grey"], "one band: shown as grey"
    if count == 12:
        return PRESETS["s2_l2a"], "12 bands: Sentinel-2 L2A"
    if count == 13:
        return PRESETS["s2_l1c"], "13 bands: Sentinel-2 L1C"
    if count == 8:
        return PRESETS["landsat8"], "8 bands: Landsat-8"
    if count == 4 and ("nir" in text or "infrared" in text) and dtype == "uint8":
        return PRESETS["rgbn"], "4 bands, one described as near infrared"
    if dtype == "uint8":
        return PRESETS["rgb8"], f"{count} bands of 8-bit data: the first three as RGB"
    return PRESETS[
        "rgb16"
    ], f"{count} bands of {dtype} data: the first three as RGB with a percentile stretch"


def _looks_like_db(sample: np.ndarray) -> bool:
    v = sample[np.isfinite(sample)]
    return v.size > 0 and float(np.mean((v > -40) & (v < 10))) > 0.95 and float(np.mean(v < 0)) > 0.5


def _looks_like_linear(sample: np.ndarray) -> bool:
    """Backscatter in linear power: never negative, a median well below 1 and more than 10 dB between the
    2nd and 98th percentiles (speckle and the water/land/town contrast), unlike NDVI, heights or kelvins.
    A one-band reflectance can look the same: a band description or a named preset then decides."""
    v = sample[np.isfinite(sample)].astype(np.float64)
    if v.size < 16 or float(v.min()) < 0:
        return False
    lo, mid, hi = np.percentile(v, [2.0, 50.0, 98.0])
    return 0 < mid < 1 and hi > 10 * max(lo, 1e-12)


def _sar(sample: np.ndarray | None, why: str) -> tuple[Preset, str]:
    if sample is not None and not _looks_like_db(sample):
        return PRESETS["s1_vh_linear"], why + "; values look like linear power: converted to dB"
    return PRESETS["s1_vh_db"], why + "; values look like dB"


def apply(preset: Preset, data: np.ndarray, nodata: float | None) -> np.ndarray:
    """Value conversions a preset calls for (linear power -> dB); other presets pass data through."""
    if not preset.to_db:
        return data
    x = data.astype(np.float32)
    invalid = ~np.isfinite(x) | (x <= 0)
    if nodata is not None:
        invalid |= data == nodata
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 10.0 * np.log10(x)
    out[invalid] = np.nan  # left out of statistics, filled downstream
    return out


# Checkpoint variants that were trained on EarthDial's band-group path (stage 3: multispectral and SAR).
BAND_GROUP_VARIANTS = ("EarthDial_4B_MS", "EarthDial_4B_Methane_UHI")


def check_variant(variant: str | None, tag: str) -> None:
    """Refuse input the loaded checkpoint was not trained on: the RGB checkpoint (stage 2) never saw the
    band-group path, so multispectral and SAR tags need the MS checkpoint. Its vocabulary has these tags
    (RGB and MS share one), which is why a tag check alone lets such a request through."""
    spec = sensors.sensor(tag)
    if variant and spec.path == "bands" and variant not in BAND_GROUP_VARIANTS:
        raise EarthDialError(
            ErrorCode.WRONG_VARIANT,
            f"{tag} ({spec.description}) goes through EarthDial's multispectral/SAR band-group path, which the "
            f"loaded {variant} was not trained on; serve EarthDial_4B_MS for it, or pick an RGB band preset",
        )
