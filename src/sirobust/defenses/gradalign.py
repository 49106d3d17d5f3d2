"""GradAlign (Andriushchenko & Flammarion, "Understanding and Improving Fast
Adversarial Training", NeurIPS 2020): FGSM adversarial training plus a
regulariser that keeps the loss locally linear inside the ε-ball.

Adversarial objective ``CE(f(x'), y)``, one FGSM step of 1.25·ε from the clean
point (zero start), projected onto the ε-ball and [0, 1] (the preset below).

Training objective ``CE(f(x^'), y) + λ · (1 − mean_i cos(g1_i, g2_i))`` with

* ``g1_i = ∇_x CE(f(x), y)`` at the clean point, a constant (it is the FGSM gradient);
* ``g2_i = ∇_x CE(f(x + η), y)``, ``η ~ U([−ε, ε]^d)``, differentiated again with respect
  to the weights (double backpropagation), so the regulariser trains the model;
* the cosine over the flattened per-example gradients, averaged over the examples
  whose two gradients are both non-zero.

λ (Sec. 5 and the authors' per-ε runs): 0.2 at ε = 8/255; for other ε = e/255 the
authors' CIFAR-10 runs use ``λ = 0.2 · (4/3)^(e − 8)`` (e = 1: 0.027, e = 16: 2.0). Their
runs stop at e = 16, so above it λ stays at their largest value, 2.0: the formula is capped
at 2.0 (which it reaches at e ≈ 16.004, so the cap changes nothing up to 16/255). Pass
``lam`` to set it.

As the authors' code, the whole step runs with the model in train mode (it never
switches to eval), η is not clipped to [0, 1] (the regulariser measures the local
linearity of the loss, not the loss of valid images), and the method is defined for
the L∞ ball only.

With SI (the base class's rule) the FGSM step maximises the SI loss and the objective
gains the SI term; the alignment regulariser keeps its CE gradients, since it is about the
linearity of the training loss, not of the attack's.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.loop import NonFiniteGradientError, objective
from ..checks import check_param
from ..losses import get_loss
from ..modes import model_mode
from ..rng import as_noise
from .base import Defense

_LAM_AT_8 = 0.2     # λ at ε = 8/255
_LAM_RATIO = 4 / 3  # λ grows by this factor per 1/255 of ε
_LAM_MAX = 2.0      # the largest λ of the authors' runs (ε = 16/255)


def gradalign_lambda(eps: float) -> float:
    """The authors' λ for an L∞ radius ``eps`` (in [0, 1] pixel units): 0.2·(4/3)^(255·eps − 8), at most 2.0."""
    return min(_LAM_AT_8 * _LAM_RATIO ** (255.0 * float(eps) - 8.0), _LAM_MAX)


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """``∇_x Σ_i CE(f(x_i), y_i)``, shaped like ``x``; with ``create_graph`` it stays differentiable in the weights.

    The sum, not the batch mean the authors take: the cosine ignores the scale, and the sum keeps
    float32 gradients of a large batch away from underflow (the non-zero test below is exact)."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        value, _ = objective(model, xg, y, get_loss("ce"))
        grad, = torch.autograd.grad(value.sum(), xg, create_graph=create_graph)
    return grad if create_graph else grad.detach()


class Alignment(NamedTuple):
    """The regulariser ``1 − mean cos`` (a scalar), the per-example cosines (0 where not counted)
    and which examples were counted (both gradients non-zero)."""

    reg: torch.Tensor
    cos: torch.Tensor
    valid: torch.Tensor


def gradient_alignment(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, generator=None,
                       create_graph: bool = True, grad_clean: Optional[torch.Tensor] = None) -> Alignment:
    """GradAlign's regulariser ``1 − mean_i cos(∇_x CE(f(x_i)), ∇_x CE(f(x_i + η_i)))``, η ~ U([−ε, ε]^d).

    ``generator``: a torch.Generator or a noise source (:mod:`sirobust.rng`) for η. ``grad_clean``:
    the clean gradient when the caller already has it (the FGSM step's); it is used as a constant.
    The model runs in the mode it is in.
    """
    g1 = input_gradient(model, x, y) if grad_clean is None else grad_clean.detach()
    u = as_noise(generator).derive("gradalign/eta").uniform(x)
    eta = (2 * u - 1) * eps
    # not clipped to [0, 1], as the authors' get_input_grad: the point only probes the loss's curvature
    g2 = input_gradient(model, x.detach() + eta, y, create_graph=create_graph)
    n1, n2 = g1.flatten(1).norm(dim=1), g2.flatten(1).norm(dim=1)
    # an example with a zero gradient has no direction (e.g. a saturated, confidently right prediction): skipped
    valid = (n1 != 0) & (n2 != 0)
    cos = torch.zeros_like(n1)
    if not valid.any():
        return Alignment(x.new_zeros(()), cos, valid)
    c = ((g1[valid].flatten(1) / n1[valid, None]) * (g2[valid].flatten(1) / n2[valid, None])).sum(1)
    cos = cos.masked_scatter(valid, c)
    return Alignment(1.0 - c.mean(), cos, valid)


def _uniform_mode(model: nn.Module) -> Optional[str]:
    """"train" / "eval" when every module is in that mode, else None (a mixed state)."""
    flags = {m.training for m in model.modules()}
    return None if len(flags) != 1 else ("train" if flags.pop() else "eval")


class GradAlign(Defense):
    """GradAlign: FGSM-AT plus the gradient-alignment regulariser (Andriushchenko & Flammarion 2020)."""

    name = "gradalign"
    # FGSM from the clean point with a 1.25ε step, the model in train mode throughout (their train.py)
    inner_preset = {"steps": 1, "alpha": 1.25, "random_start": False, "model_mode": "train"}
    lr_schedule_preset = "onecycle"
    guard_overfitting = True

    def __init__(self, attack=None, si=None, lam: Optional[float] = None):
        super().__init__(attack=attack, si=si)
        if self.attack.threat.norm != "Linf":
            raise ValueError(f"gradalign is defined for the Linf ball (η uniform in [−ε, ε]^d, λ per ε/255), "
                             f"got norm {self.attack.threat.norm}")
        # None: the authors' λ for this ε
        self.lam = gradalign_lambda(self.attack.eps) if lam is None else check_param("gradalign", "lam (λ)", lam, min=0)
        self._pending: Optional[dict] = None  # what one __call__ passes from the attack to the objective

    def _reuses_fgsm_gradient(self, model: nn.Module) -> bool:
        """Is the FGSM gradient exactly the regulariser's g1? Only for a plain one-step attack from the
        clean point, run in the mode the objective runs in (the authors' setting)."""
        a = self.attack
        return (self._pending is not None and self.si is None and a.steps == 1 and not a.random_start
                and a.eps > 0 and _uniform_mode(model) == a.model_mode)

    def make_adversarial(self, model, x, y, generator=None, clean=None):
        if not self._reuses_fgsm_gradient(model):
            return super().make_adversarial(model, x, y, generator, clean)
        # The base class's one-step loop from x, written out so that its gradient can be kept: the authors
        # take g1 from the FGSM step rather than paying for a second forward/backward at x. The test suite
        # checks that the result is identical to the base class's make_adversarial.
        x = x.detach()
        with model_mode(model, self.attack.model_mode):
            grad = input_gradient(model, x, y)
        if not torch.isfinite(grad).all():
            raise NonFiniteGradientError("the input gradient of the ce loss is NaN or infinite at the clean point; "
                                         "the FGSM step cannot move there (sign(NaN) = 0)")
        self._pending["grad"] = grad
        threat = self.attack.threat
        return threat.project(threat.step(x, grad, self.attack.alpha), x).detach()

    def __call__(self, model, x, y, generator=None):
        self._pending = {"noise": generator, "grad": None}
        try:
            loss, stats = super().__call__(model, x, y, generator)
            stats.update(self._pending.get("stats", {}))
        finally:
            self._pending = None
        return loss, stats

    def training_loss(self, model, x, x_adv, y, clean, adv, generator=None):
        pending = self._pending or {}
        noise = generator if generator is not None else pending.get("noise")
        align = gradient_alignment(model, x, y, self.attack.eps, noise, create_graph=True,
                                   grad_clean=pending.get("grad"))
        if self._pending is not None:
            valid = align.valid
            self._pending["stats"] = {
                "loss_gradalign": self.lam * align.reg.item(),
                "grad_cos": align.cos[valid].mean().item() if valid.any() else 0.0}
        return F.cross_entropy(adv.logits, y) + self.lam * align.reg

    def describe(self) -> dict:
        return {**super().describe(), "params": {"lam": self.lam}}
