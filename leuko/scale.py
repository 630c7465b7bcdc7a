"""Physical scale of a smear image from its red cells.

Every peripheral smear shows red cells, and a normal red cell is about 7.5 µm across, so their
median diameter in pixels gives the image's scale (micrometres per pixel) when the user gives
none, and lets cell finding judge sizes relative to the red cells of the same field instead of
in pixels, whatever the magnification.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

RED_CELL_UM = 7.5
"""Diameter of a normal red cell in micrometres."""


@dataclass
class RedCellConfig:
    """Settings of :func:`red_cell_diameter_px`.

    ``work_side``: the image is measured with its shorter side at most this many pixels (speed;
    diameters are given back at the input's scale). ``min_cells``: fewer round red cells than
    this gives no estimate. ``min_diameter_px``: smaller blobs (platelets, noise) at the working
    scale are ignored. ``disc_fill``: a blob counts as one disc when its area is within this
    range of the area of a disc of its largest inscribed circle (touching cells and clumps are
    above it). ``max_nucleus_score``: blobs containing a pixel more nucleus-stained than this
    (leukocytes) are left out, and their pixels do not set the threshold. ``min_density``: the
    least summed optical density (log10 units) of a red-cell pixel; the glass's noise is below.
    ``stain_spread``: discs whose mean nucleus score exceeds the discs' median by more than
    this are round leukocytes (a lymphocyte, a blast), not red cells.
    """

    work_side: int = 512
    min_cells: int = 3
    min_diameter_px: float = 8.0
    disc_fill: tuple[float, float] = (0.75, 1.6)
    max_nucleus_score: float = 0.6
    min_density: float = 0.05
    stain_spread: float = 0.1


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """Summed optical density (unitless, log10) of each pixel against the image's background
    colour, the median of the brighter Otsu class of the grey levels (the glass between cells)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    bright = grey > threshold_otsu(grey) if np.ptp(grey) > 0 else np.ones_like(grey, bool)
    background = np.median(rgb[bright].astype(np.float32), axis=0) + 1.0
    return np.log10(background / (rgb.astype(np.float32) + 1.0)).clip(0, None).sum(axis=2)


def red_cell_diameter_px(rgb: np.ndarray, config: RedCellConfig | None = None) -> float | None:
    """Median red-cell diameter in pixels of an RGB uint8 image, or ``None`` when fewer than
    ``config.min_cells`` separate red cells are seen.

    Red cells are the discs denser than the background glass (summed optical density above
    Otsu's threshold between glass and red cells, computed without nucleus-stained pixels and
    with the densest 5% clipped, so a leukocyte or a dark nucleus does not set it; central
    pallor filled). Each blob that is a single disc (its area close to that of its largest
    inscribed circle), whole (not cut by the image border) and stained like the other discs
    (not a leukocyte) gives its equivalent diameter (that of a disc of the same area); the
    median is taken over the discs' area, so that specks passing for small discs weigh little.
    Works on fields and on single-cell crops with a few whole red cells around the leukocyte.
    Divide :data:`RED_CELL_UM` (7.5 µm) by the result for micrometres per pixel.
    """
    from leuko.segment import absolute_nucleus_score

    config = config or RedCellConfig()
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 8:
        return None
    height, width = rgb.shape[:2]
    scale = min(1.0, config.work_side / min(height, width))
    small = cv2.resize(rgb, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA) \
        if scale < 1 else np.ascontiguousarray(rgb)
    density = cv2.GaussianBlur(_optical_density(small), (0, 0), 1.0)
    nucleus_score = absolute_nucleus_score(small)
    glass_or_red = density[nucleus_score <= min(config.max_nucleus_score,
                                                float(np.median(nucleus_score)) + 2 * config.stain_spread)]
    stained = glass_or_red[glass_or_red > config.min_density]
    if stained.size < config.min_cells * config.min_diameter_px ** 2:
        return None
    clipped = np.minimum(glass_or_red, np.percentile(stained, 95))
    dense = density > max(config.min_density, threshold_otsu(clipped))
    dense = cv2.morphologyEx(dense.astype(np.uint8), cv2.MORPH_OPEN,
                             cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    dense = ndi.binary_fill_holes(dense)
    labels, count = ndi.label(dense)
    if count == 0:
        return None
    inscribed = ndi.maximum(ndi.distance_transform_edt(dense), labels, np.arange(1, count + 1))
    areas = ndi.sum_labels(dense, labels, np.arange(1, count + 1))
    nucleus = ndi.maximum(nucleus_score, labels, np.arange(1, count + 1))
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    whole = ~np.isin(np.arange(1, count + 1), border)
    fill = areas / np.maximum(np.pi * inscribed ** 2, 1e-6)
    diameters = np.sqrt(4 * areas / np.pi)
    disc = (whole & (fill >= config.disc_fill[0]) & (fill <= config.disc_fill[1])
            & (diameters >= config.min_diameter_px) & (nucleus <= config.max_nucleus_score))
    stain = ndi.mean(nucleus_score, labels, np.arange(1, count + 1))
    if disc.any():
        disc &= stain <= np.median(stain[disc]) + config.stain_spread
    if disc.sum() < config.min_cells:
        return None
    chosen = np.sort(diameters[disc])
    weight = np.cumsum(chosen ** 2)
    return float(chosen[np.searchsorted(weight, weight[-1] / 2)] / scale)
