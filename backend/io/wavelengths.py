"""Band centre wavelengths (nm): read from a raster's metadata, taken from a sensor preset or given by the user,
and the resampling of one sensor's bands onto another's.

GDAL exposes wavelengths in several ways, tried in this order for each band:
* the `IMAGERY` domain's `CENTRAL_WAVELENGTH_UM` (GDAL's standard band metadata, written by its
  Sentinel-2, Landsat, WorldView … drivers and by `gdal_edit -mo`);
* ENVI-style band tags `wavelength` with `wavelength_units` (GDAL's ENVI driver, many hyperspectral products);
* a band description naming a wavelength, e.g. "B4 (665 nm)" or "0.865 um".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import rasterio

from backend.protocol import INVALID_INPUT, JobError

# Centre wavelengths (nm) of the bands in the order the products ship them. Sources: ESA's Sentinel-2 MSI
# spectral response (S2A), USGS Landsat band designations (Collection 2 surface reflectance), Maxar's WorldView-2/3
# and Planet's PlanetScope specification sheets.
SENSORS: dict[str, tuple[str, tuple[float, ...]]] = {
    "sentinel2_l1c": (
        "Sentinel-2 L1C, 13 bands B1-B12 with B8A after B8",
        (442.7, 492.4, 559.8, 664.6, 704.1, 740.5, 782.8, 832.8, 864.7, 945.1, 1373.5, 1613.7, 2202.4),
    ),
    "sentinel2_l2a": (
        "Sentinel-2 L2A, 12 bands (no B10)",
        (442.7, 492.4, 559.8, 664.6, 704.1, 740.5, 782.8, 832.8, 864.7, 945.1, 1613.7, 2202.4),
    ),
    "sentinel2_6": (
        "Sentinel-2 blue, green, red, NIR (B8), SWIR 1, SWIR 2",
        (492.4, 559.8, 664.6, 832.8, 1613.7, 2202.4),
    ),
    "landsat5": ("Landsat 5 TM, reflective bands 1-5 and 7", (485.0, 560.0, 660.0, 830.0, 1650.0, 2215.0)),
    "landsat7": ("Landsat 7 ETM+, reflective bands 1-5 and 7", (485.0, 560.0, 660.0, 835.0, 1650.0, 2220.0)),
    "landsat8": ("Landsat 8 OLI, bands 1-7", (443.0, 482.0, 561.5, 654.5, 865.0, 1608.5, 2200.5)),
    "landsat9": ("Landsat 9 OLI-2, bands 1-7", (443.0, 482.0, 561.5, 654.5, 865.0, 1608.5, 2200.5)),
    "worldview2": ("WorldView-2, 8 multispectral bands", (427.0, 478.0, 546.0, 608.0, 659.0, 724.0, 833.0, 949.0)),
    "worldview3": ("WorldView-3, 8 VNIR bands", (425.0, 480.0, 545.0, 605.0, 660.0, 725.0, 832.5, 950.0)),
    "planetscope4": ("PlanetScope, 4 bands (blue, green, red, NIR)", (490.0, 565.0, 665.0, 865.0)),
    "planetscope8": ("PlanetScope SuperDove, 8 bands", (443.0, 490.0, 531.0, 565.0, 610.0, 665.0, 705.0, 865.0)),
}
# How far (nm) an adapter's band may lie outside the span of a raster's bands and still be taken from the nearest
# one, and the widest gap between two raster bands that an adapter band may be interpolated across without a warning.
EXTRAPOLATE_NM = 60.0
WIDE_GAP_NM = 150.0

_UNITS = {"nm": 1.0, "nanometers": 1.0, "nanometer": 1.0, "um": 1000.0, "µm": 1000.0, "micrometers": 1000.0}
_UNITS |= {"micrometer": 1000.0, "microns": 1000.0, "micron": 1000.0, "mm": 1e6}
_IN_TEXT = re.compile(r"(\d+(?:\.\d+)?)\s*(nm|um|µm|micrometers?|microns?)\b", re.IGNORECASE)


def to_nm(value: float, units: str | None) -> float:
    """A wavelength in nm from a value and its unit name (no unit: values below 30 are taken as micrometres)."""
    if units:
        factor = _UNITS.get(units.strip().lower())
        if factor is None:
            raise ValueError(f"unknown wavelength unit {units!r}")
        return value * factor
    return value * 1000.0 if value < 30 else value


def band_wavelength(ds: rasterio.DatasetReader, band: int) -> float | None:
    """The centre wavelength (nm) of one band from the raster's metadata, or None."""
    imagery = ds.tags(band, ns="IMAGERY")
    if "CENTRAL_WAVELENGTH_UM" in imagery:
        return float(imagery["CENTRAL_WAVELENGTH_UM"]) * 1000.0
    tags = {k.lower(): v for k, v in ds.tags(band).items()}
    if "wavelength" in tags:
        try:
            return to_nm(float(tags["wavelength"]), tags.get("wavelength_units"))
        except ValueError:
            return None
    match = _IN_TEXT.search(ds.descriptions[band - 1] or "")
    return to_nm(float(match.group(1)), match.group(2)) if match else None


def read_wavelengths(path: str, bands: Sequence[int]) -> list[float] | None:
    """The wavelengths (nm) of the chosen bands when the metadata gives every one of them, else None."""
    with rasterio.open(path) as ds:
        found = [band_wavelength(ds, b) for b in bands]
    return None if any(w is None for w in found) else [float(w) for w in found]  # type: ignore[arg-type]


def parse_wavelengths(text: str) -> list[float]:
    """User-given wavelengths: comma-separated numbers in nm, or in µm with a unit ("0.49,0.56 um")."""
    text = text.strip()
    units = None
    match = re.search(r"(nm|um|µm|micrometers?|microns?)\s*$", text, re.IGNORECASE)
    if match:
        units, text = match.group(1), text[: match.start()]
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError as exc:
        raise JobError(
            INVALID_INPUT,
            f"The wavelengths '{text}' are not a list of numbers.",
            "Give one centre wavelength per band, e.g. 490,560,665,842 (nm) or 0.49,0.56,0.665,0.842 um.",
        ) from exc
    if units is None and values and max(values) < 30:
        units = "um"
    return [to_nm(v, units or "nm") for v in values]


def resolve_wavelengths(
    path: str, bands: Sequence[int], given: str | None, sensor: str | None, what: str = "image"
) -> tuple[list[float], str]:
    """The wavelengths (nm) of the chosen bands and where they came from: the user's list, a sensor preset,
    else the raster's metadata. Raises a plain JobError when none gives one per band."""
    n = len(bands)
    if given:
        values, source = parse_wavelengths(given), "given"
    elif sensor:
        if sensor not in SENSORS:
            raise JobError(INVALID_INPUT, f"Unknown sensor '{sensor}'.", f"Choose one of: {', '.join(SENSORS)}.")
        values, source = list(SENSORS[sensor][1]), f"sensor {sensor}"
    else:
        found = read_wavelengths(path, bands)
        if found is None:
            raise JobError(
                INVALID_INPUT,
                f"The {what} does not say which wavelength each of its {n} bands measures.",
                "Choose the sensor (e.g. sentinel2_l2a, landsat8) or give the band centre wavelengths in nm.",
            )
        values, source = found, "raster metadata"
    if len(values) != n:
        raise JobError(
            INVALID_INPUT,
            f"{len(values)} wavelengths ({source}) were given for the {n} bands used of the {what}.",
            "Give one wavelength per band, or choose the bands that the sensor preset lists.",
        )
    if any(not 200 <= v <= 20000 for v in values):
        raise JobError(INVALID_INPUT, "Band wavelengths must lie between 200 nm and 20 µm.")
    return [float(v) for v in values], source


def resampling_matrix(source: Sequence[float], target: Sequence[float]) -> tuple[np.ndarray, list[str]]:
    """(len(target), len(source)) weights that make each target band from the source bands by linear
    interpolation in wavelength, and warnings for target bands interpolated across a wide gap.

    Target bands up to EXTRAPOLATE_NM outside the source span take the nearest source band; farther ones are
    refused (the raster does not measure that part of the spectrum)."""
    src = np.asarray(source, dtype=np.float64)
    order = np.argsort(src)
    s = src[order]
    weights = np.zeros((len(target), len(src)))
    notes: list[str] = []
    far = [t for t in target if t < s[0] - EXTRAPOLATE_NM or t > s[-1] + EXTRAPOLATE_NM]
    if far:
        raise JobError(
            INVALID_INPUT,
            f"The adapter needs bands at {', '.join(f'{t:.0f}' for t in far)} nm, outside what this raster measures "
            f"({s[0]:.0f}-{s[-1]:.0f} nm).",
            "Map a raster of a sensor that covers the adapter's bands, or fine-tune an adapter on this sensor.",
        )
    for i, t in enumerate(target):
        j = int(np.searchsorted(s, t))
        if j == 0 or j == len(s):
            weights[i, order[min(j, len(s) - 1)]] = 1.0
            continue
        lo, hi = s[j - 1], s[j]
        a = (t - lo) / (hi - lo)
        weights[i, order[j - 1]] += 1 - a
        weights[i, order[j]] += a
        if hi - lo > WIDE_GAP_NM and min(t - lo, hi - t) > EXTRAPOLATE_NM:
            notes.append(f"{t:.0f} nm (between {lo:.0f} and {hi:.0f} nm)")
    return weights.astype(np.float32), notes
