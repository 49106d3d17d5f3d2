"""Model zoo: every model is ``normalize -> body -> head`` (see :mod:`.base`).

Importing this package registers the architectures; build them by name::

    from sirobust.models import build_model, list_models
    model = build_model("wrn-34-10", num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD)
"""
from .base import CosineHead, ImageClassifier, Normalize, ScaledLogits, SelectOutput
from .registry import build_model, canonical_model, describe_model, list_models, register_model

# imported for their @register_model side effect
from . import cnn, preact_resnet, resnet, wide_resnet  # noqa: E402,F401

__all__ = ["CosineHead", "ImageClassifier", "Normalize", "ScaledLogits", "SelectOutput", "build_model", "canonical_model", "describe_model",
           "list_models", "register_model"]
