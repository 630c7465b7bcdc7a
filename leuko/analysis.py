"""One analysis of one image: classify, explain, segment and measure every cell, summarise.

This is what the dashboard's Analyze page and the case log run. An :class:`Analyzer` loads
the classifier, its CAM object and the segmenter once and reuses them for every image. A
single-cell crop gives one cell; a field image gives every leukocyte found, each classified
and explained, and a differential count.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from leuko.clinical import ClinicalValues, Flag, flags
from leuko.concordance import findings
from leuko.explain import Explainer, draw_mask_outlines, energy_inside, overlay
from leuko.images import ImageError, ImageInput, load_image, load_mask
from leuko.morphometrics import measure_cell, shape_measures
from leuko.predict import BATCH_SIZE, Prediction, Predictor
from leuko.data import physical_side, square_about
from leuko.scale import RED_CELL_UM, red_cell_diameter_px
from leuko.segment import (Cell, SegmentationError, chosen_segmenter, crop_problem, segment_image, segmenter_for,
                           segmenter_weights)
from leuko.store import CellEntry, ImageEntry, PredictionEntry
from leuko.tasks import Task

OFF_CELL_ENERGY = 0.5
"""Below this share of CAM energy inside the segmented cell, the summary warns that the
model looked mostly outside the cell."""

MERGED_OUTLINE_SHARE = 0.7
"""Above this share of a crop's area, its cell outline most likely spans several cells (a
multi-cell view, such as the Aria images) and the summary says so. Single-cell crops in the
public sets average 0.13 (PBC) to 0.23 (ALL-IDB2)."""

MERGED_OUTLINE_SOLIDITY = 0.8
"""Below this solidity (area over convex-hull area), a crop's cell outline most likely joins
several cells, and the summary says so. The learned segmenter's single-cell outlines measured
0.84-0.99 on validation crops of PBC, ALL-IDB2 and both Zheng sets, the Aria multi-cell views
a median of 0.59 (97% of them below 0.8 or above the area share)."""


def on_box(square_map: np.ndarray, centre: tuple[float, float], box: tuple[int, int, int, int]) -> np.ndarray:
    """A map over the square cut about ``centre`` from a field (:func:`leuko.data.square_about`)
    placed on a cell's box (x, y, w, h, field pixels): the part of the square over the box,
    zero where the square does not reach."""
    side = square_map.shape[0]
    x0, y0 = int(round(centre[0] - side / 2)), int(round(centre[1] - side / 2))
    x, y, width, height = box
    out = np.zeros((height, width), square_map.dtype)
    top, left = max(y, y0), max(x, x0)
    bottom, right = min(y + height, y0 + side), min(x + width, x0 + side)
    if bottom > top and right > left:
        out[top - y:bottom - y, left - x:right - x] = square_map[top - y0:bottom - y0, left - x0:right - x0]
    return out


def field_pixel_size_um(rgb: np.ndarray) -> float | None:
    """Micrometres per pixel of a field image from its red cells (a normal red cell is about
    7.5 µm across; :mod:`leuko.scale`), or ``None`` when too few are seen."""
    diameter = red_cell_diameter_px(rgb)
    return RED_CELL_UM / diameter if diameter else None


def merged_outline_reason(mask: np.ndarray) -> str | None:
    """Why a crop's cell outline most likely joins several cells (too much of the crop, or too
    far from convex), worded for the summary; ``None`` when it looks like one cell. The
    solidity is only computed when the area share does not already say so."""
    outline = mask > 0
    share = float(outline.mean())
    if share > MERGED_OUTLINE_SHARE:
        return f"covers {share:.0%} of the image"
    solidity = shape_measures(outline)["solidity"]
    if solidity < MERGED_OUTLINE_SOLIDITY:
        return (f"is far from a single cell's convex shape (solidity {solidity:.2f}; "
                "single-cell outlines measure 0.84 or more)")
    return None


@dataclass(frozen=True)
class AnalysisSettings:
    """What to load: the task, a model id (``None``: the task's default), the device
    (``None``/``auto``, ``cpu``, ``cuda``), the segmenter (``auto``, ``learned``,
    ``classical``) and the inference backend (``auto``: OpenVINO, or else ONNX Runtime, on the
    CPU where installed and where the model's export reproduces it; ``torch``, ``openvino``,
    ``onnx``)."""

    task: str
    model_id: str | None = None
    device: str | None = None
    segmenter: str = "auto"
    backend: str = "auto"


SHIFT_WARNING = "this model has not seen images like these: check every result"
"""What the page says of a result marked unfamiliar (issue 24), followed by its shift score."""


@dataclass(frozen=True)
class ResultWarning:
    """A reason a person must look at a result: ``kind``, a few words for tables (``several
    cells``, ``unfamiliar``...), and ``text``, the sentence the summary prints."""

    kind: str
    text: str


@dataclass
class CellResult:
    """One analysed cell: its box in the image (x, y, w, h pixels), crop, mask
    (0/128/255), prediction, CAM (0-1, crop-sized), its share inside the cell, morphometrics;
    the last two are ``None`` when segmentation found no cell in a crop. ``in_field``: the cell
    was cut from a field image (its crop then holds neighbours, so its outline is not judged
    as a view of several cells)."""

    index: int
    box: tuple[int, int, int, int]
    touches_border: bool
    crop: np.ndarray
    mask: np.ndarray
    prediction: Prediction
    cam: np.ndarray
    cam_inside_cell: float | None
    morphometrics: dict | None
    in_field: bool = False

    def cam_overlay(self, opacity: float = 0.45, contours: bool = False) -> np.ndarray:
        return overlay(self.crop, self.cam, opacity=opacity, contour_mask=self.mask if contours else None)

    @property
    def warnings(self) -> list[ResultWarning]:
        """Every reason this cell's result must be reviewed, most serious first: the question
        does not apply, the image is unlike the training images, the confidence is below the
        model's threshold (the predictor's flag that neither of those explains), no outline,
        an outline of several cells, an empty attention map or attention mostly off the cell.
        Empty: the result may be called confident. The one rule behind :attr:`needs_review`,
        the summaries, the badges and the case table."""
        prediction = self.prediction
        found = []
        if prediction.not_applicable:
            found.append(ResultWarning("not applicable",
                                       f"{prediction.not_applicable}: this question does not apply"))
        if prediction.unfamiliar:
            score = "" if prediction.shift_score is None else f" (shift score {prediction.shift_score:.2f})"
            found.append(ResultWarning("unfamiliar", f"{SHIFT_WARNING}{score}"))
        if prediction.needs_review and not (prediction.unfamiliar or prediction.not_applicable):
            found.append(ResultWarning("low confidence", "the model is unsure (confidence below its review "
                                                         "threshold)"))
        if self.morphometrics is None:
            found.append(ResultWarning("no outline", "segmentation found no cell outline, so no morphometrics are "
                                                     "given; check that the crop is centred on one white cell"))
        elif not self.in_field and (reason := merged_outline_reason(self.mask)) is not None:
            found.append(ResultWarning("several cells", f"the cell outline {reason}: this looks like a view of "
                                                        "several cells rather than a crop of one, so the outline, "
                                                        "the morphometrics and the share of attention on the cell "
                                                        "describe a merged region"))
        elif np.isnan(self.cam_inside_cell):
            found.append(ResultWarning("empty attention map", "the explanation map is empty for this class: it "
                                                              "cannot show where the model looked"))
        elif self.cam_inside_cell < OFF_CELL_ENERGY:
            found.append(ResultWarning("attention off the cell",
                                       f"only {self.cam_inside_cell:.0%} of the model's attention falls on the cell "
                                       "itself; the result may rest on the background"))
        return found

    @property
    def needs_review(self) -> bool:
        """True when any :attr:`warnings` applies: never "Confident" beside a warning."""
        return bool(self.warnings)


@dataclass
class ImageAnalysis:
    """The analysis of one image: kind (crop or field), its cells, the whole-image mask,
    CBC flags, the model used, the confidence below which its results were flagged for
    review, and the time taken (milliseconds)."""

    name: str
    rgb: np.ndarray
    kind: str
    task: Task
    model_id: str
    weights_sha256: str
    cam_method: str
    mask: np.ndarray
    cells: list[CellResult]
    flags: list[Flag] = field(default_factory=list)
    latency_ms: float = 0.0
    review_threshold: float | None = None
    estimated_pixel_size_um: float | None = None
    """Micrometres per pixel estimated from a field's red cells when none was given and the
    model records its training scale: the scale its cells were classified at, each cut from the
    field as a square of the model's physical view (morphometrics stay in pixels)."""

    @property
    def needs_review(self) -> bool:
        """True when no cell was found or any cell has a warning (:attr:`CellResult.warnings`)."""
        return not self.cells or any(c.needs_review for c in self.cells)

    @property
    def labels(self) -> list[str]:
        """The predicted class id of each cell the task's question applies to: a cell marked
        not applicable (a granulocyte asked a lymphoid question) has no answer to count."""
        return [c.prediction.label for c in self.cells if not c.prediction.not_applicable]

    def differential(self) -> list[dict]:
        """Per class: count and percentage of the cells (whole cells and cut ones alike)."""
        return self.task.differential(self.labels)

    def blast_percent(self) -> float | None:
        """Share of cells read as blasts (%), for tasks that have blast classes."""
        return self.task.blast_percent(self.labels)

    def summary(self) -> str:
        """A plain-language reading of the result that says when a person must look, and why."""
        lines = []
        if not self.cells:
            lines.append(f"{NO_CELL}, so nothing was classified. "
                         "Check that the image is a stained blood smear and that a leukocyte is in view.")
        elif self.kind == "crop":
            cell = self.cells[0]
            info = self.task.info(cell.prediction.label)
            lines.append(f"The model reads this cell as **{info.display}** with "
                         f"{percent(cell.prediction.confidence)} confidence. {info.meaning}")
            if cell.warnings:
                lines.append("**Marked for review**: a hematologist must look at this cell before anything is "
                             "concluded, because " + "; and ".join(w.text for w in cell.warnings) + ".")
        else:
            cut = sum(c.touches_border for c in self.cells)
            lines.append(f"{len(self.cells)} white cell(s) found"
                         + (f", {cut} cut by the image border" if cut else "") + ".")
            blasts = self.blast_percent()
            if blasts is not None:
                lines.append(f"Cells read as blasts: {blasts:.1f}%.")
            lines += shift_lines(self.cells)
            flagged = [c for c in self.cells if c.needs_review]
            if flagged:
                listed = ", ".join(f"#{c.index} ({', '.join(w.kind for w in c.warnings)})" for c in flagged)
                lines.append(f"**{len(flagged)} cell(s) need review** by a hematologist: {listed}.")
        if self.estimated_pixel_size_um is not None:
            lines.append(f"Cells were brought to the model's training scale with a pixel size estimated from this "
                         f"field's red cells ({self.estimated_pixel_size_um:.3f} µm per pixel); give the microscope's "
                         "pixel size where it is known.")
        lines += [f"CBC: {flag.describe()}" for flag in self.flags]
        lines.append("This is decision support, not a diagnosis.")
        return "\n\n".join(lines)

    def rows(self) -> list[dict]:
        """The image's lines of a run's summary table: one per cell (file, cell number, label,
        confidence in %, review state, shift score, warnings), or one saying no cell was found."""
        if not self.cells:
            return [{"file": self.name, "cell": None, "label": NO_CELL, "confidence (%)": None,
                     "review": "needs review", "shift score": "", "warnings": NO_CELL}]
        return [{"file": self.name, "cell": c.index, "label": self.task.info(c.prediction.label).display,
                 "confidence (%)": round(100 * c.prediction.confidence, 1),
                 "review": "needs review" if c.needs_review else "confident",
                 "shift score": shift_text(c.prediction), "warnings": ", ".join(w.kind for w in c.warnings)}
                for c in self.cells]

    def to_entry(self, data: bytes) -> ImageEntry:
        """The case-log entry for this analysis; ``data`` is the original file's bytes."""
        height, width = self.rgb.shape[:2]
        entry = ImageEntry(data=data, original_name=self.name, width=width, height=height, kind=self.kind)
        if self.kind == "crop" and self.cells:
            entry.prediction = self._prediction_entry(self.cells[0])
            entry.morphometrics = self.cells[0].morphometrics
        elif self.kind == "field":
            entry.cells = [CellEntry(box=c.box, touches_border=c.touches_border, crop_png=png_bytes(c.crop),
                                     morphometrics=c.morphometrics, prediction=self._prediction_entry(c))
                           for c in self.cells]
        return entry

    def _prediction_entry(self, cell: CellResult) -> PredictionEntry:
        prediction = cell.prediction
        return PredictionEntry(model_id=self.model_id, weights_sha256=self.weights_sha256, task=self.task.id,
                               probabilities=prediction.as_dict(), label=prediction.label,
                               confidence=prediction.confidence, needs_review=cell.needs_review,
                               latency_ms=self.latency_ms / max(1, len(self.cells)),
                               cam_png=png_bytes(cell.cam_overlay()), mask_png=png_bytes(cell.mask),
                               shift_score=prediction.shift_score, unfamiliar=prediction.unfamiliar,
                               not_applicable=prediction.not_applicable)


NO_CELL = "No white blood cell was found in this image"


def percent(share: float) -> str:
    """A share (0-1) as the pages print probabilities: one decimal (``87.5%``), so a heading,
    a bar and a table round it alike."""
    return f"{share:.1%}"


def shift_text(prediction: Prediction) -> str:
    """A prediction's shift score for tables: the score (higher: less like the training
    images), ``unfamiliar`` beside it above the model's threshold, or ``not measured`` for a
    model whose card has no shift statistics."""
    if prediction.shift_score is None:
        return "not measured"
    return f"{prediction.shift_score:.2f}" + (" unfamiliar" if prediction.unfamiliar else "")


def shift_lines(cells: list[CellResult]) -> list[str]:
    """What the page says up front of a crop, a field or a whole case: how many cells look
    unlike the model's training images (with the highest shift score), and how many the
    task's question does not fit, per reason; empty when neither applies."""
    lines = []
    unfamiliar = [c.prediction.shift_score for c in cells if c.prediction.unfamiliar]
    if unfamiliar:
        scores = [score for score in unfamiliar if score is not None]
        highest = f" (highest shift score {max(scores):.2f})" if scores else ""
        which = "This image looks" if len(cells) == 1 else f"{len(unfamiliar)} of {len(cells)} cells look"
        lines.append(f"**{which} unlike the model's training images**: {SHIFT_WARNING}{highest}.")
    reasons: dict[str, int] = {}
    for cell in cells:
        if cell.prediction.not_applicable:
            reasons[cell.prediction.not_applicable] = reasons.get(cell.prediction.not_applicable, 0) + 1
    for reason, count in reasons.items():
        which = "This cell" if len(cells) == 1 else f"{count} of {len(cells)} cells"
        lines.append(f"**{which}: {reason}**: this question does not apply, so the answer is not a result.")
    return lines


@dataclass
class CaseAnalysis:
    """One run's analyses taken together as a case, as a lab counts: the differential over
    every cell of every image (a 100- or 200-cell count across fields), the blood count
    ``clinical`` entered with them compared with it (:mod:`leuko.concordance`), and whether a
    person must look. ``images`` are of one task and not empty."""

    images: list[ImageAnalysis]
    clinical: ClinicalValues | None = None

    @property
    def task(self) -> Task:
        return self.images[0].task

    @property
    def cells(self) -> list[CellResult]:
        return [cell for image in self.images for cell in image.cells]

    @property
    def labels(self) -> list[str]:
        """The predicted class id of every cell of every image."""
        return [label for image in self.images for label in image.labels]

    def differential(self) -> list[dict]:
        """Per class: count and percentage of all the case's cells."""
        return self.task.differential(self.labels)

    def blast_percent(self) -> float | None:
        """Share (%) of all the case's cells read as blasts, for tasks with blast classes."""
        return self.task.blast_percent(self.labels)

    def findings(self) -> list[str]:
        """Where the blood count and the case's cells disagree (empty: they agree, or no count)."""
        return findings(self.task.id, self.labels, self.clinical)

    @property
    def needs_review(self) -> bool:
        """True when any image needs review or the blood count and the images disagree."""
        return any(image.needs_review for image in self.images) or bool(self.findings())

    def rows(self) -> list[dict]:
        """The summary table: every cell of every image (:meth:`ImageAnalysis.rows`)."""
        return [row for image in self.images for row in image.rows()]

    def summary(self) -> str:
        """The case in plain language: what was counted, blasts, disagreements with the blood
        count, images unlike the training images, and what needs review."""
        cells = self.cells
        lines = [f"{len(self.images)} image(s), {len(cells)} white cell(s) counted."]
        labels = self.labels
        blasts = self.task.blast_count(labels)
        if blasts is not None and labels:
            lines.append(f"Cells read as blasts: {blasts} of {len(labels)} ({self.blast_percent():.1f}%).")
        found = self.findings()
        if found:
            lines.append("**The blood count and the images disagree**, so the case needs review: " + " ".join(found))
        empty = sum(not image.cells for image in self.images)
        if empty:
            lines.append(f"**No white blood cell was found in {empty} image(s)** (see the table).")
        lines += shift_lines(cells)
        flagged = sum(cell.needs_review for cell in cells)
        if flagged:
            lines.append(f"**{flagged} of {len(cells)} cell(s) need review** by a hematologist (see the table).")
        elif not self.needs_review:
            lines.append("No result is marked for review.")
        lines.append("This is decision support, not a diagnosis.")
        return "\n\n".join(lines)


MASK_COLOURS = {128: (80, 200, 255), 255: (150, 30, 200)}
"""Overlay colours (RGB) of the cytoplasm and nucleus labels."""


def mask_overlay(rgb: np.ndarray, mask: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """The segmentation (cytoplasm light blue, nucleus purple) blended over the image with
    ``opacity`` 0-1, with the cell and nucleus outlines drawn."""
    tinted = rgb.copy()
    for level, colour in MASK_COLOURS.items():
        tinted[mask == level] = colour
    blended = cv2.addWeighted(rgb, 1.0 - opacity, tinted, opacity, 0.0)
    return draw_mask_outlines(blended, mask, nucleus_colour=(40, 0, 60), sides_per_line=200)


def numbered_boxes(rgb: np.ndarray, cells: list[tuple[int, tuple[int, int, int, int], bool]]) -> np.ndarray:
    """``rgb`` with each cell's box (x, y, width, height in pixels) and number drawn, red where
    the cell needs review and green otherwise; ``cells`` holds (number, box, needs review)."""
    drawn = rgb.copy()
    thickness = max(2, min(drawn.shape[:2]) // 300)
    for index, (x, y, w, h), needs_review in cells:
        colour = (220, 30, 30) if needs_review else (20, 160, 60)
        cv2.rectangle(drawn, (x, y), (x + w, y + h), colour, thickness)
        cv2.putText(drawn, str(index), (x + 4, y + 10 * thickness), cv2.FONT_HERSHEY_SIMPLEX,
                    thickness / 3, colour, thickness)
    return drawn


def boxes_overlay(analysis: ImageAnalysis) -> np.ndarray:
    """A field image with each found cell's box and number; red boxes need review."""
    return numbered_boxes(analysis.rgb, [(c.index, c.box, c.needs_review) for c in analysis.cells])


def saved_mask_overlay(original: Path, mask: Path) -> bytes | None:
    """PNG of a saved crop's 0/128/255 mask drawn over its original as the Analyze page shows
    it (tinted nucleus and cytoplasm, outlined), for reviewers; ``None`` when either file is
    missing or unreadable or their sizes differ."""
    try:
        rgb = np.asarray(load_image(original))
        labels = load_mask(mask)
    except (ImageError, OSError):
        return None
    return png_bytes(mask_overlay(rgb, labels)) if labels.shape == rgb.shape[:2] else None


def png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding of an RGB or single-channel uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class Analyzer:
    """Loads a classifier, its explainer and a segmenter once; analyses images with them.
    One pass gives both the probabilities and the Grad-CAM map. With the ``auto`` backend on
    the CPU the U-Net runs in OpenVINO (ONNX Runtime where OpenVINO is not installed), and so
    does the classifier's backbone when the architecture's Grad-CAM target is the backbone's
    output (every architecture but ``mseenet`` and ``oadls_acrnn``), the method is not
    ScoreCAM and the export reproduces the network: then only the head, whose gradients
    Grad-CAM needs, runs in PyTorch (see :mod:`leuko.onnx_backend`); otherwise the classifier
    runs in PyTorch.

    Raises :class:`leuko.modelstore.ModelNotFoundError` when the task has no model installed
    and :class:`leuko.device.DeviceError` when CUDA is asked for where there is none.
    """

    def __init__(self, settings: AnalysisSettings) -> None:
        self.settings = settings
        self.predictor = Predictor(settings.model_id, task=settings.task, device=settings.device,
                                   backend=settings.backend)
        self.explainer = Explainer(self.predictor)
        self.segmenter_card = chosen_segmenter(settings.segmenter)
        self.segment = segmenter_for(self.segmenter_card, settings.device, settings.backend)
        self._lock = threading.Lock()

    @property
    def weights(self) -> str:
        """The classifier's and the segmenter's weights digests (``classical`` for the
        classical segmenter): what an analysis depends on besides its inputs and settings."""
        return f"{self.predictor.card.weights_sha256}:{segmenter_weights(self.segmenter_card)}"

    @property
    def runtime(self) -> str:
        """Where the classifier's backbone runs, in words: the device and the engine."""
        engine = self.predictor.onnx.runtime_name if self.explainer.on_onnx else "PyTorch"
        return f"{self.predictor.device}, {engine}"

    def close(self) -> None:
        self.explainer.close()

    def __enter__(self) -> "Analyzer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def analyze(self, source: ImageInput, name: str = "image", clinical: ClinicalValues | None = None,
                class_id: str | None = None, cam_method: str = "gradcam", kind: str = "auto",
                pixel_size_um: float | None = None) -> ImageAnalysis:
        """Analyse one image. ``clinical`` adds CBC flags (and feeds fusion models);
        ``class_id`` explains that class instead of each cell's predicted one; ``kind`` is
        ``auto``, ``crop`` or ``field``; ``pixel_size_um`` (micrometres per pixel) brings each
        cell to the model's training scale and adds areas in square micrometres. Safe to call
        from several threads (calls run one at a time).

        Raises :class:`leuko.images.ImageError` for an unreadable or oversized image and
        :class:`leuko.clinical.ClinicalValueError` for impossible clinical values.
        """
        with self._lock:
            return self._analyze(source, name, clinical, class_id, cam_method, kind, pixel_size_um)

    def _classify_and_explain(self, crops: list[np.ndarray], clinical: ClinicalValues | None, class_id: str | None,
                              method: str, pixel_size_um: float | None = None
                              ) -> tuple[list[Prediction], list[np.ndarray]]:
        """Predictions and CAMs of the crops, one forward and backward pass per batch: each
        crop's predicted class is explained, or ``class_id`` for every crop; a fusion model
        sees ``clinical`` in both, so its map explains the prediction it gave."""
        predictor = self.predictor
        index = predictor.class_index(class_id)
        predictions, cams = [], []
        for start in range(0, len(crops), BATCH_SIZE):
            chunk = crops[start:start + BATCH_SIZE]
            batch_cams, probs = self.explainer.explain_images(chunk, index, method, clinical, pixel_size_um)
            predictions += predictor.annotate(probs, chunk, self.explainer.last_features, pixel_size_um=pixel_size_um)
            cams += batch_cams
        return predictions, cams

    def _analyze(self, source: ImageInput, name: str, clinical: ClinicalValues | None, class_id: str | None,
                 method: str, kind: str, pixel_size_um: float | None) -> ImageAnalysis:
        started = time.perf_counter()
        cbc_flags = flags(clinical) if clinical is not None else []
        rgb = np.asarray(load_image(source))
        try:
            segmented = segment_image(rgb, self.segment, kind)
        except SegmentationError as exc:
            raise ImageError(str(exc)) from exc
        if segmented.kind == "crop" and not segmented.cells:
            problem = crop_problem(rgb)
            if problem:
                raise ImageError(f"{name}: {problem}")
            segmented.cells = [Cell((0, 0, rgb.shape[1], rgb.shape[0]), rgb, segmented.mask, False)]
        config = self.predictor.input_config
        scaled = segmented.kind == "field" and pixel_size_um is None and segmented.cells and config.view_um
        estimated = field_pixel_size_um(rgb) if scaled else None
        side = physical_side(pixel_size_um or estimated, config.view_um, config.view_zoom)
        if segmented.kind == "field" and side is not None:
            centres = [(x + w / 2, y + h / 2) for x, y, w, h in (c.box for c in segmented.cells)]
            squares = [square_about(rgb, centre, side) for centre in centres]
            predictions, square_cams = self._classify_and_explain(squares, clinical, class_id, method,
                                                                   pixel_size_um or estimated)
            cams = [on_box(cam, centre, cell.box) for cam, centre, cell in zip(square_cams, centres, segmented.cells)]
        else:
            predictions, cams = self._classify_and_explain([c.crop for c in segmented.cells], clinical, class_id,
                                                           method, pixel_size_um)
        cells = []
        for index, (cell, prediction, cam) in enumerate(zip(segmented.cells, predictions, cams), start=1):
            segmented_cell = bool(cell.mask.any())
            measures = measure_cell(cell.mask, cell.crop, pixel_size_um).as_dict() if segmented_cell else None
            inside = energy_inside(cam, cell.mask) if segmented_cell else None
            cells.append(CellResult(index, cell.box, cell.touches_border, cell.crop, cell.mask, prediction,
                                    cam, inside, measures, in_field=segmented.kind == "field"))
        card = self.predictor.card
        return ImageAnalysis(name=name, rgb=rgb, kind=segmented.kind, task=self.predictor.task, model_id=card.id,
                             weights_sha256=card.weights_sha256, cam_method=method,
                             mask=segmented.mask, cells=cells, flags=cbc_flags,
                             review_threshold=self.predictor.review_confidence, estimated_pixel_size_um=estimated,
                             latency_ms=(time.perf_counter() - started) * 1000)
