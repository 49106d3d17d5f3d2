"""Model registry: names are resolved here (and in the CLI), nowhere deeper."""
from __future__ import annotations

from typing import Callable, Dict, Sequence

from ..checks import resolve_name
from .base import ImageClassifier

_MODELS: Dict[str, Callable[..., ImageClassifier]] = {}


def register_model(name: str):
    """Decorator: ``@register_model("resnet18")`` on a builder
    ``fn(num_classes, in_channels, mean, std) -> ImageClassifier``."""

    def deco(fn):
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def canonical_model(name: str) -> str:
    return resolve_name("model", name, _MODELS)


def describe_model(name: str) -> str:
    """The first line of the builder's docstring."""
    return (_MODELS[canonical_model(name)].__doc__ or "").strip().splitlines()[0]


def build_model(name: str, num_classes: int = 10, in_channels: int = 3,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> ImageClassifier:
    """Build a zoo model by name. ``mean``/``std`` default to 0/1 per channel
    (no normalisation); pass the dataset's to normalise inside the model."""
    name = resolve_name("model", name, _MODELS)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    mean = list(mean) if mean is not None else [0.0] * in_channels
    std = list(std) if std is not None else [1.0] * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values (in_channels), got {len(mean)}/{len(std)}")
    return _MODELS[name](num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
