"""The shape every zoo model has: normalize -> features -> linear head.

Inputs are pixels in [0, 1]; the dataset's mean/std live inside the model as
buffers (as RobustBench does), so attacks work in pixel space and ε is in pixel
units. ``features(x)`` is the penultimate representation ``z`` of the paper
(Sec. 3.1, ``g(x) = Wᵀ z + b``) and ``head`` is the last linear layer ``W, b``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
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


class CosineHead(nn.Linear):
    """``s · cos θ``: the hypersphere-embedding head (Pang et al. 2020, used by the HE defense).

    Holds the same parameters as ``nn.Linear`` (so checkpoints keep their keys);
    the bias is unused, because HE normalises features and weights and drops it.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 15.0):
        super().__init__(in_features, out_features)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(z, dim=1, eps=1e-12) @ F.normalize(self.weight, dim=1, eps=1e-12).t()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale}"


class SelectOutput(nn.Module):
    """``model(x)[key]``: adapt a model that returns a tuple or dict (logits plus extras) to one that
    returns its logits, as attacks need.

    Example::

        model = SelectOutput(hf_model, "logits")      # or SelectOutput(model, 0) for (logits, aux)
    """

    wraps_model = True  # the model inside keeps its own head (sirobust.features finds it through this)

    def __init__(self, model: nn.Module, key):
        super().__init__()
        self.model = model
        self.key = key
        self.training = model.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return getattr(out, self.key) if isinstance(self.key, str) and hasattr(out, self.key) else out[self.key]


class ScaledLogits(nn.Module):
    """``α · model(x)``: the same classifier, rescaled logits (decisions unchanged). The rescaling study
    (paper Fig. 1, Sec. 4.1) and evaluate's scale-sensitivity flag attack it.

    Example::

        scaled = ScaledLogits(model, 100.0)            # CE saturates; SI-PGD does not notice
    """

    wraps_model = True  # the model inside keeps its own head (sirobust.features finds it through this)

    def __init__(self, model: nn.Module, alpha: float):
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.model = model
        self.alpha = float(alpha)
        self.training = model.training  # a wrapper must not flip the wrapped model's mode later

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.model(x)


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

    def use_cosine_head(self, scale: float = 15.0) -> "ImageClassifier":
        """Replace the head by :class:`CosineHead` (same weights): logits become s · cos θ."""
        head = CosineHead(self.head.in_features, self.head.out_features, scale)
        head.load_state_dict(self.head.state_dict())
        self.head = head.to(self.head.weight.device)
        return self

    @property
    def head_type(self) -> str:
        return "cosine" if isinstance(self.head, CosineHead) else "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
