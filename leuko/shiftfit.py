"""Fitting and measuring a model's shift detector (:mod:`leuko.shift`) on its own data."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from leuko.calibration import calibrated_probabilities
from leuko.config import TrainConfig
from leuko.data import Sample
from leuko.modelstore import ModelCard, ModelStore
from leuko.predict import BATCH_SIZE, Predictor
from leuko.shift import UNFAMILIAR_QUANTILE, ShiftDetector
from leuko.tasks import get_task
from leuko.train import load_split, load_training_samples, resolve_config


def features_of(predictor: Predictor, samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled backbone features (N, C), calibrated probabilities (N, K) and labels (N,) of
    samples, through the predictor's own input pipeline."""
    features, probabilities = [], []
    for start in range(0, len(samples), BATCH_SIZE):
        batch = predictor.tensors([s.path for s in samples[start:start + BATCH_SIZE]])
        logits, pooled = predictor.logits_and_features(batch)
        features.append(pooled)
        probabilities.append(calibrated_probabilities(logits, predictor.card.temperature))
    return np.concatenate(features), np.concatenate(probabilities), np.array([s.label for s in samples])


def training_config(card: ModelCard, data_root: str | None = None, datasets: list[str] | None = None) -> TrainConfig:
    """The training configuration a card records, pointed at ``data_root`` (default: the
    shared data) and, when given, limited to ``datasets``."""
    recorded = {k: v for k, v in card.training.items() if k not in ("history", "best_epoch")}
    config = TrainConfig.from_dict(dict(recorded, data_root=data_root, device=None, resume=False))
    return resolve_config(replace(config, datasets=datasets or config.datasets))


def fit_model_shift(model_id: str, store: ModelStore | None = None, data_root: str | None = None,
                    datasets: list[str] | None = None) -> ModelCard:
    """Fit a model's shift detector on the features of its training images (its recorded
    training configuration: splits, datasets, extra sources) with the threshold at the
    validation split's :data:`leuko.shift.UNFAMILIAR_QUANTILE`, and record it in the card."""
    store = store or ModelStore()
    predictor = Predictor(model_id, store=store, check_cell_type=False)
    config = training_config(predictor.card, data_root, datasets)
    task = get_task(config.task)
    train = list({s.path: s for s in load_training_samples(config, task)}.values())
    val = load_split(config, task, "val")
    train_features, _, train_labels = features_of(predictor, train)
    val_features, _, _ = features_of(predictor, val)
    detector = ShiftDetector.fit(train_features, train_labels, val_features)
    return store.save_shift(model_id, detector, {
        "method": ("Mahalanobis distance to the nearest class, probabilistic PCA "
                   f"({detector.components.shape[0]} directions)"),
        "fitted_on": {"train": len(train), "val": len(val), "datasets": config.datasets},
        "val_unfamiliar_share": round(1.0 - UNFAMILIAR_QUANTILE, 3)})


@dataclass
class ShiftReport:
    """A shift detector measured on images like its training ones (``seen``) and from labs it
    never saw (``unseen``): the ROC AUC of the score between them, the share of each marked
    unfamiliar, and on the unseen labs the balanced accuracy of all cells and of those not
    marked unfamiliar."""

    auc: float
    seen_n: int
    unseen_n: int
    seen_unfamiliar: float
    unseen_unfamiliar: float
    unseen_balanced_accuracy: float
    unseen_familiar_balanced_accuracy: float | None
    unseen_familiar_accuracy: float | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def measure_shift(model_id: str, seen: Sequence[Sample], unseen: Sequence[Sample],
                  store: ModelStore | None = None) -> ShiftReport:
    """Measure a model's shift detector on ``seen`` and ``unseen`` labelled samples."""
    predictor = Predictor(model_id, store=store, check_cell_type=False)
    if predictor.shift is None:
        raise ValueError(f"model {model_id!r} has no shift detector; fit one with `python -m leuko fit-shift`")
    seen_features, _, _ = features_of(predictor, seen)
    unseen_features, unseen_probs, unseen_labels = features_of(predictor, unseen)
    seen_scores, unseen_scores = predictor.shift.scores(seen_features), predictor.shift.scores(unseen_features)
    truth = np.r_[np.zeros(len(seen_scores)), np.ones(len(unseen_scores))]
    auc = roc_auc_score(truth, np.r_[seen_scores, unseen_scores])
    familiar = ~predictor.shift.unfamiliar(unseen_scores)
    predicted = unseen_probs.argmax(1)
    return ShiftReport(
        auc=float(auc), seen_n=len(seen_scores), unseen_n=len(unseen_scores),
        seen_unfamiliar=float(predictor.shift.unfamiliar(seen_scores).mean()),
        unseen_unfamiliar=float(1.0 - familiar.mean()),
        unseen_balanced_accuracy=float(balanced_accuracy_score(unseen_labels, predicted)),
        unseen_familiar_balanced_accuracy=(float(balanced_accuracy_score(unseen_labels[familiar], predicted[familiar]))
                                           if familiar.any() else None),
        unseen_familiar_accuracy=float((predicted[familiar] == unseen_labels[familiar]).mean()) if familiar.any() else None)

