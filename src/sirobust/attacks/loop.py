"""The one projected-gradient loop every gradient attack and every defense uses.

``x ← Π(x + η · step(∇ₓ L))`` (Madry et al. 2018; paper Eq. 8-10), where the
loss ``L`` is any per-example :class:`~sirobust.losses.Loss` and ``Π`` and
``step`` come from a :class:`~sirobust.threat.ThreatModel`. FGSM is one step
from the clean point. SI-PGD is this loop with the ``si`` loss (paper Eq. 24).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..features import forward_with_features
from ..losses import Loss
from ..threat import ThreatModel


def objective(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss: Loss,
              target: Optional[torch.Tensor] = None, head=None):
    """The per-example quantity the attacker maximises, and the logits it came with."""
    out = forward_with_features(model, x_adv, head=head, need_features=loss.needs_features)
    if target is None:
        value = loss(out, y)
    elif loss.takes_target:
        value = loss(out, y, target=target)
    else:
        value = -loss(out, target)  # move towards the target: minimise its loss
    return value, out.logits


class NonFiniteGradientError(ValueError):
    """The model's input gradient is NaN/inf: sign() would silently turn it into 0 and stall the attack."""


def _checked(grad: torch.Tensor, loss: Loss) -> torch.Tensor:
    bad = ~torch.isfinite(grad.flatten(1)).all(1)
    if bad.any():
        raise NonFiniteGradientError(
            f"the input gradient of the {loss.name!r} loss is NaN or infinite for {int(bad.sum())} of {len(bad)} "
            "examples; the attack cannot move there (sign(NaN) = 0), so a robust accuracy measured this way would "
            "be overstated. The model is not differentiable at these inputs (gradient masking or a numerical bug).")
    return grad


def is_fooled(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Untargeted: prediction ≠ y. Targeted: prediction == target. (B,) bool."""
    pred = logits.argmax(1)
    return pred != y if target is None else pred == target


def pgd_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: Loss, threat: ThreatModel,
             alpha: float, steps: int, random_start: bool = True, target: Optional[torch.Tensor] = None,
             early_stop: bool = False, noise=None, head=None, start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run projected gradient ascent and return the adversarial batch (same shape/dtype as ``x``).

    ``early_stop=False`` (training): every example takes every step and the last
    iterate is returned, as in Madry/TRADES training.
    ``early_stop=True`` (evaluation): an example stops at the first iterate that
    fools the model, that iterate is returned, and no more forward/backward is
    spent on it. Model gradients are never accumulated (``autograd.grad`` w.r.t.
    the input only); ``x`` is never modified. ``noise`` (a torch.Generator or a
    :class:`~sirobust.rng.KeyedNoise`) draws the random start; ``start`` replaces
    it with a given first iterate (inside the ball around ``x``).
    """
    x = x.detach()
    if steps == 0 or threat.eps == 0:
        return x.clone()
    if start is not None:
        x_adv = threat.project(start.detach(), x)
    else:
        x_adv = threat.random_init(x, noise) if random_start else x.clone()
    if not early_stop:
        for _ in range(steps):
            xa = x_adv.requires_grad_(True)
            with torch.enable_grad():
                value, _ = objective(model, xa, y, loss, target, head)
                grad, = torch.autograd.grad(value.sum(), xa)
            x_adv = threat.project(threat.step(xa.detach(), _checked(grad, loss), alpha), x)
        return x_adv.detach()
    active = torch.arange(x.shape[0], device=x.device)  # indices still being attacked
    for step in range(steps + 1):
        xa = x_adv[active].requires_grad_(True)
        ya = y[active]
        ta = None if target is None else target[active]
        with torch.enable_grad():
            value, logits = objective(model, xa, ya, loss, ta, head)
            keep = ~is_fooled(logits.detach(), ya, ta)
            if step == steps or not keep.any():
                break  # the last iterate only needed its check
            grad, = torch.autograd.grad(value[keep].sum(), xa)
        grad, xa, active = _checked(grad[keep], loss), xa[keep], active[keep]
        x_new = threat.project(threat.step(xa.detach(), grad, alpha), x[active])
        x_adv = x_adv.index_copy(0, active, x_new)
    return x_adv.detach()
