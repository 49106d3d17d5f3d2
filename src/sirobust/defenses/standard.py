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

    def __init__(self, attack=None, si=None):
        if si is not None:  # refused when the config is resolved, before a run folder or the data exist
            raise ValueError("--with-si needs an adversarial defense (at, trades, alp, mart, or the single-step "
                             "fgsm-rs, free, gat, gradalign); standard training has no adversary")
        super().__init__(attack=attack, si=None)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator=None):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss_defense": loss.item(), "clean_acc": (logits.detach().argmax(1) == y).float().mean().item()}

    def describe(self) -> dict:
        return {"defense": self.name, "si": None, "attack": None}
