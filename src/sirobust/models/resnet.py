"""CIFAR ResNets: ``resnet18`` (BasicBlock [2,2,2,2]) and ``resnet50`` (Bottleneck [3,4,6,3]).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, in the
CIFAR variant used by the adversarial-robustness codes (Madry et al. 2018;
TRADES, Zhang et al. 2019; MART, Wang et al. 2020; all derived from
kuangliu/pytorch-cifar): a 3×3 stride-1 stem and no max-pool, since 32×32 inputs
cannot afford the ImageNet stem's 4× downsampling. Widths 64-128-256-512 with
strides 1-2-2-2; features are the global average pool of the last stage
(512 dims for resnet18, 2048 for resnet50). PyTorch's default init, as there.
"""
from __future__ import annotations

from typing import Sequence, Type, Union

import torch.nn.functional as F
from torch import nn

from .base import ImageClassifier
from .registry import register_model


class BasicBlock(nn.Module):
    """Two 3×3 convs (post-activation), identity or 1×1-conv+BN shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce - 3×3 - 1×1 expand (×4); the stride sits on the 3×3 conv."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNetBody(nn.Module):
    """CIFAR ResNet trunk: image -> pooled features (B, 512 * block.expansion)."""

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], num_blocks: Sequence[int], in_channels: int = 3):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        # adaptive rather than avg_pool2d(4): identical at 32×32, and other sizes still work
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 512 * block.expansion

    def _make_layer(self, block, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.pool(out).flatten(1)


def _resnet(block, num_blocks, num_classes, in_channels, mean, std) -> ImageClassifier:
    body = ResNetBody(block, num_blocks, in_channels)
    return ImageClassifier(body, body.feature_dim, num_classes, mean, std)


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3,
             mean: Sequence[float] = (0.0,) * 3, std: Sequence[float] = (1.0,) * 3) -> ImageClassifier:
    """CIFAR ResNet-18 (≈11.17M parameters for 10 classes), feature dim 512."""
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, mean, std)


@register_model("resnet50")
def resnet50(num_classes: int = 10, in_channels: int = 3,
             mean: Sequence[float] = (0.0,) * 3, std: Sequence[float] = (1.0,) * 3) -> ImageClassifier:
    """CIFAR ResNet-50 (≈23.52M parameters for 10 classes), feature dim 2048."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, mean, std)
