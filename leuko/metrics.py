"""Metrics and curves from true labels and predicted probabilities (scikit-learn underneath).

All functions take ``y_true`` as class indices (N,) and ``probs`` as an (N, K) array of
probabilities whose rows sum to 1.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn import metrics as skm


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """ECE: the confidence-weighted gap between confidence and accuracy over equal-width bins
    of the top-class confidence (Guo et al., ICML 2017)."""
    curve = reliability_curve(y_true, probs, n_bins)
    total = sum(curve["count"])
    return float(sum(n * abs(a - c) for n, a, c in zip(curve["count"], curve["accuracy"],
                                                       curve["confidence"]) if n) / max(total, 1))


def reliability_curve(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> dict[str, list]:
    """Per confidence bin: its edges, mean confidence, accuracy and count (empty bins kept,
    with NaN confidence and accuracy) for a reliability diagram."""
    y_true = np.asarray(y_true)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    out: dict[str, list] = {"lower": [], "upper": [], "confidence": [], "accuracy": [], "count": []}
    for b in range(n_bins):
        members = which == b
        n = int(members.sum())
        out["lower"].append(float(edges[b]))
        out["upper"].append(float(edges[b + 1]))
        out["count"].append(n)
        out["confidence"].append(float(confidence[members].mean()) if n else float("nan"))
        out["accuracy"].append(float(correct[members].mean()) if n else float("nan"))
    return out


def _specificities(confusion: np.ndarray) -> np.ndarray:
    total = confusion.sum()
    tp = np.diag(confusion)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    tn = total - tp - fp - fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tn + fp > 0, tn / (tn + fp), np.nan)


def roc_auc(y_true: np.ndarray, probs: np.ndarray, positive_index: int | None = None) -> float | None:
    """Binary ROC AUC of the positive class, or macro one-vs-rest AUC over the classes present;
    ``None`` when fewer than two classes occur in ``y_true``."""
    y_true = np.asarray(y_true)
    present = np.unique(y_true)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        positive = 1 if positive_index is None else positive_index
        return float(skm.roc_auc_score(y_true == positive, probs[:, positive]))
    aucs = [skm.roc_auc_score(y_true == k, probs[:, k]) for k in present]
    return float(np.mean(aucs))


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str],
                           positive_index: int | None = None) -> dict:
    """Accuracy, balanced accuracy, macro and per-class precision, sensitivity (recall),
    specificity and F1, MCC, ROC AUC, log loss, Brier score, ECE and the confusion matrix.
    Macro averages run over the classes present in ``y_true`` (as balanced accuracy and
    AUC do), so a class absent from an evaluation set does not count as a zero.

    For a binary task with ``positive_index`` the top-level ``sensitivity``/``specificity``
    are those of the positive class, as clinicians read them.
    """
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    labels = list(range(len(class_names)))
    y_pred = probs.argmax(axis=1)
    confusion = skm.confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    specificity = _specificities(confusion)
    present = support > 0
    onehot = np.eye(len(labels))[y_true]
    result = {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "precision_macro": float(precision[present].mean()),
        "sensitivity_macro": float(recall[present].mean()),
        "specificity_macro": float(np.nanmean(specificity)),
        "f1_macro": float(f1[present].mean()),
        "mcc": float(skm.matthews_corrcoef(y_true, y_pred)),
        "roc_auc": roc_auc(y_true, probs, positive_index),
        "log_loss": float(skm.log_loss(y_true, np.clip(probs, 1e-12, 1.0), labels=labels)),
        "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=1))),
        "ece": expected_calibration_error(y_true, probs),
        "confusion_matrix": confusion.tolist(),
        "classes": list(class_names),
        "per_class": {
            name: {"precision": float(precision[k]), "sensitivity": float(recall[k]),
                   "specificity": float(specificity[k]), "f1": float(f1[k]), "support": int(support[k])}
            for k, name in enumerate(class_names)
        },
    }
    if positive_index is not None:
        result["sensitivity"] = float(recall[positive_index])
        result["specificity"] = float(specificity[positive_index])
    return result


def roc_pr_curves(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """One-vs-rest ROC and precision-recall curves per class (classes absent from ``y_true``
    are skipped): ``{class: {"fpr", "tpr", "precision", "recall", "auc", "ap"}}``."""
    y_true = np.asarray(y_true, dtype=int)
    curves = {}
    for k, name in enumerate(class_names):
        is_k = y_true == k
        if is_k.all() or not is_k.any():
            continue
        fpr, tpr, _ = skm.roc_curve(is_k, probs[:, k])
        precision, recall, _ = skm.precision_recall_curve(is_k, probs[:, k])
        curves[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "precision": precision.tolist(),
                        "recall": recall.tolist(), "auc": float(skm.auc(fpr, tpr)),
                        "ap": float(skm.average_precision_score(is_k, probs[:, k]))}
    return curves


def review_threshold(y_true: Sequence[int], probs: np.ndarray, target_accuracy: float = 0.99) -> float:
    """The lowest top-class confidence t such that predictions with confidence >= t are at
    least ``target_accuracy`` accurate on these data (chosen on ``val``); 1.0 if none are.

    Results below t are routed to human review, as digital morphology analysers route
    uncertain cells to an 'unidentified' class.
    """
    y_true = np.asarray(y_true, dtype=int)
    confidence = probs.max(axis=1)
    order = np.argsort(-confidence, kind="stable")
    correct = (probs.argmax(axis=1) == y_true)[order]
    running = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    sorted_confidence = confidence[order]
    # a cut can only fall between distinct confidences; ties share one side
    valid = np.append(sorted_confidence[1:] < sorted_confidence[:-1], True)
    ok = np.flatnonzero((running >= target_accuracy) & valid)
    return float(sorted_confidence[ok[-1]]) if len(ok) else 1.0


def review_share(probs: np.ndarray, threshold: float) -> float:
    """Share of predictions whose top-class confidence falls below ``threshold``."""
    return float((probs.max(axis=1) < threshold).mean()) if len(probs) else 0.0
