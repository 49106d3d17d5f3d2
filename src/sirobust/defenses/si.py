"""The SI mechanism (paper Sec. 4.3), in one place for every defense.

With SI, a defense's adversarial examples come from SI-PGD (inner loss
``CE(s · cos θ, y)``) and its training objective gains
``β · L_CE^m(f~(x^'), y) = β · CE(s · (cos θ − m · onehot(y)), y)`` on the
adversarial examples (Eq. 25). Defaults s = 15, m = 0.2, β = 0.2 (Sec. 5.3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_float
from ..features import ModelOutput
from ..losses import si_margin


@dataclass
class SIConfig:
    scale: float = 15.0   # s
    margin: float = 0.2   # m
    weight: float = 0.2   # β

    def __post_init__(self):
        # checked, not converted: the values are recorded as given (describe())
        check_float("si scale (--si-scale)", self.scale, min=0, min_open=True)
        check_float("si margin (--si-margin)", self.margin, min=0)
        check_float("si weight (--si-weight)", self.weight, min=0)


def si_regulariser(adv: ModelOutput, y: torch.Tensor, si: SIConfig) -> torch.Tensor:
    """β · mean over the batch of CE(s · (cos θ(x^') − m · onehot(y)), y)."""
    return si.weight * si_margin(adv, y, scale=si.scale, margin=si.margin).mean()
