"""Input validation shared by attacks, evaluation and training: clear errors at the edge."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def check_images(x: torch.Tensor, name: str = "x", channels: Optional[int] = None) -> None:
    """x must be a float (B, C, H, W) tensor of finite pixels in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of images, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor of pixels in [0, 1], got dtype {x.dtype} "
                        "(convert uint8 images with x.float() / 255)")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)} ({x.dim()} dims)")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} has {x.shape[1]} channels but the model expects {channels}")
    if x.numel() == 0:
        return
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite pixels")
    lo, hi = x.min().item(), x.max().item()
    if lo < 0 or hi > 1:
        hint = " (it looks like 0-255 pixels: divide by 255)" if hi > 1.5 else \
            " (it looks normalised: pass [0,1] pixels; normalisation belongs inside the model)" if lo < 0 else ""
        raise ValueError(f"{name} must hold pixels in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")


def check_labels(y: torch.Tensor, batch: int, num_classes: Optional[int] = None, name: str = "y") -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor of class indices, got dtype {y.dtype}")
    if y.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match the images, got {tuple(y.shape)}")
    if y.numel() and num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} must be class indices in [0, {num_classes - 1}], "
                         f"got values in [{y.min().item()}, {y.max().item()}]")


def model_channels(model: nn.Module) -> Optional[int]:
    """Input channels the model expects, when it says (zoo models do)."""
    norm = getattr(model, "normalize", None)
    mean = getattr(norm, "mean", None)
    return int(mean.shape[1]) if isinstance(mean, torch.Tensor) and mean.dim() == 4 else None


def check_positive(name: str, value, allow_zero: bool = True) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
