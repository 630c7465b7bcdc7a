import pytest
import timm
import torch
from torch import nn

from leuko.nets.fold import fold_batchnorm


def _randomise_statistics(model: nn.Module) -> nn.Module:
    """Give every batch norm non-trivial running statistics and affine parameters."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(channels, generator=generator) * 0.1)
    return model.eval()


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_folding_an_efficientnet_removes_every_batch_norm_and_keeps_its_outputs():
    model = _randomise_statistics(timm.create_model("tf_efficientnet_lite0", num_classes=3))
    example = torch.randn(2, 3, 64, 64)
    folded = fold_batchnorm(model, example)
    assert folded is not model and _count(folded, nn.BatchNorm2d) == 0 and _count(model, nn.BatchNorm2d) > 30
    fresh = torch.randn(3, 3, 96, 96)
    with torch.inference_mode():
        assert torch.allclose(model(fresh), folded(fresh), atol=1e-4, rtol=1e-4)
    assert _count(folded, nn.ReLU6) == _count(model, nn.ReLU6)


class _NormBeforeConv(nn.Module):
    """Registers a conv then a norm, but normalises the input before convolving it: folding by
    registration order would be wrong here."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))


def test_a_network_whose_outputs_would_change_is_left_unfolded():
    model = _randomise_statistics(_NormBeforeConv())
    assert fold_batchnorm(model, torch.randn(1, 3, 16, 16)) is model


def test_only_eval_mode_networks_are_folded():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).train(), torch.randn(1, 3, 4, 4))
