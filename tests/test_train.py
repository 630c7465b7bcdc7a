import json

import numpy as np
import pytest
import torch

import leuko.train as train_module
from leuko.config import TrainConfig
from leuko.nets import build_model
from leuko.progress import ProgressEvent
from leuko.train import input_config_for, resolve_config, train_model


def _config(folder, tmp_path, **overrides) -> TrainConfig:
    settings = dict(task="all_binary", arch="seed004_squeezenet", folder=str(folder), pretrained=None,
                    input_size=48, epochs=4, batch_size=8, lr=3e-3, optimizer="adamw", num_workers=0,
                    augment=False, out_dir=str(tmp_path / "runs"), model_id="t", half_weights=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_training_lowers_the_loss_and_reports_progress(binary_folder, tmp_path):
    events: list[ProgressEvent] = []
    result = train_model(_config(binary_folder, tmp_path), callbacks=[events.append])
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.7 * losses[0]
    kinds = {e.kind for e in events}
    assert {"start", "step", "epoch", "done"} <= kinds
    epoch_events = [e for e in events if e.kind == "epoch"]
    assert epoch_events[-1].metrics["val_loss"] == pytest.approx(result.history[-1]["val_loss"])
    assert epoch_events[0].eta_s is not None and epoch_events[0].eta_s > 0
    assert result.best_val_loss == min(r["val_loss"] for r in result.history)
    assert (tmp_path / "runs" / "t" / "best_model.safetensors").is_file()


def test_two_phase_training_freezes_then_releases_the_backbone(binary_folder, tmp_path, monkeypatch):
    initial: dict[str, torch.Tensor] = {}

    def recording_build_model(*args, **kwargs):
        network = build_model(*args, **kwargs)
        initial.update({k: v.clone() for k, v in network.backbone.state_dict().items()})
        return network

    def backbone_unchanged(result) -> bool:
        return all(torch.equal(initial[k], v) for k, v in result.network.backbone.state_dict().items())

    monkeypatch.setattr(train_module, "build_model", recording_build_model)
    assert backbone_unchanged(train_model(_config(binary_folder, tmp_path, epochs=1, freeze_epochs=1)))
    events: list[ProgressEvent] = []
    result = train_model(_config(binary_folder, tmp_path, epochs=2, freeze_epochs=1, model_id="t2"),
                         callbacks=[events.append])
    assert any(e.kind == "phase" for e in events) and result.best_epoch == 2
    assert not backbone_unchanged(result)
    assert all(p.requires_grad for p in result.network.parameters())
    assert result.history[1]["lr"] == pytest.approx(3e-4)


def test_resume_continues_from_the_last_checkpoint(binary_folder, tmp_path):
    train_model(_config(binary_folder, tmp_path, epochs=2, optimizer="adam"))
    resumed = train_model(_config(binary_folder, tmp_path, epochs=3, optimizer="adam", resume=True))
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
    state = json.loads((tmp_path / "runs" / "t" / "state.json").read_text())
    assert state["epoch"] == 3
    with pytest.raises(ValueError, match="other input_size"):
        train_model(_config(binary_folder, tmp_path, epochs=4, optimizer="adam", resume=True, input_size=40))
    with pytest.raises(ValueError, match="nothing to resume"):
        train_model(_config(binary_folder, tmp_path / "elsewhere", epochs=4, optimizer="adam", resume=True))


def test_same_seed_gives_the_same_weights(binary_folder, tmp_path):
    a = train_model(_config(binary_folder, tmp_path / "a", epochs=1))
    b = train_model(_config(binary_folder, tmp_path / "b", epochs=1))
    for (name, x), y in zip(a.network.state_dict().items(), b.network.state_dict().values()):
        assert np.allclose(x.numpy(), y.numpy()), name


def test_early_stopping_and_cancellation(binary_folder, tmp_path):
    result = train_model(_config(binary_folder, tmp_path, epochs=6, lr=1e-9, early_stopping_patience=1))
    assert result.stopped_early and len(result.history) < 6
    cancelled = train_model(_config(binary_folder, tmp_path / "c", epochs=3), should_stop=lambda: True)
    assert cancelled.history == []


@pytest.mark.parametrize("optimizer", ["adam", "adamax", "rmsprop", "adamw"])
def test_every_optimizer_runs_a_step(binary_folder, tmp_path, optimizer):
    result = train_model(_config(binary_folder, tmp_path, epochs=1, optimizer=optimizer, max_steps_per_epoch=1))
    assert len(result.history) == 1 and np.isfinite(result.history[0]["train_loss"])


def test_recipe_defaults_come_from_the_architecture(binary_folder):
    resolved = resolve_config(TrainConfig(task="ball_subtype", arch="melba_image", folder=str(binary_folder)))
    assert (resolved.optimizer, resolved.lr, resolved.eps, resolved.weight_decay) == ("adam", 1e-4, 1e-7, 1e-5)
    assert resolve_config(TrainConfig(task="all_binary", arch="seed003_vgg16")).optimizer == "adamax"
    assert resolve_config(TrainConfig(task="all_binary", arch="oadls_acrnn")).preprocess.equalization == "dhe"
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(task="all_binary", optimizer="sgdx")
    assert input_config_for(resolve_config(TrainConfig(task="all_binary", view_zoom=1.4))).view_zoom == 1.4
    with pytest.raises(ValueError, match="view_zoom"):
        TrainConfig(task="all_binary", view_zoom=0.5)
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainConfig.from_dict({"task": "all_binary", "epoks": 3})


def test_cosine_schedule_decays_to_zero_over_the_run(binary_folder, tmp_path):
    result = train_model(_config(binary_folder, tmp_path, epochs=3, scheduler="cosine", max_steps_per_epoch=1))
    rates = [row["lr"] for row in result.history]
    assert rates[0] == pytest.approx(3e-3) and rates[0] > rates[1] > rates[2] > 0


@pytest.mark.parametrize("settings, words", [
    ({"extra_train": [{"task": "all_binary", "split": "test", "label_map": {"ALL": "ALL"}}]}, "own images"),
    ({"extra_train": [{"task": "ball_subtype", "split": "val", "label_map": {"Pro": "ALL"}}]}, "only a train split"),
    ({"extra_train": [{"task": "ball_subtype"}]}, "each extra_train entry"),
    ({"max_steps_per_epoch": -1}, "max_steps_per_epoch"),
    ({"early_stopping_patience": 0}, "early_stopping_patience"),
    ({"freeze_epochs": -1}, "freeze_epochs"),
    ({"epochs": "10"}, "epochs"),
    ({"plateau_factor": 1.0}, "plateau_factor"),
    ({"label_smoothing": 1.5}, "label_smoothing"),
    ({"zoom_range": [2.0, 1.0]}, "0 < low <= high"),
    ({"zoom_range": [1.0]}, "two factors"),
    ({"zoom_range": [0.8, 1.2], "view_zoom": 2.0}, "must span view_zoom"),
    ({"preprocess": {"equalisation": "clahe"}}, "unknown preprocessing"),
    ({"preprocess": {"equalization": "CLAHE"}}, "equalization must be one of"),
    ({"lr": 0}, "lr must be a positive"),
])
def test_settings_that_would_leak_data_crash_late_or_ruin_a_run_are_refused_up_front(settings, words):
    """Each used to be accepted: extra sources could add the task's own test split or
    another task's val rows to training, and the rest crashed mid-run or silently trained
    nothing (``max_steps_per_epoch: -1``) or stopped after one epoch (patience 0)."""
    with pytest.raises(ValueError, match=words):
        TrainConfig(task="all_binary", **settings)


@pytest.mark.parametrize("arch, overrides, words", [
    ("seed003_alexnet", {"input_size": 32}, "cannot take 32 px"),
    ("seed003_alexnet", {"batch_size": 1, "input_size": 64}, "batch_size must be at least 2"),
])
def test_an_architecture_that_cannot_take_the_settings_is_refused_before_the_first_step(
        binary_folder, tmp_path, arch, overrides, words):
    with pytest.raises(ValueError, match=words):
        train_model(_config(binary_folder, tmp_path, arch=arch, **overrides))
