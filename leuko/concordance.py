"""Blood count and images compared: plain-language findings where they disagree.

A case holds a blood count (CBC) and the labels the model gave its cells. Where the two
cannot both be right (blasts in the count and none in the images, or the reverse; a count
with a large lymphocyte or neutrophil share and images with few of them), a hematologist
must look at the case. :func:`findings` says so in sentences the Analyze page, the Cases
page and the PDF report print as they are.

Shares are compared with the binomial sampling error of a differential count, as Rümke's
table gives it for a manual count (C. L. Rümke, "The imprecision of the ratio of two
percentages observed in differential white blood cell counts", 1979): a 20-cell count
with 10% lymphocytes is compatible with a true share of 3-30%, so only a share outside the
images' 95% range is reported. Blasts are compared by presence, since a single blast in
peripheral blood is abnormal and the crops of the ALL tasks are chosen cells, not a sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from leuko.clinical import ClinicalValues, reference_range
from leuko.tasks import Task, get_task

Z_95 = 1.959964
"""Standard normal quantile of a two-sided 95% interval."""


@dataclass(frozen=True)
class CountedType:
    """A cell type the blood count reports as an absolute count (x10^9/L, ``field``) and,
    for lymphocytes, as a percentage (``percent_field``), with the task's class id for it
    and the words for a count above and below its reference range."""

    class_id: str
    name: str
    field: str
    percent_field: str | None
    high: str
    low: str


COUNTED_TYPES = (
    CountedType("lymphocyte", "lymphocytes", "lymphocytes_abs", "lymphocytes_pct", "lymphocytosis", "lymphopenia"),
    CountedType("neutrophil", "neutrophils", "neutrophils_abs", None, "neutrophilia", "neutropenia"),
)


def share_interval(count: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval (0-1) of a share observed as ``count`` of ``total`` cells: the
    true shares a count of that size is compatible with. ``total`` must be positive."""
    share = count / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    spread = z / (1 + z * z / total) * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total))
    return max(0.0, centre - spread), min(1.0, centre + spread)


def _cells(count: int) -> str:
    return f"{count} cell" if count == 1 else f"{count} cells"


def _blast_findings(task: Task, labels: Sequence[str], clinical: ClinicalValues) -> list[str]:
    """Blasts in the count against blasts in the images (presence, not share)."""
    reported = clinical.blasts_pct
    if reported is None:
        return []
    if not task.blast_classes:
        if reported > 0:
            return [f"The blood count reports {reported:.1f}% blasts, but this model ({task.title}) has no blast "
                    "class: a blast in these images is read as one of its normal types. Look at every cell, or "
                    "analyse the lymphoid cells with an ALL task."]
        return []
    blasts = task.blast_count(labels) or 0
    if reported > 0 and blasts == 0:
        where = "the one cell in the images was not" if len(labels) == 1 else \
            f"none of the {len(labels)} cells in the images was"
        return [f"The blood count reports {reported:.1f}% blasts, but {where} read as a blast. Look for blasts in "
                "the smear and check the count."]
    if reported == 0 and blasts > 0:
        return [f"{blasts} of the {_cells(len(labels))} in the images {'was' if blasts == 1 else 'were'} read as "
                f"{'a blast' if blasts == 1 else 'blasts'}, but the blood count reports no blasts. Check these cells and the count."]
    return []


def _count_share(kind: CountedType, clinical: ClinicalValues) -> float | None:
    """The type's share (0-1) of the white cells in the count: its percentage, or its
    absolute count over the WBC; ``None`` when the count gives neither."""
    percent = getattr(clinical, kind.percent_field) if kind.percent_field else None
    if percent is not None:
        return min(1.0, percent / 100.0)
    absolute = getattr(clinical, kind.field)
    if absolute is None or not clinical.wbc:
        return None
    return min(1.0, absolute / clinical.wbc)


def _condition(kind: CountedType, clinical: ClinicalValues) -> str:
    """``" (a lymphocytosis of 6.3 x10^9/L)"`` when the absolute count is outside its
    reference range for the age and sex, else an empty string."""
    absolute = getattr(clinical, kind.field)
    if absolute is None and kind.percent_field and getattr(clinical, kind.percent_field) is not None \
            and clinical.wbc is not None:
        absolute = clinical.wbc * getattr(clinical, kind.percent_field) / 100.0
    reference = reference_range(kind.field, clinical.age, clinical.sex)
    if absolute is None or reference is None:
        return ""
    if absolute > reference.high:
        return f" (a {kind.high} of {absolute:.1f} x10^9/L)"
    if absolute < reference.low:
        return f" (a {kind.low} of {absolute:.2f} x10^9/L)"
    return ""


def _share_findings(task: Task, labels: Sequence[str], clinical: ClinicalValues) -> list[str]:
    """Lymphocyte and neutrophil shares of the count against those of the images, for a task
    with those classes; reported when the count's share is outside the images' 95% range."""
    found = []
    total = len(labels)
    for kind in COUNTED_TYPES:
        if kind.class_id not in task.class_ids:
            continue
        expected = _count_share(kind, clinical)
        if expected is None:
            continue
        seen = labels.count(kind.class_id)
        low, high = share_interval(seen, total)
        if low <= expected <= high:
            continue
        fewer = "only " if expected > high else ""
        direction = "far fewer" if expected > high else "far more"
        found.append(f"The blood count has {expected:.1%} {kind.name}{_condition(kind, clinical)}, but the images "
                     f"show {fewer}{seen} of {_cells(total)} ({seen / total:.1%}) as {kind.name}: {direction} than "
                     f"sampling in a {total}-cell count explains. Check the cells' labels and the count.")
    return found


def findings(task_id: str, labels: list[str], clinical: ClinicalValues | None) -> list[str]:
    """Sentences saying where the blood count ``clinical`` and the cells' labels (class ids
    of task ``task_id``, one per cell, over all the case's images) disagree; empty when they
    agree or there is nothing to compare (no count, no cells, or no value the task can be
    compared with). Labels that are not classes of the task (a reviewer's "not a leukocyte"
    or "duplicate") are left out. Any finding means the case needs review."""
    task = get_task(task_id)
    cells = [label for label in labels if label in task.class_ids]
    if clinical is None or not cells:
        return []
    return _blast_findings(task, cells, clinical) + _share_findings(task, cells, clinical)
