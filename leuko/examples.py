"""Example images for demonstrations, read from a folder the user points at.

Dataset images are never bundled with Leuko: ``$LEUKO_EXAMPLES`` names a folder (a
manifest like ``../shared/data`` or class sub-folders), and the development data beside the
repository is used when it exists.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from leuko.images import IMAGE_SUFFIXES
from leuko.paths import default_data_root
from leuko.tasks import get_task

PUBLIC_DATASETS = (
    "ALL-IDB2 (Labati, Piuri & Scotti, ICIP 2011; academic research use only) for ALL vs normal; "
    "the Acute Lymphoblastic Leukemia image dataset of Aria, Ghaderzadeh et al. (Taleqani Hospital, "
    "Int J Intell Syst 37(8), 2022) for B-ALL subtypes; the PBC dataset (Acevedo et al., Data in Brief 30, "
    "2020, CC BY 4.0) for white cell typing; and the Jiangxi Tecom and CellaVision sets of Zheng et al. "
    "(Micron 107, 2018) for segmentation masks"
)
"""Where the public images for the three tasks come from, for users without example data."""


@dataclass(frozen=True)
class Example:
    """One example image: its path, its label when known, and the dataset it came from."""

    path: Path
    label: str | None
    dataset: str

    @property
    def title(self) -> str:
        return f"{self.dataset}: {self.path.name}" + (f" ({self.label})" if self.label else "")


def examples_root() -> Path | None:
    """``$LEUKO_EXAMPLES`` when set, else the development data folder when it exists."""
    configured = os.environ.get("LEUKO_EXAMPLES")
    root = Path(configured).expanduser() if configured else default_data_root()
    return root if root.is_dir() else None


def find_examples(task_id: str, root: Path, per_class: int = 3, split: str = "test") -> list[Example]:
    """Up to ``per_class`` images of each class of the task: from ``root/manifest.csv``
    (its ``split`` rows) when there is one, else from class-named sub-folders."""
    task = get_task(task_id)
    found: list[Example] = []
    manifest = root / "manifest.csv"
    if manifest.is_file():
        with manifest.open(newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if r.get("task") == task.id and r.get("split") == split]
        for class_id in task.class_ids:
            for row in [r for r in rows if r["label"] == class_id][:per_class]:
                found.append(Example(root / row["path"], class_id, row.get("dataset", root.name)))
        return [e for e in found if e.path.is_file()]
    for class_id in task.class_ids:
        folder = root / class_id
        if folder.is_dir():
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            found += [Example(p, class_id, root.name) for p in images[:per_class]]
    return found
