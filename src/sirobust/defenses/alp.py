"""Adversarial logit pairing (Kannan et al., "Adversarial Logit Pairing", 2018);
paper Table 1, row ALP, α = 0.5, λ = 3.

Training objective  ``α · CE(f(x), y) + (1 − α) · CE(f(x^'), y) + λ · ‖Wᵀ(z − z^')‖₂``
Adversarial objective ``CE(f(x'), y)`` (the base class default)

The pairing term is the mean over the batch of the per-example L2 norm of
``Wᵀ(z − z^')``. The bias cancels, ``(Wᵀz + b) − (Wᵀz^' + b) = Wᵀ(z − z^')``, so
it equals the L2 distance between the clean and adversarial logits and is
computed from the logits: no feature hook is needed (any model works).
(Pang et al.'s ALP code uses the mean *squared* difference instead; we follow
Table 1's ‖·‖₂.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Defense


def logit_pairing(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """Per-example ‖g(x) − g(x^')‖₂ = ‖Wᵀ(z − z^')‖₂, (B,). Its gradient at 0 is 0 (PyTorch's subgradient)."""
    return torch.linalg.vector_norm(clean_logits - adv_logits, ord=2, dim=1)


class ALP(Defense):
    name = "alp"
    needs_clean_output = True

    def __init__(self, attack=None, si=None, alpha: float = 0.5, lam: float = 3.0):
        super().__init__(attack=attack, si=si)
        if not 0 <= alpha <= 1:
            raise ValueError(f"alp alpha (weight of the clean CE) must be in [0, 1], got {alpha}")
        if not lam >= 0:
            raise ValueError(f"alp lam (λ) must be >= 0, got {lam}")
        self.alpha, self.lam = float(alpha), float(lam)

    def training_loss(self, model, x, x_adv, y, clean, adv):
        ce = self.alpha * F.cross_entropy(clean.logits, y) + (1 - self.alpha) * F.cross_entropy(adv.logits, y)
        return ce + self.lam * logit_pairing(clean.logits, adv.logits).mean()

    def describe(self) -> dict:
        return {**super().describe(), "params": {"alpha": self.alpha, "lam": self.lam}}
