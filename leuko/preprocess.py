"""Image preprocessing from seed 002 (OADLS-ALDC): Wiener filtering and dynamic histogram
equalisation, with CLAHE as a documented variant.

Seed 002 denoises with a Wiener filter and then applies Dynamic Histogram Equalization
(DHE; Abdullah-Al-Wadud et al., IEEE Trans. Consumer Electronics 53(2), 2007) before
segmentation and classification. Both operate on the lightness channel only (CIELAB L*),
so the stain's hue, which carries the diagnostic colour, is left as it is.

Which steps run is part of each model's configuration (:class:`PreprocessConfig`), is saved
in the model card and so is applied identically at training and at prediction time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from scipy.signal import wiener

Equalization = Literal["none", "dhe", "clahe", "global"]


@dataclass
class PreprocessConfig:
    """Which classical preprocessing steps run before the network, and their settings.

    ``wiener_window`` is the side of the local window in pixels; ``clahe_clip`` is OpenCV's
    clip limit and ``clahe_tiles`` the number of tiles per side.
    """

    wiener: bool = False
    wiener_window: int = 5
    equalization: Equalization = "none"
    clahe_clip: float = 2.0
    clahe_tiles: int = 8

    @property
    def is_identity(self) -> bool:
        return not self.wiener and self.equalization == "none"


def wiener_filter(rgb: np.ndarray, window: int = 5) -> np.ndarray:
    """Adaptive (local-statistics) Wiener filter of each RGB channel, uint8 in and out.

    The noise power is estimated per channel as the mean local variance, as in
    ``scipy.signal.wiener``; flat background is smoothed, cell edges are kept.
    """
    out = np.empty_like(rgb)
    for channel in range(rgb.shape[2]):
        plane = rgb[..., channel].astype(np.float64)
        if np.ptp(plane) == 0:
            out[..., channel] = rgb[..., channel]
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            filtered = wiener(plane, (window, window))
        out[..., channel] = np.clip(np.nan_to_num(filtered, nan=0.0), 0, 255).round().astype(np.uint8)
    return out


def _split_at_local_minima(histogram: np.ndarray) -> list[tuple[int, int]]:
    """Split the occupied grey range [low, high] of a smoothed histogram at its local minima."""
    occupied = np.flatnonzero(histogram > 0)
    low, high = int(occupied[0]), int(occupied[-1])
    smooth = np.convolve(histogram, np.ones(3) / 3.0, mode="same")
    inner = np.arange(low + 1, high)
    minima = inner[(smooth[inner] < smooth[inner - 1]) & (smooth[inner] <= smooth[inner + 1])]
    bounds = [low, *minima.tolist(), high]
    return [(bounds[i] if i == 0 else bounds[i] + 1, bounds[i + 1]) for i in range(len(bounds) - 1)
            if (bounds[i] if i == 0 else bounds[i] + 1) <= bounds[i + 1]]


def _split_unbalanced(histogram: np.ndarray, segment: tuple[int, int]) -> list[tuple[int, int]]:
    """DHE's dominance check: a sub-histogram whose mean +/- one standard deviation holds
    much more or less than 68.3% of its pixels is split at mean - sd and mean + sd."""
    low, high = segment
    levels = np.arange(low, high + 1)
    counts = histogram[low:high + 1]
    total = counts.sum()
    if total == 0 or high - low < 3:
        return [segment]
    mean = float((levels * counts).sum() / total)
    sd = float(np.sqrt(((levels - mean) ** 2 * counts).sum() / total))
    a, b = int(round(mean - sd)), int(round(mean + sd))
    share = counts[(levels >= a) & (levels <= b)].sum() / total
    if abs(share - 0.683) < 0.1 or not (low < a < b < high):
        return [segment]
    return [(low, a), (a + 1, b), (b + 1, high)]


def dynamic_histogram_equalization(gray: np.ndarray) -> np.ndarray:
    """DHE of a uint8 greyscale image (Abdullah-Al-Wadud et al., 2007).

    The histogram is cut at its local minima, each part is given an output grey range in
    proportion to its span times log10 of its pixel count, and each part is equalised
    inside its own range, so no grey band swamps the others (the washed-out look that
    global equalisation gives smear backgrounds).
    """
    histogram = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    if np.count_nonzero(histogram) < 2:
        return gray.copy()
    segments = [part for seg in _split_at_local_minima(histogram)
                for part in _split_unbalanced(histogram, seg)]
    spans = np.array([high - low + 1 for low, high in segments], dtype=np.float64)
    masses = np.array([histogram[low:high + 1].sum() for low, high in segments])
    weights = spans * np.log10(np.maximum(masses, 1.0) + 1.0)
    ranges = 255.0 * weights / weights.sum()
    lut = np.arange(256, dtype=np.float64)
    start = 0.0
    for (low, high), width, mass in zip(segments, ranges, masses):
        if mass > 0:
            cdf = np.cumsum(histogram[low:high + 1]) / mass
            lut[low:high + 1] = start + cdf * width
        start += width
    return np.clip(lut, 0, 255).round().astype(np.uint8)[gray]


def _equalize_lightness(rgb: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    lightness = lab[..., 0]
    if config.equalization == "dhe":
        lab[..., 0] = dynamic_histogram_equalization(lightness)
    elif config.equalization == "clahe":
        clahe = cv2.createCLAHE(clipLimit=config.clahe_clip,
                                tileGridSize=(config.clahe_tiles, config.clahe_tiles))
        lab[..., 0] = clahe.apply(lightness)
    elif config.equalization == "global":
        lab[..., 0] = cv2.equalizeHist(lightness)
    else:
        raise ValueError(f"unknown equalization {config.equalization!r}; "
                         "use none, dhe, clahe or global")
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def apply_preprocessing(rgb: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Run the configured steps on an HxWx3 uint8 RGB array; returns a new uint8 array."""
    if config.is_identity:
        return rgb
    out = np.ascontiguousarray(rgb)
    if config.wiener:
        out = wiener_filter(out, config.wiener_window)
    if config.equalization != "none":
        out = _equalize_lightness(out, config)
    return out
