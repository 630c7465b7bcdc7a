"""Train, calibrate, evaluate and register a model in one call (what ``leuko train`` runs)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

from leuko.calibration import calibrated_probabilities, fit_temperature, negative_log_likelihood
from leuko.config import TrainConfig
from leuko.data import class_counts, file_sha256
from leuko.evaluate import metrics_from_logits, model_logits, write_report
from leuko.metrics import (expected_calibration_error, reliability_curve, review_share, review_threshold,
                           roc_pr_curves)
from leuko.modelstore import LoadedModel, ModelCard, ModelStore, hardware_description
from leuko.progress import Callback, ProgressEvent
from leuko.shiftfit import fit_model_shift
from leuko.tasks import get_task
from leuko.train import TrainResult, input_config_for, load_split, load_training_samples, resolve_config, train_model


def train_and_register(config: TrainConfig, store: ModelStore | None = None,
                       callbacks: Iterable[Callback] = (), folder: Path | None = None,
                       make_default: bool = False,
                       should_stop: Callable[[], bool] | None = None,
                       report_dir: Path | None = None) -> ModelCard | None:
    """Train, fit the temperature on ``val``, evaluate once on ``test`` and save the model;
    with ``report_dir`` the test evaluation's figures and plots are written there too.

    Returns the saved card, whose ``metrics`` hold the validation and test figures; under
    ``torchrun`` only rank 0 registers the model and the other ranks return ``None``. An id
    that a model of another task has is refused before training. When no epoch was validated
    (stopped before the first one finished) nothing is registered: the callbacks are told why
    and ``None`` is returned, so untrained weights never become a model. A test split that
    cannot be read is refused before training, not after it.
    """
    store = store or ModelStore()
    callbacks = list(callbacks)
    if config.model_id:
        store.check_new_id(config.model_id, config.task, replace=True, folder=folder)
    try:
        test_samples = load_split(config, get_task(config.task), "test")
    except ValueError as exc:
        raise ValueError(f"the test split cannot be read, so the model could not be evaluated after training "
                         f"(checked before it starts): {exc}") from exc
    result = train_model(config, callbacks, should_stop)
    if result.rank != 0:
        return None
    return register_result(result, store, callbacks, folder, make_default, report_dir, test_samples)


def samples_digest(samples: list, root: Path) -> str:
    """sha256 of a split's images (paths relative to ``root``) and labels, in sorted order:
    two models with the same digest were tested on the same images, wherever the data lies."""
    import hashlib

    def name(path: Path) -> str:
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name

    lines = sorted(f"{name(Path(s.path))}\t{s.label}" for s in samples)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


PIXEL_SIZE_SAMPLE = 400
"""Training images whose red cells are measured for the model's training pixel size."""


def training_scale(samples: list, view_zoom: float, seed: int = 0) -> dict[str, float | None]:
    """The training images' physical scale, for :class:`leuko.data.InputConfig`: the median
    micrometres per pixel of up to :data:`PIXEL_SIZE_SAMPLE` of them, from their red cells
    (:mod:`leuko.scale`), and the median width in micrometres of the network's view of those
    images; both ``None`` when no image shows enough red cells."""
    import random

    import numpy as np

    from leuko.images import load_image
    from leuko.scale import RED_CELL_UM, red_cell_diameter_px

    chosen = random.Random(seed).sample(samples, min(PIXEL_SIZE_SAMPLE, len(samples)))
    measured = []
    for sample in chosen:
        image = np.asarray(load_image(sample.path))
        diameter = red_cell_diameter_px(image)
        if diameter:
            pixel_size = RED_CELL_UM / diameter
            measured.append((pixel_size, min(image.shape[:2]) * pixel_size / view_zoom))
    if not measured:
        return {"pixel_size_um": None, "view_um": None}
    sizes, views = zip(*measured)
    return {"pixel_size_um": round(float(np.median(sizes)), 4), "view_um": round(float(np.median(views)), 2)}


def register_result(result: TrainResult, store: ModelStore | None = None, callbacks: Iterable[Callback] = (),
                    folder: Path | None = None, make_default: bool = False, report_dir: Path | None = None,
                    test_samples: list | None = None) -> ModelCard | None:
    """Calibrate a trained network on ``val``, evaluate it once on ``test``, save it with its
    card and fit its shift detector on its training images (the second half of :func:`train_and_register`, also used for a run trained on
    another machine, :func:`load_exported_run`). Returns ``None`` when no epoch was validated."""
    store = store or ModelStore()
    callbacks = list(callbacks)
    config = result.config
    task = get_task(config.task)
    test_samples = test_samples if test_samples is not None else load_split(config, task, "test")
    if result.best_epoch == 0:
        reason = ("stopped before the first epoch finished" if not result.history
                  else "no epoch gave a finite validation loss")
        for listener in callbacks:
            listener(ProgressEvent("message", message=f"{reason}: no model registered"))
        return None
    if config.half_weights:
        result.network.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                                        for k, v in result.network.state_dict().items()})
    card = ModelCard(id=config.model_id, task=task.id, classes=task.class_ids, arch=config.arch,
                     input=result.input_config.to_dict(), training=config.to_dict(),
                     training_time_s=round(result.elapsed_s, 1), hardware=result.hardware or hardware_description(),
                     pretrained_source=result.network.pretrained_source, default=make_default)
    card.training["history"] = result.history
    card.training["best_epoch"] = result.best_epoch
    loaded = LoadedModel(card, result.network.eval())
    splits = {"train": list({s.path: s for s in load_training_samples(config, task)}.values()),
              "val": load_split(config, task, "val"), "test": test_samples}
    card.input.update(training_scale(splits["train"], result.input_config.view_zoom, config.seed))
    for listener in callbacks:
        listener(ProgressEvent("message", message="calibrating on val and evaluating on test"))
    val_logits, val_labels = model_logits(loaded, splits["val"], config.device)
    card.temperature = fit_temperature(val_logits, val_labels)
    test_logits, test_labels = model_logits(loaded, splits["test"], config.device)
    card.review_threshold = review_threshold(val_labels, calibrated_probabilities(val_logits, card.temperature))
    test_probs = calibrated_probabilities(test_logits, card.temperature)
    card.metrics = {
        "test_ece_before_calibration": expected_calibration_error(test_labels, calibrated_probabilities(test_logits, 1.0)),
        "test_review_share": review_share(test_probs, card.review_threshold),
        "val": metrics_from_logits(val_logits, val_labels, task.id, card.temperature),
        "test": metrics_from_logits(test_logits, test_labels, task.id, card.temperature),
        "val_nll_before_calibration": negative_log_likelihood(val_logits, val_labels),
        "val_nll_after_calibration": negative_log_likelihood(val_logits, val_labels, card.temperature),
    }
    source = Path(config.folder) if config.folder else Path(config.data_root) / config.manifest
    card.data = {"source": str(source),
                 "manifest_sha256": file_sha256(source) if source.is_file() else None,
                 "datasets": config.datasets,
                 "split_sizes": {split: class_counts(samples, task) for split, samples in splits.items()},
                 "test_sha256": samples_digest(splits["test"], Path(config.folder or config.data_root)),
                 "extra_train": config.extra_train}
    if config.simulated_clinical_seed is not None:
        from leuko.cohort import SIMULATED_NOTICE

        withheld_logits, _ = model_logits(loaded, splits["test"], config.device, withhold_clinical=True)
        card.metrics["test_clinical_withheld"] = metrics_from_logits(withheld_logits, test_labels, task.id,
                                                                      card.temperature)
        card.limitations = f"{SIMULATED_NOTICE} {card.limitations}"
    store.save(result.network, card, half=config.half_weights, folder=folder)
    for listener in callbacks:
        listener(ProgressEvent("message", message="fitting the shift detector on the training images"))
    card = fit_model_shift(card.id, store, config.data_root, config.datasets)
    if report_dir is not None:
        write_report({"model": card.id, "task": task.id, "metrics": card.metrics["test"],
                      "curves": roc_pr_curves(test_labels, test_probs, task.class_ids),
                      "reliability": reliability_curve(test_labels, test_probs)}, report_dir)
    return card


def export_run(result: TrainResult, folder: Path) -> Path:
    """Write a finished run's best weights (float16 safetensors) and its configuration and
    history (JSON) to ``folder``, small enough to bring back from a GPU machine; registered
    where the full data is with :func:`load_exported_run` and :func:`register_result`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{result.config.model_id}.safetensors"
    save_file({k: (v.half() if v.is_floating_point() else v).cpu().contiguous()
               for k, v in result.network.state_dict().items()}, str(weights))
    (folder / f"{result.config.model_id}.json").write_text(json.dumps({
        "config": result.config.to_dict(), "history": result.history, "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss, "elapsed_s": result.elapsed_s,
        "pretrained_source": result.network.pretrained_source, "hardware": hardware_description()}, indent=1))
    return weights


def load_exported_run(path: Path, data_root: str | None = None) -> TrainResult:
    """A :class:`TrainResult` from :func:`export_run`'s JSON file (weights beside it), with
    the data root replaced by ``data_root`` (or the default) for calibration and test."""
    from safetensors.torch import load_file

    from leuko.nets import build_model

    saved = json.loads(path.read_text())
    values = dict(saved["config"], data_root=data_root, pretrained="none", device=None, resume=False)
    config = resolve_config(TrainConfig.from_dict(values))
    network = build_model(config.arch, get_task(config.task).num_classes, "none")
    network.load_state_dict({k: v.float() if v.is_floating_point() else v
                             for k, v in load_file(str(path.with_suffix(".safetensors"))).items()})
    network.pretrained_source = saved["pretrained_source"]
    config = replace(config, pretrained=saved["config"]["pretrained"])
    return TrainResult(network=network.eval(), config=config, input_config=input_config_for(config),
                       history=saved["history"], best_epoch=saved["best_epoch"],
                       best_val_loss=saved["best_val_loss"], elapsed_s=saved["elapsed_s"],
                       hardware=saved["hardware"])
