"""The three screening tasks as data: class ids, display names and clinical wording.

Every other module refers to a task through :func:`get_task`, so adding a task means
adding one entry here. Class ids are the labels used in ``../shared/data/manifest.csv``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClassInfo:
    """One output class: its id (as in manifests), display name and clinical meaning."""

    id: str
    display: str
    meaning: str


@dataclass(frozen=True)
class Task:
    """A classification task: ordered classes, and for binary screening the positive class."""

    id: str
    title: str
    description: str
    classes: tuple[ClassInfo, ...]
    positive_class: str | None = None
    blast_classes: tuple[str, ...] = field(default_factory=tuple)
    lymphoid_question: bool = False
    """Whether the task's question presumes a lymphoid cell (a lymphocyte or lymphoblast), so
    that it does not apply to a granulocyte (:class:`leuko.predict.CellTypeCheck`)."""

    @property
    def class_ids(self) -> list[str]:
        return [c.id for c in self.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_binary(self) -> bool:
        return self.num_classes == 2

    @property
    def positive_index(self) -> int | None:
        """Index of the positive class (binary tasks), used for ROC AUC and sensitivity."""
        return self.class_ids.index(self.positive_class) if self.positive_class else None

    def index_of(self, class_id: str) -> int:
        """Index of a class id; raises ``KeyError`` naming the task's classes if unknown."""
        try:
            return self.class_ids.index(class_id)
        except ValueError:
            raise KeyError(f"{class_id!r} is not a class of task {self.id!r}; "
                           f"classes are {', '.join(self.class_ids)}") from None

    def info(self, class_id: str) -> ClassInfo:
        return self.classes[self.index_of(class_id)]

    def differential(self, labels: Sequence[str]) -> list[dict]:
        """Per class, in the task's order: display name, count and percentage of the cells
        whose labels (class ids) are ``labels``."""
        total = len(labels)
        return [{"class": info.display, "cells": labels.count(info.id),
                 "percent": 100.0 * labels.count(info.id) / total if total else 0.0} for info in self.classes]

    def differential_text(self, labels: Sequence[str]) -> str:
        """The differential of ``labels`` in one line: the classes present with counts and
        percentages to one decimal, as a manual differential is written, e.g.
        ``Lymphocyte 3 (60.0%), Neutrophil 2 (40.0%)``."""
        return ", ".join(f"{r['class']} {r['cells']} ({r['percent']:.1f}%)" for r in self.differential(labels)
                         if r["cells"])

    def blast_count(self, labels: Sequence[str]) -> int | None:
        """How many of ``labels`` are blast classes; ``None`` for a task without blast classes."""
        return sum(label in self.blast_classes for label in labels) if self.blast_classes else None

    def blast_percent(self, labels: Sequence[str]) -> float | None:
        """Share (%) of ``labels`` that are blast classes; ``None`` for a task without blast
        classes or no labels."""
        count = self.blast_count(labels)
        return 100.0 * count / len(labels) if count is not None and labels else None


TASKS: dict[str, Task] = {
    t.id: t
    for t in (
        Task(
            id="all_binary",
            title="ALL vs normal",
            description="Screens a single lymphocyte crop for acute lymphoblastic leukemia "
                        "blast morphology (ALL-IDB2-style images).",
            classes=(
                ClassInfo("ALL", "ALL blast", "Morphology consistent with an acute "
                          "lymphoblastic leukemia blast; needs confirmation by a hematologist "
                          "and flow cytometry."),
                ClassInfo("normal", "Normal lymphocyte", "Morphology of a mature, "
                          "non-malignant lymphocyte."),
            ),
            positive_class="ALL",
            blast_classes=("ALL",),
            lymphoid_question=True,
        ),
        Task(
            id="ball_subtype",
            title="B-ALL subtype",
            description="Assigns a B-lineage lymphoid cell to a maturation stage: benign "
                        "hematogone or malignant Early Pre-B, Pre-B or Pro-B lymphoblast "
                        "(Aria/Taleqani dataset wording).",
            classes=(
                ClassInfo("Benign", "Benign (hematogone)", "Benign B-cell precursor "
                          "(hematogone); not leukemic."),
                ClassInfo("Early", "Early Pre-B", "Malignant early pre-B lymphoblast."),
                ClassInfo("Pre", "Pre-B", "Malignant pre-B lymphoblast."),
                ClassInfo("Pro", "Pro-B", "Malignant pro-B lymphoblast."),
            ),
            blast_classes=("Early", "Pre", "Pro"),
            lymphoid_question=True,
        ),
        Task(
            id="wbc_type",
            title="WBC typing",
            description="Types a leukocyte crop into the five normal white blood cell classes "
                        "of a manual differential.",
            classes=(
                ClassInfo("basophil", "Basophil", "Granulocyte with dark purple-black granules "
                          "obscuring the nucleus."),
                ClassInfo("eosinophil", "Eosinophil", "Granulocyte with orange-red granules "
                          "and a usually bilobed nucleus."),
                ClassInfo("lymphocyte", "Lymphocyte", "Small round cell with a dense nucleus "
                          "and scant cytoplasm."),
                ClassInfo("monocyte", "Monocyte", "Large cell with a folded or kidney-shaped "
                          "nucleus and grey-blue cytoplasm."),
                ClassInfo("neutrophil", "Neutrophil", "Granulocyte with a segmented nucleus "
                          "(2-5 lobes) and pale granular cytoplasm."),
            ),
        ),
    )
}


def get_task(task_id: str) -> Task:
    """Return the task with this id; raises ``KeyError`` listing the known tasks."""
    try:
        return TASKS[task_id]
    except KeyError:
        raise KeyError(f"unknown task {task_id!r}; known tasks: {', '.join(TASKS)}") from None
