"""Training and evaluating the learned segmenter on the manifest's masks.

Pairs come from every manifest row with a ``mask`` (``all_idb2`` crops and the
``wbc_seg_*`` sets); masks hold 0 background, 128 cytoplasm, 255 nucleus.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from leuko.data import RandomStainJitter, balanced_sampler
from leuko.images import load_image, load_mask
from leuko.modelstore import ModelCard, ModelStore, hardware_description
from leuko.nets.registry import TF_LITE_MEAN, TF_LITE_STD
from leuko.nets.unet import SEGMENTATION_CLASSES, build_unet
from leuko.paths import default_data_root
from leuko.progress import Callback, ProgressEvent
from leuko.train import seed_everything

MASK_LEVELS = (0, 128, 255)


@dataclass
class SegTrainConfig:
    """Settings of a segmentation training run; sizes in pixels, ``lr`` for AdamW. With
    ``balance_datasets`` each source set is drawn equally often, so the 70 CellaVision crops
    weigh as much as the 210 Jiangxi Tecom ones."""

    model_id: str = "segmentation-unet_lite0"
    arch: str = "unet_lite0"
    data_root: str | None = None
    input_size: int = 192
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    stain_jitter: float = 0.08
    seed: int = 0
    num_workers: int = 2
    pretrained: str = "auto"
    balance_datasets: bool = True


@dataclass(frozen=True)
class MaskSample:
    image: Path
    mask: Path
    dataset: str


def mask_samples(split: str, data_root: Path | None = None) -> list[MaskSample]:
    """Every (image, mask) pair of a manifest split, one per image path."""
    root = Path(data_root or default_data_root())
    table = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    rows = table[(table["mask"] != "") & (table["split"] == split)].drop_duplicates("path")
    if rows.empty:
        splits = sorted(set(table.loc[table["mask"] != "", "split"]))
        raise ValueError(f"no images with masks in split {split!r} of {root / 'manifest.csv'}; "
                         f"splits with masks: {', '.join(splits) or 'none'}")
    return [MaskSample(root / r.path, root / r.mask, r.dataset) for r in rows.itertuples(index=False)]


def mask_to_classes(mask: np.ndarray) -> np.ndarray:
    """0/128/255 mask -> class indices 0/1/2 (nearest level, so resampled masks survive)."""
    levels = np.array(MASK_LEVELS)
    return np.abs(mask[..., None].astype(np.int16) - levels).argmin(-1).astype(np.int64)


def classes_to_mask(classes: np.ndarray) -> np.ndarray:
    return np.array(MASK_LEVELS, dtype=np.uint8)[classes]


class MaskDataset(Dataset):
    """Image tensor and class-index mask, augmented jointly for training."""

    def __init__(self, samples: Sequence[MaskSample], size: int, train: bool, stain_jitter: float = 0.0) -> None:
        self.samples = list(samples)
        self.train = train
        self.stain = RandomStainJitter(stain_jitter) if train and stain_jitter > 0 else None
        geometric = [v2.RandomRotation(180), v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.9, 1.1)),
                     v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
                     v2.ColorJitter(0.15, 0.15, 0.1, 0.02)] if train else [v2.Resize((size, size))]
        self.transform = v2.Compose([*geometric, v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize(list(TF_LITE_MEAN), list(TF_LITE_STD))])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = load_image(sample.image)
        if self.stain:
            image = self.stain(image)
        mask = mask_to_classes(load_mask(sample.mask))
        image_t = tv_tensors.Image(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        mask_t = tv_tensors.Mask(torch.from_numpy(mask))
        image_t, mask_t = self.transform(image_t, mask_t)
        return image_t.as_subclass(torch.Tensor), mask_t.as_subclass(torch.Tensor).long()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes (cytoplasm, nucleus)."""
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = (probs * onehot).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1.0 - ((2 * inter + 1.0) / (total + 1.0))[1:].mean()


def dice_iou(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice and IoU of nucleus, cytoplasm and whole cell between two 0/128/255 masks."""
    out = {}
    for name, pick in (("nucleus", lambda m: m == 255), ("cytoplasm", lambda m: m == 128), ("cell", lambda m: m > 0)):
        a, b = pick(predicted), pick(truth)
        inter, total, union = (a & b).sum(), a.sum() + b.sum(), (a | b).sum()
        out[f"{name}_dice"] = float(2 * inter / total) if total else 1.0
        out[f"{name}_iou"] = float(inter / union) if union else 1.0
    return out


def mean_dice(rows: list[dict]) -> float:
    """Mean of nucleus, cytoplasm and cell Dice over the datasets of an evaluation table."""
    return float(np.mean([[r["nucleus_dice"], r["cytoplasm_dice"], r["cell_dice"]] for r in rows]))


def evaluate_masks(segment: Callable[[np.ndarray], np.ndarray], samples: Sequence[MaskSample]) -> pd.DataFrame:
    """Mean Dice/IoU per dataset (and ``ms_per_image``) of a mask function over samples."""
    rows = []
    for sample in samples:
        rgb = np.asarray(load_image(sample.image))
        truth = classes_to_mask(mask_to_classes(load_mask(sample.mask)))
        start = time.perf_counter()
        predicted = segment(rgb)
        rows.append({"dataset": sample.dataset, "ms_per_image": 1000 * (time.perf_counter() - start),
                     **dice_iou(predicted, truth)})
    table = pd.DataFrame(rows)
    summary = table.groupby("dataset").mean(numeric_only=True)
    summary.insert(0, "images", table.groupby("dataset").size())
    return summary


def train_segmenter(config: SegTrainConfig, callbacks: Iterable[Callback] = (), store: ModelStore | None = None,
                    folder: Path | None = None, make_default: bool = False) -> ModelCard:
    """Train the U-Net on the train masks, keep the best mean foreground Dice on val, and
    register it (fp16 safetensors + card with val and test Dice/IoU per dataset)."""
    from leuko.segment import LearnedSegmenter

    listeners = list(callbacks)
    seed_everything(config.seed)
    root = Path(config.data_root or default_data_root())
    train_set = MaskDataset(mask_samples("train", root), config.input_size, True, config.stain_jitter)
    val_set = MaskDataset(mask_samples("val", root), config.input_size, False)
    generator = torch.Generator().manual_seed(config.seed)
    sampler = (balanced_sampler([sample.dataset for sample in train_set.samples], generator)
               if config.balance_datasets else None)
    loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=config.num_workers, drop_last=True, persistent_workers=config.num_workers > 0,
                        generator=generator)
    val_loader = DataLoader(val_set, batch_size=config.batch_size, num_workers=0)
    network = build_unet(config.arch, len(SEGMENTATION_CLASSES), config.pretrained).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.epochs * len(loader))
    best, best_state, started, history = -1.0, None, time.perf_counter(), []
    for epoch in range(1, config.epochs + 1):
        network.train()
        total = 0.0
        for step, (images, targets) in enumerate(loader, 1):
            logits = network(images.to(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, targets) + soft_dice_loss(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
            for listener in listeners:
                listener(ProgressEvent("step", epoch=epoch, epochs=config.epochs, step=step, steps=len(loader),
                                       loss=loss.item(), elapsed_s=time.perf_counter() - started))
        network.eval()
        inter, sums = torch.zeros(3), torch.zeros(3)
        with torch.inference_mode():
            for images, targets in val_loader:
                predicted = network(images).argmax(1)
                for k in (1, 2):
                    inter[k] += ((predicted == k) & (targets == k)).sum()
                    sums[k] += (predicted == k).sum() + (targets == k).sum()
        val_dice = float((2 * inter[1:] / sums[1:].clamp(min=1)).mean())
        history.append({"epoch": epoch, "train_loss": total / len(loader), "val_dice": val_dice})
        if val_dice > best:
            best, best_state = val_dice, {k: v.detach().clone() for k, v in network.state_dict().items()}
        elapsed = time.perf_counter() - started
        for listener in listeners:
            listener(ProgressEvent("epoch", epoch=epoch, epochs=config.epochs, elapsed_s=elapsed,
                                   eta_s=elapsed / epoch * (config.epochs - epoch),
                                   metrics={"train_loss": total / len(loader), "val_dice": val_dice}))
    network.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in best_state.items()})
    network = network.to(memory_format=torch.contiguous_format).eval()
    card = ModelCard(id=config.model_id, task="segmentation", classes=list(SEGMENTATION_CLASSES), arch=config.arch,
                     input={"input_size": config.input_size, "mean": list(TF_LITE_MEAN), "std": list(TF_LITE_STD),
                            "interpolation": "bilinear", "preprocess": {}},
                     training={**asdict(config), "history": history},
                     training_time_s=round(time.perf_counter() - started, 1), hardware=hardware_description(),
                     pretrained_source=network.pretrained_source, default=make_default,
                     intended_use="Nucleus/cytoplasm masks of single leukocyte crops for morphometrics and overlays.",
                     limitations="Trained on ALL-IDB2 and two small WBC sets (Zheng et al. 2018); masks of cells from "
                                 "other stains or magnifications must be checked by eye.")
    from leuko.segment import classical_segment

    segmenter = LearnedSegmenter.from_network(network, card)
    card.metrics = {split: evaluate_masks(segmenter.segment, mask_samples(split, root)).reset_index().to_dict("records")
                    for split in ("val", "test")}
    card.metrics["classical_val"] = evaluate_masks(classical_segment, mask_samples("val", root)).reset_index().to_dict("records")
    (store or ModelStore()).save(network, card, half=True, folder=folder)
    return card
