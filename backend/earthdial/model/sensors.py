"""EarthDial's sensor tags and how each one's pixels reach the vision tower.

RGB tags take InternVL's dynamic tiling with ImageNet statistics. Multispectral and SAR tags take
EarthDial's stage-3 band-group path: per-sensor normalisation, a resize to one tile, groups of three
bands through the vision tower, and a fusion of the group features (engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from earthdial.contract.wire import EarthDialError, ErrorCode


@dataclass(frozen=True)
class Sensor:
    tag: str
    description: str
    path: str  # "rgb" (dynamic tiles) or "bands" (band groups fused into one tile's tokens)
    gsd_m: float  # ground sampling distance the tag stands for, in metres
    temporal: bool = False


SENSORS: dict[str, Sensor] = {
    s.tag: s
    for s in (
        Sensor("[hr_rgb_0.5]", "high-resolution RGB (~0.5 m)", "rgb", 0.5),
        Sensor("[hr_rgb_temp_0.5]", "high-resolution RGB time series (~0.5 m)", "rgb", 0.5, temporal=True),
        Sensor("[s2_rgb_10]", "Sentinel-2 true colour (10 m)", "rgb", 10.0),
        Sensor("[l8_rgb_30]", "Landsat-8 true colour (30 m)", "rgb", 30.0),
        Sensor(
            "[s2_ms_10]", "Sentinel-2 multispectral (12 bands L2A, or 10 bands scaled 0-1)", "bands", 10.0
        ),
        Sensor("[hr_rgbi_0.5]", "high-resolution RGB + NIR, 8-bit (~0.5 m)", "bands", 0.5),
        Sensor("[s1_vh_10]", "Sentinel-1 VH backscatter in dB (10 m)", "bands", 10.0),
        Sensor("[s1_vh_1]", "high-resolution SAR VH in dB (~1 m)", "bands", 1.0),
        Sensor("[s1_vh_temp_10]", "Sentinel-1 VH time series in dB (10 m)", "bands", 10.0, temporal=True),
        Sensor("[l8_ms_30]", "Landsat-8 multispectral, 8 bands (30 m)", "bands", 30.0),
        Sensor("[hyper_rgb_3]", "RGB + methane enhancement band, 8-bit (~3 m)", "bands", 3.0),
    )
}

# Normalisation constants of EarthDial's stage-3 data (mean, std per band; a scalar applies to every band),
# as upstream's train/constants.py publishes them (S2_MEAN/S2_STD, S1_MEAN/S1_STD, L8_MEAN/L8_STD).
S2_L2A_MEAN = (756.4, 889.6, 1151.7, 1307.6, 1637.6, 2212.6, 2442.0, 2538.9, 2602.9, 2666.8, 2388.8, 1821.5)
S2_L2A_STD = (1111.4, 1159.1, 1188.1, 1375.2, 1376.6, 1358.6, 1418.4, 1476.4, 1439.9, 1582.1, 1460.7, 1352.2)
# Landsat-8, 8 bands; upstream repeats its sixth value for bands 7 and 8.
L8_MEAN = (
    1685.9217528110576,
    2576.6100969824315,
    3412.410682967383,
    4061.91785557694,
    4908.372486703946,
    4252.256712562256,
    4252.256712562256,
    4252.256712562256,
)
L8_STD = (
    359.7262632109024,
    418.76947482788194,
    568.2571089787482,
    626.040956183579,
    978.8922439362542,
    866.6750990367983,
    866.6750990367983,
    866.6750990367983,
)
S1_MEAN, S1_STD = -20.26, 5.91
NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "s2_l2a": (S2_L2A_MEAN, S2_L2A_STD),
    "s2_norm": ((0.0,), (1.0,)),
    "rgbm_norm": ((0.0,), (255.0,)),
    "tree_norm": ((0.0,), (255.0,)),
    "l8_norm": (L8_MEAN, L8_STD),
    "s1": ((S1_MEAN,), (S1_STD,)),  # applied to 8-bit SAR scaled to 0-1 (see sar_to_unit)
}
SAR_TAGS = ("[s1_vh_10]", "[s1_vh_1]", "[s1_vh_temp_10]")
# How float SAR reaches the 8-bit images EarthDial was evaluated on: upstream does not publish it, so
# this is our choice. A fixed dB window (not a per-window stretch) keeps neighbouring tiles of a scene
# on one scale; -30..0 dB spans sea (about -25) to ships and buildings (above -5) in VH.
SAR_DB_RANGE = (-30.0, 0.0)
# Tasks whose SAR pixels take the RGB path: upstream evaluates SAR region captions (ship datasets) with
# plain ImageNet tiles of the 8-bit image, not band groups (eval/rs_region_captioning).
SAR_RGB_TASKS = ("identify",)


def sensor(tag: str) -> Sensor:
    if tag not in SENSORS:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"unknown sensor tag {tag!r}; known: {', '.join(SENSORS)}"
        )
    return SENSORS[tag]


def norm_for(tag: str, band_count: int) -> str:
    """The normalisation a band-group sensor's data gets, from its tag and band count."""
    if tag == "[s2_ms_10]":
        return "s2_l2a" if band_count == 12 else "s2_norm"
    if tag in SAR_TAGS:
        return "s1"
    if tag == "[hr_rgbi_0.5]":
        return "tree_norm"
    if tag == "[hyper_rgb_3]":
        return "rgbm_norm"
    if tag == "[l8_ms_30]":
        return "l8_norm"
    raise EarthDialError(ErrorCode.BAD_REQUEST, f"sensor {tag} takes the RGB path, not band groups")


# Upstream's LCZ questions (10-band Sentinel-2 scaled 0-1, s2_norm) start with the SAR tag [s1_vh_10]
# (sic), not [s2_ms_10]: the prompt of 10-band Sentinel-2 data carries that tag; its pixels stay s2_norm.
LCZ_PROMPT_TAG = "[s1_vh_10]"


def prompt_tag(tag: str, band_count: int) -> str:
    """The sensor tag written into the question for data of `band_count` bands sent as `tag`."""
    return LCZ_PROMPT_TAG if tag == "[s2_ms_10]" and band_count == 10 else tag


def pair_tag(sar: bool, task_sensor: str, vocab: frozenset[str] | set[str]) -> str:
    """The sensor tag of a pair or sequence: [s1_vh_temp_10] for SAR when the checkpoint's vocabulary
    holds it (a published vocabulary may lack it), else the single-date [s1_vh_10]; the task's own
    temporal tag for optical data."""
    if not sar:
        return task_sensor
    return "[s1_vh_temp_10]" if "[s1_vh_temp_10]" in vocab else "[s1_vh_10]"


def pixel_path(tag: str, task: str | None = None) -> str:
    """ "rgb" (dynamic ImageNet tiles) or "bands" (band groups) for a sensor tag and task: the tag's own
    path, except SAR region captions, which upstream ran through the RGB path."""
    if tag in SAR_TAGS and task in SAR_RGB_TASKS:
        return "rgb"
    return sensor(tag).path


def sar_to_8bit(data: np.ndarray, nodata: float | None = None) -> np.ndarray:
    """SAR as the 8-bit image upstream's evaluation read: uint8 data as it is; anything else is taken as
    dB (linear power is converted by the s1_vh_linear preset before this), mapped linearly from
    SAR_DB_RANGE onto 0..255, clipped and rounded. Nodata/NaN become 0 (black, as in the image files)."""
    if data.dtype == np.uint8:
        return data.copy()
    x = data.astype(np.float64)
    invalid = ~np.isfinite(x)
    if nodata is not None and np.isfinite(nodata):
        invalid |= data == nodata
    lo, hi = SAR_DB_RANGE
    with np.errstate(invalid="ignore"):
        scaled = np.clip((x - lo) / (hi - lo) * 255.0, 0.0, 255.0)
    return np.where(invalid, 0.0, np.round(scaled)).astype(np.uint8)


def normalize_bands(data: np.ndarray, norm: str, nodata: float | None = None) -> np.ndarray:
    """(bands, rows, cols) -> float32 standardised with the named constants. Nodata/NaN become 0 after
    standardising (the band's mean), the value that least disturbs the features. For "s1" the data is
    first made the 8-bit image upstream evaluated on and scaled to 0-1 (ToTensor), then standardised
    with the dB constants, exactly as upstream's s1 transform does."""
    if norm == "s1":
        unit = sar_to_8bit(data, nodata).astype(np.float32) / 255.0
        return ((unit - np.float32(S1_MEAN)) / np.float32(S1_STD)).astype(np.float32)
    x = data.astype(np.float32)
    invalid = ~np.isfinite(x)
    if nodata is not None and np.isfinite(nodata):
        invalid |= data == nodata
    if norm not in NORMS:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"unknown normalisation {norm!r}")
    mean_t, std_t = NORMS[norm]
    if len(mean_t) not in (1, x.shape[0]):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"normalisation {norm} is for {len(mean_t)} bands; the data has {x.shape[0]}",
        )
    mean = np.broadcast_to(np.asarray(mean_t, np.float32), (x.shape[0],))
    std = np.broadcast_to(np.asarray(std_t, np.float32), (x.shape[0],))
    out = (x - mean[:, None, None]) / std[:, None, None]
    out[invalid] = 0.0
    return out.astype(np.float32)


def band_groups(count: int) -> list[list[int]]:
    """Band indexes (0-based) in groups of three, in storage order; a short last group repeats its last band."""
    groups = [list(range(i, min(i + 3, count))) for i in range(0, count, 3)]
    if groups and len(groups[-1]) < 3:
        groups[-1] += [groups[-1][-1]] * (3 - len(groups[-1]))
    return groups
