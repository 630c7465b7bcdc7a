"""What a logged case says as a whole, for the Cases page and the PDF report: the differential
over all its images, the blood count compared with it, how unlike the model's training
images its inputs were, morphometrics under human names and units, and fields drawn with
their numbered cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from leuko.analysis import SHIFT_WARNING, numbered_boxes
from leuko.clinical import ClinicalValues
from leuko.concordance import findings
from leuko.images import ImageError, load_image
from leuko.store.models import Case, ImageRecord, Prediction
from leuko.store.service import DUPLICATE, EXCLUDED_LABELS, NOT_LEUKOCYTE, CaseStore, counted_labels
from leuko.tasks import get_task

REVIEW_LABELS = {NOT_LEUKOCYTE: "Not a leukocyte", DUPLICATE: "Duplicate (part of another cell)"}
"""Display names of the final labels that take a field cell out of the count."""


def label_name(task_id: str, label: str) -> str:
    """A final or predicted label as people read it: the task's display name of a class, or
    the wording of a review label ("Not a leukocyte")."""
    task = get_task(task_id)
    return task.info(label).display if label in task.class_ids else REVIEW_LABELS.get(label, label)


@dataclass
class CaseSummary:
    """A case as a whole. ``labels``: per task, the counted label of every leukocyte over all
    images (:func:`leuko.store.service.counted_labels`); ``findings``: where the blood count
    and those labels disagree (:func:`leuko.concordance.findings`); ``unfamiliar``: results
    marked unlike the model's training images, of ``measured`` with a shift score;
    ``highest_shift``: the largest shift score (``None``: none measured); ``not_applicable``:
    each distinct reason a task's question did not fit a cell; ``left_out``: how many field
    cells reviewers took out of the count, per final label."""

    labels: dict[str, list[str]]
    findings: list[str] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)
    unfamiliar: int = 0
    measured: int = 0
    highest_shift: float | None = None
    not_applicable: list[str] = field(default_factory=list)

    def left_out_text(self) -> str:
        """The cells taken out of the count, e.g. "2 reviewed as 'duplicate'", or ""."""
        return ", ".join(f"{count} reviewed as {label!r}" for label, count in self.left_out.items())

    def shift_warning(self) -> str | None:
        """The case's shift warning with its score, or ``None`` when no result is unfamiliar."""
        if not self.unfamiliar:
            return None
        return shift_warning(f"{self.unfamiliar} of {self.measured} result(s) marked unfamiliar; "
                             f"highest shift score {self.highest_shift:.2f}")


def shift_warning(detail: str) -> str:
    """The warning for results unlike the model's training images (:data:`SHIFT_WARNING`) as a
    sentence, with ``detail`` (the scores) in brackets."""
    return f"{SHIFT_WARNING[:1].upper()}{SHIFT_WARNING[1:]} ({detail})."


def case_summary(case: Case) -> CaseSummary:
    """The :class:`CaseSummary` of a case loaded by :meth:`CaseStore.case`."""
    labels = counted_labels(case)
    clinical = ClinicalValues(**case.clinical) if case.clinical else None
    summary = CaseSummary(labels, [line for task, counted in labels.items()
                                   for line in findings(task, counted, clinical)])
    scores = []
    for image in case.images:
        for review in {r.cell_id: r for r in image.reviews}.values():
            if review.final_label in EXCLUDED_LABELS:
                summary.left_out[review.final_label] = summary.left_out.get(review.final_label, 0) + 1
        for prediction in image.predictions:
            if prediction.shift_score is not None:
                scores.append(prediction.shift_score)
            summary.unfamiliar += bool(prediction.unfamiliar)
            if prediction.not_applicable and prediction.not_applicable not in summary.not_applicable:
                summary.not_applicable.append(prediction.not_applicable)
    summary.measured = len(scores)
    summary.highest_shift = max(scores) if scores else None
    return summary


def shift_text(prediction: Prediction) -> str | None:
    """One result's shift score and what it means, or ``None`` when it was not measured."""
    parts = []
    if prediction.shift_score is not None:
        parts.append(f"shift score {prediction.shift_score:.2f}"
                     + (": unfamiliar, this model has not seen images like this one" if prediction.unfamiliar else ""))
    if prediction.not_applicable:
        parts.append(prediction.not_applicable)
    return "; ".join(parts) or None


class MeasureName(NamedTuple):
    """A morphometric as people read it: its name, and for a size the dimension (1 for a
    length, 2 for an area) that converts it to micrometres with the pixel size."""

    name: str
    dimension: int = 0


MEASURE_NAMES: dict[str, MeasureName] = {
    "cell_area_px": MeasureName("Cell area", 2), "nucleus_area_px": MeasureName("Nucleus area", 2),
    "cytoplasm_area_px": MeasureName("Cytoplasm area", 2), "nc_ratio": MeasureName("N:C ratio"),
    "nucleus_fraction": MeasureName("Nucleus share of cell area"),
    "nucleus_perimeter_px": MeasureName("Nucleus perimeter", 1),
    "nucleus_circularity": MeasureName("Nucleus circularity (1 = circle)"),
    "nucleus_solidity": MeasureName("Nucleus solidity (1 = convex)"),
    "nucleus_convexity": MeasureName("Nucleus convexity (1 = smooth)"),
    "contour_irregularity": MeasureName("Nuclear contour irregularity"), "nuclear_lobes": MeasureName("Nuclear lobes"),
    "nucleus_intensity_mean": MeasureName("Nucleus mean grey level (0-255)"),
    "nucleus_intensity_std": MeasureName("Nucleus grey-level spread (0-255)"),
    "chromatin_contrast": MeasureName("Chromatin contrast"),
    "chromatin_homogeneity": MeasureName("Chromatin homogeneity"),
    "chromatin_energy": MeasureName("Chromatin energy"), "chromatin_correlation": MeasureName("Chromatin correlation"),
}
"""Human names of :class:`leuko.morphometrics.Morphometrics` fields, in the order shown; the
``*_um2`` fields are not listed as they give the areas' values in micrometres."""

UNITS_BY_DIMENSION = {1: ("µm", "px"), 2: ("µm²", "px²")}
"""Units of a length and an area, with and without a pixel size."""


def pixel_size_um(measures: dict) -> float | None:
    """Micrometres per pixel as the measured areas imply (``*_um2`` over ``*_px``), or
    ``None`` when the cell was measured without a pixel size."""
    for area in ("cell_area", "nucleus_area"):
        square_um, square_px = measures.get(f"{area}_um2"), measures.get(f"{area}_px")
        if square_um and square_px:
            return math.sqrt(square_um / square_px)
    return None


def _measures(measures: dict, keys: tuple[str, ...] | None) -> list[tuple[str, str, float | int]]:
    """(name, unit, value) of each measure of ``keys`` (all of :data:`MEASURE_NAMES` when
    ``None``) that is present: sizes in µm and µm² where the pixel size is known, otherwise in
    px and px²; ratios and counts unitless."""
    scale = pixel_size_um(measures)
    found = []
    for key in keys or tuple(MEASURE_NAMES):
        name, dimension = MEASURE_NAMES[key]
        value = measures.get(key)
        if value is None:
            continue
        unit = ""
        if dimension:
            microns, pixels = UNITS_BY_DIMENSION[dimension]
            unit, value = (microns, value * scale ** dimension) if scale else (pixels, value)
        found.append((name, unit, value))
    return found


def readable_measures(measures: dict, keys: tuple[str, ...] | None = None) -> dict[str, float | int]:
    """A cell's morphometrics (only ``keys`` of :data:`MEASURE_NAMES` when given) by column
    names with units, "Nucleus area (µm²)" where the pixel size is known, otherwise in pixels,
    "Nucleus area (px²)"; absent measures left out."""
    return {f"{name} ({unit})" if unit else name: value for name, unit, value in _measures(measures, keys)}


def measures_line(measures: dict, keys: tuple[str, ...] | None = None) -> str:
    """A cell's morphometrics (only ``keys`` when given) in one line, each with its unit:
    "Nucleus area 52.1 µm², N:C ratio 0.62"."""
    return ", ".join(f"{name} {measure_text(value)}" + (f" {unit}" if unit else "")
                     for name, unit, value in _measures(measures, keys))


def measure_text(value: float | int) -> str:
    """A measure as printed: whole numbers as they are, others to three significant digits
    (at most one decimal from 100 up)."""
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"


def numbered_field(store: CaseStore, image: ImageRecord) -> np.ndarray | None:
    """The stored field ``image`` (RGB) with each found cell's box and number (the cell's
    index, so "cell 2" can be found), red where the model flagged it for review, green
    otherwise; ``None`` when the stored file is missing or unreadable."""
    try:
        rgb = np.asarray(load_image(store.files.path(image.stored_path)))
    except (ImageError, OSError):
        return None
    flagged = {p.cell_id: p.needs_review for p in image.predictions}
    return numbered_boxes(rgb, [(c.index, (c.x, c.y, c.width, c.height), flagged.get(c.id, True))
                                for c in image.cells])
