"""Seed 000's image + clinical fusion network (Issa et al.), built on any registered backbone.

Image module: backbone, global average pooling, FC to 512 with ReLU, dropout 0.5, FC 512 to
256 with ReLU. Clinical module: FC m to 128 with ReLU, dropout 0.3, FC 128 to 64 with ReLU.
Fusion: multi-head attention (8 heads, d_k 40) over the 320-d concatenation, add and norm,
feed-forward, add and norm, and a sigmoid output trained with binary cross-entropy.

The paper applies attention to the single concatenated vector, where softmax over one
position is always 1 and attention reduces to a linear map; here the concatenation is split
into its two modality tokens (image features and clinical features, each zero-padded to 320
dimensions in its own slots), so attention can weigh one modality against the other. The
single sigmoid logit z is returned as two-class logits [z, 0], so that the softmax equals the
sigmoid and calibration, metrics and prediction treat it like any binary model.
"""

from __future__ import annotations

import torch
from torch import nn

from leuko.nets.heads import MelbaImageHead
from leuko.nets.registry import LeukoNet

FUSION_WIDTH = 320


class ClinicalModule(nn.Module):
    """FC m -> 128 (ReLU), dropout 0.3, FC 128 -> 64 (ReLU)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.fc3 = nn.Linear(in_features, 128)
        self.dropout = nn.Dropout(0.3)
        self.fc4 = nn.Linear(128, 64)

    def forward(self, clinical: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc4(self.dropout(torch.relu(self.fc3(clinical)))))


class FusionBlock(nn.Module):
    """Transformer-style fusion: 8-head attention (d_k = 320 / 8 = 40), add and norm,
    feed-forward (320 -> 640 -> 320), add and norm."""

    def __init__(self, width: int = FUSION_WIDTH, heads: int = 8) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(width)
        self.feed_forward = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))
        self.norm2 = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        tokens = self.norm1(tokens + attended)
        return self.norm2(tokens + self.feed_forward(tokens))


class FusionNet(LeukoNet):
    """Image and clinical values in, two-class logits [z, 0] out (class 0 is positive).

    ``clinical`` is the (B, m) encoding of :func:`leuko.clinical.encode`, whose missing-value
    indicators let the model run from the image alone; ``None`` means nothing was measured.
    """

    def __init__(self, arch: str, backbone: nn.Module, clinical_features: int, pretrained_source: str) -> None:
        super().__init__(arch, backbone, MelbaImageHead(backbone.num_features, 2), pretrained_source)
        self.clinical_features = clinical_features
        self.clinical = ClinicalModule(clinical_features)
        self.fusion = FusionBlock()
        self.output = nn.Linear(FUSION_WIDTH, 1)

    def forward(self, images: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        from leuko.clinical import missing_encoding

        if clinical is None:
            clinical = missing_encoding(images.shape[0]).to(images.device)
        image_features = self.head.embed(self.backbone(images))
        clinical_features = self.clinical(clinical)
        image_token = torch.cat([image_features, torch.zeros_like(image_features[:, :64])], dim=1)
        clinical_token = torch.cat([torch.zeros_like(image_features), clinical_features], dim=1)
        fused = self.fusion(torch.stack([image_token, clinical_token], dim=1)).mean(dim=1)
        z = self.output(fused)
        return torch.cat([z, torch.zeros_like(z)], dim=1)
