"""TRADES (Zhang et al., "Theoretically Principled Trade-off between Robustness and
Accuracy", ICML 2019); paper Table 1, row TRADES, λ = 6.

Training objective  ``CE(f(x), y) + λ · KL(f(x) ‖ f(x^'))``
Adversarial objective ``KL(f(x) ‖ f(x'))``

The KL has the clean prediction first, ``Σ_k p_k(x) · (log p_k(x) − log p_k(x'))``,
as TRADES' ``KLDivLoss(log_softmax(f(x_adv)), softmax(f(x)))``; it is summed over
classes and averaged over the batch ("batchmean", TRADES' ``sum / batch_size``).
Inside the attack ``f(x)`` is a constant computed by the base class in the attack's
mode; in the training objective both sides carry gradient, as in TRADES.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_param
from ..features import ModelOutput
from ..losses import Loss, get_loss
from ..modes import model_mode
from .base import Defense


def kl_clean_adv(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """Per-example KL(softmax(clean) ‖ softmax(adv)), summed over classes, (B,)."""
    # log-space on both sides: exact where a probability underflows to 0 (0·log 0 = 0)
    return F.kl_div(F.log_softmax(adv_logits, dim=1), F.log_softmax(clean_logits, dim=1),
                    reduction="none", log_target=True).sum(1)


class TRADES(Defense):
    """TRADES: CE(f(x)) + λ·KL(f(x) ‖ f(x')) with KL-maximising PGD (Zhang et al. 2019), λ = 6."""

    name = "trades"
    needs_clean_output = True
    attack_uses_clean = True

    def __init__(self, attack=None, si=None, lam: float = 6.0):
        super().__init__(attack=attack, si=si)
        self.lam = check_param(self.name, "lam (λ)", lam, min=0)  # "he" for TRADES-HE

    def adversarial_loss(self, clean) -> Loss:
        # the registered "kl" loss: KL(f(x) ‖ f(x')) with f(x) detached
        return get_loss("kl", clean_logits=clean.logits)

    def make_adversarial(self, model, x, y, generator=None, clean=None):
        if clean is None and self.si is None:
            # called directly rather than from __call__: f(x) as __call__ gets it, in the attack's mode
            with model_mode(model, self.attack.model_mode), torch.no_grad():
                clean = ModelOutput(model(x))
        return super().make_adversarial(model, x, y, generator, clean)

    def training_loss(self, model, x, x_adv, y, clean, adv):
        return F.cross_entropy(clean.logits, y) + self.lam * kl_clean_adv(clean.logits, adv.logits).mean()

    def describe(self) -> dict:
        return {**super().describe(), "params": {"lam": self.lam}}
