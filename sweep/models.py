"""Architectures. Every model takes images in [0, 1]; normalisation is its first layer.

Why normalisation inside the model: attacks then work in pixel space, so eps means what the
papers mean by it (8/255 for CIFAR) and clipping to [0, 1] is exact.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
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


class SmallCNN(nn.Sequential):
    """Four conv layers and global pooling: seconds per epoch on CPU for digits/MNIST.

    A Sequential (so `body[0]` and the state_dict keys are those of the plain Sequential it
    used to be) whose last module is the classifier: `features` runs all but the last module.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(
            _conv_bn(in_channels, 32),
            _conv_bn(32, 32),
            nn.MaxPool2d(2),
            _conv_bn(32, 64),
            _conv_bn(64, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, num_classes),
        )

    def __getitem__(self, idx: int | slice) -> nn.Module:
        # Sequential would rebuild a slice as SmallCNN(OrderedDict): a plain Sequential instead
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    @property
    def head(self) -> nn.Module:
        return self[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for module in list(self)[:-1]:
            x = module(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@MODELS.register("small_cnn")
def small_cnn(in_channels: int, num_classes: int) -> nn.Module:
    return SmallCNN(in_channels, num_classes)


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

    @property
    def head(self) -> nn.Module:
        return self.fc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.layers(self.stem(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@MODELS.register("resnet18")
def resnet18(in_channels: int, num_classes: int) -> nn.Module:
    return ResNet([2, 2, 2, 2], in_channels, num_classes)


class PreActBlock(nn.Module):
    """He et al. 2016b ("Identity Mappings in Deep Residual Networks"): BN -> ReLU -> conv,
    twice, and an identity path that nothing touches. Where the shape changes, the 1x1
    projection takes the pre-activated input, as in Wong et al.'s fast-AT code."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet with the CIFAR stem (a bare 3x3 conv, no max-pool) and the final
    BN + ReLU that pre-activation needs before pooling. Module names follow Wong et al.'s
    fast_adversarial `PreActResNet18` (conv1, layer1-4, bn, linear), the architecture of the
    DESIGN's Fast-AT reference figure."""

    def __init__(self, blocks: Sequence[int], in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        cin = 64
        for i, n in enumerate(blocks):
            cout = 64 * 2**i
            layer = []
            for j in range(n):
                layer.append(PreActBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        self.n_layers = len(blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    @property
    def head(self) -> nn.Module:
        return self.linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        for i in range(self.n_layers):
            out = getattr(self, f"layer{i + 1}")(out)
        return torch.flatten(self.pool(torch.relu(self.bn(out))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@MODELS.register("preact_resnet18")
def preact_resnet18(in_channels: int, num_classes: int) -> nn.Module:
    return PreActResNet([2, 2, 2, 2], in_channels, num_classes)


class WideBlock(nn.Module):
    """The pre-activation block of Zagoruyko & Komodakis's WRN as written in the TRADES and
    MadryLab robustness code: where the shape changes, BN-ReLU is applied once and feeds both
    the residual branch and the 1x1 shortcut (`convShortcut`); otherwise the shortcut is the
    raw input."""

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.convShortcut: nn.Module | None = None  # the TRADES checkpoints' key name
        if stride != 1 or cin != cout:
            self.convShortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = torch.relu(self.bn1(x))
        out = torch.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class _WideGroup(nn.Module):
    """TRADES's `NetworkBlock`: `n` blocks under `.layer`, so state_dict keys match theirs."""

    def __init__(self, n: int, cin: int, cout: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016) as in TRADES (Zhang et al. 2019) and Madry et
    al.'s robustness code: (depth - 4) / 6 blocks per group, widths 16, 16k, 32k, 64k.

    TRADES's code also builds a `sub_block1` that its forward never uses; it is left out here
    (it changes no output, only the parameter count; load TRADES checkpoints with strict=False).
    Global average pooling is adaptive, so 8x8 inputs work too.
    """

    def __init__(
        self,
        depth: int,
        widen: int,
        in_channels: int,
        num_classes: int,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = _WideGroup(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = _WideGroup(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = _WideGroup(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        # TRADES's initialisation: He-normal convs (fan-out), unit BN, zero linear bias
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @property
    def head(self) -> nn.Module:
        return self.fc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return torch.flatten(self.pool(torch.relu(self.bn1(out))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@MODELS.register("wrn34_10")
def wrn34_10(in_channels: int, num_classes: int) -> nn.Module:
    """WRN-34-10, dropout 0: the TRADES / RobustBench robust-teacher architecture."""
    return WideResNet(34, 10, in_channels, num_classes)


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> list:
    return [
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    ]


class InvertedResidual(nn.Module):
    """Sandler et al. 2018: 1x1 expansion (skipped for t = 1), 3x3 depthwise, linear 1x1
    projection; the identity shortcut only where stride 1 keeps the shape."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += _conv_bn_relu6(cin, hidden, 1, 1)
        layers += _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden)
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) with the usual CIFAR changes (as in kuangliu/pytorch-cifar):
    stride 1 in the stem and in the second stage (24 channels), so a 32x32 input reaches the
    last stage at 4x4 instead of 1x1. Otherwise torchvision's layout and initialisation, so
    the parameter count equals torchvision's `mobilenet_v2` (2.24M at 10 classes); no dropout
    before the classifier (torchvision has 0.2).
    """

    # (expansion t, channels c, repeats n, stride s of the first block)
    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),  # ImageNet: stride 2
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn_relu6(in_channels, 32, 3, 1))]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(nn.Sequential(*_conv_bn_relu6(cin, 1280, 1, 1)))
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def head(self) -> nn.Module:
        return self.classifier

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.layers(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@MODELS.register("mobilenetv2")
def mobilenetv2(in_channels: int, num_classes: int) -> nn.Module:
    return MobileNetV2(in_channels, num_classes)


def forward_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features [N, D], logits [N, C]) in one forward pass.

    `model` is what `build_model` returns (Normalize, then a body with `features(x)` and a
    linear `head`), or any module that has `features` and `head` itself. The logits are
    computed by exactly the operations of `model(x)`, so they are equal to it bit for bit.
    """
    body = model
    if isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[0], Normalize):
        body = model[1]
    features = getattr(body, "features", None)
    head = getattr(body, "head", None)
    if not callable(features) or not isinstance(head, nn.Module):
        raise TypeError(
            f"{type(body).__name__} has no features(x) / head: forward_features needs a model "
            "from build_model (a registered architecture) or a module defining both"
        )
    dtype = getattr(model, "compute_dtype", None)
    with _maybe_autocast(x, dtype):
        if body is not model:
            x = model[0](_to_format(x, model))
        feats = features(x)
        logits = head(feats)
    if dtype is None:
        return feats, logits
    return feats.float(), logits.float()


class Classifier(nn.Sequential):
    """What `build_model` returns: Normalize, then the body (`model[1]`); a Sequential, so the
    state_dict keys are those of the plain Sequential it used to be.

    Two settings, both off by default and set by `sweep.fast` for a trial's training steps only:
    `compute_dtype` (e.g. torch.bfloat16) runs the forward under autocast to that dtype and
    returns fp32 logits, so every loss, temperature-scaled KL and attack objective downstream is
    computed in fp32 whatever the forward ran in; `channels_last` converts the input to the NHWC
    memory format the (converted) weights use. With both off the forward is the plain
    Sequential's, bit for bit.
    """

    def __init__(self, normalize: Normalize, body: nn.Module) -> None:
        super().__init__(normalize, body)
        self.compute_dtype: torch.dtype | None = None
        self.channels_last = False

    def __getitem__(self, idx: int | slice) -> nn.Module:
        # Sequential would rebuild a slice as Classifier(OrderedDict): a plain Sequential instead
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype is None:
            return super().forward(_to_format(x, self))
        with torch.autocast(x.device.type, dtype=self.compute_dtype):
            out = super().forward(_to_format(x, self))
        return out.float()


def _to_format(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """x in channels_last when the model says so (a no-op when it already is)."""
    if getattr(model, "channels_last", False):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _maybe_autocast(x: torch.Tensor, dtype: torch.dtype | None) -> AbstractContextManager:
    return nullcontext() if dtype is None else torch.autocast(x.device.type, dtype=dtype)


def build_model(
    arch: str, *, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]
) -> Classifier:
    """The registered body behind a Normalize layer; `model[1]` is the body."""
    return Classifier(Normalize(mean, std), MODELS.get(arch)(in_channels, num_classes))
