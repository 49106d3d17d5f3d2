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

from ..fastpath import fp32_island
from ..features import forward_with_features
from ..losses import Loss, margin
from ..threat import ThreatModel


def objective(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss: Loss,
              target: Optional[torch.Tensor] = None, head=None):
    """The per-example quantity the attacker maximises, and the logits it came with."""
    out = forward_with_features(model, x_adv, head=head, need_features=loss.needs_features)
    with fp32_island(x_adv.device):  # the loss in fp32, whatever the model ran in
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


# On a GPU every boolean test of a device tensor (``if mask.any()``, ``x[mask]``) waits for the device to
# finish: the step loop tests only every SYNC_EVERY steps there, and freezes examples with torch.where in
# between. On a CPU the test is free, and dropping finished examples at once saves their arithmetic.
SYNC_EVERY = {"cpu": 1}
DEFAULT_SYNC_EVERY = 4


def sync_every(device: torch.device) -> int:
    """Steps between two host synchronisations of the step loop on ``device``."""
    return SYNC_EVERY.get(torch.device(device).type, DEFAULT_SYNC_EVERY)


def _nonfinite(grad: torch.Tensor, moving: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B,) bool on the device: rows whose gradient has a NaN/inf (only rows that ``moving`` marks)."""
    bad = ~torch.isfinite(grad.flatten(1)).all(1)
    return bad if moving is None else bad & moving


def _raise_if(bad: torch.Tensor, loss: Loss) -> None:
    """The deferred form of :func:`_checked`: raise if any row was ever flagged (one host sync)."""
    if bad.any():
        _checked(torch.full((int(bad.sum()), 1), float("nan")), loss)


def pgd_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: Loss, threat: ThreatModel,
             alpha: float, steps: int, random_start: bool = True, target: Optional[torch.Tensor] = None,
             early_stop: bool = False, noise=None, head=None, start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run projected gradient ascent and return the adversarial batch (same shape/dtype as ``x``).

    ``early_stop=False`` (training): every example takes every step and the last
    iterate is returned, as in Madry/TRADES training.
    ``early_stop=True`` (evaluation): an example stops at the first iterate that
    fools the model, that iterate is returned, and no more forward/backward is
    spent on it (on a GPU, from the next host synchronisation on: :func:`sync_every`).
    Model gradients are never accumulated (``autograd.grad`` w.r.t.
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
    every = sync_every(x.device)
    bad = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)  # rows with a non-finite gradient
    if not early_stop:
        for step in range(steps):
            xa = x_adv.requires_grad_(True)
            with torch.enable_grad():
                value, _ = objective(model, xa, y, loss, target, head)
                grad, = torch.autograd.grad(value.sum(), xa)
            bad |= _nonfinite(grad)
            if (step + 1) % every == 0:
                _raise_if(bad, loss)
            x_adv = threat.project(threat.step(xa.detach(), grad, alpha), x)
        _raise_if(bad, loss)
        return x_adv.detach()
    # the working set: rows of the batch still attacked, with their clean points, labels and targets
    active = torch.arange(x.shape[0], device=x.device)
    xw, x0, yw, tw = x_adv, x, y, target
    frozen = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)  # fooled: kept at that iterate
    out = x_adv.clone()
    # bf16 forward (the fast path): its logits are good to about 1 % of their size, so its "fooled" is
    # confirmed in fp32, and an iterate it calls "nearly fooled" is kept and checked in fp32 too: an attack
    # that walked past a fooling point it could not see would end weaker than in fp32
    reduced = torch.is_autocast_enabled(x.device.type)
    if reduced:
        near = x_adv.clone()  # per row: the nearest-to-fooling iterate since the last check
        near_score = torch.full((x.shape[0],), -float("inf"), device=x.device)
    for step in range(steps + 1):
        xa = xw.detach().requires_grad_(True)
        with torch.enable_grad():
            value, logits = objective(model, xa, yw, loss, tw, head)
            if not reduced:
                frozen = frozen | is_fooled(logits.detach(), yw, tw)
            else:  # stop only where bf16 is sure; a near tie keeps climbing and is checked in fp32 later
                lead = _fooling_margin(logits.detach(), yw, tw)
                tol = _BF16_MARGIN * logits.detach().abs().amax(1)
                frozen = frozen | (lead > tol)
                better = ~frozen & (lead > -tol) & (lead > near_score)
                near = torch.where(better.view(-1, *([1] * (x.dim() - 1))), xa.detach(), near)
                near_score = torch.where(better, lead, near_score)
            if step == steps:
                if reduced:
                    frozen = _confirm_in_fp32(model, xw, yw, tw, frozen, head)
                    frozen, xw = _check_near(model, xw, yw, tw, frozen, near, near_score, head)
                break  # the last iterate only needed its check
            grad, = torch.autograd.grad(value.sum(), xa)  # per-example losses: a frozen row's gradient is unused
        moved = threat.project(threat.step(xa.detach(), grad, alpha), x0)
        sync = (step + 1) % every == 0
        if sync and reduced:
            # a point at the decision boundary can look fooled in bf16 and not be (a bf16 tie, say): such a
            # row is unfrozen and takes its step, or it would stay there for good
            frozen = _confirm_in_fp32(model, xa.detach(), yw, tw, frozen, head)
        xw = torch.where(frozen.view(-1, *([1] * (x.dim() - 1))), xa.detach(), moved)
        bad[active] |= _nonfinite(grad, ~frozen)
        if sync:  # host sync: drop the fooled rows from the working set
            _raise_if(bad, loss)
            if reduced:  # and a nearly-fooling iterate that fools in fp32 is where that row stops
                frozen, xw = _check_near(model, xw, yw, tw, frozen, near, near_score, head)
                near_score = torch.full_like(near_score, -float("inf"))
            keep = ~frozen
            out.index_copy_(0, active, xw)
            if not keep.any():
                return out.detach()
            if not keep.all():
                active, xw, x0, yw = active[keep], xw[keep], x0[keep], yw[keep]
                tw = None if tw is None else tw[keep]
                frozen = frozen[keep]
                if reduced:
                    near, near_score = near[keep], near_score[keep]
    _raise_if(bad, loss)
    out.index_copy_(0, active, xw.detach())
    return out.detach()


def _confirm_in_fp32(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor],
                     frozen: torch.Tensor, head=None) -> torch.Tensor:
    """``frozen`` with the rows whose point does not fool the model in fp32 set back to False."""
    rows = frozen.nonzero().squeeze(1)
    if rows.numel() == 0:
        return frozen
    with fp32_island(x.device), torch.no_grad():
        logits = forward_with_features(model, x[rows], head=head, need_features=False).logits
    confirmed = is_fooled(logits, y[rows], None if target is None else target[rows])
    return frozen.index_put((rows[~confirmed],), torch.zeros((), dtype=torch.bool, device=x.device))


_BF16_MARGIN = 0.03  # |bf16 − fp32| logit error, relative to the largest logit, with a margin of 3 (measured ≤ 1 %)


def _fooling_margin(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
    """(B,) > 0 exactly when the example is fooled: best other logit − true logit (targeted: target logit −
    best other)."""
    return -margin(logits, y) if target is None else margin(logits, target)


def fooled_checked(model: nn.Module, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                   target: Optional[torch.Tensor] = None, head=None) -> torch.Tensor:
    """:func:`is_fooled` from ``logits`` of ``x``; under bf16 autocast, every example within the bf16 margin
    of the boundary (or past it) is decided by an fp32 forward instead (one host sync; for loops that
    sync anyway, as APGD's)."""
    if not torch.is_autocast_enabled(x.device.type):
        return is_fooled(logits, y, target)
    lead = _fooling_margin(logits.float(), y, target)
    unsure = (lead > -_BF16_MARGIN * logits.float().abs().amax(1)).nonzero().squeeze(1)
    out = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if unsure.numel():
        with fp32_island(x.device), torch.no_grad():
            exact = forward_with_features(model, x[unsure], head=head, need_features=False).logits
        out[unsure] = is_fooled(exact, y[unsure], None if target is None else target[unsure])
    return out


class DeferredVerdicts:
    """"Does this iterate fool the model?" for a loop that synchronises the host only every few steps (APGD's).

    Without autocast the answer is on the device at once: :meth:`now` gives it, and the loop applies it with
    ``torch.where`` (no sync). Under bf16 autocast an iterate within the bf16 margin of the boundary must be
    decided by an fp32 forward, a data-dependent subset: :meth:`now` says "not yet" for every row and keeps the
    step's iterate and its unsure rows; :meth:`resolve`, at the next sync, runs one fp32 forward over every
    kept unsure row of every step and returns the verdicts step by step, oldest first. The loop keeps the first
    fooling iterate per row, as :func:`fooled_checked` at every step would have (the same rows go through fp32).
    Every step between two resolves must run on the same rows (the loop's working set changes only at syncs).
    """

    def __init__(self, model: nn.Module, y: torch.Tensor, goal: Optional[torch.Tensor], head=None):
        self.model, self.y, self.goal, self.head = model, y, goal, head
        self.reduced = torch.is_autocast_enabled(y.device.type)
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (iterates, unsure rows) per step since the sync

    def now(self, x: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(A,) bool: the rows ``rows`` of the batch whose iterate ``x`` is known to fool the model now."""
        goal = None if self.goal is None else self.goal[rows]
        if not self.reduced:
            return is_fooled(logits, self.y[rows], goal)
        lead = _fooling_margin(logits.float(), self.y[rows], goal)
        self.kept.append((x, lead > -_BF16_MARGIN * logits.float().abs().amax(1)))
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    def resolve(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(fooled (A,) bool, iterates)] for each step kept since the last resolve, decided in fp32 (one sync)."""
        kept, self.kept = self.kept, []
        if not kept:
            return []
        unsure = torch.stack([u for _, u in kept])            # (steps, A)
        at = unsure.flatten().nonzero().squeeze(1)            # the host sync
        fooled = torch.zeros(unsure.numel(), dtype=torch.bool, device=unsure.device)
        if at.numel():
            a = unsure.shape[1]
            points = torch.stack([x for x, _ in kept]).flatten(0, 1)[at]
            with fp32_island(points.device), torch.no_grad():
                logits = forward_with_features(self.model, points, head=self.head, need_features=False).logits
            r = rows[at % a]
            fooled[at] = is_fooled(logits, self.y[r], None if self.goal is None else self.goal[r])
        return [(f, x) for f, (x, _) in zip(fooled.view(unsure.shape), kept)]


def margin_checked(model: nn.Module, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, head=None) -> torch.Tensor:
    """The margins (B,) of ``x`` from its ``logits``; under bf16 autocast, every example within the bf16 error of
    0 (or below it) gets its margin from an fp32 forward instead: the sign, fooled or not, is fp32's."""
    m = margin(logits.float(), y)
    if not torch.is_autocast_enabled(x.device.type):
        return m
    unsure = (m < _BF16_MARGIN * logits.float().abs().amax(1)).nonzero().squeeze(1)
    if unsure.numel() == 0:
        return m
    with fp32_island(x.device), torch.no_grad():
        exact = forward_with_features(model, x[unsure], head=head, need_features=False).logits
    return m.index_copy(0, unsure, margin(exact.float(), y[unsure]))


def _check_near(model, xw, y, target, frozen, near, near_score, head):
    """Rows not frozen whose nearly-fooling iterate fools the model in fp32 stop there (xw takes that iterate)."""
    rows = (~frozen & torch.isfinite(near_score)).nonzero().squeeze(1)
    if rows.numel() == 0:
        return frozen, xw
    with fp32_island(xw.device), torch.no_grad():
        logits = forward_with_features(model, near[rows], head=head, need_features=False).logits
    hit = rows[is_fooled(logits, y[rows], None if target is None else target[rows])]
    xw = xw.index_copy(0, hit, near[hit])
    return frozen.index_fill(0, hit, True), xw
