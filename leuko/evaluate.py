"""Evaluating a model on a labelled split or folder: metrics, curves, JSON and plots."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
from torch.utils.data import DataLoader

from leuko.calibration import calibrated_probabilities
from leuko.data import ImageDataset, Sample, build_transform
from leuko.device import pick_device
from leuko.metrics import classification_metrics, reliability_curve, roc_pr_curves
from leuko.modelstore import LoadedModel
from leuko.nets import get_arch
from leuko.tasks import get_task
from leuko.train import collect_logits


def model_logits(loaded: LoadedModel, samples: Sequence[Sample], device: str | None = None,
                 batch_size: int = 32, num_workers: int = 0,
                 withhold_clinical: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Uncalibrated logits (N, K) and labels (N,) of a loaded model over samples; a fusion
    model gets each sample's clinical values unless ``withhold_clinical``."""
    target = pick_device(device)
    if withhold_clinical:
        samples = [replace(s, clinical=None) for s in samples]
    dataset = ImageDataset(samples, build_transform(loaded.card.input_config, train=False),
                           clinical=get_arch(loaded.card.arch).fusion)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    return collect_logits(loaded.network.to(target), loader, target)


def metrics_from_logits(logits: np.ndarray, labels: np.ndarray, task_id: str, temperature: float) -> dict:
    """All metrics of :func:`leuko.metrics.classification_metrics` on calibrated probabilities."""
    task = get_task(task_id)
    probs = calibrated_probabilities(logits, temperature)
    return classification_metrics(labels, probs, task.class_ids, task.positive_index)


def evaluate(loaded: LoadedModel, samples: Sequence[Sample], device: str | None = None,
             withhold_clinical: bool = False) -> dict:
    """Metrics, ROC/PR curves and reliability data of a model on labelled samples."""
    logits, labels = model_logits(loaded, samples, device, withhold_clinical=withhold_clinical)
    task = get_task(loaded.card.task)
    probs = calibrated_probabilities(logits, loaded.card.temperature)
    return {"model": loaded.card.id, "task": task.id,
            "metrics": classification_metrics(labels, probs, task.class_ids, task.positive_index),
            "curves": roc_pr_curves(labels, probs, task.class_ids),
            "reliability": reliability_curve(labels, probs)}


HEADLINE = ("n", "accuracy", "balanced_accuracy", "f1_macro", "mcc", "roc_auc", "sensitivity",
            "specificity", "sensitivity_macro", "specificity_macro", "ece", "log_loss")


def format_metrics(metrics: dict) -> str:
    """A plain-text table: headline figures, then per-class precision/sensitivity/specificity/F1."""
    lines = [f"{key:<20} {metrics[key]:.4f}" if isinstance(metrics[key], float) else f"{key:<20} {metrics[key]}"
             for key in HEADLINE if key in metrics and metrics[key] is not None]
    lines.append("")
    lines.append(f"{'class':<14}{'precision':>10}{'sensitivity':>12}{'specificity':>12}{'f1':>8}{'n':>6}")
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:<14}{row['precision']:>10.3f}{row['sensitivity']:>12.3f}"
                     f"{row['specificity']:>12.3f}{row['f1']:>8.3f}{row['support']:>6d}")
    return "\n".join(lines)


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def strict_json(value):
    """``value`` with every NaN or infinite float (an empty reliability bin, an undefined
    score) replaced by ``None``, so the file is JSON that strict readers (browsers, jq) accept."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """Write ``metrics.json`` and PNG plots (confusion matrix, ROC, PR, reliability)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(strict_json(report), indent=2, allow_nan=False))
    written = [out_dir / "metrics.json"]
    metrics, model = report["metrics"], report["model"]

    fig, ax = plt.subplots(figsize=(4.5, 4))
    matrix = np.array(metrics["confusion_matrix"])
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(metrics["classes"])), metrics["classes"], rotation=45, ha="right")
    ax.set_yticks(range(len(metrics["classes"])), metrics["classes"])
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > matrix.max() / 2 else "black")
    written.append(_finish(fig, ax, "predicted", "true", f"{model}: confusion matrix", out_dir / "confusion_matrix.png"))

    for kind, x, y, xlabel, ylabel, score in (("roc", "fpr", "tpr", "1 - specificity", "sensitivity", "auc"),
                                              ("pr", "recall", "precision", "sensitivity", "precision", "ap")):
        fig, ax = plt.subplots(figsize=(4.5, 4))
        for name, curve in report["curves"].items():
            ax.plot(curve[x], curve[y], label=f"{name} ({score.upper()} {curve[score]:.3f})")
        ax.legend(fontsize=7)
        written.append(_finish(fig, ax, xlabel, ylabel, f"{model}: {kind.upper()}", out_dir / f"{kind}.png"))

    fig, ax = plt.subplots(figsize=(4.5, 4))
    rel = report["reliability"]
    points = [(c, a) for c, a in zip(rel["confidence"], rel["accuracy"]) if not math.isnan(c)]
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    if points:
        ax.plot(*zip(*points), "o-")
    written.append(_finish(fig, ax, "confidence", "accuracy", f"reliability (ECE {metrics['ece']:.3f})",
                           out_dir / "reliability.png"))
    return written
