"""Architectures. Every model takes images in [0, 1]; normalisation is its first layer.

Why normalisation inside the model: attacks then work in pixel space, so eps means what the
papers mean by it (8/255 for CIFAR) and clipping to [0, 1] is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .registry import Registry

ModelBuilder = Callable[[int, int], nn.Module]  # (in_channels, num_classes) -> body
MODELS: Registry[ModelBuilder] = Registry("model")


class Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


@MODELS.register("small_cnn")
def small_cnn(in_channels: int, num_classes: int) -> nn.Module:
    """Four conv layers and global pooling: seconds per epoch on CPU for digits/MNIST."""
    return nn.Sequential(
        _conv_bn(in_channels, 32),
        _conv_bn(32, 32),
        nn.MaxPool2d(2),
        _conv_bn(32, 64),
        _conv_bn(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with the CIFAR stem: one 3x3 conv, no max-pool (He et al. 2016, sec. 4.2 style)."""

    def __init__(self, blocks: Sequence[int], in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, 64)
        layers, cin = [], 64
        for i, n in enumerate(blocks):
            cout = 64 * 2**i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


@MODELS.register("resnet18")
def resnet18(in_channels: int, num_classes: int) -> nn.Module:
    return ResNet([2, 2, 2, 2], in_channels, num_classes)


def build_model(
    arch: str, *, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]
) -> nn.Sequential:
    """The registered body behind a Normalize layer; `model[1]` is the body."""
    return nn.Sequential(Normalize(mean, std), MODELS.get(arch)(in_channels, num_classes))
