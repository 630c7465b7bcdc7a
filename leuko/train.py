"""One training loop for every architecture and task, with the seeds' recipes.

Adam / Adamax / RMSprop / AdamW; reduce-on-plateau and early stopping on the validation loss;
optional two-phase fine-tuning (frozen backbone, then all layers); mixed precision on CUDA;
channels-last memory layout; DistributedDataParallel when launched with ``torchrun``; fixed seeds;
resumable checkpoints (safetensors + JSON, never pickles); the best weights by validation
loss are kept. Progress is reported only through :class:`leuko.progress.ProgressEvent`.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler

from leuko.cellmasks import RandomBackground, cell_mask_files
from leuko.config import TrainConfig
from leuko.data import (ImageDataset, InputConfig, Sample, balanced_sampler, build_transform,
                        read_folder, read_manifest, read_relabelled)
from leuko.device import pick_device
from leuko.nets import LeukoNet, build_model, get_arch
from leuko.paths import default_data_root
from leuko.preprocess import PreprocessConfig
from leuko.progress import Callback, ProgressEvent
from leuko.tasks import Task, get_task


@dataclass
class TrainResult:
    """The trained network (best validation-loss weights) and how it got there.

    ``best_epoch`` is 0 when no epoch was validated (the run was stopped before the first one
    finished) or none gave a finite validation loss: ``network`` then holds no weights worth
    keeping.
    """

    network: LeukoNet
    config: TrainConfig
    input_config: InputConfig
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    elapsed_s: float = 0.0
    stopped_early: bool = False
    run_dir: Path | None = None
    hardware: str | None = None
    """Where it was trained, when not on this machine (a run brought back from a GPU)."""
    rank: int = 0


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill unset optimiser, learning rate, freezing and preprocessing from the architecture's
    registered recipe, and the data root from ``$LEUKO_DATA`` or ``../shared/data``."""
    spec = get_arch(config.arch)
    get_task(config.task)
    recipe = spec.recipe
    return replace(
        config,
        optimizer=config.optimizer or recipe.optimizer,
        lr=config.lr if config.lr is not None else recipe.lr,
        weight_decay=config.weight_decay if config.weight_decay is not None else recipe.weight_decay,
        eps=config.eps if config.eps is not None else recipe.eps,
        freeze_epochs=config.freeze_epochs if config.freeze_epochs is not None else recipe.freeze_epochs,
        input_size=config.input_size or spec.input_size,
        preprocess=config.preprocess or PreprocessConfig(**spec.preprocessing),
        data_root=str(Path(config.data_root).resolve()) if config.data_root else str(default_data_root()),
        model_id=config.model_id or f"{config.task}-{config.arch}-{time.strftime('%Y%m%d-%H%M%S')}",
    )


def input_config_for(config: TrainConfig) -> InputConfig:
    """The input pipeline a resolved configuration implies (saved in the model card)."""
    spec = get_arch(config.arch)
    return InputConfig(input_size=config.input_size or spec.input_size, mean=spec.mean, std=spec.std,
                       interpolation=spec.interpolation, preprocess=config.preprocess or PreprocessConfig(),
                       view_zoom=config.view_zoom)


def load_split(config: TrainConfig, task: Task, split: str) -> list[Sample]:
    """Samples of a split from the configured manifest or folder."""
    root = Path(config.data_root or default_data_root())
    if config.folder:
        return read_folder(Path(config.folder), task, split)
    manifest = root / config.manifest
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} not found; set data_root (--data) or folder")
    samples = read_manifest(manifest, task, split, config.datasets)
    if config.simulated_clinical_seed is not None:
        from leuko.cohort import attach_simulated

        samples = attach_simulated(samples, task.positive_index or 0, config.simulated_clinical_seed)
    return samples


def load_training_samples(config: TrainConfig, task: Task) -> list[Sample]:
    """The train split, capped per class, plus any relabelled extra sources."""
    samples = limit_per_class(load_split(config, task, "train"), config.limit_train, config.seed)
    samples = samples * max(1, config.train_repeat)
    manifest = Path(config.data_root or default_data_root()) / config.manifest
    for extra in config.extra_train or []:
        samples += read_relabelled(manifest, task, get_task(extra["task"]), extra.get("split", "train"),
                                   extra["label_map"])
    return samples


def limit_per_class(samples: list[Sample], per_class: int | None, seed: int) -> list[Sample]:
    """A seeded random subset of at most ``per_class`` samples of each class of each source
    dataset, order kept: a cap meant for a large lab leaves a small lab's few images alone."""
    if not per_class:
        return samples
    rng = random.Random(seed)
    keep: set[int] = set()
    for group in sorted({(s.dataset, s.label) for s in samples}):
        indices = [i for i, s in enumerate(samples) if (s.dataset, s.label) == group]
        keep.update(rng.sample(indices, min(per_class, len(indices))))
    return [s for i, s in enumerate(samples) if i in keep]


def one_thread_worker(_: int) -> None:
    """Data-loading worker set-up: one thread for OpenCV and PyTorch inside each worker.
    Each worker is one process already; left to their defaults, every worker starts a thread
    per core, and on a 16-core GPU machine with 15 workers a training step took 1.8 s
    instead of about 0.1."""
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(config: TrainConfig, parameters: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The configured optimiser over the trainable parameters (seed 000: Adam lr 1e-4, eps 1e-7,
    weight decay 1e-5; seed 003: Adamax lr 1e-3; seed 002: RMSprop)."""
    params = [p for p in parameters if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, eps=config.eps, weight_decay=config.weight_decay)
    if config.optimizer == "adamax":
        return torch.optim.Adamax(params, lr=lr, eps=config.eps, weight_decay=config.weight_decay)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, eps=config.eps, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=lr, eps=config.eps, weight_decay=config.weight_decay)


def _save_checkpoint(run_dir: Path, network: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler, state: dict) -> None:
    """Write last-epoch weights, optimiser tensors and JSON state, the JSON last and atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()},
              str(run_dir / "last_model.safetensors"))
    optimizer_state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, values in optimizer_state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{name}"] = value
    save_file(tensors, str(run_dir / "last_optimizer.safetensors"))
    payload = dict(state, optimizer_groups=optimizer_state["param_groups"], optimizer_scalars=scalars,
                   scheduler=scheduler.state_dict())
    temporary = run_dir / "state.json.tmp"
    temporary.write_text(json.dumps(payload, indent=1))
    os.replace(temporary, run_dir / "state.json")


def _restore_optimizer(run_dir: Path, optimizer: torch.optim.Optimizer, payload: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in load_file(str(run_dir / "last_optimizer.safetensors")).items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    for key, value in payload["optimizer_scalars"].items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": payload["optimizer_groups"]})


def inputs_to(inputs, device: torch.device, channels_last: bool = False) -> list[torch.Tensor]:
    """A batch's network inputs (an image tensor, or image and clinical tensors) on ``device``."""
    items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    moved = [item.to(device, non_blocking=True) for item in items]
    if channels_last:
        moved[0] = moved[0].to(memory_format=torch.channels_last)
    return moved


@torch.inference_mode()
def collect_logits(network: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, K) and labels (N,) of a whole loader, the network in eval mode."""
    was_training = network.training
    network.eval()
    logits, labels = [], []
    for inputs, targets in loader:
        logits.append(network(*inputs_to(inputs, device)).float().cpu())
        labels.append(targets)
    network.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def _distributed_setup(config: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when run under ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, pick_device(config.device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and config.device != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), world, torch.device("cuda", local_rank)
    return dist.get_rank(), world, torch.device("cpu")


def _check_network_takes(network: LeukoNet, config: TrainConfig, device: torch.device) -> None:
    """Raise ``ValueError`` before the first step when the architecture cannot take the
    configured input size (its pooling shrinks small images to nothing) or a batch of one (a
    head that normalises over the batch), which would otherwise fail inside the first step."""
    if config.batch_size < 2 and any(isinstance(m, nn.BatchNorm1d) for m in network.modules()):
        raise ValueError(f"{config.arch} normalises its head over each batch: batch_size must be at least 2")
    network.eval()
    try:
        with torch.no_grad():
            network(torch.zeros(1, 3, config.input_size, config.input_size, device=device))
    except RuntimeError as exc:
        raise ValueError(f"{config.arch} cannot take {config.input_size} px images ({exc}); "
                         "choose a larger input size") from exc
    network.train()


RESUME_MUST_MATCH = ("task", "arch", "input_size", "freeze_stages", "freeze_epochs", "view_zoom")
"""Settings a resumed run must share with its checkpoint: the weights and optimizer state
saved there only fit a run with the same ones."""


def _checkpoint_to_resume(run_dir: Path, config: TrainConfig) -> dict:
    """The saved training state of ``run_dir``; raises ``ValueError`` when there is none (a
    new model id or another output folder: the run would silently start over) or when it was
    trained with other :data:`RESUME_MUST_MATCH` settings."""
    path = run_dir / "state.json"
    if not path.is_file():
        raise ValueError(f"nothing to resume in {run_dir}: give the interrupted run's model id and output folder")
    payload = json.loads(path.read_text())
    saved = payload.get("config", {})
    changed = [name for name in RESUME_MUST_MATCH if name in saved and saved[name] != getattr(config, name)]
    if changed:
        raise ValueError(f"the run in {run_dir} was trained with other {', '.join(changed)} "
                         f"({', '.join(f'{n}={saved[n]!r}' for n in changed)}); resume with the same settings")
    return payload


def train_model(config: TrainConfig, callbacks: Iterable[Callback] = (),
                should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train ``config.arch`` on ``config.task`` and return the best-validation-loss network.

    ``should_stop`` is polled between steps, so a user interface can cancel a run; the best
    weights so far are returned, and ``best_epoch`` is 0 when it stopped before any.
    """
    config = resolve_config(config)
    task = get_task(config.task)
    rank, world, device = _distributed_setup(config)
    listeners = list(callbacks) if rank == 0 else []

    def emit(event: ProgressEvent) -> None:
        for listener in listeners:
            listener(event)

    seed_everything(config.seed)
    input_config = input_config_for(config)
    train_samples = load_training_samples(config, task)
    val_samples = load_split(config, task, "val")
    fusion = get_arch(config.arch).fusion
    cell_masks, background = None, None
    if config.augment and config.background_replacement > 0:
        cell_masks = cell_mask_files(train_samples, lambda done, total: emit(ProgressEvent(
            "message", message=f"cell masks for background replacement: {done}/{total} segmented")))
        background = RandomBackground(config.background_replacement)
    train_set = ImageDataset(train_samples, build_transform(input_config, train=config.augment,
                                                            stain_jitter=config.stain_jitter,
                                                            zoom_range=config.zoom_range,
                                                            colour_invariance=config.colour_invariance,
                                                            degrade=config.degrade),
                             clinical=fusion, clinical_dropout=config.clinical_dropout,
                             cell_masks=cell_masks, background=background)
    val_set = ImageDataset(val_samples, build_transform(input_config, train=False), clinical=fusion)
    if world > 1:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
    elif config.balanced_sampling:
        sampler = balanced_sampler(train_set.labels, config.seed,
                                   [s.dataset for s in train_samples] if config.lab_balance else None)
    else:
        sampler = None
    loader_args = dict(batch_size=config.batch_size, num_workers=config.num_workers,
                       persistent_workers=config.num_workers > 0, pin_memory=device.type == "cuda",
                       worker_init_fn=one_thread_worker if config.num_workers > 0 else None)
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(train_set, sampler=sampler, shuffle=sampler is None, drop_last=len(train_set) > config.batch_size,
                              generator=generator, **loader_args)
    val_loader = DataLoader(val_set, shuffle=False, **loader_args)

    network = build_model(config.arch, task.num_classes, config.pretrained).to(device)
    _check_network_takes(network, config, device)
    network.freeze_early_stages(config.freeze_stages)
    use_amp = config.amp and device.type == "cuda"
    if config.channels_last:
        network = network.to(memory_format=torch.channels_last)
    model: nn.Module = network
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(config.freeze_epochs) or fusion)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    run_dir = Path(config.out_dir) / config.model_id

    def phase_of(epoch: int) -> int:
        return 1 if epoch <= (config.freeze_epochs or 0) else 2

    def start_phase(phase: int):
        network.freeze_backbone(phase == 1 and bool(config.freeze_epochs))
        lr = config.lr if phase == 1 or not config.freeze_epochs else config.lr * config.finetune_lr_factor
        optimizer = make_optimizer(config, network.parameters(), lr)
        if config.scheduler == "cosine":
            last = config.freeze_epochs if phase == 1 and config.freeze_epochs else config.epochs
            first = 1 if phase == 1 or not config.freeze_epochs else config.freeze_epochs + 1
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, last - first + 1))
        else:
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=config.plateau_factor, patience=config.plateau_patience)
        return optimizer, scheduler

    result = TrainResult(network=network, config=config, input_config=input_config, run_dir=run_dir, rank=rank)
    start_epoch, stale_epochs, previous_elapsed = 1, 0, 0.0
    best_state: dict[str, torch.Tensor] | None = None
    optimizer, scheduler = start_phase(phase_of(1))
    if config.resume:
        payload = _checkpoint_to_resume(run_dir, config)
        network.load_state_dict(load_file(str(run_dir / "last_model.safetensors"), device=str(device)))
        start_epoch = payload["epoch"] + 1
        optimizer, scheduler = start_phase(phase_of(start_epoch))
        if phase_of(start_epoch) == phase_of(payload["epoch"]):
            _restore_optimizer(run_dir, optimizer, payload)
            scheduler.load_state_dict(payload["scheduler"])
        result.history = payload["history"]
        result.best_epoch, result.best_val_loss = payload["best_epoch"], payload["best_val_loss"]
        stale_epochs, previous_elapsed = payload["stale_epochs"], payload["elapsed_s"]
        if (run_dir / "best_model.safetensors").is_file():
            best_state = load_file(str(run_dir / "best_model.safetensors"), device=str(device))
        emit(ProgressEvent("message", message=f"resumed {config.model_id} after epoch {payload['epoch']}"))

    steps = len(train_loader) if not config.max_steps_per_epoch else min(len(train_loader), config.max_steps_per_epoch)
    emit(ProgressEvent("start", epochs=config.epochs, steps=steps, message=(
        f"training {config.arch} on {task.id}: {len(train_set)} train / {len(val_set)} val images, "
        f"{config.input_size} px, {config.optimizer} lr {config.lr:g}, device {device}")))
    started = time.perf_counter() - previous_elapsed
    cancelled = False
    for epoch in range(start_epoch, config.epochs + 1):
        if epoch > 1 and phase_of(epoch) != phase_of(epoch - 1):
            optimizer, scheduler = start_phase(phase_of(epoch))
            emit(ProgressEvent("phase", epoch=epoch, epochs=config.epochs,
                               message=f"epoch {epoch}: backbone unfrozen, fine-tuning all layers"))
        torch.manual_seed(config.seed + epoch)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        model.train()
        running, seen = 0.0, 0
        for step, (inputs, targets) in enumerate(train_loader, start=1):
            if step > steps:
                break
            if should_stop and should_stop():
                cancelled = True
                break
            targets = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=use_amp):
                logits = model(*inputs_to(inputs, device, config.channels_last))
                loss = F.cross_entropy(logits, targets, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            running += loss.item() * len(targets)
            seen += len(targets)
            emit(ProgressEvent("step", epoch=epoch, epochs=config.epochs, step=step, steps=steps,
                               loss=loss.item(), elapsed_s=time.perf_counter() - started))
        if cancelled:
            emit(ProgressEvent("message", message="training stopped; keeping the best weights so far"
                               if best_state is not None else "training stopped before the first epoch finished"))
            break
        val_logits, val_labels = collect_logits(network, val_loader, device)
        val_loss = float(F.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(val_labels)))
        val_accuracy = float((val_logits.argmax(1) == val_labels).mean())
        current_lr = float(optimizer.param_groups[0]["lr"])
        if config.scheduler == "plateau":
            scheduler.step(val_loss)
        else:
            scheduler.step()
        elapsed = time.perf_counter() - started
        row = {"epoch": epoch, "train_loss": running / max(seen, 1), "val_loss": val_loss,
               "val_accuracy": val_accuracy, "lr": current_lr,
               "elapsed_s": elapsed}
        result.history.append(row)
        if val_loss < result.best_val_loss - 1e-6:
            result.best_val_loss, result.best_epoch, stale_epochs = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
            if rank == 0:
                run_dir.mkdir(parents=True, exist_ok=True)
                save_file({k: v.cpu().contiguous() for k, v in best_state.items()},
                          str(run_dir / "best_model.safetensors"))
        else:
            stale_epochs += 1
        if rank == 0:
            _save_checkpoint(run_dir, network, optimizer, scheduler, {
                "epoch": epoch, "history": result.history, "best_epoch": result.best_epoch,
                "best_val_loss": result.best_val_loss, "stale_epochs": stale_epochs,
                "elapsed_s": elapsed, "config": config.to_dict()})
        done = epoch - start_epoch + 1
        eta = elapsed / max(epoch, 1) * (config.epochs - epoch) if done else None
        emit(ProgressEvent("epoch", epoch=epoch, epochs=config.epochs, steps=steps,
                           loss=row["train_loss"], elapsed_s=elapsed, eta_s=eta,
                           metrics={k: v for k, v in row.items() if k in ("train_loss", "val_loss", "val_accuracy", "lr")}))
        if stale_epochs >= config.early_stopping_patience:
            result.stopped_early = True
            emit(ProgressEvent("message", message=f"early stop: no validation-loss gain for {stale_epochs} epochs"))
            break
    if best_state is not None:
        network.load_state_dict(best_state)
    network.freeze_backbone(False)
    network.freeze_early_stages(0)
    for parameter in network.parameters():
        parameter.requires_grad = True
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    result.elapsed_s = time.perf_counter() - started
    emit(ProgressEvent("done", elapsed_s=result.elapsed_s, message=(
        f"best epoch {result.best_epoch} (validation loss {result.best_val_loss:.4f}); "
        f"{result.elapsed_s / 60:.1f} min")))
    return result
