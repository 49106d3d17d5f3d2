"""Free adversarial training (Shafahi et al., "Adversarial Training for Free!", NeurIPS 2019).

Each minibatch is replayed m times in a row (m = 8). Every replay does ONE forward and backward pass on
x + δ: the backward gives the model's gradient (an SGD step) and δ's gradient, from which δ takes a
signed step of ε (then projected into the ε-ball and [0, 1]). δ persists across replays and across
minibatches: the attack is "free" because it reuses the training backward. An epoch counts passes over
the data as for every defense, so one epoch of ``free`` makes m× the updates of one epoch of AT; the
preset divides the epoch budget by m (sirobust.train) so the cost matches.

With SI the adversary follows the SI loss CE(s·cos θ, y): its gradient with respect to δ comes from the
same forward pass (one extra backward through the features), while the model trains on CE + β·CosFace.

Free AT is defined for the L∞ ball only: its δ step is ``ε · sign(∇δ)``, the L∞ steepest ascent, which
under L2 would leave the threat model it claims to train against.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..checks import check_param
from ..features import forward_with_features
from .base import Defense
from .si import si_regulariser


class FreeAT(Defense):
    """Free AT (Shafahi et al. 2019): each minibatch replayed m = 8 times, δ carried across them."""

    name = "free"
    inner_preset = {"steps": 1, "alpha": 1.0, "random_start": False, "model_mode": "train"}
    guard_overfitting = True
    own_start = "its δ carries over from replay to replay (zero at the first batch)"
    unused_attack_settings = {"steps": "δ takes one signed step per replay, from the training backward; "
                                       "--defense-param m=... sets how many replays (default 8)"}
    attack_reuses_training_backward = True  # δ's gradient comes from the update's own backward: the attack is free

    def __init__(self, attack=None, si=None, m: int = 8):
        super().__init__(attack=attack, si=si)
        if self.attack.threat.norm != "Linf":
            raise ValueError(f"free is defined for the Linf ball (its δ steps by ε·sign(∇δ), Shafahi et al.'s "
                             f"update), got norm {self.attack.threat.norm}; use norm Linf")
        self.m = check_param("free", "m (minibatch replays)", m, min=1, integer=True)
        self.replays = self.m
        self.delta: Optional[torch.Tensor] = None   # (B, C, H, W), the largest batch's shape
        self._live: Optional[tuple] = None           # (δ with grad, x, the SI gradient) of the replay in flight

    def __call__(self, model, x, y, generator=None):
        b = x.shape[0]
        if self.delta is not None and self.delta.device != x.device:
            self.delta = self.delta.to(x.device)  # restored from a checkpoint, which is read on the CPU
        if self.delta is None or self.delta.shape[1:] != x.shape[1:] or self.delta.shape[0] < b:
            # first batch (or a larger one): δ starts at 0, as in Shafahi et al.'s code
            grown = torch.zeros_like(x)
            if self.delta is not None and self.delta.shape[1:] == x.shape[1:]:
                grown[:self.delta.shape[0]] = self.delta
            self.delta = grown
        delta = self.delta[:b].clone().requires_grad_(True)
        adv = forward_with_features(model, (x + delta).clamp(0, 1), need_features=self.si is not None)
        loss = F.cross_entropy(adv.logits, y)
        stats = {"loss_defense": loss.item()}
        si_grad = None
        if self.si is not None:
            # the adversary's own objective, from the same forward pass
            si_grad, = torch.autograd.grad(self.inner_loss()(adv, y).sum(), delta, retain_graph=True)
            reg = si_regulariser(adv, y, self.si)
            stats["loss_si"] = reg.item()
            loss = loss + reg
        self._live = (delta, x, si_grad)
        stats["adv_acc"] = (adv.logits.detach().argmax(1) == y).float().mean().item()
        return loss, stats

    def after_backward(self) -> None:
        """δ ← Π(δ + ε·sign(∇δ)), from the gradient the training backward just computed (or SI's)."""
        delta, x, si_grad = self._live
        grad = si_grad if si_grad is not None else delta.grad
        if grad is None:
            raise RuntimeError("free: loss.backward() did not reach δ; call after_backward after the backward pass")
        x_adv = self.attack.threat.project(x + delta.detach() + self.attack.alpha * grad.sign(), x)
        self.delta[:x.shape[0]] = x_adv - x
        self._live = None

    def state_dict(self) -> dict:
        return {} if self.delta is None else {"delta": self.delta.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.delta = state.get("delta")

    def describe(self) -> dict:
        return {**super().describe(), "params": {"m": self.m}}
