"""Madry et al. 2018 adversarial training (Table 1, row AT).

Training objective CE(f(x^'), y); adversarial objective CE(f(x'), y).
"""
from __future__ import annotations

import torch.nn.functional as F

from .base import Defense


class AT(Defense):
    """Madry AT: CE on PGD examples (Madry et al. 2018; paper Table 1)."""

    name = "at"

    def training_loss(self, model, x, x_adv, y, clean, adv):
        return F.cross_entropy(adv.logits, y)
