"""APGD and APGD-T (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks", Sec. 3): PGD with momentum whose step size starts at 2ε and is
halved at checkpoints when the loss has stopped improving; the best point is kept per example.

Any per-example loss of the registry: ``ce`` (APGD-CE), ``dlr`` (APGD-DLR), ``si`` (SI-APGD: the
paper's scale-invariant loss inside APGD, ours), and ``dlr-targeted`` over the top-k classes (APGD-T).

Example::

    x_adv = APGD(model, eps=8/255, loss="dlr")(x, y)
    x_adv = APGDT(model, eps=8/255)(x, y)          # targeted DLR, 9 target classes (fewer if K < 10)
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..checks import check_float, check_int, logits_of
from ..features import find_head
from ..losses import Loss
from ..fastpath import fp32_island
from ..threat import ThreatModel
from .base import Attack, attack_loss, fixed_loss
from .loop import DeferredVerdicts, _nonfinite, _raise_if, fooled_checked, is_fooled, objective, sync_every
from .robust import attack_still_robust


def apgd_checkpoints(steps: int) -> list[int]:
    """The iteration counts after which the step size is checked (paper Sec. 3.2):
    ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)`` times ``steps``,
    e.g. 22, 41, 57, 70, 80, 87, 93, 99 for 100 steps (as the reference computes them)."""
    first, shortest, decrease = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    out, length, at = [], first, 0
    while at + length <= steps:
        at += length
        out.append(at)
        length = max(length - decrease, shortest)
    return out


def halve_step(increases: torch.Tensor, window: int, rho: float, reduced_last: torch.Tensor,
               best_at_last: torch.Tensor, best_now: torch.Tensor) -> torch.Tensor:
    """Which examples halve their step size at a checkpoint (paper Eq. 4-5): the loss rose in at most
    a fraction ρ of the ``window`` steps since the last checkpoint, or the step was not halved there
    and the best loss has not improved since."""
    return (increases <= window * rho) | (~reduced_last & (best_at_last >= best_now))


def _value_and_grad(model, x_adv, y, loss, target, head, eot_iter):
    """Loss per example, its input gradient (averaged over ``eot_iter`` passes for randomised models), logits,
    and the rows whose gradient is NaN/inf (on the device: the loop raises at its next host sync)."""
    grad = None
    for _ in range(eot_iter):
        xa = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            value, logits = objective(model, xa, y, loss, target, head)
            g, = torch.autograd.grad(value.sum(), xa)
        grad = g if grad is None else grad + g
    if eot_iter > 1:
        grad = grad / eot_iter
    return value.detach(), grad, logits.detach(), _nonfinite(grad)


def _where(rows: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` where ``rows`` (A,) is True, else ``old``: a per-example choice without a host sync."""
    return torch.where(rows.view(-1, *([1] * (new.dim() - 1))), new, old)


def apgd_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: Loss, threat: ThreatModel, steps: int,
             noise, rho: float = 0.75, target: Optional[torch.Tensor] = None, targeted_success: bool = False,
             head=None, eot_iter: int = 1, early_stop: bool = True) -> torch.Tensor:
    """One run of APGD from a random start; returns, per example, the first point that fooled the model,
    else the point of highest loss. With ``early_stop`` a fooled example takes no more steps.

    The host is synchronised only every :func:`~sirobust.attacks.loop.sync_every` steps (every step on a CPU,
    where it is free): in between, the working set stays the same, every per-example update is a
    ``torch.where``, a fooled example keeps stepping (its answer is already kept), and under bf16 the fp32
    verdicts wait for the sync (:class:`~sirobust.attacks.loop.DeferredVerdicts`).

    The state of the examples still attacked is kept compact (:class:`_WorkingSet`): gathered again only when
    an example leaves it, written back at that moment and at the end. Indexing the full-batch tensors at every
    step instead (a gather and a scatter per tensor) was a tenth of APGD-T's time on cnn-small on a CPU.
    """
    x = x.detach()
    n = x.shape[0]
    goal = target if targeted_success else None
    x_adv = threat.random_sphere(x, noise, threat.eps)  # the reference's start: on the ε-sphere
    value, grad, logits, bad = _value_and_grad(model, x_adv, y, loss, target, head, eot_iter)
    _raise_if(bad, loss)
    out = x_adv.clone()                      # the answer per example (first fooling point, or best point)
    fooled = fooled_checked(model, x_adv, logits, y, goal, head)  # fp32 where bf16 is unsure
    best_x = x_adv.clone()
    checks = set(apgd_checkpoints(steps))
    window_starts = [0] + sorted(checks)
    every = sync_every(x.device)
    verdicts = DeferredVerdicts(model, y, goal, head)
    act = torch.arange(n, device=x.device)   # examples still attacked (all of them without early stop)
    if early_stop:
        act = act[~fooled]
    w = _WorkingSet(act, x=x, y=y, target=target, x_adv=x_adv, x_prev=x_adv.clone(), grad=grad, out=out,
                    fooled=fooled, best=value, best_x=best_x, best_grad=grad, prev_value=value,
                    step=torch.full((n,) + (1,) * (x.dim() - 1), 2.0 * threat.eps, dtype=x.dtype, device=x.device),
                    increases=torch.zeros(n, device=x.device),
                    reduced_last=torch.ones(n, dtype=torch.bool, device=x.device), best_at_last=value)
    s = w.state

    def keep_fooling(hit: torch.Tensor, points: torch.Tensor) -> None:
        s["out"] = _where(hit & ~s["fooled"], points, s["out"])  # the first fooling iterate is the answer
        s["fooled"] = s["fooled"] | hit

    for i in range(steps):
        if w.act.numel() == 0:
            break
        xa = s["x_adv"]
        with torch.no_grad():
            a = 0.75 if i > 0 else 1.0
            z = threat.project(xa + s["step"] * threat.direction(s["grad"]), s["x"])
            x_new = threat.project(xa + a * (z - xa) + (1 - a) * (xa - s["x_prev"]), s["x"])
        s["x_prev"], s["x_adv"] = xa, x_new
        v, g, lg, nonfinite = _value_and_grad(model, x_new, s["y"], loss, s["target"], head, eot_iter)
        s["bad"] = s["bad"] | nonfinite
        s["grad"] = g
        keep_fooling(verdicts.now(x_new, lg, w.act), x_new)
        s["increases"] = s["increases"] + (v > s["prev_value"]).float()
        s["prev_value"] = v
        better = v > s["best"]
        s["best"] = torch.where(better, v, s["best"])
        s["best_x"] = _where(better, x_new, s["best_x"])
        s["best_grad"] = _where(better, g, s["best_grad"])
        if i + 1 in checks:  # a checkpoint: halve where the loss stalled, restart those from their best point
            window = (i + 1) - window_starts[window_starts.index(i + 1) - 1]
            halve = halve_step(s["increases"], window, rho, s["reduced_last"], s["best_at_last"], s["best"])
            s["step"] = _where(halve, s["step"] / 2, s["step"])
            s["x_adv"] = _where(halve, s["best_x"], s["x_adv"])
            s["grad"] = _where(halve, s["best_grad"], s["grad"])
            s["reduced_last"] = halve
            s["best_at_last"] = s["best"]
            s["increases"] = torch.zeros_like(s["increases"])
        if (i + 1) % every == 0 or i + 1 == steps:  # the host sync
            _raise_if(s["bad"], loss)
            for hit, points in verdicts.resolve(w.act):
                keep_fooling(hit, points)
            if early_stop:
                w.keep(~s["fooled"], {"out": out, "fooled": fooled})
    w.write_back({"out": out, "fooled": fooled, "best_x": best_x})
    return torch.where(fooled.view(-1, *([1] * (x.dim() - 1))), out, best_x).detach()


class _WorkingSet:
    """The per-example state of APGD's examples still attacked, gathered from the full batch (``state``, rows
    aligned with ``act``); :meth:`keep` drops rows, writing the named tensors' dropped rows back first."""

    def __init__(self, act: torch.Tensor, **full):
        self.act = act
        self.state = {k: None if v is None else v[act] for k, v in full.items()}
        self.state["bad"] = torch.zeros(act.numel(), dtype=torch.bool, device=act.device)

    def keep(self, rows: torch.Tensor, back: dict) -> None:
        if bool(rows.all()):  # the host sync; most steps finish no example
            return
        gone = ~rows
        for k, full in back.items():
            full[self.act[gone]] = self.state[k][gone]
        self.act = self.act[rows]
        self.state.update({k: None if v is None else v[rows] for k, v in self.state.items()})  # in place: callers hold it

    def write_back(self, back: dict) -> None:
        for k, full in back.items():
            full[self.act] = self.state[k]


class APGD(Attack):
    """APGD (Croce & Hein 2020): momentum PGD with an adaptive step size, 100 steps; any registry loss
    (apgd-ce, apgd-dlr, apgd-si: SI-APGD).

    Example::

        x_adv = APGD(model, eps=8/255, loss="ce", steps=100)(x, y)
    """

    name = "apgd"
    default_loss = "ce"  # the loss it runs when given none (a subclass that fixes its loss names that one)
    # bf16 autocast for the model; every "fooled" near the boundary is decided in fp32 (fooled_checked)
    autocast_ok = True
    # evaluation-wide settings an APGD preset does not take from the PGD family's defaults
    fixed: tuple = ("steps", "alpha", "restarts", "random_start", "force")

    def __init__(self, model: nn.Module, eps: Optional[float] = None, steps: int = 100,
                 loss: Union[str, Loss] = "ce", norm: str = "Linf", restarts: int = 1, seed: Optional[int] = 0,
                 rho: float = 0.75, eot_iter: int = 1, head=None, model_mode: str = "eval", early_stop: bool = True,
                 precision: str = "auto", **loss_params):
        super().__init__(model, eps, norm=norm, restarts=restarts, seed=seed, model_mode=model_mode,
                         early_stop=early_stop, precision=precision)
        self.steps = check_int("steps", steps, min=1)
        self.rho = check_float("rho", rho, min=0, max=1)
        self.eot_iter = check_int("eot_iter", eot_iter, min=1)
        self.loss = attack_loss(self, loss, loss_params)
        self.head = head
        if self.loss.needs_features:
            find_head(model, head)

    def run(self, x, y, target, noise):
        return apgd_run(self.model, x, y, loss=self.loss, threat=self.threat, steps=self.steps, noise=noise,
                        rho=self.rho, target=target, targeted_success=target is not None, head=self.head,
                        eot_iter=self.eot_iter, early_stop=self.early_stop)

    def forward_passes(self, num_classes: int) -> float:
        return (3.0 * (self.steps + 1) * self.eot_iter + 2) * self.restarts  # the start's gradient too

    def params(self) -> dict:
        return {**super().params(), "steps": self.steps, "rho": self.rho, "eot_iter": self.eot_iter,
                "loss": {"name": self.loss.name, **self.loss.params}, "first_step": f"2ε = {2 * self.eps:.6g}",
                "checkpoints": apgd_checkpoints(self.steps)}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps:.6g}, norm={self.norm}, steps={self.steps}, "
                f"loss={self.loss.name}, restarts={self.restarts})")


class APGDT(APGD):
    """APGD-T (Croce & Hein 2020): APGD on the targeted DLR loss, once per target among the top-k classes
    (k = 9, or K − 1 for a model with fewer classes); an example is broken when any target run fools it."""

    name = "apgd-t"
    default_loss = "dlr-targeted"

    def __init__(self, model: nn.Module, eps: Optional[float] = None, steps: int = 100, n_targets: int = 9, **kw):
        super().__init__(model, eps, steps=steps, loss=fixed_loss(self, kw), **kw)
        self.n_targets = check_int("n_targets", n_targets, min=1)

    def run(self, x, y, target, noise):
        if target is not None:
            raise ValueError("apgd-t chooses its own targets (the top-k classes); for one target use APGD "
                             "with loss='dlr-targeted'")
        with torch.no_grad(), fp32_island(x.device):  # the targets from fp32 logits
            order = logits_of(self.model(x)).argsort(1, descending=True)  # (B, K), the true class usually first

        def one_target(j: int, idx: torch.Tensor):
            targets = order[idx, j + 1]  # the (j+2)-th most likely class, as the reference picks them
            adv = apgd_run(self.model, x[idx], y[idx], loss=self.loss, threat=self.threat, steps=self.steps,
                           noise=noise.subset(idx).derive(f"target-{j + 1}"), rho=self.rho, target=targets,
                           targeted_success=False, head=self.head, eot_iter=self.eot_iter,
                           early_stop=self.early_stop)
            with torch.no_grad(), fp32_island(x.device):  # decided in fp32
                return adv, is_fooled(logits_of(self.model(adv)), y[idx])

        k = min(self.n_targets, order.shape[1] - 1)
        robust = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return attack_still_robust(x, robust, range(k), one_target)[0]

    def params(self) -> dict:
        return {**super().params(), "n_targets": self.n_targets}

    def forward_passes(self, num_classes: int) -> float:  # one APGD run and verdict per target, + the order
        return (super().forward_passes(num_classes) + 1) * max(1, min(self.n_targets, num_classes - 1)) + 1


class APGDCE(APGD):
    """APGD on the cross-entropy (APGD-CE, the first attack of AutoAttack)."""

    name = "apgd-ce"
    default_loss = "ce"

    def __init__(self, model: nn.Module, eps: Optional[float] = None, **kw):
        super().__init__(model, eps, loss=fixed_loss(self, kw), **kw)


class APGDDLR(APGD):
    """APGD on the DLR loss (APGD-DLR), invariant to shifts and rescaling of the logits; needs 3+ classes."""

    name = "apgd-dlr"
    default_loss = "dlr"

    def __init__(self, model: nn.Module, eps: Optional[float] = None, **kw):
        super().__init__(model, eps, loss=fixed_loss(self, kw), **kw)


class APGDSI(APGD):
    """SI-APGD (ours): APGD on the paper's scale-invariant loss CE(s·cos θ, y), s = 15."""

    name = "apgd-si"
    default_loss = "si"

    def __init__(self, model: nn.Module, eps: Optional[float] = None, scale: float = 15.0, **kw):
        check_float("scale", scale, min=0, min_open=True)
        super().__init__(model, eps, loss=fixed_loss(self, kw), scale=scale, **kw)
