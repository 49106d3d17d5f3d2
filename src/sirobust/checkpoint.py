"""Model weights as ``.safetensors`` with everything needed to rebuild the model.

The metadata holds the architecture name, class and channel counts, the
normalisation and the dataset, so ``sirobust.load(path)`` needs no other
argument. safetensors stores tensors only: loading never runs code from the file.

Example::

    save_model(model, "run/model.safetensors", model_name="resnet18", dataset="cifar10")
    model = sirobust.load("run/model.safetensors")      # or the run folder
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open

from .io import PathLike, atomic_write
from .models import ImageClassifier, build_model

FORMAT_VERSION = "1"
WEIGHTS_NAME = "model.safetensors"   # the last epoch's weights
BEST_NAME = "best.safetensors"       # best validation robust accuracy
BEST_NAME_ALIASES = {"last": WEIGHTS_NAME, "best": BEST_NAME}


class CheckpointError(ValueError):
    """A weights file that is missing, corrupt, or not a sirobust checkpoint."""


def save_model(model: ImageClassifier, path: PathLike, *, model_name: str, dataset: Optional[str] = None,
               extra: Optional[dict[str, Any]] = None) -> Path:
    """Write ``model``'s weights and rebuild metadata to ``path`` atomically."""
    if not isinstance(model, ImageClassifier):
        raise TypeError("save_model takes a sirobust zoo model (ImageClassifier); "
                        "for other models use safetensors.torch.save_file on their state_dict")
    meta = {
        "sirobust_format": FORMAT_VERSION,
        "model": model_name,
        "dataset": dataset or "",
        "num_classes": str(model.num_classes),
        "in_channels": str(int(model.normalize.mean.shape[1])),
        "mean": json.dumps(model.normalize.mean.flatten().tolist()),
        "std": json.dumps(model.normalize.std.flatten().tolist()),
        "extra": json.dumps(extra or {}),
        "head": model.head_type,
        "head_scale": str(getattr(model.head, "scale", "")),
    }
    # clone+contiguous: safetensors refuses shared or strided storage
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda p: save_file(state, str(p), metadata=meta))


def read_metadata(path: PathLike) -> dict[str, str]:
    path = resolve_weights_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file: {e}") from None
    if meta.get("sirobust_format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has no sirobust metadata (format {meta.get('sirobust_format')!r}); "
                              "it was not written by sirobust.save_model")
    return meta


def resolve_weights_path(path: PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path} (expected a .safetensors file or a run folder containing {WEIGHTS_NAME})")
    return path


def load(path: PathLike, device: Optional[str | torch.device] = None) -> ImageClassifier:
    """Rebuild a zoo model from a sirobust ``.safetensors`` file or run folder (in eval mode)."""
    path = resolve_weights_path(path)
    meta = read_metadata(path)
    model = build_model(meta["model"], num_classes=int(meta["num_classes"]), in_channels=int(meta["in_channels"]),
                        mean=json.loads(meta["mean"]), std=json.loads(meta["std"]))
    if meta.get("head", "linear") == "cosine":  # HE-trained models predict with s · cos θ
        model.use_cosine_head(float(meta["head_scale"]))
    try:
        state = load_file(str(path), device="cpu")
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"weights in {path} do not match model {meta['model']!r}: {e}") from None
    model.sirobust_metadata = {k: v for k, v in meta.items()}  # provenance for reports
    return model.to(device or "cpu").eval()
