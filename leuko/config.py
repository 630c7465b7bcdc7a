"""Training configuration as a dataclass, loadable from YAML and saved in each model card."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from leuko.preprocess import PreprocessConfig

OPTIMIZERS = ("adam", "adamax", "rmsprop", "adamw")


def check_view_zoom(view_zoom: float) -> None:
    """Raises ``ValueError`` unless ``view_zoom`` is at least 1 (1 = the whole image)."""
    if not view_zoom >= 1.0:
        raise ValueError(f"view_zoom must be at least 1 (1 = the whole image), not {view_zoom}")


@dataclass
class TrainConfig:
    """One training run. ``None`` fields fall back to the architecture's registered recipe.

    Data comes from ``manifest`` (a CSV, relative to ``data_root``) or, when ``folder`` is
    set, from a folder of class sub-folders. ``limit_train`` caps the training images per
    class (for quick runs); ``max_steps_per_epoch`` caps optimiser steps per epoch.
    ``freeze_epochs`` trains the head alone first (phase one), then everything with the
    learning rate times ``finetune_lr_factor`` (phase two); ``freeze_stages`` keeps the stem
    and that many early backbone stages frozen throughout (a large CPU speed-up).
    ``scheduler`` is ``plateau`` (the seeds' reduce-on-plateau on validation loss) or
    ``cosine`` (cosine decay over each phase's epochs, better suited to short CPU runs).
    ``channels_last`` uses the NHWC memory layout (faster on CUDA and, measured, on the CPU). ``stain_jitter`` is the strength
    of stain-space colour augmentation (0 = off, 0.05-0.1 typical). ``zoom_range`` (low, high)
    replaces the default 0.7-1.0 area crop by a zoom between those factors (below 1 zooms
    out), for cells photographed at other magnifications; its factors apply to the whole
    image. ``view_zoom`` (at least 1) lets the network see only the central 1/``view_zoom``
    of each side of an image, in training and prediction (:class:`leuko.data.InputConfig`).
    ``colour_invariance`` adds hue and
    saturation jitter and grey crops (:func:`leuko.data.build_transform`), for other labs'
    stains. ``degrade`` adds blur, coarser resolution and JPEG compression
    (:class:`leuko.data.RandomDegrade`). ``lab_balance`` (with ``balanced_sampling``) draws
    images of small source datasets more often (:func:`leuko.data.balanced_sampler`), so a
    model trained on several labs does not learn mostly the largest. ``background_replacement`` is the
    share of training crops whose background outside the cell is replaced
    (:mod:`leuko.cellmasks`; 0 = off), so the network learns from the cell and not from the
    lab's smear around it. ``extra_train`` adds
    relabelled training images from another task of the same manifest, each entry
    ``{"task": ..., "split": "train", "label_map": {source class: target class}}``; the
    validation and test splits are never touched by it. ``train_repeat`` shows each image of
    the task's own train split that many times per epoch, to keep it from being swamped by
    extra sources. ``clinical_dropout`` (fusion models) withholds each clinical value, and
    the whole blood count, with that probability during training. ``simulated_clinical_seed``
    pairs every image with simulated blood counts (:mod:`leuko.cohort`), for demonstration.
    """

    task: str
    arch: str = "efficientnet_lite0"
    model_id: str | None = None
    data_root: str | None = None
    manifest: str = "manifest.csv"
    folder: str | None = None
    datasets: list[str] | None = None
    input_size: int | None = None
    pretrained: str | None = "auto"
    preprocess: PreprocessConfig | None = None
    augment: bool = True
    balanced_sampling: bool = False
    stain_jitter: float = 0.0
    zoom_range: tuple[float, float] | None = None
    view_zoom: float = 1.0
    colour_invariance: bool = False
    degrade: bool = False
    lab_balance: bool = False
    background_replacement: float = 0.0
    extra_train: list[dict] | None = None
    train_repeat: int = 1
    clinical_dropout: float = 0.3
    simulated_clinical_seed: int | None = None
    epochs: int = 10
    batch_size: int = 32
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    eps: float | None = None
    freeze_epochs: int | None = None
    freeze_stages: int = 0
    finetune_lr_factor: float = 0.1
    scheduler: str = "plateau"
    plateau_patience: int = 5
    plateau_factor: float = 0.5
    early_stopping_patience: int = 10
    label_smoothing: float = 0.0
    amp: bool = True
    channels_last: bool = True
    seed: int = 0
    num_workers: int = 2
    device: str | None = None
    limit_train: int | None = None
    max_steps_per_epoch: int | None = None
    out_dir: str = "runs"
    resume: bool = False
    half_weights: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.preprocess, dict):
            unknown = set(self.preprocess) - {f.name for f in fields(PreprocessConfig)}
            if unknown:
                raise ValueError(f"unknown preprocessing setting(s): {', '.join(sorted(unknown))}")
            self.preprocess = PreprocessConfig(**self.preprocess)
        if self.zoom_range is not None:
            if len(self.zoom_range) != 2 or not 0.0 < float(self.zoom_range[0]) <= float(self.zoom_range[1]):
                raise ValueError(f"zoom_range must be two factors, 0 < low <= high, not {self.zoom_range}")
            self.zoom_range = (float(self.zoom_range[0]), float(self.zoom_range[1]))
            if self.view_zoom > 1.0 and not self.zoom_range[0] <= self.view_zoom <= self.zoom_range[1]:
                raise ValueError(f"zoom_range {self.zoom_range} must span view_zoom {self.view_zoom}: training would "
                                 "show cells at other sizes than prediction does")
        self._check_numbers()
        self._check_extra_train()
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.scheduler not in ("plateau", "cosine"):
            raise ValueError(f"scheduler must be plateau or cosine, not {self.scheduler!r}")
        check_view_zoom(self.view_zoom)

    def _check_numbers(self) -> None:
        """Refuse counts and rates that would crash a run late or quietly ruin it."""
        least = {"epochs": 1, "batch_size": 1, "train_repeat": 1, "freeze_stages": 0, "plateau_patience": 1,
                 "early_stopping_patience": 1, "num_workers": 0, "seed": 0, "input_size": 16, "freeze_epochs": 0,
                 "limit_train": 1, "max_steps_per_epoch": 1}
        optional = {item.name for item in fields(self) if item.default is None}
        for name, minimum in least.items():
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be a whole number of at least {minimum}, not {value!r}")
        within = {"stain_jitter": (0.0, 1.0), "label_smoothing": (0.0, 0.99), "clinical_dropout": (0.0, 1.0),
                  "plateau_factor": (0.01, 0.99), "finetune_lr_factor": (1e-6, 1.0),
                  "background_replacement": (0.0, 1.0)}
        for name, (low, high) in within.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name} must be a number within {low:g}-{high:g}, not {value!r}")
        for name in ("lr", "weight_decay", "eps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
                                      or (name != "weight_decay" and value == 0)):
                raise ValueError(f"{name} must be a positive number, not {value!r}")

    def _check_extra_train(self) -> None:
        """Extra sources may only add another task's ``train`` split: a task's own images, or
        any val or test rows, would leak into training."""
        for extra in self.extra_train or []:
            if not isinstance(extra, dict) or set(extra) - {"task", "split", "label_map"} \
                    or "task" not in extra or not isinstance(extra.get("label_map"), dict):
                raise ValueError(f"each extra_train entry is {{task, split, label_map}}, not {extra!r}")
            if extra["task"] == self.task:
                raise ValueError(f"extra_train cannot add {self.task}'s own images; its train split is used already")
            if extra.get("split", "train") != "train":
                raise ValueError(f"extra_train may add only a train split, not {extra['split']!r}: other splits "
                                 "are for choosing and judging models")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: Path) -> "TrainConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
        return cls.from_dict(data)

    def with_overrides(self, **overrides) -> "TrainConfig":
        """A copy with the non-``None`` overrides applied (command-line flags over a file)."""
        data = self.to_dict()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return TrainConfig.from_dict(data)
