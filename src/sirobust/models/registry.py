"""Model registry: names are resolved here (and in the CLI), nowhere deeper."""
from __future__ import annotations

from typing import Callable, Sequence

from ..registry import Registry
from .base import ImageClassifier

MODELS: Registry[Callable[..., ImageClassifier]] = Registry("model")


def register_model(name: str):
    """Decorator: ``@register_model("resnet18")`` on a builder
    ``fn(num_classes, in_channels, mean, std) -> ImageClassifier``."""

    return MODELS.decorator(name)


def list_models() -> list[str]:
    return MODELS.names()


def canonical_model(name: str) -> str:
    return MODELS.canonical(name)


def describe_model(name: str) -> str:
    """The first line of the builder's docstring."""
    return MODELS.describe(name)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> ImageClassifier:
    """Build a zoo model by name. ``mean``/``std`` default to 0/1 per channel
    (no normalisation); pass the dataset's to normalise inside the model."""
    build = MODELS.get(name)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    mean = list(mean) if mean is not None else [0.0] * in_channels
    std = list(std) if std is not None else [1.0] * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values (in_channels), got {len(mean)}/{len(std)}")
    return build(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
