"""A small U-Net for nucleus/cytoplasm segmentation on an EfficientNet-Lite0 encoder.

The encoder takes the offline ImageNet weights (see :mod:`leuko.nets.backbones`), so the
network trains on a 2-core CPU in minutes; the decoder upsamples with skip connections to
the input resolution and predicts three classes: background, cytoplasm, nucleus.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn import functional as F

from leuko.nets.backbones import BackboneSpec, build_backbone

SEGMENTATION_CLASSES = ["background", "cytoplasm", "nucleus"]
UNET_ARCHS = {"unet_lite0": "tf_efficientnet_lite0"}


class DecoderBlock(nn.Module):
    """Upsample x2, concatenate the skip feature map, two 3x3 conv-BN-ReLU layers."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:] if skip is not None else None,
                          scale_factor=None if skip is not None else 2.0, mode="bilinear", align_corners=False)
        return self.body(torch.cat([x, skip], 1) if skip is not None else x)


class LiteUNet(nn.Module):
    """U-Net with a timm EfficientNet-Lite encoder (strides 2-32) and a light decoder."""

    def __init__(self, encoder_name: str = "tf_efficientnet_lite0", num_classes: int = 3,
                 pretrained: str | Path | None = None, decoder_channels: tuple[int, ...] = (96, 64, 40, 24, 16)) -> None:
        super().__init__()
        self.encoder = timm.create_model(encoder_name, features_only=True, pretrained=False)
        self.pretrained_source = "random"
        if pretrained not in (None, "none"):
            source, self.pretrained_source = build_backbone(BackboneSpec("timm", encoder_name), pretrained)
            self.encoder.load_state_dict(source.body.state_dict(), strict=False)
        channels = self.encoder.feature_info.channels()
        skips = list(reversed(channels[:-1])) + [0]
        blocks, current = [], channels[-1]
        for skip, out in zip(skips, decoder_channels):
            blocks.append(DecoderBlock(current, skip, out))
            current = out
        self.decoder = nn.ModuleList(blocks)
        self.classifier = nn.Conv2d(current, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        y = features[-1]
        skips = list(reversed(features[:-1])) + [None]
        for block, skip in zip(self.decoder, skips):
            y = block(y, skip)
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(y)


def build_unet(arch: str, num_classes: int = 3, pretrained: str | Path | None = None) -> LiteUNet:
    """Build a registered segmentation network by name (``unet_lite0``)."""
    if arch not in UNET_ARCHS:
        raise KeyError(f"unknown segmentation architecture {arch!r}; known: {', '.join(UNET_ARCHS)}")
    return LiteUNet(UNET_ARCHS[arch], num_classes, pretrained)
