"""Finding leukocytes in a field image, each once, and measuring how well it is done.

Three steps, all sizes relative to the field's own red cells (:func:`leuko.scale.red_cell_diameter_px`),
so the same settings hold at any magnification:

1. candidates from the nucleus stain: pixels well above the field's usual nucleus score (a
   fraction of the way from its 85th percentile to the maximum of their stained region, so a
   pale stain, a cyan white balance or a paler cell beside a dark one is handled like a strong
   one);
2. nuclei that share one cytoplasm are merged: fragments closer than ``lobe_gap`` red-cell
   diameters are one candidate (a granulocyte's lobes), and a group whose centre lies within
   the cell of another (its box grown by ``cell_margin`` red-cell diameters) joins it (a lobe
   that stayed apart);
3. one decision per candidate: a small logistic regression over five features (stained area
   and extent relative to the red cells, stain strength relative to the field's strongest,
   darkness relative to the glass, shape) says whether it is a leukocyte.

Evaluation (:func:`evaluate_fields`) matches found boxes to true leukocyte boxes one to one.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import cv2
import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

from leuko.scale import red_cell_diameter_px

if TYPE_CHECKING:
    from leuko.segment import FieldConfig

Box = tuple[int, int, int, int]
"""A box as (x, y, width, height) in pixels."""

FEATURES = ("log_area", "log_extent", "relative_peak", "darkness", "aspect")
"""What the candidate classifier sees of a nucleus group, relative to its field: ``log_area``
natural log of its stained area over a red cell's area; ``log_extent`` log of its box's longer
side over the red-cell diameter; ``relative_peak`` its peak nucleus score above the field's
usual score (``FieldConfig.field_percentile``), over the field's largest such rise;
``darkness`` its mean grey level over the background's (the field's 90th percentile);
``aspect`` its box's shorter over longer side."""


@dataclass(frozen=True)
class CandidateModel:
    """A logistic regression over :data:`FEATURES`, standardised by ``mean`` and ``scale``;
    stored as JSON (:meth:`to_json`), never pickled."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    provenance: str = ""

    def probability(self, values: dict[str, float]) -> float:
        """Probability (0-1) that a candidate with these feature values is a leukocyte."""
        x = (np.array([values[name] for name in self.features]) - self.mean) / np.array(self.scale)
        return 0.5 * (1.0 + math.tanh((float(np.dot(self.coef, x)) + self.intercept) / 2))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CandidateModel":
        data = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


MODEL_PATH = Path(__file__).with_name("cellfind_model.json")
"""The shipped candidate classifier (fitted by :func:`fit_candidate_model` on the
``bionet_fields`` train split; see ``docs/cell-finding.md``)."""


@functools.lru_cache(maxsize=4)
def load_model(path: Path = MODEL_PATH) -> CandidateModel:
    """The candidate classifier stored at ``path`` (read once per path)."""
    return CandidateModel.from_json(path.read_text())


@dataclass
class Candidate:
    """A nucleus group found in a field: its box (x, y, w, h, full-image pixels), the field's
    red-cell diameter in full-image pixels, its features and, once judged, the probability that
    it is a leukocyte."""

    box: Box
    red_cell_px: float
    features: dict[str, float]
    probability: float = 0.0


def nucleus_candidates(rgb: np.ndarray, config: FieldConfig | None = None) -> list[Candidate]:
    """Every nucleus group of a field image with its features (steps 1 and 2 of the module's
    method)."""
    from leuko.segment import FieldConfig, _disc, absolute_nucleus_score

    config = config or FieldConfig()
    height, width = rgb.shape[:2]
    scale = min(1.0, config.detection_side / min(height, width))
    small = cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))),
                       interpolation=cv2.INTER_AREA) if scale < 1 else np.ascontiguousarray(rgb)
    red_cell = red_cell_diameter_px(small) or config.fallback_red_cell * min(small.shape[:2])
    score = cv2.GaussianBlur(absolute_nucleus_score(small), (0, 0), max(0.8, 0.03 * red_cell))
    level, peak = float(np.percentile(score, config.field_percentile)), float(score.max())
    if peak - level < config.min_rise:
        return []
    regions, count = ndi.label(score > level + config.region_level * (peak - level))
    region_peak = np.concatenate([[np.inf], ndi.maximum(score, regions, np.arange(1, count + 1))])
    stained = score > level + config.nucleus_level * (region_peak[regions] - level)
    labels, count = ndi.label(stained)
    red_area = math.pi * red_cell ** 2 / 4
    areas = ndi.sum_labels(stained, labels, np.arange(1, count + 1))
    stained = np.isin(labels, 1 + np.flatnonzero(areas >= config.min_fragment * red_area))
    groups, _ = ndi.label(cv2.dilate(stained.astype(np.uint8), _disc(round(config.lobe_gap * red_cell / 2))))
    groups[~stained] = 0
    groups = _absorb_lobes(groups, config.cell_margin * red_cell)
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)
    background = float(np.percentile(grey, 90)) or 1.0
    candidates = []
    for index, where in enumerate(ndi.find_objects(groups), start=1):
        if where is None:
            continue
        member = groups[where] == index
        ys, xs = np.nonzero(member)
        x, y = where[1].start + xs.min(), where[0].start + ys.min()
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        features = {
            "log_area": math.log(float(member.sum()) / red_area), "log_extent": math.log(max(w, h) / red_cell),
            "relative_peak": (float(score[where][member].max()) - level) / (peak - level),
            "darkness": float(grey[where][member].mean()) / background, "aspect": min(w, h) / max(w, h)}
        box = tuple(int(round(v / scale)) for v in (x, y, w, h))
        candidates.append(Candidate(box, red_cell / scale, features))
    return candidates


def _absorb_lobes(groups: np.ndarray, margin: float) -> np.ndarray:
    """Relabel nucleus groups so that two groups one of whose centres lies within the other's
    cell (its box grown by ``margin`` pixels on every side) are one, the larger taking the
    smaller: a lobe further from the rest of its nucleus than the lobe gap still shares their
    cytoplasm."""
    boxes = ndi.find_objects(groups)
    sizes = ndi.sum_labels(groups > 0, groups, np.arange(1, len(boxes) + 1))
    centres = {i: ((b[0].start + b[0].stop) / 2, (b[1].start + b[1].stop) / 2) for i, b in enumerate(boxes) if b}

    def within(i: int, j: int) -> bool:
        """Whether group i's centre lies in group j's cell."""
        (cy, cx), (ys, xs) = centres[i], boxes[j]
        return ys.start - margin <= cy <= ys.stop + margin and xs.start - margin <= cx <= xs.stop + margin

    parent = np.arange(len(boxes) + 1)
    order = [i for i in np.argsort(-sizes) if boxes[i] is not None]
    for rank, big in enumerate(order):
        if parent[big + 1] != big + 1:
            continue
        for small in order[rank + 1:]:
            if parent[small + 1] == small + 1 and (within(small, big) or within(big, small)):
                parent[small + 1] = big + 1
    return parent[groups]


def find_leukocytes(rgb: np.ndarray, config: FieldConfig | None = None,
                    model: CandidateModel | None = None) -> list[Candidate]:
    """The leukocytes of a field image, each once: the nucleus groups (lobes merged) that the
    candidate classifier accepts with at least ``config.min_probability``."""
    from leuko.segment import FieldConfig

    config = config or FieldConfig()
    model = model or load_model()
    found = []
    for candidate in nucleus_candidates(rgb, config):
        candidate.probability = model.probability(candidate.features)
        if candidate.probability >= config.min_probability:
            found.append(candidate)
    return found


def _centre(box: Box) -> tuple[float, float]:
    return box[0] + box[2] / 2, box[1] + box[3] / 2


# ---------------------------------------------------------------------------------------------
# Evaluation


def count_matches(found: list[Box], true: list[Box]) -> int:
    """How many found boxes match a true box, one to one: a pair matches when their IoU is at
    least 0.3 or the found box's centre lies inside the true box (boxes as x, y, w, h)."""
    if not found or not true:
        return 0
    good = np.zeros((len(found), len(true)))
    for i, (x, y, w, h) in enumerate(found):
        for j, (tx, ty, tw, th) in enumerate(true):
            inter = max(0, min(x + w, tx + tw) - max(x, tx)) * max(0, min(y + h, ty + th) - max(y, ty))
            iou = inter / max(w * h + tw * th - inter, 1)
            cx, cy = x + w / 2, y + h / 2
            good[i, j] = iou >= 0.3 or (tx <= cx <= tx + tw and ty <= cy <= ty + th)
    rows, cols = linear_sum_assignment(-good)
    return int(good[rows, cols].sum())


@dataclass
class FieldResult:
    """One field: its name, how many leukocytes are in it, how many were found and matched."""

    name: str
    true: int
    found: int
    matched: int


@dataclass
class CellFindingScores:
    """Precision, recall and exact-count rate (fraction of fields whose found count equals the
    true count) of leukocyte finding over a set of fields, with the per-field results."""

    fields: list[FieldResult] = field(default_factory=list)

    @property
    def precision(self) -> float:
        found = sum(f.found for f in self.fields)
        return sum(f.matched for f in self.fields) / found if found else 1.0

    @property
    def recall(self) -> float:
        true = sum(f.true for f in self.fields)
        return sum(f.matched for f in self.fields) / true if true else 1.0

    @property
    def exact_count(self) -> float:
        return sum(f.found == f.true for f in self.fields) / len(self.fields) if self.fields else 1.0

    def summary(self) -> dict:
        """The figures and counts as a JSON-ready dict (fields with a wrong count listed)."""
        return {"fields": len(self.fields), "true_cells": sum(f.true for f in self.fields),
                "found_cells": sum(f.found for f in self.fields),
                "matched_cells": sum(f.matched for f in self.fields),
                "precision": round(self.precision, 4), "recall": round(self.recall, 4),
                "exact_count": round(self.exact_count, 4),
                "wrong_count_fields": [asdict(f) for f in self.fields if f.found != f.true]}


def evaluate_fields(fields: Iterable[tuple[str, np.ndarray, list[Box]]],
                    find: Callable[[np.ndarray], list[Box]]) -> CellFindingScores:
    """Scores of ``find`` (field image -> found boxes) on (name, RGB image, true boxes) fields."""
    scores = CellFindingScores()
    for name, rgb, true in fields:
        found = find(rgb)
        scores.fields.append(FieldResult(name, len(true), len(found), count_matches(found, true)))
    return scores


def bionet_fields(root: Path, split: str) -> Iterator[tuple[str, np.ndarray, list[Box]]]:
    """The ``bionet_fields`` images of a manifest split as (path, RGB image, leukocyte boxes)."""
    import pandas as pd

    manifest = pd.read_csv(root / "manifest.csv")
    paths = manifest[(manifest.dataset == "bionet_fields") & (manifest.split == split)].path
    boxes = pd.read_csv(root / "bionet_fields" / "boxes.csv")
    boxes = boxes[boxes.kind == "WBC"]
    by_path = {p: [(int(r.xmin), int(r.ymin), int(r.xmax - r.xmin), int(r.ymax - r.ymin)) for r in rows.itertuples()]
               for p, rows in boxes.groupby("path")}
    for path in paths:
        yield path, _read_rgb(root / path), by_path.get(path, [])


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(path)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


PSEUDO_GAP = 12
"""Background pixels between the tiles of a pseudo-field."""


def pseudo_fields(root: Path, dataset: str, split: str, fields: int = 3, tile: int = 224,
                  ) -> Iterator[tuple[str, np.ndarray, list[Box]]]:
    """Pseudo-fields of single-cell crops: up to ``fields`` 3x3 mosaics of the split's crops of
    ``dataset`` (evenly spread through the manifest, resized to ``tile`` pixels), on the crops'
    own background colour with :data:`PSEUDO_GAP` pixels between tiles. Each tile holds one known
    leukocyte, whose true box is the tile's central 60%."""
    import pandas as pd

    manifest = pd.read_csv(root / "manifest.csv")
    paths = manifest[(manifest.dataset == dataset) & (manifest.split == split)].path.tolist()
    count = min(len(paths), 9 * fields)
    chosen = [paths[round(k * len(paths) / count)] for k in range(count)] if count else []
    side = 3 * tile + 4 * PSEUDO_GAP
    for start in range(0, len(chosen), 9):
        tiles = [cv2.resize(_read_rgb(root / p), (tile, tile), interpolation=cv2.INTER_AREA)
                 for p in chosen[start:start + 9]]
        stack = np.concatenate([t.reshape(-1, 3) for t in tiles])
        grey = stack.astype(np.float32).mean(axis=1)
        canvas = np.empty((side, side, 3), np.uint8)
        canvas[...] = np.median(stack[grey >= np.percentile(grey, 80)], axis=0).astype(np.uint8)
        true = []
        for k, image in enumerate(tiles):
            x = PSEUDO_GAP + (k % 3) * (tile + PSEUDO_GAP)
            y = PSEUDO_GAP + (k // 3) * (tile + PSEUDO_GAP)
            canvas[y:y + tile, x:x + tile] = image
            true.append((x + round(0.2 * tile), y + round(0.2 * tile), round(0.6 * tile), round(0.6 * tile)))
        yield f"{dataset}/{split}/mosaic{start // 9 + 1}", canvas, true


# ---------------------------------------------------------------------------------------------
# Fitting the candidate classifier


def labelled_candidates(root: Path, split: str,
                        config: FieldConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Feature matrix (n, len(FEATURES)) and labels of every candidate of a ``bionet_fields``
    split: 1 for the largest candidate whose centre lies in a true leukocyte box, 0 for the rest
    (platelets, red cells, debris, and lobes that stayed apart, which the finder drops as
    lying inside a larger accepted candidate)."""
    rows, labels = [], []
    for _, rgb, true in bionet_fields(root, split):
        best: dict[int, tuple[float, int]] = {}
        for candidate in nucleus_candidates(rgb, config):
            cx, cy = _centre(candidate.box)
            inside = [j for j, (x, y, w, h) in enumerate(true) if x <= cx <= x + w and y <= cy <= y + h]
            rows.append([candidate.features[name] for name in FEATURES])
            labels.append(0)
            if inside:
                area = candidate.features["log_area"]
                if inside[0] not in best or area > best[inside[0]][0]:
                    best[inside[0]] = (area, len(rows) - 1)
        for _, row in best.values():
            labels[row] = 1
    return np.array(rows, np.float64), np.array(labels, np.int64)


def fit_candidate_model(root: Path, split: str = "train", regularisation: float = 0.1,
                        config: FieldConfig | None = None) -> CandidateModel:
    """Fit the candidate classifier (scikit-learn's logistic regression on standardised
    :data:`FEATURES`, inverse regularisation ``regularisation``) on a ``bionet_fields`` split."""
    from sklearn.linear_model import LogisticRegression

    features, labels = labelled_candidates(root, split, config)
    mean, scale = features.mean(axis=0), features.std(axis=0) + 1e-9
    fitted = LogisticRegression(C=regularisation, max_iter=2000).fit((features - mean) / scale, labels)
    return CandidateModel(FEATURES, tuple(mean.round(6)), tuple(scale.round(6)), tuple(fitted.coef_[0].round(6)),
                          round(float(fitted.intercept_[0]), 6),
                          f"logistic regression, C={regularisation}, fitted by leuko.cellfind.fit_candidate_model on "
                          f"bionet_fields {split}: {len(labels)} candidates, {int(labels.sum())} leukocytes")


# ---------------------------------------------------------------------------------------------
# The evaluation report

PSEUDO_DATASETS = ("pbc_wbc", "all_idb2")
"""Single-cell sets tiled into pseudo-fields by :func:`evaluate_cell_finding`."""


def field_boxes(segment: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], list[Box]]:
    """A field image -> boxes function: the crop box of every cell :func:`leuko.segment.segment_image`
    gives with the crop segmenter ``segment`` (what the Analyze page and the CLI show)."""
    from leuko.segment import segment_image

    return lambda rgb: [cell.box for cell in segment_image(rgb, segment, "field").cells]


def evaluate_cell_finding(root: Path, split: str, segment: Callable[[np.ndarray], np.ndarray],
                          pseudo_datasets: tuple[str, ...] = PSEUDO_DATASETS) -> dict:
    """Precision, recall and exact-count rate of the field path on the ``bionet_fields`` images
    of ``split`` and on 3x3 pseudo-fields of the same split's crops of ``pseudo_datasets``."""
    import time

    find = field_boxes(segment)
    start = time.perf_counter()
    scores = evaluate_fields(bionet_fields(root, split), find)
    report = {"split": split, "bionet_fields": scores.summary(),
              "seconds_per_field": round((time.perf_counter() - start) / max(len(scores.fields), 1), 3),
              "pseudo_fields": {}}
    for dataset in pseudo_datasets:
        report["pseudo_fields"][dataset] = evaluate_fields(pseudo_fields(root, dataset, split), find).summary()
    return report


def format_report(report: dict) -> str:
    """A short plain-text table of :func:`evaluate_cell_finding`'s figures."""
    lines = [f"cell finding on the {report['split']} split (leukocytes; a found box matches a true box at "
             f"IoU >= 0.3 or with its centre inside, one to one)",
             f"{'set':<28}{'fields':>7}{'cells':>7}{'found':>7}{'precision':>11}{'recall':>8}{'exact count':>13}"]
    rows = [("bionet_fields", report["bionet_fields"])]
    rows += [(f"pseudo-fields {name}", summary) for name, summary in report["pseudo_fields"].items()]
    for name, s in rows:
        lines.append(f"{name:<28}{s['fields']:>7}{s['true_cells']:>7}{s['found_cells']:>7}{s['precision']:>11.3f}"
                     f"{s['recall']:>8.3f}{s['exact_count']:>13.3f}")
    lines.append(f"bionet_fields: {report['seconds_per_field']:.3f} s per 640x480 field, cell finding and "
                 "segmentation of each cell")
    wrong = report["bionet_fields"]["wrong_count_fields"]
    if wrong:
        lines.append("bionet_fields with a wrong count (true/found): "
                     + ", ".join(f"{Path(f['name']).name} {f['true']}/{f['found']}" for f in wrong))
    return "\n".join(lines)


def write_report(report: dict, folder: Path) -> list[Path]:
    """Write ``<split>.json`` and ``<split>.txt`` into ``folder``; the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / f"{report['split']}.json", folder / f"{report['split']}.txt"]
    written[0].write_text(json.dumps(report, indent=2) + "\n")
    written[1].write_text(format_report(report) + "\n")
    return written
