"""Class activation maps through pytorch-grad-cam: where in the image the model looked.

Seed 000 uses Grad-CAM to show which morphological regions drive a prediction. One CAM
object is built per (loaded model, method) and reused; :meth:`Explainer.close` (or leaving
the ``with`` block) removes its hooks. Gradients are switched on only inside the call, and
the target layer comes from the architecture registry, so EfficientNet-style models are
hooked after their final activation rather than at a pre-activation convolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
from pytorch_grad_cam.utils.image import scale_cam_image, show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
from torch import nn

from leuko.calibration import calibrated_probabilities
from leuko.clinical import ClinicalValues, encode
from leuko.data import CentreView, from_physical_view, physical_side, view_box
from leuko.images import ImageInput, load_image, load_mask
from leuko.nets import get_arch, resolve_target_layer
from leuko.predict import Predictor, pool_features

CAM_METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM,
               "eigencam": EigenCAM, "layercam": LayerCAM, "scorecam": ScoreCAM}
"""Available methods; ScoreCAM runs one forward pass per feature channel and is slow."""

FEATURE_MAP_METHODS = {"gradcam", "gradcam++", "xgradcam", "eigencam", "layercam"}
"""Methods computed from the target layer's activations and gradients alone, which can
therefore start from a feature map computed elsewhere (ScoreCAM masks the input image)."""

COLORMAPS = {"jet": cv2.COLORMAP_JET, "turbo": cv2.COLORMAP_TURBO, "inferno": cv2.COLORMAP_INFERNO,
             "viridis": cv2.COLORMAP_VIRIDIS}


@dataclass
class Explanation:
    """A CAM (H, W) in 0-1 at the original image's size, for ``class_id``, with that class's
    calibrated probability and the full calibrated probabilities."""

    cam: np.ndarray
    class_id: str
    probability: float
    probabilities: dict[str, float]
    method: str


def _track_from_here(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook making the target layer's output the start of the autograd graph.

    With every weight frozen, the backward pass that Grad-CAM needs stops at the target
    layer instead of running through the whole backbone: about half the cost of a CAM.
    """
    if torch.is_grad_enabled() and not output.requires_grad:
        return output.requires_grad_(True)
    return None


class FeatureHead(nn.Module):
    """A classifier's head as a model of its own, taking the backbone's feature map.

    When the predictor runs its backbone in an exported runtime (OpenVINO or ONNX Runtime),
    Grad-CAM needs PyTorch only from the target layer (the backbone's output, here the
    ``features`` identity) to the logits: the feature map comes from that runtime, and
    gradients flow through the small head alone.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(features))


class WithClinical(nn.Module):
    """A fusion network as an image-only model for pytorch-grad-cam, which calls its model
    with the image batch alone: ``clinical`` (one encoded blood count, (1, m), shared by every
    image of the batch; ``None``: nothing measured) is set before each explanation, so the map
    explains the same output the prediction gave. One count for all, as ScoreCAM runs its own
    batches of masked copies."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.clinical: torch.Tensor | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.clinical is None:
            return self.network(images)
        return self.network(images, self.clinical.to(images.device).expand(len(images), -1))


class Explainer:
    """CAMs for one loaded model. Reuses one pytorch-grad-cam object per method; the model's
    weights are frozen for its lifetime (a predictor's network is inference-only). Where the
    predictor's exported runtime also returns the backbone's feature map, the methods of
    :data:`FEATURE_MAP_METHODS` start from it (the same maps, to 1e-6, at about half the cost)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        network = predictor.network
        self.target_layer = resolve_target_layer(network, get_arch(network.arch).target_layer)
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        self._hooks = [self.target_layer.register_forward_hook(_track_from_here)]
        onnx = predictor.onnx
        self._head = FeatureHead(network.head).eval() if onnx is not None and "features" in onnx.output_names else None
        if self._head is not None:
            self._hooks.append(self._head.features.register_forward_hook(_track_from_here))
        self._fused = WithClinical(network) if predictor.fusion else None
        self._cams: dict[str, object] = {}
        self.last_features: np.ndarray | None = None
        """Pooled (N, C) backbone features of the last batch where the CAM's layer is the
        backbone's output (``None`` otherwise): what a shift detector scores, for free."""
        self._layer_is_backbone = get_arch(network.arch).target_layer == "backbone"
        self.grid: tuple[int, int] | None = None
        """The target layer's spatial size (rows, columns) at the last call: the resolution
        of every map before it is resized to the image."""

    def __enter__(self) -> "Explainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and drop the CAM objects."""
        for cam in self._cams.values():
            cam.activations_and_grads.release()
        self._cams.clear()
        for hook in self._hooks:
            hook.remove()

    @property
    def on_onnx(self) -> bool:
        """Whether Grad-CAM and its siblings start from the exported runtime's feature map."""
        return self._head is not None

    def cam_object(self, method: str):
        if method not in CAM_METHODS:
            raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}")
        if method not in self._cams:
            if self._head is not None and method in FEATURE_MAP_METHODS:
                model, layer = self._head, self._head.features
            else:
                model, layer = self._fused or self.predictor.network, self.target_layer
            self._cams[method] = CAM_METHODS[method](model=model, target_layers=[layer])
        return self._cams[method]

    def explain_batch(self, batch: torch.Tensor, class_index: int | None = None, method: str = "gradcam",
                      clinical: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """CAMs (N, S, S) at input resolution and calibrated probabilities (N, K) of a
        preprocessed batch, for ``class_index`` or each image's predicted class; a fusion
        model sees ``clinical`` (one :func:`leuko.clinical.encode`, (1, m)) beside each image."""
        if clinical is not None and clinical.shape[0] != 1:
            raise ValueError("explain one blood count at a time: clinical must be (1, m)")
        cam = self.cam_object(method)
        on_features = cam.model is self._head
        inputs = (self.predictor.onnx(batch, "features") if on_features
                  else batch.to(self.predictor.device).contiguous(memory_format=torch.channels_last))
        if self._fused is not None:
            self._fused.clinical = clinical
        with torch.enable_grad():
            maps = cam(input_tensor=inputs, targets=self._targets(inputs, class_index))
        if on_features:
            maps = grid_map_to_image(maps, batch.shape[-1], batch.shape[-2])
        logits = cam.outputs.detach().float().cpu()
        activations = cam.activations_and_grads.activations[0]
        self.grid = tuple(activations.shape[-2:])
        self.last_features = pool_features(activations) if self._layer_is_backbone else None
        cam.activations_and_grads.clear()
        return maps, calibrated_probabilities(logits, self.predictor.card.temperature)

    def _targets(self, batch: torch.Tensor, class_index: int | None) -> list | None:
        """What each CAM explains: the class's logit (the predicted class when ``None``, left
        to pytorch-grad-cam). A fusion model's second logit is fixed at zero, so its classes
        are explained through their softmax probability, whose gradient never vanishes."""
        if not self.predictor.fusion:
            return None if class_index is None else [ClassifierOutputTarget(class_index)] * len(batch)
        if class_index is None:
            with torch.inference_mode():
                return [ClassifierOutputSoftmaxTarget(int(c)) for c in self._fused(batch).argmax(1)]
        return [ClassifierOutputSoftmaxTarget(class_index)] * len(batch)

    def explain_images(self, images: Sequence[np.ndarray], class_index: int | None = None,
                       method: str = "gradcam", clinical: ClinicalValues | None = None,
                       pixel_size_um: float | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        """CAMs (0-1, each at its image's size) and calibrated probabilities (N, K) of RGB
        images, in one forward and backward pass, for ``class_index`` or each image's
        predicted class; a fusion model sees ``clinical`` with every image, as it did when
        predicting; images of a known ``pixel_size_um`` are cut to the training images' physical
        view (:func:`leuko.data.physical_view`) and their maps placed back. Outside the network's view (``view_zoom`` above 1) a map is zero: the model did not
        see those pixels."""
        encoded = torch.tensor([encode(clinical)], dtype=torch.float32) if clinical is not None else None
        maps, probs = self.explain_batch(self.predictor.tensors(images, pixel_size_um), class_index, method, encoded)
        config = self.predictor.input_config
        side = physical_side(pixel_size_um, config.view_um, config.view_zoom)
        if side is None:
            return [map_to_image(m, rgb.shape[0], rgb.shape[1], config.view_zoom) for m, rgb in zip(maps, images)], probs
        return [from_physical_view(map_to_image(m, side, side, config.view_zoom), rgb.shape[0], rgb.shape[1])
                for m, rgb in zip(maps, images)], probs

    def explain(self, image: ImageInput, class_id: str | None = None, method: str = "gradcam",
                clinical: ClinicalValues | None = None) -> Explanation:
        """Explain one image for ``class_id`` (default: the predicted class); a fusion model
        takes ``clinical`` beside the image, as in prediction."""
        rgb = np.asarray(load_image(image))
        classes = self.predictor.classes
        index = self.predictor.class_index(class_id)
        cams, probs = self.explain_images([rgb], index, method, clinical)
        chosen = int(probs[0].argmax()) if index is None else index
        return Explanation(cams[0], classes[chosen], float(probs[0, chosen]),
                           dict(zip(classes, map(float, probs[0]))), method)


def overlay(rgb: np.ndarray, cam: np.ndarray, colormap: str = "jet", opacity: float = 0.45,
            contour_mask: np.ndarray | None = None) -> np.ndarray:
    """The CAM blended over the image (``opacity`` 0-1 is the heat map's weight), optionally
    with the segmentation contours drawn on top (white: cell, black: nucleus)."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError("opacity must be between 0 and 1")
    blended = show_cam_on_image(rgb.astype(np.float32) / 255.0, cam.astype(np.float32), use_rgb=True,
                                colormap=COLORMAPS[colormap], image_weight=1.0 - opacity)
    if contour_mask is not None:
        draw_mask_outlines(blended, contour_mask)
    return blended


def draw_mask_outlines(canvas: np.ndarray, mask: np.ndarray, nucleus_colour: tuple[int, int, int] = (0, 0, 0),
                       sides_per_line: int = 150) -> np.ndarray:
    """Draw a 0/128/255 segmentation mask's outlines on the RGB ``canvas`` in place and return
    it: the cell in white, the nucleus in ``nucleus_colour``, lines 1/``sides_per_line`` of the
    shorter side thick (at least one pixel)."""
    width = max(1, min(canvas.shape[:2]) // sides_per_line)
    for level, colour in ((1, (255, 255, 255)), (255, nucleus_colour)):
        contours, _ = cv2.findContours((mask >= level).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, colour, width)
    return canvas


def side_by_side(rgb: np.ndarray, rendered: np.ndarray) -> np.ndarray:
    """Original and overlay next to each other, separated by a 4-pixel white gap."""
    gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([rgb, gap, rendered], axis=1)


def save_png(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def energy_inside(cam: np.ndarray, cell_mask: np.ndarray) -> float:
    """Share of the CAM's total energy (sum of its values) that falls inside the cell mask;
    NaN for an all-zero map, which points nowhere."""
    total = float(cam.sum())
    return float(cam[cell_mask > 0].sum() / total) if total > 0 else float("nan")


def grid_map_to_image(maps: np.ndarray, width: int, height: int) -> np.ndarray:
    """Maps (N, rows, columns) at a target layer's grid, resized to ``width`` x ``height`` and
    normalised to 0-1 exactly as pytorch-grad-cam finishes the maps it computes on an image."""
    return scale_cam_image(scale_cam_image(maps, (width, height)))


def map_to_image(cam: np.ndarray, height: int, width: int, view_zoom: float = 1.0) -> np.ndarray:
    """A map over the network's input placed on a ``height`` x ``width`` image: resized to the
    central view the network saw (:func:`leuko.data.view_box`), zero around it, clipped to 0-1."""
    top, left, bottom, right = view_box(height, width, view_zoom)
    placed = np.zeros((height, width), np.float32)
    placed[top:bottom, left:right] = np.clip(cv2.resize(cam, (right - left, bottom - top),
                                                        interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    return placed


def mask_at_cam_resolution(cell_mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The cell mask as a CAM could draw it: averaged over the target layer's grid (rows,
    columns), then resized and normalised as pytorch-grad-cam resizes its maps. Its energy
    inside the cell is what a map following the cell exactly at that resolution scores."""
    pooled = cv2.resize((cell_mask > 0).astype(np.float32), grid[::-1], interpolation=cv2.INTER_AREA)
    if pooled.max() == pooled.min():
        return np.full(cell_mask.shape, float(pooled.max() > 0), np.float32)
    return grid_map_to_image(pooled[None], cell_mask.shape[1], cell_mask.shape[0])[0]


def deletion_insertion(explainer: Explainer, batch: torch.Tensor, cams: np.ndarray,
                       percentiles: tuple[int, ...] = (20, 40, 60, 80)) -> tuple[np.ndarray, np.ndarray]:
    """ROAD deletion and insertion scores (Rong et al., ICML 2022, as shipped by
    pytorch-grad-cam): change of the predicted class's softmax probability when the most
    relevant pixels are removed (deletion: more negative is more faithful) and when the least
    relevant are removed (insertion: closer to zero is more faithful), averaged over percentiles."""
    network = explainer.predictor.network
    batch = batch.to(explainer.predictor.device)
    with torch.inference_mode():
        predicted = network(batch).argmax(1).tolist()
    targets = [ClassifierOutputSoftmaxTarget(c) for c in predicted]
    deletion = ROADMostRelevantFirstAverage(list(percentiles))(batch, cams, targets, network)
    insertion = ROADLeastRelevantFirstAverage(list(percentiles))(batch, cams, targets, network)
    return np.asarray(deletion, np.float64).ravel(), np.asarray(insertion, np.float64).ravel()


def _nan_mean(values: list[float]) -> float | None:
    """Mean of the values that are not NaN; ``None`` when none is left."""
    kept = [v for v in values if not np.isnan(v)]
    return float(np.mean(kept)) if kept else None


def faithfulness(predictor: Predictor, samples, segment=None, method: str = "gradcam", batch_size: int = 16,
                 seed: int = 0, percentiles: tuple[int, ...] = (20, 40, 60, 80)) -> dict:
    """Faithfulness of a CAM method on labelled samples (:class:`leuko.data.Sample`).

    (a) mean share of CAM energy inside the cell, the cell taken from the sample's mask file
    when it has one and otherwise from ``segment`` (crop -> 0/128/255 mask), beside the mean
    share of the network's view (the image, or its centre with ``view_zoom``) that the cell
    covers (``cell_area_share``: what a map spread evenly over the view would score, so the
    first figure means something only well above it), and the
    share scored by the cell mask itself at the target layer's resolution
    (``mask_at_cam_resolution``: see :func:`mask_at_cam_resolution`); (b) ROAD deletion and
    insertion of the CAM against a uniform random map, same images and seed.
    """
    rng = np.random.default_rng(seed)
    in_view = CentreView(predictor.input_config.view_zoom)
    shares, areas, mask_shares, deletion, insertion, random_deletion, random_insertion = [], [], [], [], [], [], []
    with Explainer(predictor) as explainer:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            images = [np.asarray(load_image(s.path)) for s in chunk]
            batch = predictor.tensors(images)
            cams, _ = explainer.explain_batch(batch, None, method)
            size = cams.shape[-1]
            for sample, rgb, cam in zip(chunk, images, cams):
                if sample.mask is not None and Path(sample.mask).is_file():
                    mask = load_mask(sample.mask)
                elif segment is not None:
                    mask = segment(rgb)
                else:
                    continue
                cell = cv2.resize(in_view(mask), (size, size), interpolation=cv2.INTER_NEAREST)
                shares.append(energy_inside(cam, cell))
                areas.append(float((cell > 0).mean()))
                mask_shares.append(energy_inside(mask_at_cam_resolution(cell, explainer.grid), cell))
            d, i = deletion_insertion(explainer, batch, cams, percentiles)
            random_maps = rng.uniform(0, 1, cams.shape).astype(np.float32)
            rd, ri = deletion_insertion(explainer, batch, random_maps, percentiles)
            deletion += d.tolist(); insertion += i.tolist()
            random_deletion += rd.tolist(); random_insertion += ri.tolist()
    return {"method": method, "images": len(samples), "view_zoom": in_view.zoom,
            "energy_inside_cell": _nan_mean(shares),
            "cell_area_share": float(np.mean(areas)) if areas else None,
            "mask_at_cam_resolution": _nan_mean(mask_shares),
            "deletion": float(np.mean(deletion)), "deletion_random": float(np.mean(random_deletion)),
            "insertion": float(np.mean(insertion)), "insertion_random": float(np.mean(random_insertion))}
