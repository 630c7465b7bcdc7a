"""Train-and-register (what ``leuko train`` runs): nothing untrained is registered, and no
model of another task is replaced or shadowed."""

import pytest

from leuko.config import TrainConfig
from leuko.modelstore import ModelStore
from leuko.pipeline import train_and_register
from leuko.progress import ProgressEvent
from tests.test_modelstore import _save


def _config(folder, tmp_path, **overrides) -> TrainConfig:
    settings = dict(task="all_binary", arch="seed004_squeezenet", folder=str(folder), pretrained=None,
                    input_size=32, epochs=1, batch_size=8, num_workers=0, out_dir=str(tmp_path / "runs"),
                    model_id="m", half_weights=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_a_run_stopped_before_its_first_epoch_registers_nothing_and_says_so(binary_folder, tmp_path):
    store = ModelStore([tmp_path / "models"])
    events: list[ProgressEvent] = []
    card = train_and_register(_config(binary_folder, tmp_path, epochs=3), store, [events.append],
                              should_stop=lambda: True, report_dir=tmp_path / "report")
    assert card is None and store.cards() == [] and not (tmp_path / "report").exists()
    assert events[-1].message == "stopped before the first epoch finished: no model registered"


def test_another_tasks_model_id_is_refused_before_training(binary_folder, tmp_path):
    store = ModelStore([tmp_path / "models", tmp_path / "shipped"])
    _save(ModelStore([tmp_path / "shipped"]), "wbc_type-lite0", task="wbc_type", default=True)
    events: list[ProgressEvent] = []
    with pytest.raises(ValueError, match=r"another task \(wbc_type\)"):
        train_and_register(_config(binary_folder, tmp_path, model_id="wbc_type-lite0"), store, [events.append])
    assert events == [] and [c.id for c in store.cards()] == ["wbc_type-lite0"]


def test_retraining_a_shipped_default_under_its_id_still_works(binary_folder, tmp_path):
    shipped = tmp_path / "shipped"
    _save(ModelStore([shipped]), "m", default=True)
    card = train_and_register(_config(binary_folder, tmp_path, max_steps_per_epoch=1), ModelStore([shipped]),
                              folder=shipped)
    assert card is not None and card.default and card.training["best_epoch"] == 1
    assert ModelStore([shipped]).default_id("all_binary") == "m"


def test_a_folder_without_a_test_split_is_refused_before_training(binary_folder, tmp_path):
    """It used to train the whole run and then fail at the test evaluation."""
    import shutil

    partial = tmp_path / "partial"
    for split in ("train", "val"):
        shutil.copytree(binary_folder / split, partial / split)
    events: list[ProgressEvent] = []
    with pytest.raises(ValueError, match="test split cannot be read"):
        train_and_register(_config(partial, tmp_path), ModelStore([tmp_path / "models"]), [events.append])
    assert events == [] and not (tmp_path / "runs").exists()
