"""Shift detection: images unlike a model's training images score higher and need review."""

import csv
import io
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from leuko.modelstore import ModelIntegrityError, ModelStore
from leuko.predict import Predictor
from leuko.shift import ShiftDetector


def gaussian_classes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes of 64-dimensional features with unequal spreads per dimension."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    centres = np.random.default_rng(99).normal(0, 3, (3, 64))
    spread = np.linspace(0.05, 1.0, 64)
    return centres[labels] + rng.normal(0, 1, (n, 64)) * spread, labels


def test_scores_are_near_one_for_training_like_features_and_grow_away_from_them(tmp_path):
    features, labels = gaussian_classes(3000, 0)
    val, _ = gaussian_classes(500, 1)
    detector = ShiftDetector.fit(features, labels, val, dims=16)
    assert np.median(detector.scores(features)) == pytest.approx(1.0, abs=0.1)
    assert detector.unfamiliar(detector.scores(val)).mean() == pytest.approx(0.05, abs=0.01)
    direction = np.random.default_rng(2).normal(0, 1, 64)
    medians = [np.median(detector.scores(val + step * direction)) for step in (0.0, 0.5, 1.0, 2.0)]
    assert medians == sorted(medians) and medians[-1] > 2 * medians[0]
    detector.save(tmp_path / "shift.safetensors")
    again = ShiftDetector.load(tmp_path / "shift.safetensors")
    assert np.allclose(again.scores(val), detector.scores(val), rtol=1e-4) and again.threshold == detector.threshold


@pytest.mark.shared_data
def test_hue_shifted_or_rescaled_copies_score_higher_than_the_crops(shared_data):
    from leuko.data import read_manifest
    from leuko.tasks import get_task

    samples = read_manifest(shared_data / "manifest.csv", get_task("wbc_type"), "test", ["pbc_wbc"])[::40]
    images = [cv2.cvtColor(cv2.imread(str(s.path)), cv2.COLOR_BGR2RGB) for s in samples]
    hsv = [cv2.cvtColor(image, cv2.COLOR_RGB2HSV) for image in images]
    hue_shifted = [cv2.cvtColor(np.dstack([(h[..., 0].astype(int) + 60) % 180, h[..., 1], h[..., 2]]).astype(np.uint8),
                                cv2.COLOR_HSV2RGB) for h in hsv]
    rescaled = [cv2.resize(image[image.shape[0] // 3:-image.shape[0] // 3, image.shape[1] // 3:-image.shape[1] // 3],
                           image.shape[1::-1]) for image in images]
    predictor = Predictor(task="wbc_type")
    scores = {name: np.array([p.shift_score for p in predictor.predict(batch)])
              for name, batch in (("crops", images), ("hue", hue_shifted), ("rescaled", rescaled))}
    assert np.median(scores["hue"]) > np.median(scores["crops"])
    assert np.median(scores["rescaled"]) > np.median(scores["crops"])
    assert (scores["crops"] <= predictor.shift.threshold).mean() >= 0.8
    predictions = predictor.predict(hue_shifted)
    assert all(p.needs_review for p in predictions if p.unfamiliar) and any(p.unfamiliar for p in predictions)


def test_every_shipped_classifier_has_a_shift_detector_that_loads():
    store = ModelStore()
    for card in store.cards():
        if card.task == "segmentation":
            continue
        assert card.shift and card.shift["threshold"] > 0, card.id
        assert store.load(card.id).shift is not None


def test_a_tampered_shift_file_is_refused(tmp_path, monkeypatch):
    import shutil

    from leuko.paths import SHIPPED_MODELS

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    for suffix in (".json", ".safetensors", ".shift.safetensors"):
        shutil.copy(SHIPPED_MODELS / f"all_binary-lite0{suffix}", home / "models" / f"all_binary-lite0{suffix}")
    monkeypatch.setenv("LEUKO_HOME", str(home))
    path = home / "models" / "all_binary-lite0.shift.safetensors"
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ModelIntegrityError, match="shift statistics"):
        ModelStore().load("all_binary-lite0")


def test_a_card_without_shift_statistics_loads_as_not_measured(tmp_path, monkeypatch):
    import shutil

    from leuko.paths import SHIPPED_MODELS

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    card = json.loads((SHIPPED_MODELS / "all_binary-lite0.json").read_text())
    card.pop("shift")
    card["id"] = "old-card"
    (home / "models" / "old-card.json").write_text(json.dumps(card))
    shutil.copy(SHIPPED_MODELS / "all_binary-lite0.safetensors", home / "models" / "old-card.safetensors")
    monkeypatch.setenv("LEUKO_HOME", str(home))
    predictor = Predictor("old-card", check_cell_type=False)
    rgb = np.full((64, 64, 3), (230, 200, 210), np.uint8)
    cv2.circle(rgb, (32, 32), 14, (90, 40, 140), -1)
    prediction = predictor.predict([rgb])[0]
    assert predictor.shift is None and prediction.shift_score is None and not prediction.unfamiliar


@pytest.mark.shared_data
def test_a_granulocyte_asked_the_all_question_is_not_applicable(shared_data):
    from leuko.data import read_manifest
    from leuko.tasks import get_task

    neutrophils = [s.path for s in read_manifest(shared_data / "manifest.csv", get_task("wbc_type"), "test",
                                                 ["pbc_wbc"]) if s.label == get_task("wbc_type").index_of("neutrophil")][:6]
    predictions = Predictor(task="all_binary").predict(neutrophils)
    assert all(p.needs_review for p in predictions)
    assert sum(p.not_applicable is not None for p in predictions) >= 5
    assert all("not a lymphocyte" in p.not_applicable for p in predictions if p.not_applicable)


@pytest.mark.shared_data
def test_predict_csv_carries_shift_columns_for_every_task(shared_data, tmp_path):
    crop = next((shared_data / "pbc_wbc").rglob("*.jpg"))
    for task in ("all_binary", "ball_subtype", "wbc_type"):
        run = subprocess.run([sys.executable, "-m", "leuko", "predict", "--task", task, str(crop)],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        row = next(csv.DictReader(io.StringIO(run.stdout)))
        header = list(row)
        assert header.index("shift_score") + 1 == header.index("unfamiliar") == header.index("cell") - 1
        assert float(row["shift_score"]) > 0 and row["unfamiliar"] in ("True", "False")
        if row["unfamiliar"] == "True":
            assert row["needs_review"] == "True"
