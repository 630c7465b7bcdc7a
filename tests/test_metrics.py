import numpy as np
import pytest

from leuko.metrics import classification_metrics, expected_calibration_error, reliability_curve, roc_pr_curves


def test_binary_metrics_against_hand_computed_values():
    # positive class 0 ("ALL"); 4 positives, 4 negatives
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p_pos = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.1, 0.4])
    probs = np.stack([p_pos, 1 - p_pos], axis=1)
    m = classification_metrics(y_true, probs, ["ALL", "normal"], positive_index=0)
    # predictions: 0,0,0,1 | 0,1,1,1 -> TP=3 FN=1 FP=1 TN=3
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["per_class"]["ALL"]["precision"] == pytest.approx(3 / 4)
    assert m["mcc"] == pytest.approx((3 * 3 - 1 * 1) / np.sqrt(4 * 4 * 4 * 4))
    # AUC: pairs (pos, neg) where pos score > neg score: 0.9,0.8,0.7 beat all 4 (12); 0.3 beats 0.2,0.1 (2)
    assert m["roc_auc"] == pytest.approx(14 / 16)
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]


def test_multiclass_macro_figures():
    y_true = np.array([0, 1, 2, 2])
    probs = np.eye(3)[[0, 2, 2, 2]] * 0.7 + 0.1
    m = classification_metrics(y_true, probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["per_class"]["b"]["sensitivity"] == 0.0
    assert m["per_class"]["c"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["a"]["specificity"] == 1.0
    assert m["per_class"]["c"]["specificity"] == pytest.approx(1 / 2)
    assert m["f1_macro"] == pytest.approx((1 + 0 + 0.8) / 3)
    assert "sensitivity" not in m


def test_ece_of_a_perfectly_calibrated_and_an_overconfident_model():
    y_true = np.array([0] * 8 + [1] * 2)
    calibrated = np.tile([0.8, 0.2], (10, 1))
    assert expected_calibration_error(y_true, calibrated) == pytest.approx(0.0)
    overconfident = np.tile([0.99, 0.01], (10, 1))
    assert expected_calibration_error(y_true, overconfident) == pytest.approx(0.19)
    curve = reliability_curve(y_true, overconfident, n_bins=10)
    assert sum(curve["count"]) == 10 and curve["accuracy"][-1] == pytest.approx(0.8)


def test_curves_skip_absent_classes():
    y_true = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1]])
    curves = roc_pr_curves(y_true, probs, ["a", "b", "c"])
    assert set(curves) == {"a", "b"} and curves["a"]["auc"] == 1.0


def test_review_threshold_keeps_99_percent_accuracy_above_it():
    from leuko.metrics import review_share, review_threshold
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, 1000)
    y_pred = np.zeros(1000, int)
    y_true = np.where(rng.uniform(size=1000) < confidence ** 8, 0, 1)  # errors concentrate at low confidence
    probs = np.stack([confidence, 1 - confidence], 1)
    t = review_threshold(y_true, probs, 0.99)
    above = confidence >= t
    assert (y_true[above] == y_pred[above]).mean() >= 0.99
    assert 0.5 < t < 1.0 and review_share(probs, t) == pytest.approx(1 - above.mean())
    assert review_threshold(np.array([1, 1]), np.array([[0.9, 0.1], [0.8, 0.2]])) == 1.0


def test_the_written_report_is_strict_json_with_empty_bins_as_null(tmp_path):
    """Empty reliability bins are NaN in memory; the file must parse in strict readers."""
    import json

    from leuko.calibration import calibrated_probabilities
    from leuko.evaluate import metrics_from_logits, write_report
    from leuko.metrics import reliability_curve, roc_pr_curves

    labels = np.array([0, 1] * 8)
    logits = np.random.default_rng(0).normal(size=(16, 2))
    probs = calibrated_probabilities(logits, 1.0)
    write_report({"model": "m", "task": "all_binary", "metrics": metrics_from_logits(logits, labels, "all_binary", 1.0),
                  "curves": roc_pr_curves(labels, probs, ["ALL", "normal"]),
                  "reliability": reliability_curve(labels, probs)}, tmp_path)

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    report = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert None in report["reliability"]["confidence"] and (tmp_path / "reliability.png").is_file()


def test_macro_figures_leave_out_a_class_absent_from_the_evaluated_set():
    """A perfect classifier on a set without one class scores 1 on macro F1 and sensitivity
    (it scored 0.8 with five classes: the absent one counted as a zero)."""
    y_true = np.array([0, 1, 2, 3] * 5)
    probs = np.eye(5)[y_true]
    metrics = classification_metrics(y_true, probs, ["a", "b", "c", "d", "e"])
    assert metrics["f1_macro"] == metrics["sensitivity_macro"] == metrics["precision_macro"] == 1.0
