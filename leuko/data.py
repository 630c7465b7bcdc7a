"""Datasets from a manifest CSV or a folder of class sub-folders, and smear-cell transforms.

Manifest CSV columns (as ``../shared/data/manifest.csv``): ``path`` (relative to the
manifest's folder), ``mask``, ``dataset``, ``task``, ``label``, ``split``. Its fixed splits
are used as they are, so every figure the project reports is comparable.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Hashable, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, WeightedRandomSampler
from torchvision.transforms import v2

from leuko.clinical import ClinicalValues, encode, from_row
from leuko.config import check_view_zoom
from leuko.images import IMAGE_SUFFIXES, load_image, load_mask
from leuko.preprocess import PreprocessConfig, denoise_and_equalize, normalize_stain
from leuko.tasks import Task

SPLITS = ("train", "val", "test")


@dataclass
class InputConfig:
    """How an image becomes the network's input tensor; saved in each model card.

    ``input_size`` is the square side in pixels; ``mean``/``std`` per RGB channel on the
    0-1 scale; ``interpolation`` is ``bilinear`` or ``bicubic``. ``view_zoom`` (at least 1)
    makes the network see only the central 1/``view_zoom`` of each side of an image, so a
    centred cell fills more of its input and of its explanation grid (1: the whole image).
    ``pixel_size_um`` is the training images' median micrometres per pixel (from their red
    cells) and ``view_um`` the width in micrometres of the network's view of a median training
    image (``None``: not recorded); an image whose pixel size is known is cut or padded to
    the same physical view (:func:`physical_view`), so a cell photographed at another
    magnification fills as much of the network's input as in training.
    """

    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    view_zoom: float = 1.0
    pixel_size_um: float | None = None
    view_um: float | None = None

    def __post_init__(self) -> None:
        check_view_zoom(self.view_zoom)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "InputConfig":
        values = dict(data)
        values["preprocess"] = PreprocessConfig(**values.get("preprocess", {}))
        values["mean"] = tuple(values.get("mean", cls.mean))
        values["std"] = tuple(values.get("std", cls.std))
        return cls(**values)


@dataclass(frozen=True)
class Sample:
    """One labelled image: absolute path, class index and the dataset it came from."""

    path: Path
    label: int
    dataset: str = ""
    mask: Path | None = None
    clinical: ClinicalValues | None = None


def physical_side(pixel_size_um: float | None, view_um: float | None, view_zoom: float) -> int | None:
    """Side in pixels of the square whose central 1/``view_zoom`` spans ``view_um``
    micrometres at ``pixel_size_um`` micrometres per pixel; ``None`` when either is unknown."""
    if not pixel_size_um or not view_um:
        return None
    return max(1, round(view_um / pixel_size_um * view_zoom))


def square_about(rgb: np.ndarray, centre: tuple[float, float], side: int) -> np.ndarray:
    """The ``side`` x ``side`` square of ``rgb`` centred on ``centre`` (x, y pixels), mirrored
    beyond the image's border."""
    height, width = rgb.shape[:2]
    x0, y0 = int(round(centre[0] - side / 2)), int(round(centre[1] - side / 2))
    pad = max(0, -x0, -y0, x0 + side - width, y0 + side - height)
    if pad:
        rgb = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    return np.ascontiguousarray(rgb[y0 + pad:y0 + pad + side, x0 + pad:x0 + pad + side])


def physical_view(image: Image.Image, pixel_size_um: float | None, view_um: float | None,
                  view_zoom: float) -> Image.Image:
    """``image`` cut or padded (mirrored) about its centre to :func:`physical_side`, so that
    the network's view (the central 1/``view_zoom``, :class:`CentreView`) spans ``view_um``
    micrometres, as it did in training: a cell photographed at another magnification then
    fills as much of the view as the training cells did. Unchanged when the image's
    ``pixel_size_um`` or the model's ``view_um`` is unknown. A cell in a larger image should be
    cut from it at this side (:func:`square_about`) rather than padded."""
    side = physical_side(pixel_size_um, view_um, view_zoom)
    if side is None or (image.width == image.height == side):
        return image
    return Image.fromarray(square_about(np.asarray(image), (image.width / 2, image.height / 2), side))


def from_physical_view(placed: np.ndarray, height: int, width: int) -> np.ndarray:
    """A map over the square :func:`physical_view` made of a ``height`` x ``width`` image,
    placed back on that image's pixels (the inverse cut; zero where the square did not reach)."""
    side = placed.shape[0]
    out = np.zeros((height, width), placed.dtype)
    x0, y0 = int(round(width / 2 - side / 2)), int(round(height / 2 - side / 2))
    top, left = max(0, y0), max(0, x0)
    bottom, right = min(height, y0 + side), min(width, x0 + side)
    out[top:bottom, left:right] = placed[top - y0:bottom - y0, left - x0:right - x0]
    return out


def view_box(height: int, width: int, zoom: float) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) in pixels of the central 1/``zoom`` of each side of a
    ``height`` x ``width`` image: the part a network with that ``view_zoom`` sees."""
    view_height, view_width = max(1, round(height / zoom)), max(1, round(width / zoom))
    top, left = (height - view_height) // 2, (width - view_width) // 2
    return top, left, top + view_height, left + view_width


class CentreView:
    """Crops a PIL image or a (H, W[, C]) array to its central 1/``zoom`` of each side
    (:func:`view_box`)."""

    def __init__(self, zoom: float) -> None:
        self.zoom = zoom

    def __call__(self, image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
        if isinstance(image, Image.Image):
            top, left, bottom, right = view_box(image.height, image.width, self.zoom)
            return image if self.zoom == 1.0 else image.crop((left, top, right, bottom))
        top, left, bottom, right = view_box(image.shape[0], image.shape[1], self.zoom)
        return image[top:bottom, left:right]


class SmearPreprocess:
    """Applies the configured classical preprocessing (Wiener, DHE/CLAHE) to a PIL image."""

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config

    def __call__(self, image: Image.Image) -> Image.Image:
        if not self.config.denoises:
            return image
        return Image.fromarray(denoise_and_equalize(np.asarray(image), self.config))


class StainNormalize:
    """Applies the configured stain normalisation to a PIL image or a (3, H, W) uint8 tensor.
    It runs after the training augmentations, so the network learns from normalised colours
    whatever the jitter did."""

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        if self.config.stain_normalization == "none":
            return image
        if isinstance(image, torch.Tensor):
            return torch.from_numpy(normalize_stain(image.permute(1, 2, 0).numpy(), self.config)).permute(2, 0, 1)
        return Image.fromarray(normalize_stain(np.asarray(image), self.config))


class RandomZoom:
    """A change of magnification by a factor drawn log-uniformly from ``zoom_range``, about a
    point near the centre, resized to ``size`` pixels square. Above 1 it crops in (a cell
    filling the frame, as on a 100x rapid-stain camera); below 1 it shows more surroundings,
    mirrored beyond the border. Microscopes, cameras and crop tools differ mostly in this."""

    def __init__(self, zoom_range: tuple[float, float], size: int) -> None:
        low, high = zoom_range
        if not 0 < low <= high:
            raise ValueError(f"zoom_range must be two positive factors, low first, not {zoom_range}")
        self.log_low, self.log_high, self.size = math.log(low), math.log(high), size

    def __call__(self, image: Image.Image) -> Image.Image:
        array = np.asarray(image)
        height, width = array.shape[:2]
        side = min(height, width) / math.exp(random.uniform(self.log_low, self.log_high))
        centre_x = width / 2.0 + random.uniform(-0.1, 0.1) * side
        centre_y = height / 2.0 + random.uniform(-0.1, 0.1) * side
        canvas = max(1, int(round(side)))
        shift = np.float32([[1, 0, canvas / 2.0 - centre_x], [0, 1, canvas / 2.0 - centre_y]])
        window = cv2.warpAffine(array, shift, (canvas, canvas), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REFLECT_101)
        shrinking = canvas > self.size
        resized = cv2.resize(window, (self.size, self.size),
                             interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
        return Image.fromarray(resized)


class RandomRotationReflect:
    """Rotation by any angle with mirrored borders, so a rotated crop shows smear background
    in its corners instead of black wedges the network could learn from."""

    def __call__(self, image: Image.Image) -> Image.Image:
        array = np.asarray(image)
        height, width = array.shape[:2]
        matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), random.uniform(0.0, 360.0), 1.0)
        rotated = cv2.warpAffine(array, matrix, (width, height), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REFLECT_101)
        return Image.fromarray(rotated)


class RandomStainJitter:
    """Perturbs the haematoxylin, eosin and residual stain concentrations independently
    (colour deconvolution of Ruifrok and Johnston, via scikit-image's H-E-D matrix), as stain
    batches, staining protocols and cameras differ between labs (Tellez et al., Med Image
    Anal 58, 2019). ``strength`` is the standard deviation of the per-stain scale and shift."""

    def __init__(self, strength: float) -> None:
        from skimage.color import hed_from_rgb, rgb_from_hed

        self.strength = strength
        self.to_hed = hed_from_rgb.astype(np.float32)
        self.to_rgb = rgb_from_hed.astype(np.float32)

    def __call__(self, image: Image.Image) -> Image.Image:
        rgb = np.asarray(image, dtype=np.float32) / 255.0
        optical_density = -np.log(np.maximum(rgb, 1e-6))
        stains = optical_density.reshape(-1, 3) @ self.to_hed
        scale = 1.0 + np.random.normal(0.0, self.strength, 3).astype(np.float32)
        shift = np.random.normal(0.0, self.strength * 0.05, 3).astype(np.float32)
        restored = np.exp(-((stains * scale + shift) @ self.to_rgb)).reshape(rgb.shape)
        return Image.fromarray((np.clip(restored, 0.0, 1.0) * 255.0).round().astype(np.uint8))


class RandomDegrade:
    """What other labs' optics and cameras do to a crop, each with probability ``p``: defocus
    (Gaussian blur, sigma 0.5-2.5 px), a coarser sensor (down to 35-100% of the side and back
    up) and JPEG compression (quality 30-90)."""

    def __init__(self, p: float = 0.35) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        array = np.asarray(image)
        if random.random() < self.p:
            array = cv2.GaussianBlur(array, (0, 0), random.uniform(0.5, 2.5))
        if random.random() < self.p:
            height, width = array.shape[:2]
            factor = random.uniform(0.35, 1.0)
            small = cv2.resize(array, (max(8, round(width * factor)), max(8, round(height * factor))),
                               interpolation=cv2.INTER_AREA)
            array = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
        if random.random() < self.p:
            ok, encoded = cv2.imencode(".jpg", array[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, random.randint(30, 90)])
            array = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1] if ok else array
        return Image.fromarray(np.ascontiguousarray(array))


def _interpolation(name: str) -> v2.InterpolationMode:
    return {"bicubic": v2.InterpolationMode.BICUBIC,
            "bilinear": v2.InterpolationMode.BILINEAR}[name]


def build_transform(config: InputConfig, train: bool, stain_jitter: float = 0.0,
                    zoom_range: tuple[float, float] | None = None, colour_invariance: bool = False,
                    degrade: bool = False) -> v2.Compose:
    """PIL RGB image -> normalised float tensor (3, S, S).

    Training adds augmentations suited to smear cells, which have no canonical orientation:
    any rotation, both flips, scale 0.7-1.0 of the area of the network's view (or, with
    ``zoom_range``, a zoom of the whole image by a factor in that range, below 1 to zoom out,
    which should span the ``view_zoom`` that prediction uses), and mild colour jitter standing in for
    illumination differences. ``stain_jitter`` > 0 adds stain-space jitter of that strength
    and occasional defocus blur, for robustness to other labs' stains and optics.
    ``colour_invariance`` adds saturation (30%) and hue (0.08 of the colour wheel) jitter and
    turns a fifth of the crops grey, so the network leans on shape and texture more than on
    the hue a lab's stain gives the cytoplasm. ``degrade`` adds blur, a coarser resolution and
    JPEG compression (:class:`RandomDegrade`), as other labs' optics and cameras give. Stain
    normalisation, when the preprocessing sets it, comes last, in training and prediction.
    Prediction resizes the uint8 tensor rather than the PIL image: 0.2 ms against 0.8 for a
    257 px crop to 192, at most 2 grey levels apart (mean 0.005) on 100 crops of the five
    shared datasets at 160 and 192 px. The uint8 tensor, a channels-last view until then, is
    made contiguous before the float conversion and normalisation, which then take 0.15-0.25
    ms less per 192 px image (same tensors).
    """
    size, mode = config.input_size, _interpolation(config.interpolation)
    steps: list = [SmearPreprocess(config.preprocess)]
    if train:
        if zoom_range:
            steps += [RandomZoom(zoom_range, size), RandomRotationReflect()]
        else:
            steps += [RandomRotationReflect(), CentreView(config.view_zoom),
                      v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.9, 1.1), interpolation=mode,
                                           antialias=True)]
        steps += [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1, hue=0.02),
        ]
        if colour_invariance:
            steps += [v2.ColorJitter(saturation=0.3, hue=0.08), v2.RandomGrayscale(p=0.2)]
        if stain_jitter > 0:
            steps += [RandomStainJitter(stain_jitter),
                      v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.25)]
        if degrade:
            steps.append(RandomDegrade())
        steps += [StainNormalize(config.preprocess), v2.PILToTensor()]
    else:
        steps += [CentreView(config.view_zoom), v2.PILToTensor(),
                  v2.Resize((size, size), interpolation=mode, antialias=True),
                  StainNormalize(config.preprocess)]
    steps += [v2.Lambda(torch.Tensor.contiguous, torch.Tensor), v2.ToDtype(torch.float32, scale=True),
              v2.Normalize(list(config.mean), list(config.std))]
    return v2.Compose(steps)


class ImageDataset(Dataset):
    """Labelled images read through :func:`leuko.images.load_image` and a transform.

    With ``clinical`` each item's input is ``(image, encoded clinical values)``; with
    ``clinical_dropout`` > 0 (training) each value is withheld with that probability and, with
    the same probability, the whole blood count, so a fusion model also learns to work from
    partial values and from the image alone. ``background`` (a callable taking the image and
    its cell mask, such as :class:`leuko.cellmasks.RandomBackground`) runs before the
    transform, with each item's cell mask read from ``cell_masks`` (one file per sample).
    """

    def __init__(self, samples: Sequence[Sample], transform=None, clinical: bool = False,
                 clinical_dropout: float = 0.0, cell_masks: Sequence[Path] | None = None,
                 background: Callable[[Image.Image, np.ndarray], Image.Image] | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.clinical = clinical
        self.clinical_dropout = clinical_dropout
        if background is not None and (cell_masks is None or len(cell_masks) != len(self.samples)):
            raise ValueError("background replacement needs one cell mask file per sample")
        self.cell_masks = list(cell_masks) if cell_masks is not None else None
        self.background = background

    def __len__(self) -> int:
        return len(self.samples)

    def _clinical_input(self, values: ClinicalValues | None) -> torch.Tensor:
        if values is not None and self.clinical_dropout > 0:
            if random.random() < self.clinical_dropout:
                values = None
            else:
                values = replace(values, **{k: None for k in values.present()
                                            if random.random() < self.clinical_dropout})
        return torch.tensor(encode(values), dtype=torch.float32)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = load_image(sample.path)
        if self.background is not None:
            image = self.background(image, load_mask(self.cell_masks[index]))
        image = self.transform(image) if self.transform else image
        if self.clinical:
            return (image, self._clinical_input(sample.clinical)), sample.label
        return image, sample.label

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]


def read_manifest(manifest: Path, task: Task, split: str,
                  datasets: Sequence[str] | None = None) -> list[Sample]:
    """Samples of one task and split from a manifest CSV, optionally only some datasets.

    Raises ``ValueError`` when the manifest lacks a column or holds a label the task does
    not know, and when the selection is empty. Columns named as the fields of
    :class:`leuko.clinical.ClinicalValues` (age, sex, wbc, rbc, hemoglobin, hematocrit, mcv,
    platelets, lymphocytes_pct, lymphocytes_abs, neutrophils_abs, blasts_pct, ldh; in its
    units) become each sample's clinical values; ``path`` may be absolute.
    """
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    missing = {"path", "task", "label", "split"} - set(table.columns)
    if missing:
        raise ValueError(f"{manifest}: missing column(s) {', '.join(sorted(missing))}")
    rows = table[(table["task"] == task.id) & (table["split"] == split)]
    if datasets:
        rows = rows[rows["dataset"].isin(list(datasets))]
    unknown = set(rows["label"]) - set(task.class_ids)
    if unknown:
        raise ValueError(f"{manifest}: labels {sorted(unknown)} are not classes of {task.id}")
    if rows.empty:
        raise ValueError(f"{manifest}: no rows for task {task.id!r}, split {split!r}"
                         + (f", datasets {list(datasets)}" if datasets else ""))
    root = manifest.parent
    return [Sample(root / row["path"], task.index_of(row["label"]), row.get("dataset", ""),
                   root / row["mask"] if row.get("mask", "") else None, from_row(row))
            for row in rows.to_dict("records")]


def read_relabelled(manifest: Path, task: Task, source_task: Task, split: str,
                    label_map: dict[str, str]) -> list[Sample]:
    """Samples of another task's split relabelled into ``task``'s classes through
    ``label_map`` (source class id -> target class id); unmapped classes are left out.
    Used for honest extra training data, e.g. Aria B-lineage cells for ALL vs normal."""
    unknown = set(label_map.values()) - set(task.class_ids)
    if unknown:
        raise ValueError(f"label_map targets {sorted(unknown)} are not classes of {task.id}")
    samples = read_manifest(manifest, source_task, split)
    return [replace(s, label=task.index_of(label_map[source_task.class_ids[s.label]]))
            for s in samples if source_task.class_ids[s.label] in label_map]


def read_folder(folder: Path, task: Task, split: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
                ) -> list[Sample]:
    """Samples from a folder of class sub-folders named by class id.

    If ``folder`` has ``train``/``val``/``test`` sub-folders they are the splits; otherwise
    each class is cut in sorted-file-name order into contiguous blocks by ``fractions``, so
    neighbouring (often same-patient) images stay in one split.
    """
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    if split in SPLITS and (folder / split).is_dir():
        folder, fractions, split = folder / split, (1.0, 0.0, 0.0), "train"
    class_dirs = {d.name: d for d in folder.iterdir() if d.is_dir()}
    unknown = set(class_dirs) - set(task.class_ids)
    if unknown:
        raise ValueError(f"{folder}: sub-folders {sorted(unknown)} are not classes of {task.id} "
                         f"({', '.join(task.class_ids)})")
    samples: list[Sample] = []
    for class_id, directory in sorted(class_dirs.items()):
        files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        n_train = math.floor(len(files) * fractions[0])
        n_val = math.floor(len(files) * fractions[1])
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val),
                  "test": (n_train + n_val, len(files)), "all": (0, len(files))}[split]
        samples += [Sample(p, task.index_of(class_id), folder.name) for p in files[slice(*bounds)]]
    if not samples:
        raise ValueError(f"{folder}: no images for split {split!r}; expected sub-folders named "
                         f"{', '.join(task.class_ids)}")
    return samples


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def class_counts(samples: Sequence[Sample], task: Task) -> dict[str, int]:
    counts = Counter(s.label for s in samples)
    return {c: counts.get(i, 0) for i, c in enumerate(task.class_ids)}


def balanced_sampler(groups: Sequence[Hashable], seed: int | torch.Generator = 0,
                     sources: Sequence[Hashable] | None = None) -> WeightedRandomSampler:
    """Sampler drawing each group (a class, or a source dataset) equally often (weights 1/group
    size), with replacement, one epoch being as many draws as there are samples. With
    ``sources`` (each sample's lab) each weight is also divided by the square root of its
    lab's size, so a lab of 70 crops is drawn about a third as often as one of 7,000 instead
    of a hundredth, without repeating its few images every few steps. ``seed`` is a
    seed, or a generator to share with the data loader."""
    counts = Counter(groups)
    source_counts = Counter(sources) if sources is not None else None
    weights = torch.tensor([1.0 / counts[group] / (math.sqrt(source_counts[source]) if source_counts else 1.0)
                            for group, source in zip(groups, sources or groups)], dtype=torch.double)
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, num_samples=len(groups), replacement=True, generator=generator)
