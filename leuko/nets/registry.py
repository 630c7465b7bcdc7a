"""Architecture registry: name -> constructor plus the facts a checkpoint needs beside it.

Architectures register themselves with :func:`register_arch` (the pattern of timm's model
registry), so the CLI, the training page and the tests all see a new entry at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from leuko.nets.backbones import BackboneSpec, build_backbone, offline_weights_available

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)

HeadFactory = Callable[[int, int], nn.Module]


@dataclass(frozen=True)
class Recipe:
    """The training recipe a seed paper reports for the architecture (defaults for ``train``)."""

    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-2
    eps: float = 1e-8
    freeze_epochs: int = 0


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture.

    ``input_size`` is the side in pixels the recipe uses; ``mean``/``std`` and
    ``interpolation`` are the normalisation its pretrained weights expect; ``target_layer``
    is the dotted path of the module whose output Grad-CAM should hook (the last spatial
    feature map that the head reads).
    """

    name: str
    backbone: BackboneSpec
    head: HeadFactory
    input_size: int
    target_layer: str
    source: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    recipe: Recipe = field(default_factory=Recipe)
    preprocessing: dict = field(default_factory=dict)
    heavy: bool = False
    fusion: bool = False

    @property
    def offline_weights(self) -> bool:
        return offline_weights_available(self.backbone)


ARCHITECTURES: dict[str, ArchSpec] = {}


def register_arch(name: str, **spec_fields) -> Callable[[HeadFactory], HeadFactory]:
    """Decorator registering a head factory ``(in_features, num_classes) -> nn.Module``
    under ``name`` with the given :class:`ArchSpec` fields."""

    def decorate(head_factory: HeadFactory) -> HeadFactory:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        ARCHITECTURES[name] = ArchSpec(name=name, head=head_factory, **spec_fields)
        return head_factory

    return decorate


def get_arch(name: str) -> ArchSpec:
    """Return the registered architecture; raises ``KeyError`` listing the known names."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None


class LeukoNet(nn.Module):
    """Backbone feature extractor followed by a classification head.

    ``pretrained_source`` records where the backbone weights came from, for the model card.
    """

    def __init__(self, arch: str, backbone: nn.Module, head: nn.Module, pretrained_source: str) -> None:
        super().__init__()
        self.arch = arch
        self.backbone = backbone
        self.head = head
        self.pretrained_source = pretrained_source
        self._backbone_frozen = False
        self._frozen_early: list[nn.Module] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Freeze (or release) the backbone. While frozen its batch-norm statistics stay fixed
        too, as Keras does for a base set to non-trainable."""
        self._backbone_frozen = frozen
        for parameter in self.backbone.parameters():
            parameter.requires_grad = not frozen
        for module in self._frozen_early:
            for parameter in module.parameters():
                parameter.requires_grad = False
        self.train(self.training)

    def early_stages(self) -> list[nn.Module]:
        """The backbone's stem and stages in input order (timm EfficientNet/ResNet layouts)."""
        body = getattr(self.backbone, "body", None)
        if hasattr(body, "blocks") and hasattr(body, "conv_stem"):
            return [nn.ModuleList([body.conv_stem, body.bn1]), *body.blocks]
        if hasattr(body, "layer1") and hasattr(body, "conv1"):
            return [nn.ModuleList([body.conv1, body.bn1]), body.layer1, body.layer2, body.layer3, body.layer4]
        raise ValueError(f"freezing early stages is not supported for {self.arch}")

    def freeze_early_stages(self, count: int) -> None:
        """Freeze the stem and the first ``count`` stages (weights and batch-norm statistics).

        Early layers hold generic edge and colour filters; not training them roughly halves
        the cost of a CPU training step, as their high-resolution backward pass is skipped.
        """
        self._frozen_early = self.early_stages()[: count + 1] if count > 0 else []
        for module in self._frozen_early:
            for parameter in module.parameters():
                parameter.requires_grad = False
        self.train(self.training)

    def train(self, mode: bool = True) -> "LeukoNet":
        super().train(mode)
        if self._backbone_frozen:
            self.backbone.eval()
        for module in self._frozen_early:
            module.eval()
        return self


def build_model(name: str, num_classes: int, pretrained: str | Path | None = None) -> LeukoNet:
    """Build a registered architecture for ``num_classes`` outputs.

    ``pretrained`` is ``None`` (random), ``"auto"`` (offline package, hub, then random with a
    warning), ``"offline"``, ``"hub"``, or a local checkpoint path.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    spec = get_arch(name)
    if spec.fusion and num_classes != 2:
        raise ValueError(f"{name} fuses clinical values for the binary task only (2 classes), not {num_classes}")
    backbone, source = build_backbone(spec.backbone, pretrained)
    if spec.fusion:
        from leuko.clinical import ENCODING_SIZE
        from leuko.nets.fusion import FusionNet

        return FusionNet(name, backbone, ENCODING_SIZE, source)
    head = spec.head(backbone.num_features, num_classes)
    return LeukoNet(name, backbone, head, source)


def resolve_target_layer(model: nn.Module, dotted_path: str) -> nn.Module:
    """Return the sub-module at ``dotted_path`` (e.g. ``"head.inception"``)."""
    module = model
    for part in dotted_path.split("."):
        if not hasattr(module, part):
            raise AttributeError(f"{type(model).__name__} has no layer {dotted_path!r}")
        module = getattr(module, part)
    return module
