"""``preact-resnet18``: pre-activation ResNet-18 for CIFAR.

He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016, in the
form used by Wong, Rice & Kolter, "Fast is better than free: revisiting
adversarial training", ICLR 2020, and by Andriushchenko & Flammarion's
GradAlign code (NeurIPS 2020): BN-ReLU before each conv, a bare 3×3 stem, a
1×1-conv shortcut (no BN) taken from the pre-activated input, and a final
BN-ReLU before global average pooling. Feature dim 512; PyTorch default init.
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

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        # the projection shortcut sees the pre-activated input, as in the reference code
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNetBody(nn.Module):
    """Pre-activation ResNet trunk: image -> (B, 512)."""

    def __init__(self, num_blocks: Sequence[int] = (2, 2, 2, 2), in_channels: int = 3):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        # blocks end un-normalised, so the trunk needs a last BN-ReLU before pooling
        self.bn = nn.BatchNorm2d(512)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 512

    def _make_layer(self, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.pool(out).flatten(1)


@register_model("preact-resnet18")
def preact_resnet18(num_classes: int = 10, in_channels: int = 3,
                    mean: Sequence[float] = (0.0,) * 3, std: Sequence[float] = (1.0,) * 3) -> ImageClassifier:
    """Pre-activation ResNet-18 (≈11.17M parameters for 10 classes), feature dim 512."""
    body = PreActResNetBody((2, 2, 2, 2), in_channels)
    return ImageClassifier(body, body.feature_dim, num_classes, mean, std)
