"""Per-cell morphometrics from a three-level mask (0 background, 128 cytoplasm, 255 nucleus).

Hematologists judge a blast by nucleus size, nucleus-to-cytoplasm ratio, contour and
chromatin; these are the measurable counterparts. Areas are in pixels, and in square
micrometres when the pixel size (micrometres per pixel) is known.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from scipy.ndimage import binary_erosion
from skimage.feature import graycomatrix, graycoprops
from skimage.measure import label, perimeter_crofton, regionprops

NUCLEUS, CYTOPLASM, BACKGROUND = 255, 128, 0
"""The labels of a segmentation mask (single-channel, as in the shared data's masks)."""


@dataclass
class Morphometrics:
    """Shape and texture of one cell. Ratios are unitless; ``*_px`` in pixels (areas in
    square pixels); ``*_um2`` in square micrometres or ``None`` without a pixel size."""

    cell_area_px: int
    nucleus_area_px: int
    cytoplasm_area_px: int
    cell_area_um2: float | None
    nucleus_area_um2: float | None
    nc_ratio: float | None
    nucleus_fraction: float
    nucleus_perimeter_px: float
    nucleus_circularity: float
    nucleus_solidity: float
    nucleus_convexity: float
    contour_irregularity: float
    nuclear_lobes: int
    nucleus_intensity_mean: float
    nucleus_intensity_std: float
    chromatin_contrast: float
    chromatin_homogeneity: float
    chromatin_energy: float
    chromatin_correlation: float

    def as_dict(self) -> dict:
        return asdict(self)


def shape_measures(binary: np.ndarray) -> dict[str, float]:
    """Shape of the largest region of ``binary``: perimeter (Crofton estimate, which unlike a
    pixel-chain length does not overstate diagonal edges), circularity (4 pi A / P^2, 1 for a
    disc), solidity (A / convex hull area), convexity (hull perimeter / perimeter) and contour
    irregularity (coefficient of variation of the centroid-to-boundary distance, 0 for a disc)."""
    labels = label(binary.astype(bool))
    regions = regionprops(labels)
    if not regions or max(r.area for r in regions) < 5:
        return {"perimeter": 0.0, "circularity": 0.0, "solidity": 0.0, "convexity": 0.0, "irregularity": 0.0}
    region = max(regions, key=lambda r: r.area)
    image = np.pad(region.image, 1)
    hull = np.pad(region.image_convex, 1)
    perimeter = float(perimeter_crofton(image, 4))
    boundary = np.argwhere(image & ~binary_erosion(image))
    cy, cx = np.argwhere(image).mean(axis=0)
    radii = np.hypot(boundary[:, 0] - cy, boundary[:, 1] - cx)
    return {"perimeter": perimeter,
            "circularity": float(min(4 * math.pi * region.area / max(perimeter ** 2, 1e-9), 1.0)),
            "solidity": float(region.solidity),
            "convexity": float(min(perimeter_crofton(hull, 4) / max(perimeter, 1e-9), 1.0)),
            "irregularity": float(radii.std() / max(radii.mean(), 1e-9))}


def count_lobes(nucleus: np.ndarray) -> int:
    """Nuclear lobes: regions left after an opening that cuts thin chromatin bridges, with a
    disc of 1/6 of the nucleus' equivalent radius; tiny fragments (< 5% of the nucleus) are ignored."""
    area = int(np.count_nonzero(nucleus))
    if area == 0:
        return 0
    radius = max(1, int(round(math.sqrt(area / math.pi) / 6)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    opened = cv2.morphologyEx(nucleus.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    count, _, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    return max(1, int(np.sum(stats[1:, cv2.CC_STAT_AREA] >= 0.05 * area)))


def chromatin_texture(gray: np.ndarray, nucleus: np.ndarray, levels: int = 32) -> dict[str, float]:
    """Grey-level co-occurrence features of the nucleus (scikit-image), distance 1 pixel,
    averaged over 0, 45, 90 and 135 degrees; pixels outside the nucleus are excluded."""
    if np.count_nonzero(nucleus) < 4:
        return {"contrast": 0.0, "homogeneity": 0.0, "energy": 0.0, "correlation": 0.0}
    ys, xs = np.nonzero(nucleus)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    values = gray[box].astype(np.float64)
    inside = nucleus[box]
    low, high = values[inside].min(), values[inside].max()
    quantised = np.where(inside, 1 + np.floor((values - low) / max(high - low, 1e-9) * (levels - 2)), 0).astype(np.uint8)
    matrix = graycomatrix(quantised, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=levels)
    matrix[0, :, :, :] = 0
    matrix[:, 0, :, :] = 0
    matrix = matrix.astype(np.float64)
    totals = matrix.sum(axis=(0, 1), keepdims=True)
    matrix = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    return {name: float(np.nan_to_num(graycoprops(matrix, name).mean()))
            for name in ("contrast", "homogeneity", "energy", "correlation")}


def measure_cell(mask: np.ndarray, rgb: np.ndarray, pixel_size_um: float | None = None) -> Morphometrics:
    """Morphometrics of the one cell in ``mask`` (values 0/128/255), using ``rgb`` for the
    nuclear intensity and chromatin texture. ``pixel_size_um`` is micrometres per pixel."""
    nucleus = mask == NUCLEUS
    cell = mask != BACKGROUND
    nucleus_area, cell_area = int(nucleus.sum()), int(cell.sum())
    cytoplasm_area = cell_area - nucleus_area
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    shape = shape_measures(nucleus)
    texture = chromatin_texture(gray, nucleus)
    square_um = pixel_size_um ** 2 if pixel_size_um else None
    values = gray[nucleus].astype(np.float64)
    return Morphometrics(
        cell_area_px=cell_area, nucleus_area_px=nucleus_area, cytoplasm_area_px=cytoplasm_area,
        cell_area_um2=cell_area * square_um if square_um else None,
        nucleus_area_um2=nucleus_area * square_um if square_um else None,
        nc_ratio=nucleus_area / cytoplasm_area if cytoplasm_area > 0 else None,
        nucleus_fraction=nucleus_area / cell_area if cell_area else 0.0,
        nucleus_perimeter_px=shape["perimeter"], nucleus_circularity=shape["circularity"],
        nucleus_solidity=shape["solidity"], nucleus_convexity=shape["convexity"],
        contour_irregularity=shape["irregularity"], nuclear_lobes=count_lobes(nucleus),
        nucleus_intensity_mean=float(values.mean()) if values.size else 0.0,
        nucleus_intensity_std=float(values.std()) if values.size else 0.0,
        chromatin_contrast=texture["contrast"], chromatin_homogeneity=texture["homogeneity"],
        chromatin_energy=texture["energy"], chromatin_correlation=texture["correlation"],
    )
