"""The shape every zoo model has: normalize -> features -> linear head.

Inputs are pixels in [0, 1]; the dataset's mean/std live inside the model as
buffers (as RobustBench does), so attacks work in pixel space and ε is in pixel
units. ``features(x)`` is the penultimate representation ``z`` of the paper
(Sec. 3.1, ``g(x) = Wᵀ z + b``) and ``head`` is the last linear layer ``W, b``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean/std stored as buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """Base class of the model zoo.

    Subclasses build ``self.body`` (normalised image -> flat feature vector of
    size ``feature_dim``); this class adds normalisation and the linear head.

    Example::

        model = build_model("resnet18", num_classes=10)
        z = model.features(x)            # (B, 512)
        logits = model.head(z)           # == model(x)
    """

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int,
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features z, (B, feature_dim)."""
        return self.body(self.normalize(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # timm-style alias
        return self.features(x)

    def get_classifier(self) -> nn.Linear:  # timm-style accessor
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
