"""Pixel checks when a tile index is built: a few windows of every image are read and checked
against the value range the run maps to [-1, 1], so that NaNs, a wrong range (float32 imagery
in 0-255 clipped at 1.0, 12-bit data squeezed into an eighth of the range) or a truncated file
fail in ``data info`` / ``data prepare`` naming the file, not mid-training.

Windows sampled per image: the first, the last (a truncated body loses its tail), and up to
``SAMPLES - 2`` spread between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsseg.errors import DataError

SAMPLES = 6
MAX_OUTSIDE = 0.005  # share of sampled valid pixels allowed outside the value range (rounding, rare outliers)
TWELVE_BIT = 4095


@dataclass(frozen=True)
class PixelSample:
    path: Path
    dtype: str
    value_range: tuple[float, float]
    lo: float
    hi: float
    pixels: int


def read_error(path: Path, row: int, col: int, exc: Exception) -> DataError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DataError(f"{path}: cannot read pixels at window row {row}, col {col} ({reason}); the file may be truncated or corrupt")


_DTYPE_RANGES = {"uint8": (0.0, 255.0), "int8": (-128.0, 127.0), "uint16": (0.0, 65535.0), "int16": (-32768.0, 32767.0)}


def default_value_range(dtype: str) -> tuple[float, float]:
    """The raw range mapped to [-1, 1] when data.value_range is not set: the integer dtype's, else [0, 1]."""
    return _DTYPE_RANGES.get(dtype, (0.0, 1.0))


def sample_windows(all_windows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The first, the last and up to SAMPLES - 2 evenly spread (row, col) windows."""
    if len(all_windows) <= SAMPLES:
        return all_windows
    picks = np.linspace(0, len(all_windows) - 1, SAMPLES).round().astype(int)
    return [all_windows[i] for i in sorted(set(picks.tolist()))]


def check_image(path: Path, src, windows: list[tuple[int, int]], tile: int, bands: list[int] | None,
                value_range: tuple[float, float] | None, dtype: str) -> PixelSample:
    """Read ``windows`` of the open raster ``src``; raise DataError naming ``path`` on a read
    error, non-finite pixels, or values outside the range that maps to [-1, 1]."""
    explicit = value_range is not None
    lo_r, hi_r = value_range if explicit else default_value_range(dtype)
    lo, hi, total, outside = sample_stats(path, src, windows, tile, bands, (lo_r, hi_r))
    if total and outside / total > MAX_OUTSIDE:
        where = "data.value_range" if explicit else f"the {dtype} default range"
        raise DataError(f"{path}: {100 * outside / total:.1f} % of sampled pixels lie outside {where} [{lo_r:g}, {hi_r:g}] "
                        f"(sampled values {lo:g} .. {hi:g}); set data.value_range to the imagery's range, e.g. "
                        "[{:g}, {:g}]".format(*suggested_range(lo, hi)))
    if not explicit and dtype == "uint16" and total and hi is not None and 0 < hi <= TWELVE_BIT:
        raise DataError(f"{path}: uint16 values reach only {hi:g} (12-bit data?): mapped with the uint16 range [0, 65535] they "
                        f"fill 1/16 of [-1, 1]; set data.value_range: [0, {TWELVE_BIT}] (or [0, 65535] to keep the full range)")
    return PixelSample(path, dtype, (lo_r, hi_r), lo if lo is not None else float("nan"), hi if hi is not None else float("nan"), total)


def sample_stats(path: Path, src, windows: list[tuple[int, int]], tile: int, bands: list[int] | None,
                 value_range: tuple[float, float]) -> tuple[float | None, float | None, int, int]:
    """(lowest, highest, valid values read, values outside ``value_range``) over ``windows``; a
    read error or a NaN/inf pixel is a DataError naming ``path``."""
    from rasterio.windows import Window

    lo_r, hi_r = value_range
    lo = hi = None
    total = outside = 0
    for r, c in windows:
        win = Window(c, r, tile, tile)
        try:
            data = src.read(bands, window=win) if bands else src.read(window=win)
            valid = src.dataset_mask(window=win) > 0
        except Exception as exc:  # noqa: BLE001 - rasterio/GDAL raise several types for a broken body
            raise read_error(path, r, c, exc) from None
        px = data[:, valid].astype(np.float64)
        if px.size == 0:
            continue
        bad = ~np.isfinite(px)
        if bad.any():
            band = int(np.nonzero(bad.any(axis=1))[0][0]) + 1
            raise DataError(f"{path}: {int(bad.sum())} NaN/inf pixels in band {band} (window row {r}, col {c}); "
                            "mark them as nodata (or mask them) so that they are left out")
        lo = float(px.min()) if lo is None else min(lo, float(px.min()))
        hi = float(px.max()) if hi is None else max(hi, float(px.max()))
        total += px.size
        outside += int(((px < lo_r) | (px > hi_r)).sum())
    return lo, hi, total, outside


def suggested_range(lo: float, hi: float) -> tuple[float, float]:
    """A round range holding [lo, hi]: 0 (or the floor of a negative lowest value) to the next of
    1, 255, 1023, 4095, 10000, 65535."""
    return _nice_floor(lo), _nice_ceil(hi)


def _nice_floor(x: float) -> float:
    return 0.0 if x >= 0 else float(np.floor(x))


def _nice_ceil(x: float) -> float:
    for edge in (1.0, 255.0, 1023.0, 4095.0, 10000.0, 65535.0):
        if x <= edge:
            return edge
    return float(np.ceil(x))
