"""Temperature scaling (Guo et al., ICML 2017): one scalar T > 0 dividing the logits,
fitted on the validation split by minimising the negative log-likelihood.

It leaves the predicted class unchanged and only makes the confidence honest, which is what
the dashboard's "needs review" threshold relies on.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch.nn import functional as F

log = logging.getLogger(__name__)


def fit_temperature(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                    max_iter: int = 200) -> float:
    """Return the temperature minimising the NLL of ``softmax(logits / T)`` on ``labels``.

    Optimised over log T with L-BFGS, so T stays positive; the result is clamped to
    [0.05, 20] so a degenerate validation set cannot produce an absurd value, and a fit that
    does not converge (a non-finite logit) leaves T = 1 with a logged warning.
    """
    logits_t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits_t / log_t.exp(), labels_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = log_t.exp().item()
    if not math.isfinite(temperature):
        log.warning("temperature scaling did not converge (non-finite validation logits); keeping T = 1")
        return 1.0
    return float(np.clip(temperature, 0.05, 20.0))


def calibrated_probabilities(logits: np.ndarray | torch.Tensor, temperature: float) -> np.ndarray:
    """Softmax of ``logits / temperature`` as a float64 array whose rows sum to 1."""
    scaled = torch.as_tensor(np.asarray(logits), dtype=torch.float64) / temperature
    return torch.softmax(scaled, dim=1).numpy()


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean NLL (nats per sample) of the temperature-scaled softmax."""
    scaled = torch.as_tensor(np.asarray(logits), dtype=torch.float64) / temperature
    return float(F.cross_entropy(scaled, torch.as_tensor(np.asarray(labels), dtype=torch.long)))
