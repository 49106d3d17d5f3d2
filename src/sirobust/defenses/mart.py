"""MART (Wang et al., "Improving Adversarial Robustness Requires Revisiting
Misclassified Examples", ICLR 2020); paper Table 1, row MART, λ = 6.

Training objective  ``BCE(f(x^'), y) + λ · mean_i[ KL(f(x_i) ‖ f(x^'_i)) · (1 − f(x_i)_y) ]``
Adversarial objective ``CE(f(x'), y)`` (the base class default)

with ``BCE(p', y) = −log p'_y − log(1 − max_{k≠y} p'_k)`` (boosted CE) and the KL
summed over classes per example. Both KL arguments and the weight ``1 − f(x)_y``
carry gradient, as in MART's code.

Safety terms, as in MART's released code (they keep the logs finite when a
probability saturates): ``−log(1.0001 − p'_k + 1e-12)`` in the BCE's second term,
``log(p' + 1e-12)`` for the adversarial side of the KL, and the weight
``1.0000001 − f(x)_y``. The first BCE term is an exact log-softmax CE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_param
from .base import Defense

_TINY = 1e-12        # inside the logs
_ONE_BCE = 1.0001    # "1" in log(1 − max_{k≠y} p'_k)
_ONE_W = 1.0000001   # "1" in the weight 1 − f(x)_y


def boosted_ce(adv_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example −log p'_y − log(1 − max_{k≠y} p'_k), (B,)."""
    p = F.softmax(adv_logits, dim=1)
    p_other = p.masked_fill(F.one_hot(y, p.shape[1]).bool(), float("-inf")).max(1).values
    return F.cross_entropy(adv_logits, y, reduction="none") - torch.log(_ONE_BCE - p_other + _TINY)


def weighted_kl(clean_logits: torch.Tensor, adv_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example KL(f(x) ‖ f(x^')) · (1 − f(x)_y), (B,)."""
    p_clean = F.softmax(clean_logits, dim=1)
    log_p_adv = torch.log(F.softmax(adv_logits, dim=1) + _TINY)
    # kl_div(input, target) = Σ target · (log target − input), with 0·log 0 = 0
    kl = F.kl_div(log_p_adv, p_clean, reduction="none").sum(1)
    return kl * (_ONE_W - p_clean.gather(1, y[:, None]).squeeze(1))


class MART(Defense):
    """MART: boosted CE on PGD examples + λ·KL weighted by 1 − f(x)_y (Wang et al. 2020), λ = 6."""

    name = "mart"
    needs_clean_output = True

    def __init__(self, attack=None, si=None, lam: float = 6.0):
        super().__init__(attack=attack, si=si)
        self.lam = check_param("mart", "lam (λ)", lam, min=0)

    def training_loss(self, model, x, x_adv, y, clean, adv):
        return boosted_ce(adv.logits, y).mean() + self.lam * weighted_kl(clean.logits, adv.logits, y).mean()

    def describe(self) -> dict:
        return {**super().describe(), "params": {"lam": self.lam}}
