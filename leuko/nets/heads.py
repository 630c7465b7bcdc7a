"""Classification heads from the seed papers, each taking a backbone's feature map (B, C, H, W).

Keeping every head on feature maps lets any backbone pair with any head and gives Grad-CAM
one spatial layer to hook per architecture.
"""

from __future__ import annotations

import torch
from torch import nn


class LinearHead(nn.Module):
    """Global average pooling, dropout and one linear classifier (timm's default head)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(features).flatten(1)))


class MelbaImageHead(nn.Module):
    """Seed 000's image branch: GAP, FC to 512 with ReLU, dropout 0.5, FC 512 to 256 with ReLU,
    then the classifier. ``embed`` returns the 256-d feature used by the clinical fusion."""

    embedding_size = 256

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(in_features, 512)
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(512, 256)
        self.classifier = nn.Linear(256, num_classes)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(self.pool(features).flatten(1)))
        return torch.relu(self.fc2(self.dropout(x)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(features))


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InceptionModule(nn.Module):
    """Seed 001's multi-scale block: parallel 1x1, 3x3 and 5x5 convolutions and a 3x3 max-pool
    branch, concatenated along channels (GoogLeNet-style, with 1x1 reductions)."""

    def __init__(self, in_channels: int, branch1: int = 64, branch3: tuple[int, int] = (96, 128),
                 branch5: tuple[int, int] = (16, 32), pool_proj: int = 32) -> None:
        super().__init__()
        self.branch1 = _conv_bn_relu(in_channels, branch1, 1)
        self.branch3 = nn.Sequential(_conv_bn_relu(in_channels, branch3[0], 1),
                                     _conv_bn_relu(branch3[0], branch3[1], 3))
        self.branch5 = nn.Sequential(_conv_bn_relu(in_channels, branch5[0], 1),
                                     _conv_bn_relu(branch5[0], branch5[1], 5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                         _conv_bn_relu(in_channels, pool_proj, 1))
        self.out_channels = branch1 + branch3[1] + branch5[1] + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], 1)


class InceptionHead(nn.Module):
    """Seed 001 (MSEENet): Inception module on the EfficientNetV2-B0 features, GAP, classifier."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.3) -> None:
        super().__init__()
        self.inception = InceptionModule(in_features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.inception.out_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.inception(features)).flatten(1)
        return self.classifier(self.dropout(x))


class AttentionPooling(nn.Module):
    """Additive attention over a sequence: score_t = v . tanh(W h_t), softmax over t,
    returns the weighted sum of h_t (Bahdanau-style, as in seed 002's ACRNN)."""

    def __init__(self, size: int, attention_size: int = 128) -> None:
        super().__init__()
        self.project = nn.Linear(size, attention_size)
        self.score = nn.Linear(attention_size, 1, bias=False)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.score(torch.tanh(self.project(sequence))), dim=1)
        return (weights * sequence).sum(dim=1)


class ACRNNHead(nn.Module):
    """Seed 002's attention convolutional-recurrent head on EfficientNetV2-M feature maps.

    Convolution blocks refine the feature map; its spatial positions, read in raster order,
    form a sequence for two bidirectional GRU layers (256 units in all, tanh); attention
    pooling weighs the positions and a linear layer classifies. The seed stacks 8 convolution
    layers on raw input; on top of a pretrained backbone ``conv_blocks`` defaults to 2.
    """

    def __init__(self, in_features: int, num_classes: int, channels: int = 256,
                 conv_blocks: int = 2, gru_units: int = 256, dropout: float = 0.3) -> None:
        super().__init__()
        blocks = [_conv_bn_relu(in_features if i == 0 else channels, channels, 3)
                  for i in range(conv_blocks)]
        self.conv = nn.Sequential(*blocks)
        self.gru = nn.GRU(channels, gru_units // 2, num_layers=2, batch_first=True,
                          bidirectional=True)
        self.attention = AttentionPooling(gru_units)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(gru_units, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.conv(features)
        sequence = x.flatten(2).transpose(1, 2)
        outputs, _ = self.gru(sequence)
        return self.classifier(self.dropout(self.attention(outputs)))


class MaxPoolDenseHead(nn.Module):
    """Seed 003's head: global max pooling, batch norm (Keras momentum 0.99, i.e. PyTorch
    momentum 0.01, epsilon 1e-3), dense 256 with ReLU, dropout, classifier. The seed does not
    give the dropout rate; 0.45 is our choice."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.45) -> None:
        super().__init__()
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.norm = nn.BatchNorm1d(in_features, momentum=0.01, eps=1e-3)
        self.dense = nn.Linear(in_features, 256)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.pool(features).flatten(1))
        return self.classifier(self.dropout(torch.relu(self.dense(x))))


class AvgPoolDenseHead(nn.Module):
    """Seed 004's head: global average pooling, dense 256 with ReLU, classifier."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dense = nn.Linear(in_features, 256)
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.dense(self.pool(features).flatten(1))))
