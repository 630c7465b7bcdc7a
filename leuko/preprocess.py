"""Image preprocessing from seed 002 (OADLS-ALDC): Wiener filtering and dynamic histogram
equalisation, with CLAHE as a documented variant.

Seed 002 denoises with a Wiener filter and then applies Dynamic Histogram Equalization
(DHE; Abdullah-Al-Wadud et al., IEEE Trans. Consumer Electronics 53(2), 2007) before
segmentation and classification. Both operate on the lightness channel only (CIELAB L*),
so the stain's hue, which carries the diagnostic colour, is left as it is.

Stain normalisation (Reinhard et al., IEEE Computer Graphics and Applications 21(5), 2001)
maps each image's CIELAB channel means and spreads onto a reference, so a rapid stain's
yellow background and a May-Gruenwald-Giemsa's pink one reach the network alike; it is an
addition of this project for cells from other labs, not part of seed 002.

Which steps run is part of each model's configuration (:class:`PreprocessConfig`), is saved
in the model card and so is applied identically at training and at prediction time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import cv2
import numpy as np
from scipy.signal import wiener

Equalization = Literal["none", "dhe", "clahe", "global"]
StainNormalization = Literal["none", "reinhard", "macenko"]

PBC_LAB_MEAN = (201.2, 139.3, 135.0)
"""CIELAB channel means (OpenCV's 8-bit scale) averaged over 300 images of the PBC training
split (CellaVision DM96, May-Gruenwald-Giemsa): the default Reinhard reference."""
PBC_LAB_STD = (41.4, 9.1, 14.3)
"""CIELAB channel standard deviations matching :data:`PBC_LAB_MEAN`."""


@dataclass
class PreprocessConfig:
    """Which classical preprocessing steps run before the network, and their settings.

    ``wiener_window`` is the side of the local window in pixels; ``clahe_clip`` is OpenCV's
    clip limit and ``clahe_tiles`` the number of tiles per side. ``stain_normalization``
    ``reinhard`` maps each image's CIELAB means and standard deviations onto
    ``stain_target_mean`` and ``stain_target_std`` (OpenCV's 8-bit LAB scale); ``macenko``
    estimates each image's two stain vectors and maps them onto torchstain's reference
    (:func:`macenko_normalize`).
    """

    wiener: bool = False
    wiener_window: int = 5
    equalization: Equalization = "none"
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    stain_normalization: StainNormalization = "none"
    stain_target_mean: tuple[float, float, float] = PBC_LAB_MEAN
    stain_target_std: tuple[float, float, float] = PBC_LAB_STD

    def __post_init__(self) -> None:
        self.stain_target_mean = tuple(self.stain_target_mean)
        self.stain_target_std = tuple(self.stain_target_std)
        if self.equalization not in get_args(Equalization):
            raise ValueError(f"equalization must be one of {', '.join(get_args(Equalization))}, "
                             f"not {self.equalization!r}")
        if self.stain_normalization not in get_args(StainNormalization):
            raise ValueError(f"stain_normalization must be one of {', '.join(get_args(StainNormalization))}, "
                             f"not {self.stain_normalization!r}")
        if not (self.wiener_window >= 3 and self.wiener_window % 2 == 1):
            raise ValueError(f"wiener_window must be an odd number of pixels, at least 3, not {self.wiener_window}")
        if not (self.clahe_clip > 0 and self.clahe_tiles >= 1):
            raise ValueError("clahe_clip must be above 0 and clahe_tiles at least 1")

    @property
    def denoises(self) -> bool:
        """Whether a Wiener filter or a lightness equalisation runs."""
        return self.wiener or self.equalization != "none"

    @property
    def is_identity(self) -> bool:
        return not self.denoises and self.stain_normalization == "none"


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
    else:
        lab[..., 0] = cv2.equalizeHist(lightness)
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def reinhard_normalize(rgb: np.ndarray, target_mean: tuple[float, float, float],
                       target_std: tuple[float, float, float]) -> np.ndarray:
    """Reinhard colour transfer of an HxWx3 uint8 RGB image onto CIELAB target statistics
    (OpenCV's 8-bit LAB scale); a flat channel keeps the target mean. The per-channel linear
    map is applied as a 256-entry lookup table (five times faster than mapping each pixel)."""
    lab = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2LAB)
    mean, std = (values.ravel().astype(np.float32) for values in cv2.meanStdDev(lab))
    scale = np.asarray(target_std, np.float32) / np.maximum(std, 1.0)
    levels = np.arange(256, dtype=np.float32)[:, None]
    table = np.clip((levels - mean) * scale + np.asarray(target_mean, np.float32), 0, 255).round().astype(np.uint8)
    return cv2.cvtColor(cv2.LUT(lab, table[:, None, :]), cv2.COLOR_LAB2RGB)


def macenko_normalize(rgb: np.ndarray) -> np.ndarray:
    """Macenko stain normalisation (Macenko et al., ISBI 2009) of an HxWx3 uint8 RGB image
    through torchstain's NumPy implementation, onto its reference stain vectors and maximum
    concentrations. An image with too few stained pixels to estimate two stains (a crop of
    background, a blank image) is returned as it is."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    try:
        normalised, _, _ = NumpyMacenkoNormalizer().normalize(np.ascontiguousarray(rgb), stains=False)
    except (np.linalg.LinAlgError, ValueError, IndexError):
        return rgb
    if not np.isfinite(normalised).all():
        return rgb
    return np.clip(normalised, 0, 255).astype(np.uint8)


def denoise_and_equalize(rgb: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """The configured Wiener filter and lightness equalisation, uint8 RGB in and out."""
    out = np.ascontiguousarray(rgb)
    if config.wiener:
        out = wiener_filter(out, config.wiener_window)
    if config.equalization != "none":
        out = _equalize_lightness(out, config)
    return out


def normalize_stain(rgb: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """The configured stain normalisation, uint8 RGB in and out (the input when none)."""
    if config.stain_normalization == "reinhard":
        return reinhard_normalize(rgb, config.stain_target_mean, config.stain_target_std)
    if config.stain_normalization == "macenko":
        return macenko_normalize(rgb)
    return rgb


def apply_preprocessing(rgb: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Run all configured steps on an HxWx3 uint8 RGB array: denoising and equalisation,
    then stain normalisation. Returns a new uint8 array (the input when nothing is set)."""
    if config.is_identity:
        return rgb
    return normalize_stain(denoise_and_equalize(rgb, config), config)
