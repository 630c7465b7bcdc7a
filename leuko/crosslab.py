"""Leave-one-lab-out validation: how a training recipe does on a lab it never saw.

For each method (a named set of training-setting overrides) and each lab, a model is trained
on the other labs' train splits (early stopping and temperature on their val splits) and
measured on the left-out lab's train and val crops; its test split is kept for the final,
once-only measurement of the shipped model. The held-out logits are kept with each row, so
calibration choices (such as a temperature that holds under shift) can be studied without
training again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from leuko.calibration import calibrated_probabilities, fit_temperature
from leuko.config import TrainConfig
from leuko.evaluate import model_logits
from leuko.metrics import expected_calibration_error
from leuko.modelstore import LoadedModel, ModelCard
from leuko.progress import Callback
from leuko.tasks import get_task
from leuko.train import load_split, train_model

METHODS: dict[str, dict] = {
    "reinhard": {},
    "no-normalisation": {"preprocess": {"stain_normalization": "none"}},
    "macenko": {"preprocess": {"stain_normalization": "macenko"}},
    "reinhard+degrade": {"degrade": True},
    "reinhard+colour+degrade": {"degrade": True, "colour_invariance": True},
}
"""The recipes compared, as overrides of the base configuration (``configs/`` file)."""


@dataclass
class HeldOutResult:
    """One trained model measured on the lab it did not see."""

    method: str
    held_out: str
    n: int
    balanced_accuracy: float
    accuracy: float
    ece: float
    temperature: float
    best_temperature: float
    ece_at_best_temperature: float
    train_time_s: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def method_config(base: TrainConfig, method: str, **overrides) -> TrainConfig:
    """``base`` with a method's settings (:data:`METHODS`; its preprocessing merged into the
    base's) and ``overrides`` applied."""
    settings = dict(METHODS[method])
    preprocess = dict(base.preprocess.__dict__ if base.preprocess else {}, **settings.pop("preprocess", {}))
    return base.with_overrides(**settings, preprocess=preprocess, **overrides)


def held_out_samples(config: TrainConfig, lab: str) -> list:
    """The left-out lab's train and val crops (its test split stays unseen)."""
    task = get_task(config.task)
    one_lab = config.with_overrides(datasets=[lab])
    return [s for split in ("train", "val") for s in load_split(one_lab, task, split)]


def run_fold(base: TrainConfig, method: str, lab: str, labs: list[str], out_dir: Path,
             callbacks: Iterable[Callback] = ()) -> HeldOutResult:
    """Train ``method`` without ``lab`` and measure it on ``lab``; the held-out logits and
    labels are written to ``out_dir/<method>-<lab>.npz``."""
    config = method_config(base, method, datasets=[x for x in labs if x != lab],
                           model_id=f"lolo-{method.replace('+', '-')}-{lab}", out_dir=str(out_dir / "runs"))
    result = train_model(config, callbacks)
    task = get_task(config.task)
    card = ModelCard(id=config.model_id, task=task.id, classes=task.class_ids, arch=config.arch,
                     input=result.input_config.to_dict())
    loaded = LoadedModel(card, result.network.eval())
    val_logits, val_labels = model_logits(loaded, load_split(result.config, task, "val"), config.device,
                                          num_workers=config.num_workers)
    temperature = fit_temperature(val_logits, val_labels)
    logits, labels = model_logits(loaded, held_out_samples(result.config, lab), config.device,
                                  num_workers=config.num_workers)
    np.savez_compressed(out_dir / f"{method}-{lab}.npz", logits=logits, labels=labels, val_logits=val_logits,
                        val_labels=val_labels)
    probs = calibrated_probabilities(logits, temperature)
    best = fit_temperature(logits, labels)
    return HeldOutResult(method=method, held_out=lab, n=len(labels),
                         balanced_accuracy=float(balanced_accuracy_score(labels, probs.argmax(1))),
                         accuracy=float((probs.argmax(1) == labels).mean()),
                         ece=expected_calibration_error(labels, probs), temperature=temperature,
                         best_temperature=best,
                         ece_at_best_temperature=expected_calibration_error(labels, calibrated_probabilities(logits, best)),
                         train_time_s=round(result.elapsed_s, 1))


def leave_one_lab_out(base: TrainConfig, labs: list[str], methods: list[str], out_dir: Path,
                      callbacks: Iterable[Callback] = ()) -> list[HeldOutResult]:
    """Every fold of every method; each row is appended to ``out_dir/rows.jsonl`` as soon as
    it is measured, so a run cut short keeps what it finished."""
    if base.extra_train:
        raise ValueError("leave-one-lab-out cannot use extra_train: extra sources are not split by lab, so the "
                         "lab left out could reach training through them")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(sorted(unknown))}; known: {', '.join(METHODS)}")
    if len(labs) < 2:
        raise ValueError("leave-one-lab-out needs at least two labs")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in methods:
        for lab in labs:
            row = run_fold(base, method, lab, labs, out_dir, callbacks)
            with open(out_dir / "rows.jsonl", "a") as handle:
                handle.write(json.dumps(row.as_dict()) + "\n")
            rows.append(row)
    return rows


def read_rows(out_dir: Path) -> list[dict]:
    """The rows written so far by :func:`leave_one_lab_out` (several runs may share a folder)."""
    rows = []
    for path in sorted(out_dir.glob("**/rows.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def table(rows: list[dict]) -> str:
    """A Markdown table per method: balanced accuracy and ECE on each left-out lab, and
    their means."""
    labs = sorted({r["held_out"] for r in rows})
    header = "| method | " + " | ".join(f"{lab}: bal. acc. / ECE" for lab in labs) + " | mean bal. acc. | mean ECE |"
    lines = [header, "|" + "---|" * (len(labs) + 3)]
    for method in dict.fromkeys(r["method"] for r in rows):
        own = {r["held_out"]: r for r in rows if r["method"] == method}
        cells = [f"{own[lab]['balanced_accuracy']:.3f} / {own[lab]['ece']:.3f}" if lab in own else "-" for lab in labs]
        done = list(own.values())
        lines.append(f"| {method} | " + " | ".join(cells)
                     + f" | {np.mean([r['balanced_accuracy'] for r in done]):.3f}"
                     + f" | {np.mean([r['ece'] for r in done]):.3f} |")
    return "\n".join(lines)


def best_method(rows: list[dict]) -> str:
    """The method with the highest mean balanced accuracy over its left-out labs."""
    methods = dict.fromkeys(r["method"] for r in rows)
    return max(methods, key=lambda m: np.mean([r["balanced_accuracy"] for r in rows if r["method"] == m]))
