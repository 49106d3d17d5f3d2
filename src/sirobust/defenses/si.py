"""The SI mechanism (paper Sec. 4.3), in one place for every defense.

With SI, a defense's adversarial examples come from SI-PGD (inner loss
``CE(s · cos θ, y)``) and its training objective gains
``β · L_CE^m(f~(x^'), y) = β · CE(s · (cos θ − m · onehot(y)), y)`` on the
adversarial examples (Eq. 25). Defaults s = 15, m = 0.2, β = 0.2 (Sec. 5.3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..features import ModelOutput
from ..losses import si_margin


@dataclass
class SIConfig:
    scale: float = 15.0   # s
    margin: float = 0.2   # m
    weight: float = 0.2   # β

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"si scale (--si-scale) must be > 0, got {self.scale}")
        if not self.margin >= 0:
            raise ValueError(f"si margin (--si-margin) must be >= 0, got {self.margin}")
        if not self.weight >= 0:
            raise ValueError(f"si weight (--si-weight) must be >= 0, got {self.weight}")


def si_regulariser(adv: ModelOutput, y: torch.Tensor, si: SIConfig) -> torch.Tensor:
    """β · mean over the batch of CE(s · (cos θ(x^') − m · onehot(y)), y)."""
    return si.weight * si_margin(adv, y, scale=si.scale, margin=si.margin).mean()
