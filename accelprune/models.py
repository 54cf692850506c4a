"""Small CIFAR models used by the papers' experiments, the tests and the benchmarks.

* :func:`resnet20`, :func:`resnet56`: He et al.'s CIFAR ResNets (3 stages of 16/32/64 channels,
  n BasicBlocks each, depth 6n+2), the models of the REPrune and C-SGD CIFAR-10 tables. Where a
  block changes shape its shortcut is a 1×1 conv + BN ("option B"), so that every layer is a real
  module a pruner can see (option A's zero-padding lambda is invisible to a dependency graph).
* :func:`vgg_small`: a VGG-style plain stack (conv-BN-ReLU, max-pool) with a small classifier.

Input: 3×32×32. Weights are initialised (Kaiming for convs, γ=1, β=0); nothing is downloaded.
"""

from __future__ import annotations

import torch
from torch import nn

from accelprune._validation import check_int

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet56", "VGGSmall", "vgg_small"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:  # option B: a projection the graph can follow
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv (w) → layer1 (w) → layer2 (2w, stride 2) → layer3 (4w, stride 2) → pool → fc,
    with w = ``width`` (16 in the paper's CIFAR ResNets)."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, *, width: int = 16):
        super().__init__()
        blocks_per_stage = check_int(blocks_per_stage, "blocks_per_stage", low=1)
        num_classes = check_int(num_classes, "num_classes", low=1)
        width = check_int(width, "width", low=1)
        # as built, for saved constructors (private: not a width that loading compares or sets)
        self._width = width
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        in_planes = width
        stages = []
        for planes, stride in [(width, 1), (2 * width, 2), (4 * width, 2)]:
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-20 (3 BasicBlocks per stage, ~0.27 M parameters)."""
    return CifarResNet(3, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-56 (9 BasicBlocks per stage, ~0.86 M parameters), the papers' CIFAR-10 model."""
    return CifarResNet(9, num_classes)


# channels per conv, "M" = 2×2 max-pool; 32×32 input → 2×2 after the four pools
_VGG_SMALL_CFG = (32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256, "M")


class VGGSmall(nn.Module):
    """Plain conv-BN-ReLU stack (8 convs, 4 max-pools), flatten, then Linear-ReLU-Linear.

    The flatten feeds a Linear, so its input columns come in blocks of 2·2 per channel: the case
    C-SGD's folding must handle per block of columns.
    """

    def __init__(self, num_classes: int = 10, cfg=_VGG_SMALL_CFG):
        super().__init__()
        num_classes = check_int(num_classes, "num_classes", low=1)
        layers: list[nn.Module] = []
        in_ch = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(in_ch, v, 3, padding=1, bias=False),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(in_ch * 2 * 2, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes)
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg_small(num_classes: int = 10) -> VGGSmall:
    """A small VGG for CIFAR (32×32 input, ~1.4 M parameters)."""
    return VGGSmall(num_classes)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
