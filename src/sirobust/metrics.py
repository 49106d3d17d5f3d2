"""Per-example correctness, clean and under attack, batched over a dataset."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .checks import model_device
from .modes import model_mode


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def correct_mask(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                 attack: Optional[Callable] = None, device: Optional[torch.device] = None,
                 progress: Optional[Callable[[int], None]] = None,
                 keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool (N,) on CPU: is example i classified correctly (after ``attack`` when given)?

    ``images`` are float [0,1] or uint8 (converted per batch, so a uint8 dataset
    stays small in memory). The model's mode is left as it is; attacks restore it. ``keys`` (N,) are the
    examples' indices: they key a sirobust attack's random starts (the result then does not depend on batching).
    """
    device = torch.device(device) if device is not None else model_device(model) or torch.device("cpu")
    out = torch.empty(len(labels), dtype=torch.bool)
    for start in range(0, len(labels), batch_size):
        x = images[start:start + batch_size].to(device)
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        y = labels[start:start + batch_size].to(device)
        if attack is not None:
            x = attack(x, y) if keys is None else attack(x, y, keys=keys[start:start + batch_size].to(device))
        out[start:start + len(y)] = (_predict(model, x) == y).cpu()
        if progress is not None:
            progress(len(y))
    return out


def eval_mode(model: nn.Module):
    """Context manager: model.eval() inside, every module's previous mode restored after."""
    return model_mode(model, "eval")
