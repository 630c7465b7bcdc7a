import numpy as np
import pytest

from leuko.calibration import calibrated_probabilities, fit_temperature, negative_log_likelihood


def _overconfident_model(n: int = 2000, seed: int = 0):
    """Labels drawn from softmax(z), but the model reports 4 * z: far too confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.0, (n, 3))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=row) for row in p])
    return 4.0 * z, labels


def test_temperature_scaling_recovers_the_true_temperature_and_lowers_nll():
    logits, labels = _overconfident_model()
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(4.0, rel=0.15)
    assert negative_log_likelihood(logits, labels, temperature) < 0.8 * negative_log_likelihood(logits, labels)


def test_calibration_keeps_the_predicted_class_and_sums_to_one():
    logits, _ = _overconfident_model(50)
    probs = calibrated_probabilities(logits, 3.0)
    assert np.allclose(probs.sum(1), 1.0)
    assert np.array_equal(probs.argmax(1), logits.argmax(1))


def test_a_non_finite_logit_leaves_the_temperature_at_one():
    """A NaN temperature would turn every later probability into NaN."""
    logits = np.array([[np.inf, 0.0], [0.0, 2.0], [1.0, 0.0]])
    assert fit_temperature(logits, np.array([0, 1, 0])) == 1.0
