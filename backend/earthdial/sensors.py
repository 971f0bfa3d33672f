"""EarthDial's sensor tags and how each one's pixels reach the vision tower.

RGB tags take InternVL's dynamic tiling with ImageNet statistics. Multispectral and SAR tags take
EarthDial's stage-3 band-group path: per-sensor normalisation, a resize to one tile, groups of three
bands through the vision tower, and a fusion of the group features (engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .protocol import EarthDialError, ErrorCode


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

# Normalisation constants of EarthDial's stage-3 data (mean, std per band; a scalar applies to every band).
# s2_l2a: means as EarthDial lists them; stds from SSL4EO-S12's published L2A statistics, whose first and
# last values (1111.4 ... 1352.2) EarthDial's own list matches to within 1%.
S2_L2A_MEAN = (756.4, 889.6, 1151.7, 1307.6, 1637.6, 2212.6, 2442.0, 2538.9, 2602.9, 2666.8, 2388.8, 1821.5)
S2_L2A_STD = (1111.4, 1155.2, 1183.6, 1368.1, 1370.3, 1355.6, 1416.5, 1474.8, 1439.3, 1582.3, 1455.5, 1352.2)
NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "s2_l2a": (S2_L2A_MEAN, S2_L2A_STD),
    "s2_norm": ((0.0,), (1.0,)),
    "rgbm_norm": ((0.0,), (255.0,)),
    "tree_norm": ((0.0,), (255.0,)),
    "s1": ((-20.26,), (5.91,)),
}


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
    if tag in ("[s1_vh_10]", "[s1_vh_1]", "[s1_vh_temp_10]"):
        return "s1"
    if tag == "[hr_rgbi_0.5]":
        return "tree_norm"
    if tag == "[hyper_rgb_3]":
        return "rgbm_norm"
    if tag == "[l8_ms_30]":
        return "window"  # EarthDial's l8_norm constants are not published: standardise by the window itself
    raise EarthDialError(ErrorCode.BAD_REQUEST, f"sensor {tag} takes the RGB path, not band groups")


def normalize_bands(data: np.ndarray, norm: str, nodata: float | None = None) -> np.ndarray:
    """(bands, rows, cols) -> float32 standardised with the named constants. Nodata/NaN become the band's
    mean (0 after standardising), the value that least disturbs the features."""
    x = data.astype(np.float32)
    invalid = ~np.isfinite(x)
    if nodata is not None and np.isfinite(nodata):
        invalid |= data == nodata
    if norm == "window":
        valid = np.where(invalid, np.nan, x)
        with np.errstate(all="ignore"):
            mean = np.nan_to_num(np.nanmean(valid, axis=(1, 2)))
            std = np.nan_to_num(np.nanstd(valid, axis=(1, 2)), nan=1.0)
        std[std == 0] = 1.0
    else:
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
