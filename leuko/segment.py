"""Nucleus and cytoplasm segmentation of leukocytes, and cell finding in field images.

The classical segmenter follows seed 002 (Vinurajan et al.): Wiener filter and histogram
equalisation, colour-space nucleus detection, then marker-controlled watershed on the
morphological gradient. Masks use one byte per pixel: 0 background, 128 cytoplasm,
255 nucleus (the convention of ``../shared/data`` masks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from leuko.morphometrics import BACKGROUND, CYTOPLASM, NUCLEUS
from leuko.preprocess import PreprocessConfig, apply_preprocessing

MIN_SIDE = 24
"""Smallest image side, in pixels, that can hold a measurable cell."""


class SegmentationError(ValueError):
    """An image that cannot be segmented; the message says why."""


@dataclass
class ClassicalConfig:
    """Settings of the classical segmenter, relative to the crop so that the method works at
    any magnification of a single-cell crop: ``smoothing`` and ``background_margin`` are
    fractions of the crop's shorter side, ``min_nucleus_fraction`` a fraction of its area."""

    preprocess: PreprocessConfig = field(default_factory=lambda: PreprocessConfig(wiener=True, equalization="dhe"))
    smoothing: float = 0.01
    min_nucleus_fraction: float = 0.002
    background_margin: float = 0.04


def _normalise(channel: np.ndarray) -> np.ndarray:
    low, high = np.percentile(channel, (1, 99))
    return np.clip((channel - low) / max(high - low, 1e-6), 0.0, 1.0)


def nucleus_score(rgb: np.ndarray) -> np.ndarray:
    """How nucleus-like each pixel is, 0-1: Romanowsky-stained nuclei are the most saturated
    and the most blue-over-green pixels of a smear (HSV saturation averaged with B - G)."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.float32)
    rgbf = rgb.astype(np.float32)
    return 0.5 * _normalise(hsv[..., 1]) + 0.5 * _normalise(rgbf[..., 2] - rgbf[..., 1])


def absolute_nucleus_score(rgb: np.ndarray) -> np.ndarray:
    """Nucleus score on a fixed scale, 0-1 (saturation / 255 averaged with (B - G) / 128), for
    field images where a per-image normalisation would promote red cells when no nucleus is
    present. Romanowsky nuclei score about 0.6-0.8, red cells and cytoplasm below 0.35."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.float32)
    rgbf = rgb.astype(np.float32)
    return 0.5 * hsv[..., 1] / 255.0 + 0.5 * np.clip((rgbf[..., 2] - rgbf[..., 1]) / 128.0, 0.0, 1.0)


NUCLEUS_EVIDENCE = 0.2
"""Least absolute nucleus score (:func:`absolute_nucleus_score`, smoothed) that a crop's most
nucleus-like spot must reach for the classical segmenter to look for a nucleus at all. Every
image of the shared segmentation sets reaches 0.27 or more (most 0.5-0.8); blank, noise-only
and greyscale images stay below 0.15, where a per-image stretch would otherwise turn camera
noise into a 'nucleus'."""


def cell_score(rgb: np.ndarray) -> np.ndarray:
    """How leukocyte-like (nucleus or cytoplasm) each pixel is, 0-1: leukocyte cytoplasm is
    bluer than red cells (pink) and background (pale), so blue over the red-green mean."""
    rgbf = rgb.astype(np.float32)
    darkness = 1.0 - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    return 0.6 * _normalise(rgbf[..., 2] - (rgbf[..., 0] + rgbf[..., 1]) / 2) + 0.4 * _normalise(darkness)


def _otsu(values: np.ndarray) -> float:
    return float(threshold_otsu(values)) if np.ptp(values) > 1e-6 else float(values.max()) + 1.0


def _disc(radius: int) -> np.ndarray:
    radius = max(1, radius)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _central_components(binary: np.ndarray, min_area: int) -> np.ndarray:
    """Connected regions of at least ``min_area`` pixels that belong to the crop's central
    cell: the region nearest the centre, plus any region within one nucleus radius of it
    (the lobes of a segmented nucleus)."""
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    keep = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= min_area]
    if not keep:
        return np.zeros_like(binary, dtype=bool)
    centre = np.array(binary.shape[::-1], dtype=np.float64) / 2.0
    nearest = min(keep, key=lambda i: np.linalg.norm(centroids[i] - centre) / np.sqrt(stats[i, cv2.CC_STAT_AREA]))
    chosen = labels == nearest
    reach = np.sqrt(stats[nearest, cv2.CC_STAT_AREA] / np.pi)
    near_chosen = ndi.distance_transform_edt(~chosen) <= reach
    for i in keep:
        if i != nearest and np.any(near_chosen & (labels == i)):
            chosen |= labels == i
    return chosen


def require_min_side(height: int, width: int) -> None:
    """Raise :class:`SegmentationError` for an image under :data:`MIN_SIDE` pixels on a side."""
    if min(height, width) < MIN_SIDE:
        raise SegmentationError(f"image of {width}x{height} pixels is too small to segment "
                                f"(at least {MIN_SIDE}x{MIN_SIDE} needed)")


BLANK_STD = 2.0
"""Grey-level standard deviation (0-255) below which an image is one flat colour: no cell."""


def crop_problem(rgb: np.ndarray) -> str | None:
    """Why an image cannot show a cell to classify (smaller than :data:`MIN_SIDE` on a side,
    or one flat colour), or ``None``. A classifier answers for any input, so callers that do
    not segment first (the ``predict`` and ``explain`` commands) check this instead."""
    try:
        require_min_side(*rgb.shape[:2])
    except SegmentationError as exc:
        return str(exc)
    if cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY).std() < BLANK_STD:
        return "the image is blank (one flat colour): there is no cell to classify"
    return None


def classical_segment(rgb: np.ndarray, config: ClassicalConfig | None = None) -> np.ndarray:
    """Mask (H, W) uint8 of the central leukocyte of a single-cell crop: 0/128/255.

    Returns an all-zero mask when no nucleus is found (for example a blank image).
    """
    config = config or ClassicalConfig()
    height, width = rgb.shape[:2]
    require_min_side(height, width)
    side = min(height, width)
    clean = apply_preprocessing(rgb, config.preprocess)
    sigma = max(0.5, config.smoothing * side)
    nucleus_map = cv2.GaussianBlur(nucleus_score(clean), (0, 0), sigma)
    cell_map = cv2.GaussianBlur(cell_score(clean), (0, 0), sigma)
    evidence = cv2.GaussianBlur(absolute_nucleus_score(rgb), (0, 0), sigma).max()
    if np.ptp(nucleus_map) < 0.05 or evidence < NUCLEUS_EVIDENCE:
        return np.zeros((height, width), np.uint8)
    min_area = int(config.min_nucleus_fraction * height * width) + 1
    nucleus = nucleus_map > _otsu(nucleus_map)
    nucleus = cv2.morphologyEx(nucleus.astype(np.uint8), cv2.MORPH_OPEN, _disc(int(side * 0.01))).astype(bool)
    nucleus = _central_components(nucleus, min_area)
    if not nucleus.any():
        return np.zeros((height, width), np.uint8)
    nucleus = ndi.binary_fill_holes(nucleus)
    if nucleus.all():
        return np.zeros((height, width), np.uint8)

    candidate = (cell_map > _otsu(cell_map[~nucleus])) | nucleus
    candidate = ndi.binary_fill_holes(cv2.morphologyEx(candidate.astype(np.uint8), cv2.MORPH_CLOSE,
                                                       _disc(int(side * 0.02))).astype(bool))
    lbl, _ = ndi.label(candidate)
    touching = np.unique(lbl[nucleus])
    candidate = np.isin(lbl, touching[touching > 0]) | nucleus
    markers = np.zeros((height, width), np.int32)
    sure_background = ~cv2.dilate(candidate.astype(np.uint8), _disc(int(side * config.background_margin))).astype(bool)
    markers[sure_background] = 1
    inner = cv2.erode(candidate.astype(np.uint8), _disc(int(side * 0.03))).astype(bool)
    markers[inner | nucleus] = 2
    gradient = cv2.morphologyEx((cell_map * 255).astype(np.uint8), cv2.MORPH_GRADIENT, _disc(1))
    cell = watershed(gradient, markers) == 2
    cell = ndi.binary_fill_holes(cell) | nucleus
    mask = np.zeros((height, width), np.uint8)
    mask[cell] = CYTOPLASM
    mask[nucleus] = NUCLEUS
    return mask


def keep_central_cell(mask: np.ndarray) -> np.ndarray:
    """Keep the connected cell region nearest the image centre (relative to its size), fill
    its holes (by filling its outer contour: the same as SciPy's hole filling on 594 real
    masks with holes punched in, 0.07 ms against 1.2), and keep nucleus pixels only inside
    it: a crop's mask describes one cell."""
    cell = mask > 0
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(cell.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros_like(mask)
    centre = np.array(mask.shape[::-1], dtype=np.float64) / 2.0
    best = min(range(1, count), key=lambda i: np.linalg.norm(centroids[i] - centre) / np.sqrt(stats[i, cv2.CC_STAT_AREA]))
    outline, _ = cv2.findContours((labels == best).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    region = cv2.drawContours(np.zeros(mask.shape, np.uint8), outline, -1, 1, thickness=cv2.FILLED).astype(bool)
    out = np.zeros_like(mask)
    out[region] = CYTOPLASM
    out[region & (mask == NUCLEUS)] = NUCLEUS
    return out


class LearnedSegmenter:
    """The U-Net segmenter: loads once, segments crops of any size at its input resolution.
    ``backend`` is ``auto`` (OpenVINO or ONNX Runtime on the CPU where installed, else
    PyTorch), ``torch``, ``openvino`` or ``onnx``; see :mod:`leuko.onnx_backend` for why the
    pipeline keeps to one runtime."""

    def __init__(self, model_id: str | None = None, store=None, device: str | None = None,
                 backend: str = "auto") -> None:
        from leuko.modelstore import ModelStore

        store = store or ModelStore()
        loaded = store.load(model_id or store.default_id("segmentation"))
        self._setup(loaded.network, loaded.card, device, backend)

    @classmethod
    def from_network(cls, network, card, device: str | None = None, backend: str = "auto") -> "LearnedSegmenter":
        segmenter = cls.__new__(cls)
        segmenter._setup(network, card, device, backend)
        return segmenter

    def _setup(self, network, card, device: str | None, backend: str) -> None:
        import torch

        from leuko.device import pick_device
        from leuko.onnx_backend import onnx_network

        self.torch = torch
        self.card = card
        self.device = pick_device(device)
        self.network = network.to(self.device).eval().to(memory_format=torch.channels_last)
        self.size = int(card.input["input_size"])
        self.mean = np.array(card.input["mean"], np.float32)
        self.std = np.array(card.input["std"], np.float32)
        self.onnx = onnx_network(self.network, self.size, backend, self.device)

    def logits(self, rgb: np.ndarray) -> "torch.Tensor":
        """Class logits (1, 3, H, W) at the image's own resolution."""
        torch = self.torch
        height, width = rgb.shape[:2]
        resized = cv2.resize(rgb, (self.size, self.size), interpolation=cv2.INTER_AREA)
        tensor = torch.from_numpy(((resized.astype(np.float32) / 255.0 - self.mean) / self.std).transpose(2, 0, 1))
        with torch.inference_mode():
            if self.onnx is not None:
                logits = self.onnx(tensor[None])
            else:
                logits = self.network(tensor[None].to(self.device).contiguous(memory_format=torch.channels_last)).float()
            return torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)

    def segment(self, rgb: np.ndarray) -> np.ndarray:
        """Mask (H, W) uint8, 0/128/255, of the central cell of a crop."""
        height, width = rgb.shape[:2]
        require_min_side(height, width)
        classes = self.logits(rgb)[0].cpu().numpy().argmax(0)
        return keep_central_cell(np.array([BACKGROUND, CYTOPLASM, NUCLEUS], np.uint8)[classes])


FIELD_MIN_SIDE = 600
"""Images whose longer side reaches this many pixels are treated as fields of view when the
kind is ``auto``; single-cell crops in the public sets are 120-400 pixels."""


@dataclass
class FieldConfig:
    """Cell finding in a field image (:mod:`leuko.cellfind`). Sizes are in red-cell diameters
    of the same field (:func:`leuko.scale.red_cell_diameter_px`), so they hold at any
    magnification.

    ``detection_side``: the field is searched with its shorter side at most this many pixels.
    ``field_percentile``: the field's usual nucleus score (red cells and glass) is this
    percentile of it (85: it stays on red cells and glass while nuclei cover less than 15% of
    the field, as in a field crowded with blasts).
    ``region_level``: stained regions are the pixels above this fraction of the way from that
    usual score to the field's maximum; ``nucleus_level``: within a region, a pixel is a nucleus
    above this fraction of the way from the usual score to the region's own maximum (so a paler
    cell beside a dark one keeps its nucleus). ``min_rise``: a field whose maximum nucleus score
    is less than this above its usual score has no nucleus at all.
    ``min_fragment``: stained specks under this fraction of a red cell's area are dropped.
    ``lobe_gap``: stained parts closer than this are one nucleus group (a granulocyte's lobes).
    ``fallback_red_cell``: the red-cell diameter, as a fraction of the shorter side, taken when
    too few red cells are seen. ``min_probability``: the least probability from the candidate
    classifier for a leukocyte. ``cell_margin``: a cell reaches this far beyond its nucleus
    group's box; two nucleus groups one of whose centres lies in the other's cell are one.
    ``crop_scale``: each cell is cut out as a square this many times its nucleus group's
    longer side."""

    detection_side: int = 480
    field_percentile: float = 85.0
    region_level: float = 0.15
    nucleus_level: float = 0.35
    min_rise: float = 0.08
    min_fragment: float = 0.005
    lobe_gap: float = 0.4
    fallback_red_cell: float = 0.11
    min_probability: float = 0.5
    cell_margin: float = 0.4
    crop_scale: float = 1.8


@dataclass
class Cell:
    """One leukocyte found in an image: its box (x, y, width, height in pixels of the full
    image), its crop and mask (0/128/255, crop-sized), and whether the border cuts it."""

    box: tuple[int, int, int, int]
    crop: np.ndarray
    mask: np.ndarray
    touches_border: bool


@dataclass
class SegmentedImage:
    """All cells of one image, with the whole-image mask (0/128/255)."""

    kind: str
    mask: np.ndarray
    cells: list[Cell]


def find_nuclei_groups(rgb: np.ndarray, config: FieldConfig | None = None) -> list[tuple[int, int, int, int]]:
    """Boxes (x, y, w, h, full-image pixels) around each leukocyte's nucleus group in a field
    image, one per leukocyte: nucleus-stained candidates, lobes merged, each judged against
    the field's red cells (see :func:`leuko.cellfind.find_leukocytes`)."""
    from leuko.cellfind import find_leukocytes

    return [candidate.box for candidate in find_leukocytes(rgb, config)]


def _crop_box(box: tuple[int, int, int, int], shape: tuple[int, int], crop_scale: float) -> tuple[int, int, int, int]:
    """A square ``crop_scale`` times the box's longer side about its centre, clipped to the image."""
    x, y, w, h = box
    half = crop_scale * max(w, h) / 2
    cx, cy = x + w / 2, y + h / 2
    x0, y0, x1, y1 = int(np.floor(cx - half)), int(np.floor(cy - half)), int(np.ceil(cx + half)), int(np.ceil(cy + half))
    height, width = shape
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    return x0, y0, x1 - x0, y1 - y0


def _touches_image_border(mask: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int]) -> bool:
    """Whether a crop's cell mask reaches an edge of the crop that is also the image's edge,
    that is, whether the image border cuts the cell."""
    x, y, w, h = box
    height, width = shape
    ys, xs = np.nonzero(mask)
    return bool((x == 0 and xs.min() == 0) or (y == 0 and ys.min() == 0)
                or (x + w == width and xs.max() == w - 1) or (y + h == height and ys.max() == h - 1))


def resolve_kind(kind: str, height: int, width: int) -> str:
    """``crop`` or ``field`` for an image of ``height`` x ``width`` pixels: ``kind`` itself, or
    for ``auto`` a field when the longer side is at least :data:`FIELD_MIN_SIDE` pixels."""
    if kind == "auto":
        return "field" if max(height, width) >= FIELD_MIN_SIDE else "crop"
    return kind


def segment_image(rgb: np.ndarray, segment: Callable[[np.ndarray], np.ndarray], kind: str = "auto",
                  config: FieldConfig | None = None) -> SegmentedImage:
    """Segment a single-cell crop or every leukocyte of a field image.

    ``segment`` maps a crop to its 0/128/255 mask (:func:`classical_segment` or
    :meth:`LearnedSegmenter.segment`). ``kind`` is ``crop``, ``field`` or ``auto`` (a field
    when the longer side is at least :data:`FIELD_MIN_SIDE` pixels). A field with no
    leukocyte gives no cells and an empty mask.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise SegmentationError("expected an RGB uint8 image")
    height, width = rgb.shape[:2]
    require_min_side(height, width)
    kind = resolve_kind(kind, height, width)
    if kind == "crop":
        mask = segment(rgb)
        cells = [Cell((0, 0, width, height), rgb, mask, False)] if mask.any() else []
        return SegmentedImage("crop", mask, cells)
    config = config or FieldConfig()
    field_mask = np.zeros((height, width), np.uint8)
    cells = []
    for box in find_nuclei_groups(rgb, config):
        x, y, w, h = _crop_box(box, (height, width), config.crop_scale)
        if min(w, h) < MIN_SIDE:
            continue
        crop = np.ascontiguousarray(rgb[y:y + h, x:x + w])
        mask = segment(crop)
        if not (mask == NUCLEUS).any():
            continue
        region = field_mask[y:y + h, x:x + w]
        np.copyto(region, mask, where=(mask > region))
        cells.append(Cell((x, y, w, h), crop, mask, _touches_image_border(mask, (x, y, w, h), (height, width))))
    return SegmentedImage("field", field_mask, cells)


def chosen_segmenter(method: str = "auto", model_id: str | None = None):
    """The card of the learned segmenter that ``method`` resolves to, or ``None`` for the
    classical one. ``auto`` takes whichever had the higher mean Dice on the validation masks
    (both are measured when the learned one is trained, and kept in its card), and the
    classical one when no learned segmenter is installed; ``learned`` raises
    :class:`leuko.modelstore.ModelNotFoundError` when none is."""
    from leuko.modelstore import ModelNotFoundError, ModelStore
    from leuko.segtrain import mean_dice

    if method == "classical":
        return None
    store = ModelStore()
    try:
        card, _ = store.locate(model_id or store.default_id("segmentation"))
    except ModelNotFoundError:
        if method == "learned":
            raise
        return None
    metrics = card.metrics
    if method == "auto" and "classical_val" in metrics and mean_dice(metrics["classical_val"]) > mean_dice(metrics["val"]):
        return None
    return card


def segmenter_for(card, device: str | None = None, backend: str = "auto") -> Callable[[np.ndarray], np.ndarray]:
    """The crop -> mask function of a learned segmenter's card, or the classical one for
    ``None`` (what :func:`chosen_segmenter` returns). ``backend`` is the learned segmenter's
    (see :class:`LearnedSegmenter`)."""
    if card is None:
        return classical_segment
    return LearnedSegmenter(card.id, device=device, backend=backend).segment


def segmenter_weights(card) -> str:
    """The weights digest of a learned segmenter's card, or ``classical`` for ``None``."""
    return card.weights_sha256 if card is not None else "classical"


def make_segmenter(method: str = "auto", model_id: str | None = None, device: str | None = None,
                   backend: str = "auto") -> Callable[[np.ndarray], np.ndarray]:
    """A crop -> mask function: the segmenter :func:`chosen_segmenter` resolves ``method`` to."""
    return segmenter_for(chosen_segmenter(method, model_id), device, backend)
