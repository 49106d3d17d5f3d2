"""GAT, Guided Adversarial Training (Sriramanan, Addepalli, Baburaj & Babu, "Guided
Adversarial Attack for Evaluating and Enhancing Adversarial Defenses", NeurIPS 2020):
a single-step defense whose attack and objective both use a relaxation term, the
squared L2 distance between the clean and the adversarial softmax outputs.

    relaxation            R(x, x') = ‖softmax(f(x)) − softmax(f(x'))‖²₂   (summed over classes)
    adversarial objective CE(f(x'), y) + a_t · λ · R(x, x'),  softmax(f(x)) a constant
    training objective    CE(f(x), y)  + λ · mean_i R(x_i, x^'_i)        (both sides carry gradient)

Details, from the authors' CIFAR-10 code (GAT_cifar10.py):

* the attack starts at ``x + (ε/2) · s`` with a random sign ``s = ±1`` per pixel (their
  B_val = 4/255 at ε = 8/255), clipped to [0, 1], and takes ONE signed step of size ε,
  projected onto the ε-ball and [0, 1]; the model is in eval mode for the step;
* ``a_t`` alternates within an epoch: ``a_t = t mod 2`` for the minibatch of index t
  (0-based), so the relaxation term guides the attack on the odd-indexed minibatches
  and the attack is plain FGSM-from-noise on the even ones;
* softmax(f(x)) for the attack comes from the clean forward pass made before the model is
  put in eval mode, i.e. in the caller's mode (train during training);
* λ = 10, multiplied by 4 once the first 86 % of the epochs are done (their code multiplies
  it after training epoch 85 of 100, 0-based, together with the last learning-rate decay); the
  attack's λ is the same variable, so it is multiplied too;
* the training objective's CE is on the clean images, not the adversarial ones.

With SI (the base class's rule) the inner adversary maximises the SI loss instead of the
GAT adversarial objective, from the same random-sign start, and the objective gains the
SI term. GAT is defined for the L∞ ball only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..attacks.loop import pgd_loop
from ..checks import check_param
from ..features import ModelOutput, forward_with_features
from ..losses import Loss, get_loss
from ..modes import model_mode
from ..rng import as_noise
from .base import Defense

# the reference multiplies λ after epoch 85 (0-based) of 100: from epoch index 86, i.e. 86 epochs per 100 done
_LAM_SWITCH_PER_100 = 86


def relaxation(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """Per-example ‖softmax(clean) − softmax(adv)‖²₂, summed over classes, (B,)."""
    return (F.softmax(clean_logits, dim=1) - F.softmax(adv_logits, dim=1)).pow(2).sum(1)


def gat_lambda(epoch: int, epochs: int, lam: float = 10.0, multiplier: float = 4.0) -> float:
    """λ for epoch ``epoch`` (0-based) of ``epochs``: ``lam``, times ``multiplier`` from epoch ⌈0.86·epochs⌉ on."""
    switch = -(-_LAM_SWITCH_PER_100 * int(epochs) // 100)  # integer ceiling: no float rounding at the boundary
    return float(lam) * (float(multiplier) if epoch >= switch else 1.0)


def _guided_ce(out: ModelOutput, y: torch.Tensor, clean_probs: Optional[torch.Tensor] = None,
               weight: float = 0.0) -> torch.Tensor:
    """CE(f(x'), y) + weight · ‖p − softmax(f(x'))‖²₂ per example, p = ``clean_probs`` (detached by the caller)."""
    if clean_probs is None:
        raise ValueError("the GAT attack loss needs the clean softmax outputs (clean_probs=...)")
    term = (clean_probs - F.softmax(out.logits, dim=1)).pow(2).sum(1)
    return F.cross_entropy(out.logits, y, reduction="none") + weight * term


class GAT(Defense):
    """GAT: CE(f(x)) + λ·‖softmax(f(x)) − softmax(f(x'))‖² with a guided single-step attack (Sriramanan et al. 2020)."""

    name = "gat"
    needs_clean_output = True
    # one signed step of ε from the random-sign start, in eval mode (their Guided_Attack)
    inner_preset = {"steps": 1, "alpha": 1.0, "random_start": True, "model_mode": "eval"}
    lr_schedule_preset = None  # their schedule is piecewise (÷10 twice)
    guard_overfitting = True
    own_start = "its attack starts at its own random-sign point"

    def __init__(self, attack=None, si=None, lam: float = 10.0, lam_multiplier: float = 4.0,
                 start_noise: float = 0.5):
        super().__init__(attack=attack, si=si)
        if self.attack.threat.norm != "Linf":
            raise ValueError(f"gat is defined for the Linf ball (its start is a random sign per pixel), "
                             f"got norm {self.attack.threat.norm}")
        self.lam = check_param("gat", "lam (λ)", lam, min=0)
        self.lam_multiplier = check_param("gat", "lam_multiplier", lam_multiplier, min=0)
        self.start_noise = check_param("gat", "start_noise (a multiple of ε)", start_noise, min=0, max=1)
        # both follow from the loop's position alone (epoch, batch index): nothing to save for resume
        self.lam_now = self.lam
        self.guided = False  # batch 0 of an epoch: their counter % 2 == 0

    # ----- the training loop's hooks ------------------------------------------------------------
    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.lam_now = gat_lambda(epoch, epochs, self.lam, self.lam_multiplier)

    def start_batch(self, index: int) -> None:
        self.guided = index % 2 == 1

    # ----- the two objectives ----------------------------------------------------------------------
    def _guide_on(self) -> bool:
        return self.guided and self.lam_now != 0

    def adversarial_loss(self, clean: Optional[ModelOutput]) -> Loss:
        if not self._guide_on():
            return get_loss("ce")  # their alt = 0: the relaxation term is multiplied by 0
        if clean is None:
            raise ValueError("the guided GAT attack needs f(x) (clean=...)")
        # detached: softmax(f(x)) is a constant of the attack (in their code its backward reaches only the
        # weights, whose gradients optimizer.zero_grad() then discards)
        return Loss("gat-guided-ce", _guided_ce,
                    params={"clean_probs": F.softmax(clean.logits.detach(), dim=1), "weight": self.lam_now})

    def training_loss(self, model, x, x_adv, y, clean, adv):
        return F.cross_entropy(clean.logits, y) + self.lam_now * relaxation(clean.logits, adv.logits).mean()

    # ----- the attack --------------------------------------------------------------------------------
    def start_point(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        """``clip(x + start_noise · ε · s, 0, 1)`` with an independent fair sign ``s`` per pixel."""
        u = as_noise(generator).derive("gat/start").uniform(x)
        sign = torch.where(u < 0.5, 1.0, -1.0).to(x.dtype)
        return (x.detach() + self.start_noise * self.attack.eps * sign).clamp(0, 1)

    def make_adversarial(self, model, x, y, generator=None, clean=None):
        if self.si is None and self._guide_on() and clean is None:
            # f(x) in the caller's mode, before the switch to the attack's mode, as their code
            with torch.no_grad():
                clean = forward_with_features(model, x, need_features=False)
        # the base class's rule: with SI the adversary maximises the SI loss instead of the defense's own
        inner = self.inner_loss(clean)  # the base class's one SI rule
        start = self.start_point(x, generator) if self.attack.random_start else None
        with model_mode(model, self.attack.model_mode):
            return pgd_loop(model, x, y, loss=inner, threat=self.attack.threat, alpha=self.attack.alpha,
                            steps=self.attack.steps, random_start=False, start=start, early_stop=False)

    def describe(self) -> dict:
        return {**super().describe(),
                "params": {"lam": self.lam, "lam_multiplier": self.lam_multiplier, "start_noise": self.start_noise}}
