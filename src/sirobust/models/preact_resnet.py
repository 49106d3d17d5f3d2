"""Pre-activation ResNet-18 for CIFAR (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016):
BN-ReLU before each conv, a bare 3×3 stem, 1×1-conv projection shortcuts (no BN). Feature dim 512.

Three variants, because the codes the paper's single-step defenses come from differ in two places:

- ``preact-resnet18``: the projection shortcut sees the block's pre-activated input, and the trunk ends
  with a BN-ReLU before pooling (the widely copied pytorch-cifar form). sirobust's original model.
- ``preact-resnet18-wong``: Wong, Rice & Kolter's ``preact_resnet.py`` ("Fast is better than free",
  ICLR 2020; RFGSM-AT): the shortcut sees the block's raw input; final BN-ReLU.
- ``preact-resnet18-gradalign``: Andriushchenko & Flammarion's ``models.py`` (GradAlign, NeurIPS 2020):
  the shortcut sees the raw input, and there is no final BN-ReLU (layer 4 goes straight to pooling).

The variants share parameter names, so a checkpoint records which one it is (its model name) and is
rebuilt as that one. PyTorch default init.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import nn

from .base import ImageClassifier
from .registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-conv3×3 plus shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut_from: str = "preact"):
        super().__init__()
        self.shortcut_from = shortcut_from  # "preact": BN-ReLU(x) feeds the projection; "input": x itself
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        if self.shortcut is None:
            shortcut = x
        else:
            shortcut = self.shortcut(out if self.shortcut_from == "preact" else x)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNetBody(nn.Module):
    """Pre-activation ResNet trunk: image -> (B, 512)."""

    def __init__(self, num_blocks: Sequence[int] = (2, 2, 2, 2), in_channels: int = 3, shortcut_from: str = "preact",
                 final_bn: bool = True):
        super().__init__()
        self.in_planes = 64
        self.shortcut_from = shortcut_from
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        # blocks end un-normalised: all but the GradAlign variant add a last BN-ReLU before pooling
        self.bn = nn.BatchNorm2d(512) if final_bn else None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 512

    def _make_layer(self, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(PreActBlock(self.in_planes, planes, s, self.shortcut_from))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.bn is not None:
            out = F.relu(self.bn(out))
        return self.pool(out).flatten(1)


@register_model("preact-resnet18")
def preact_resnet18(num_classes: int = 10, in_channels: int = 3,
                    mean: Sequence[float] = (0.0,) * 3, std: Sequence[float] = (1.0,) * 3) -> ImageClassifier:
    """Pre-activation ResNet-18 (≈11.17M parameters for 10 classes), feature dim 512."""
    body = PreActResNetBody((2, 2, 2, 2), in_channels)
    return ImageClassifier(body, body.feature_dim, num_classes, mean, std)


@register_model("preact-resnet18-wong")
def preact_resnet18_wong(num_classes: int = 10, in_channels: int = 3,
                         mean: Sequence[float] = (0.0,) * 3, std: Sequence[float] = (1.0,) * 3) -> ImageClassifier:
    """Pre-activation ResNet-18 as in Wong et al.'s fast-AT code (shortcut from the raw input)."""
    body = PreActResNetBody((2, 2, 2, 2), in_channels, shortcut_from="input")
    return ImageClassifier(body, body.feature_dim, num_classes, mean, std)


@register_model("preact-resnet18-gradalign")
def preact_resnet18_gradalign(num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] = (0.0,) * 3,
                              std: Sequence[float] = (1.0,) * 3) -> ImageClassifier:
    """Pre-activation ResNet-18 as in Andriushchenko & Flammarion's GradAlign code (raw-input shortcut, no final BN)."""
    body = PreActResNetBody((2, 2, 2, 2), in_channels, shortcut_from="input", final_bn=False)
    return ImageClassifier(body, body.feature_dim, num_classes, mean, std)
