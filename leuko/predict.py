"""One Predictor: images in, calibrated class probabilities out.

A model is loaded and verified once and reused for every call; inputs are batched and run
under ``torch.inference_mode``. Probabilities are the temperature-scaled softmax stored with
the model, so a confidence of 0.9 means right about nine times in ten on validation data.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from leuko.calibration import calibrated_probabilities
from leuko.clinical import ClinicalValues, encode
from leuko.data import build_transform, physical_view
from leuko.device import pick_device
from leuko.images import ImageInput, load_image
from leuko.modelstore import LoadedModel, ModelStore
from leuko.nets import get_arch
from leuko.onnx_backend import OnnxNetwork, onnx_network
from leuko.tasks import Task, get_task

log = logging.getLogger(__name__)

REVIEW_CONFIDENCE = 0.80
"""Below this calibrated top-class probability a result is flagged for human review, for a
model whose card holds no threshold of its own."""

BATCH_SIZE = 8
"""Images per forward pass. Measured on a 2-core CPU with EfficientNet-Lite0 in channels-last
layout: 7.8 ms per image at batch 1, 7.6 at 8, 8.9 at 32 and 10.9 at 64 (larger batches
overflow the caches)."""

PREDICT_WORKERS = 2
"""Batches in flight at once in :meth:`Predictor.predict`, so that one batch's images are
decoded and resized while another's forward pass runs (both release the GIL): 64 crops ran
at 114-140 images/s against 82-100 one batch after the other with ONNX Runtime, and at 83-92
against 50-65 with PyTorch. Three or four in flight were no faster. The worker threads end
with each call, so no thread (nor an OpenMP team started from one) lingers between calls."""


@dataclass
class Prediction:
    """Calibrated probabilities for one image, with the top label and its confidence.

    ``shift_score`` says how unlike the model's training images the input is (higher: less
    alike; ``None`` for a model whose card holds no shift statistics, "not measured");
    ``unfamiliar`` is True when it is above the model's threshold. ``not_applicable`` names
    why the task's question does not fit the cell (for example a neutrophil asked "ALL blast
    or normal lymphocyte?"), or is ``None``. An unfamiliar or not-applicable result always
    needs review."""

    classes: list[str]
    probabilities: np.ndarray
    needs_review: bool
    shift_score: float | None = None
    unfamiliar: bool = False
    not_applicable: str | None = None

    @property
    def index(self) -> int:
        return int(self.probabilities.argmax())

    @property
    def label(self) -> str:
        return self.classes[self.index]

    @property
    def confidence(self) -> float:
        return float(self.probabilities[self.index])

    def as_dict(self) -> dict[str, float]:
        return {c: float(p) for c, p in zip(self.classes, self.probabilities)}


def pool_features(maps: torch.Tensor) -> np.ndarray:
    """A backbone's output averaged over space (N, C, H, W) or over its sequence (N, T, C):
    the (N, C) features a shift detector scores."""
    maps = maps.float().cpu()
    if maps.ndim == 4:
        return maps.mean((2, 3)).numpy()
    if maps.ndim == 3:
        return maps.mean(1).numpy()
    return maps.reshape(len(maps), -1).numpy()


GRANULOCYTES = ("neutrophil", "eosinophil", "basophil")
"""Cell types that are never lymphoid blasts: a question about lymphoid cells does not fit them."""

NOT_APPLICABLE_CONFIDENCE = 0.9
"""Calibrated probability of a granulocyte class (``wbc_type`` model) from which a lymphoid
question is declared not to apply."""


class CellTypeCheck:
    """Whether a lymphoid question (ALL blast or normal lymphocyte; B-ALL subtype) fits a
    cell, read by the ``wbc_type`` default: a cell it reads as a granulocyte with at least
    :data:`NOT_APPLICABLE_CONFIDENCE`, and that is familiar to it (not flagged by its shift
    detector), is "not a lymphocyte". Monocytes are left to the task's model and its shift
    score: the ``wbc_type`` model never saw blasts, and a large blast can look like a monocyte
    to it, so excluding monocytes could hide blasts. Without the familiarity condition 7 of
    the 26 ALL-IDB2 test lymphocytes and blasts were read as granulocytes (all unfamiliar to
    the ``wbc_type`` model); with it none is."""

    def __init__(self, store: ModelStore | None = None, device: str | None = None, backend: str = "auto") -> None:
        self.predictor = Predictor(task="wbc_type", store=store, device=device, backend=backend,
                                   check_cell_type=False)

    def reasons(self, images: Sequence[ImageInput], pixel_size_um: float | None = None) -> list[str | None]:
        """Per image (of ``pixel_size_um`` micrometres per pixel, where known): why the
        question does not apply, or ``None``."""
        reasons = []
        for reading in self.predictor.predict(images, pixel_size_um=pixel_size_um):
            granulocyte = (reading.label in GRANULOCYTES and reading.confidence >= NOT_APPLICABLE_CONFIDENCE
                           and not reading.unfamiliar)
            reasons.append(f"not a lymphocyte (reads as {reading.label}, {reading.confidence:.1%})"
                           if granulocyte else None)
        return reasons


def _dihedral(batch: torch.Tensor) -> list[torch.Tensor]:
    """The 8 rotations/flips of a square batch; cells have no preferred orientation."""
    views = []
    for flipped in (batch, batch.flip(-1)):
        views += [torch.rot90(flipped, k, dims=(-2, -1)) for k in range(4)]
    return views


class LogitsAndFeatures(nn.Module):
    """A network whose Grad-CAM target is its backbone, returning its logits and that feature
    map, so that one ONNX export serves both prediction and the costly half of Grad-CAM."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.network.backbone(x)
        return self.network.head(features), features


class Predictor:
    """Loads a model once and predicts batches of images with calibrated probabilities.

    ``model`` is a model id, an already loaded model, or ``None`` for the task's default.
    ``device`` is ``None``/``"auto"``, ``"cpu"`` or ``"cuda"``. With ``tta`` the
    probabilities are averaged over the 8 rotations and flips of each image. Results below
    ``review_confidence`` (default: the card's threshold) are marked needs-review.
    ``backend`` is ``torch``, ``openvino``, ``onnx`` (ONNX Runtime; both on the CPU, for
    image-only models) or ``auto`` (the first installed of the two where they apply, else
    PyTorch; see :mod:`leuko.onnx_backend`).
    """

    def __init__(self, model: str | LoadedModel | None = None, task: str | None = None,
                 device: str | None = None, tta: bool = False, store: ModelStore | None = None,
                 review_confidence: float | None = None, backend: str = "auto", check_cell_type: bool = True) -> None:
        store = store or ModelStore()
        loaded = model if isinstance(model, LoadedModel) else store.load(model, task)
        if task is not None and loaded.card.task != task:
            raise ValueError(f"model {loaded.card.id!r} is for task {loaded.card.task!r}, not {task!r}")
        self.loaded = loaded
        self.card = loaded.card
        self.task: Task = get_task(loaded.card.task)
        self.device = pick_device(device)
        self.network = loaded.network.to(self.device).eval().to(memory_format=torch.channels_last)
        self.input_config = loaded.card.input_config
        """The card's input pipeline, parsed once: size, normalisation and the network's view."""
        self.transform = build_transform(self.input_config, train=False)
        self.tta = tta
        self.fusion = get_arch(loaded.card.arch).fusion
        self.review_confidence = (review_confidence if review_confidence is not None
                                  else loaded.card.review_threshold or REVIEW_CONFIDENCE)
        self.onnx = self._onnx_backend(backend)
        self.shift = loaded.shift
        """The model's shift detector, or ``None`` (not measured)."""
        self.cell_check = self._cell_check(store, device, backend) if check_cell_type else None
        """The lymphoid-question check of :class:`CellTypeCheck`, for tasks that ask one."""

    def _cell_check(self, store: ModelStore, device: str | None, backend: str) -> CellTypeCheck | None:
        if not self.task.lymphoid_question:
            return None
        try:
            return CellTypeCheck(store, device, backend)
        except (LookupError, RuntimeError) as exc:
            log.warning("no cell-type check for %s: %s", self.task.id, exc)
            return None

    def _onnx_backend(self, backend: str) -> OnnxNetwork | None:
        unsupported = "a fusion model takes blood counts besides the image; only image-only models are exported" \
            if self.fusion else None
        size = self.input_config.input_size
        if get_arch(self.card.arch).target_layer == "backbone":
            return onnx_network(LogitsAndFeatures(self.network), size, backend, self.device, unsupported,
                                output_names=("logits", "features"), reference=self.network)
        return onnx_network(self.network, size, backend, self.device, unsupported)

    @property
    def classes(self) -> list[str]:
        return list(self.card.classes)

    def class_index(self, class_id: str | None) -> int | None:
        """The index of ``class_id`` (``None`` stays ``None``: the predicted class); raises
        ``ValueError`` for a class the model does not have."""
        if class_id is None:
            return None
        if class_id not in self.classes:
            raise ValueError(f"{class_id!r} is not a class of this model ({', '.join(self.classes)})")
        return self.classes.index(class_id)

    def tensors(self, images: Sequence[ImageInput], pixel_size_um: float | None = None) -> torch.Tensor:
        """Load and transform images into one (N, 3, S, S) batch on the CPU; images of a known
        ``pixel_size_um`` (micrometres per pixel) are first cut or padded to the training
        images' physical view (:func:`leuko.data.physical_view`)."""
        config = self.input_config
        return torch.stack([self.transform(physical_view(load_image(image), pixel_size_um, config.view_um,
                                                         config.view_zoom)) for image in images])

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        """Raw (uncalibrated) logits of a preprocessed batch, on the CPU. ``clinical`` (the
        encoded values of :func:`leuko.clinical.encode`) is used by fusion models only."""
        if self.onnx is not None:
            return self.onnx(batch)
        inputs = [batch.to(self.device).contiguous(memory_format=torch.channels_last)]
        if self.fusion and clinical is not None:
            inputs.append(clinical.to(self.device))
        return self.network(*inputs).float().cpu()

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor, clinical: torch.Tensor | None = None) -> np.ndarray:
        """Calibrated (N, K) probabilities of a preprocessed batch, TTA-averaged if enabled."""
        views = _dihedral(batch) if self.tta else [batch]
        probs = [calibrated_probabilities(self.logits(v, clinical), self.card.temperature) for v in views]
        return np.mean(probs, axis=0)

    @torch.inference_mode()
    def logits_and_features(self, batch: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Raw logits (N, K) and pooled backbone features (N, C, :func:`pool_features`) of a
        preprocessed image batch, in one pass for image-only models (a fusion model's logits
        are those of the image alone)."""
        if self.onnx is not None and "features" in self.onnx.output_names:
            maps = self.onnx(batch, "features")
            return self.network.head(maps).float(), pool_features(maps)
        images = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        maps = self.network.backbone(images)
        logits = self.network(images) if self.fusion else self.network.head(maps)
        return logits.float().cpu(), pool_features(maps)

    def to_predictions(self, probabilities: np.ndarray, shift_scores: np.ndarray | None = None,
                       not_applicable: Sequence[str | None] | None = None) -> list[Prediction]:
        """One :class:`Prediction` per row of calibrated (N, K) probabilities, flagged for
        review below the model's threshold, when unfamiliar (``shift_scores`` above the
        detector's threshold) or when the question does not apply (``not_applicable``)."""
        predictions = []
        for i, p in enumerate(probabilities):
            score = None if shift_scores is None else float(shift_scores[i])
            unfamiliar = bool(score is not None and score > self.shift.threshold)
            reason = not_applicable[i] if not_applicable is not None else None
            predictions.append(Prediction(self.classes, p, bool(p.max() < self.review_confidence) or unfamiliar
                                          or reason is not None, score, unfamiliar, reason))
        return predictions

    def annotate(self, probabilities: np.ndarray, images: Sequence[ImageInput],
                 features: np.ndarray | None = None, batch: torch.Tensor | None = None,
                 pixel_size_um: float | None = None) -> list[Prediction]:
        """Predictions of ``images`` from their calibrated probabilities, with shift scores
        (from pooled ``features`` when the caller has them, else from ``batch`` or the images
        at ``pixel_size_um``, as they were classified) and the lymphoid-question check."""
        scores = None
        if self.shift is not None:
            if features is None:
                features = self.logits_and_features(batch if batch is not None
                                                    else self.tensors(images, pixel_size_um))[1]
            scores = self.shift.scores(features)
        reasons = self.cell_check.reasons(images, pixel_size_um) if self.cell_check is not None else None
        return self.to_predictions(probabilities, scores, reasons)

    def predict(self, images: Sequence[ImageInput], batch_size: int = BATCH_SIZE,
                clinical: Sequence[ClinicalValues | None] | None = None,
                pixel_size_um: float | None = None) -> list[Prediction]:
        """Predict images given as paths, bytes, PIL images or RGB arrays; ``clinical`` gives
        each image's blood count (used by fusion models, missing values allowed);
        ``pixel_size_um`` the images' micrometres per pixel, where known.

        Raises :class:`leuko.images.ImageError` for an unreadable image; callers that must
        skip bad files predict them one at a time.
        """
        def one_batch(start: int) -> list[Prediction]:
            chunk = [load_image(image) for image in images[start:start + batch_size]]
            batch = self.tensors(chunk, pixel_size_um)
            if self.shift is not None and not self.tta and not self.fusion:
                logits, features = self.logits_and_features(batch)
                return self.annotate(calibrated_probabilities(logits, self.card.temperature), chunk, features,
                                     pixel_size_um=pixel_size_um)
            encoded = None
            if clinical is not None:
                encoded = torch.tensor([encode(v) for v in clinical[start:start + batch_size]], dtype=torch.float32)
            return self.annotate(self.probabilities(batch, encoded), chunk, batch=batch, pixel_size_um=pixel_size_um)

        starts = range(0, len(images), batch_size)
        if len(starts) < 2:
            return [p for start in starts for p in one_batch(start)]
        with ThreadPoolExecutor(PREDICT_WORKERS) as pool:
            return [p for batch in pool.map(one_batch, starts) for p in batch]

    def predict_one(self, image: ImageInput) -> Prediction:
        return self.predict([image])[0]
