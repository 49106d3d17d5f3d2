"""Standard (non-adversarial) training: CE on clean inputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Defense


class Standard(Defense):
    """Standard training: CE on clean examples, no adversary (the non-robust baseline)."""

    name = "standard"
    uses_attack = False

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator=None):
        if self.si is not None:
            raise ValueError("--with-si needs an adversarial defense (at, trades, alp, mart); standard training has no adversary")
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss_defense": loss.item(), "clean_acc": (logits.detach().argmax(1) == y).float().mean().item()}

    def describe(self) -> dict:
        return {"defense": self.name, "si": None, "attack": None}
