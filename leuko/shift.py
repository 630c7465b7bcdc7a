"""How unlike a model's training images an input is: a density score on the network's features.

A classifier answers for any input, and on images from another microscope or stain it is
often confidently wrong. Its penultimate features (the backbone's feature map averaged over
space) show it: inputs unlike the training images land far from the training classes.

The score is a Mahalanobis distance to the nearest class under a probabilistic-PCA model of
the training features (Lee et al., NeurIPS 2018, with a shared covariance): the ``dims``
leading principal directions keep their own variances, and the rest share one residual
variance, so directions the training images barely vary in still count (inputs from another
lab often differ exactly there) while the stored statistics stay small (about 0.7 MB for a
1,280-feature backbone). The score is the root mean square per feature dimension, so about
1 for training images. The threshold is a quantile of the validation images' scores, chosen
at fitting time and kept with the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

UNFAMILIAR_QUANTILE = 0.95
"""Share of the validation images that must score below the threshold."""

PCA_DIMS = 128
"""Principal directions with variances of their own."""


@dataclass
class ShiftDetector:
    """Fitted statistics: ``centre`` (D,), ``components`` (k, D) orthonormal rows,
    ``class_means`` (K, k) in the principal subspace, ``precision`` (k, k) of the shared
    within-class covariance there, ``residual_variance`` per remaining dimension, and the
    ``threshold`` above which an input is unfamiliar."""

    centre: np.ndarray
    components: np.ndarray
    class_means: np.ndarray
    precision: np.ndarray
    residual_variance: float
    threshold: float

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Shift score (N,) of pooled features (N, D); higher means less like the training images."""
        centred = np.asarray(features, np.float64) - self.centre
        projected = centred @ self.components.T
        residual = ((centred - projected @ self.components) ** 2).sum(1)
        nearest = np.min([np.einsum("ni,ij,nj->n", projected - mean, self.precision, projected - mean)
                          for mean in self.class_means], axis=0)
        return np.sqrt((nearest + residual / self.residual_variance) / self.centre.size)

    def unfamiliar(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, val_features: np.ndarray,
            dims: int = PCA_DIMS, quantile: float = UNFAMILIAR_QUANTILE) -> "ShiftDetector":
        """Fit on training features (N, D) and their class labels; the threshold is the
        ``quantile`` of the validation features' scores."""
        from sklearn.covariance import LedoitWolf
        from sklearn.decomposition import PCA

        features = np.asarray(features, np.float64)
        dims = min(dims, features.shape[1], len(features) - 1)
        pca = PCA(n_components=dims, random_state=0).fit(features)
        projected = pca.transform(features)
        classes = np.unique(labels)
        means = np.stack([projected[labels == c].mean(0) for c in classes])
        within = projected - means[np.searchsorted(classes, labels)]
        precision = LedoitWolf().fit(within).precision_
        residual = ((features - pca.mean_ - projected @ pca.components_) ** 2).sum(1)
        residual_variance = float(residual.mean() / max(1, features.shape[1] - dims)) or 1e-12
        detector = cls(pca.mean_.astype(np.float32).astype(np.float64),
                       pca.components_.astype(np.float32).astype(np.float64), means, precision, residual_variance,
                       threshold=np.inf)
        detector.threshold = float(np.quantile(detector.scores(val_features), quantile))
        return detector

    def save(self, path: Path) -> None:
        """Write the statistics as safetensors (float32, C order: safetensors writes an
        array's memory as it lies, so a Fortran-ordered array would come back transposed)."""
        from safetensors.numpy import save_file

        arrays = {"centre": self.centre, "components": self.components, "class_means": self.class_means,
                  "precision": self.precision}
        save_file({**{name: np.ascontiguousarray(value, np.float32) for name, value in arrays.items()},
                   "residual_variance": np.array([self.residual_variance], np.float64),
                   "threshold": np.array([self.threshold], np.float64)}, str(path))

    @classmethod
    def load(cls, path: Path) -> "ShiftDetector":
        from safetensors.numpy import load_file

        values = {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}
        return cls(values["centre"], values["components"], values["class_means"], values["precision"],
                   float(values["residual_variance"][0]), float(values["threshold"][0]))
