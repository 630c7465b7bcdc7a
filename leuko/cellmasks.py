"""Cell masks of training images, and the background replacement they make possible.

A classifier trained on one lab's crops also learns that lab's smear around the cell: the
red-cell density, the plasma colour, the camera's noise. None of that says what the white
cell is, and all of it changes at the next lab. Replacing the background of part of the
training crops (keeping the cell) takes that shortcut away, so the network looks at the cell.

The cell outline comes from the crop's annotated mask when the dataset has one, else from
the learned segmenter, computed once per image and cached under ``$LEUKO_HOME/cache``.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image

from leuko.data import Sample
from leuko.images import load_image
from leuko.paths import leuko_home
from leuko.segment import SegmentationError

FEATHER_FRACTION = 0.02
"""Dilation and feathering of the cell outline, as a fraction of the crop's shorter side: the
replaced background starts just outside the cell, with a soft edge and no hard seam."""

MIN_BACKGROUND_FRACTION = 0.05
"""Crops whose cell leaves less background than this are left as they are."""


def mask_cache_dir(segmenter_id: str, weights_sha256: str) -> Path:
    """The cache folder of one segmenter's masks; new weights get a new folder."""
    return leuko_home() / "cache" / "cell_masks" / f"{segmenter_id}-{weights_sha256[:12]}"


def _cache_name(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:32] + ".png"


def cell_mask_files(samples: Sequence[Sample], progress: Callable[[int, int], None] | None = None,
                    segmenter=None) -> list[Path]:
    """One mask file per sample (PNG, non-zero inside the cell): its annotated mask when it
    has one, else the learned segmenter's mask, segmented on first use and then cached.

    A crop too small to segment gets an empty mask, which leaves its background as it is.
    ``progress(done, total)`` is called while masks are being computed; ``segmenter`` (a
    :class:`leuko.segment.LearnedSegmenter`) defaults to the installed default one, loaded
    only when some mask is not cached yet.
    """
    missing = [s for s in samples if s.mask is None]
    if not missing:
        return [Path(s.mask) for s in samples]
    if segmenter is None:
        from leuko.modelstore import ModelStore

        store = ModelStore()
        card, _ = store.locate(store.default_id("segmentation"))
    else:
        card = segmenter.card
    folder = mask_cache_dir(card.id, card.weights_sha256)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[Path, Path] = {}
    for sample in missing:
        files.setdefault(Path(sample.path), folder / _cache_name(Path(sample.path)))
    todo = [(image, mask) for image, mask in files.items() if not mask.is_file()]
    if todo and segmenter is None:
        from leuko.segment import LearnedSegmenter

        segmenter = LearnedSegmenter(card.id, store=store)
    for done, (image, mask) in enumerate(todo, 1):
        rgb = np.asarray(load_image(image))
        try:
            outline = segmenter.segment(rgb)
        except SegmentationError:
            outline = np.zeros(rgb.shape[:2], np.uint8)
        partial = mask.with_suffix(f".{os.getpid()}.part.png")
        cv2.imwrite(str(partial), outline)
        partial.replace(mask)
        if progress is not None and (done % 200 == 0 or done == len(todo)):
            progress(done, len(todo))
    return [Path(s.mask) if s.mask is not None else files[Path(s.path)] for s in samples]


class RandomBackground:
    """With probability ``probability``, replaces everything outside the cell with either a
    plain smear background (the crop's own background colour, slightly shifted, with sensor
    noise) or a strongly blurred copy of the crop's own surroundings (colour kept, red cells
    and debris gone). The cell is untouched."""

    def __init__(self, probability: float) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"background replacement probability must be within 0-1, not {probability}")
        self.probability = probability

    def __call__(self, image: Image.Image, cell: np.ndarray) -> Image.Image:
        if random.random() >= self.probability:
            return image
        rgb = np.asarray(image)
        height, width = rgb.shape[:2]
        if cell.shape != (height, width):
            cell = cv2.resize(cell.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        radius = max(1, round(FEATHER_FRACTION * min(height, width)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        grown = cv2.dilate((cell > 0).astype(np.uint8), kernel) > 0
        if grown.all() or not grown.any() or (~grown).mean() < MIN_BACKGROUND_FRACTION:
            return image
        colour = np.median(rgb[~grown], axis=0).astype(np.float32)
        if random.random() < 0.5:
            shifted = np.clip(colour * np.random.normal(1.0, 0.04, 3), 0, 255).astype(np.float32)
            background = shifted + np.random.normal(0.0, 3.0, rgb.shape).astype(np.float32)
        else:
            filled = rgb.astype(np.float32)
            filled[grown] = colour
            background = cv2.GaussianBlur(filled, (0, 0), 0.15 * min(height, width))
        alpha = cv2.GaussianBlur(grown.astype(np.float32), (0, 0), radius / 2.0)[..., None]
        blended = alpha * rgb.astype(np.float32) + (1.0 - alpha) * background
        return Image.fromarray(np.clip(blended, 0, 255).round().astype(np.uint8))
