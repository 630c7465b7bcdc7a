import numpy as np
import pytest

from leuko.clinical import flags, validate
from leuko.cohort import _rng, attach_simulated, simulate
from leuko.data import InputConfig, Sample
from leuko.modelstore import ModelCard, ModelStore
from leuko.nets import build_model
from leuko.predict import Predictor
from tests.conftest import synthetic_cell


def test_the_same_seed_gives_the_same_cohort_and_another_seed_another(tmp_path):
    samples = [Sample(tmp_path / f"{k}.png", k % 2) for k in range(20)]
    first, again = attach_simulated(samples, 0, seed=7), attach_simulated(samples, 0, seed=7)
    other = attach_simulated(samples, 0, seed=8)
    assert [s.clinical for s in first] == [s.clinical for s in again]
    assert [s.clinical for s in first] != [s.clinical for s in other]
    assert [s.clinical for s in attach_simulated(samples[::-1], 0, 7)][::-1] == [s.clinical for s in first]


def test_simulated_patients_differ_from_healthy_people_with_overlap():
    leukemic = [simulate(True, _rng(0, str(k))) for k in range(400)]
    healthy = [simulate(False, _rng(1, str(k))) for k in range(400)]
    for values in leukemic + healthy:
        validate(values)
    assert np.median([v.hemoglobin for v in leukemic]) < np.median([v.hemoglobin for v in healthy]) - 3
    assert np.mean([v.platelets < 100 for v in leukemic]) > 0.6
    assert np.mean([v.blasts_pct > 0 for v in leukemic]) > 0.8 and all(v.blasts_pct == 0 for v in healthy)
    flagged_healthy = np.mean([bool(flags(v)) for v in healthy])
    assert 0.02 < flagged_healthy < 0.6, "healthy draws should sometimes fall outside their interval"


def test_predictor_passes_clinical_values_to_a_fusion_model(tmp_path):
    store = ModelStore([tmp_path])
    card = ModelCard(id="fusion", task="all_binary", classes=["ALL", "normal"], arch="fusion_lite0",
                     input=InputConfig(input_size=64).to_dict())
    store.save(build_model("fusion_lite0", 2), card)
    predictor = Predictor("fusion", store=store)
    image = synthetic_cell(0, 64)
    patient = simulate(True, _rng(0, "x"))
    with_values = predictor.predict([image], clinical=[patient])[0]
    without = predictor.predict([image])[0]
    missing = predictor.predict([image], clinical=[None])[0]
    assert with_values.probabilities.sum() == pytest.approx(1.0)
    assert np.allclose(without.probabilities, missing.probabilities)
    assert not np.allclose(with_values.probabilities, without.probabilities)
