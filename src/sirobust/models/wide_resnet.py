"""Wide ResNets ``wrn-34-10`` and ``wrn-28-10``.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016, as used by TRADES
(Zhang et al., ICML 2019) and MART (Wang et al., ICLR 2020): three groups of
(depth - 4) / 6 pre-activation basic blocks with widths 16k, 32k, 64k, dropout
0, default BN momentum, a final BN-ReLU and global average pooling, so the
feature dim is 64·k (640 for k = 10). Convs use He-normal init with fan-out and
the head bias starts at zero, as in the reference code. The TRADES file also
builds an unused ``sub_block1``; it is left out here (it never gets a gradient
and would add ≈2.3M dead parameters).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import nn

from .base import ImageClassifier
from .registry import register_model


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3 plus shortcut.

    When the width or stride changes, the activated input feeds both the
    residual branch and the 1×1 projection shortcut (the reference behaviour).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        residual = x if self.equal_in_out else self.shortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + residual


class WideResNet(nn.Module):
    """WRN-depth-k trunk: image -> (B, 64·k). ``depth`` must be 6n + 4."""

    def __init__(self, depth: int = 34, widen_factor: int = 10, in_channels: int = 3, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._make_group(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = self._make_group(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = self._make_group(n, widths[2], widths[3], 2, drop_rate)
        self.bn = nn.BatchNorm2d(widths[3])
        self.pool = nn.AdaptiveAvgPool2d(1)  # = avg_pool2d(8) at 32×32
        self.feature_dim = widths[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He et al. 2015 init with fan-out, as in the WRN/TRADES code
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_group(n, in_planes, out_planes, stride, drop_rate):
        return nn.Sequential(*[WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                              stride if i == 0 else 1, drop_rate) for i in range(n)])

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.pool(out).flatten(1)


def _wrn(depth, widen_factor, num_classes, in_channels, mean, std) -> ImageClassifier:
    body = WideResNet(depth, widen_factor, in_channels)
    model = ImageClassifier(body, body.feature_dim, num_classes, mean, std)
    nn.init.zeros_(model.head.bias)  # reference code zeroes the classifier bias (weight keeps default init)
    return model


@register_model("wrn-34-10")
def wrn_34_10(num_classes: int = 10, in_channels: int = 3,
              mean: Sequence[float] = (0.0,) * 3, std: Sequence[float] = (1.0,) * 3) -> ImageClassifier:
    """WRN-34-10 (≈46.16M parameters for 10 classes), feature dim 640."""
    return _wrn(34, 10, num_classes, in_channels, mean, std)


@register_model("wrn-28-10")
def wrn_28_10(num_classes: int = 10, in_channels: int = 3,
              mean: Sequence[float] = (0.0,) * 3, std: Sequence[float] = (1.0,) * 3) -> ImageClassifier:
    """WRN-28-10 (≈36.48M parameters for 10 classes), feature dim 640."""
    return _wrn(28, 10, num_classes, in_channels, mean, std)
