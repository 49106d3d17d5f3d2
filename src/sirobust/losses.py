"""Per-example losses, registered by name. Each returns shape (B,).

A loss takes a :class:`~sirobust.features.ModelOutput` and labels; attacks
*maximise* it. Formulas: ``../shared/paper/SPEC.md`` and the paper, Sec. 3.2
(CE, CW margin, DLR) and Sec. 4.2-4.3 (SI, Eq. 24; SI-margin, Eq. 25).

Example::

    loss = get_loss("si", scale=15)
    per_example = loss(forward_with_features(model, x), y)   # (B,)
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .fastpath import fp32_island
from .features import ModelOutput
from .registry import Registry, first_doc_line

_EPS_NORM = 1e-12  # keeps ‖z‖, ‖W_k‖ > 0 (SPEC: "a small epsilon in the norms")


@dataclass(frozen=True)
class Loss:
    """A named per-example loss with bound parameters.

    ``needs_features``: the loss reads ``z`` and ``W`` (so the model is run with
    a feature hook). ``takes_target``: the loss has its own targeted form and is
    called as ``loss(out, y, target=t)``; other losses are made targeted by
    maximising ``-loss(out, t)``.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    needs_features: bool = False
    takes_target: bool = False
    params: dict = field(default_factory=dict)

    def __call__(self, out: ModelOutput, y: torch.Tensor, **kw) -> torch.Tensor:
        return self.fn(out, y, **self.params, **kw)

    def with_params(self, **params) -> "Loss":
        return Loss(self.name, self.fn, self.needs_features, self.takes_target, {**self.params, **params})


LOSSES: Registry[Loss] = Registry("loss", describe=lambda loss: first_doc_line(loss.fn))


def register_loss(name: str, needs_features: bool = False, takes_target: bool = False):
    def deco(fn):
        LOSSES.register(name, Loss(name, fn, needs_features, takes_target))
        return fn
    return deco


def list_losses() -> list[str]:
    return LOSSES.names()


def describe_loss(name: str) -> str:
    """The first line of the loss's docstring."""
    return LOSSES.describe(name)


def get_loss(name: str, **params) -> Loss:
    """Look up a loss by name and bind parameters (e.g. ``scale=15`` for ``si``)."""
    loss = name if isinstance(name, Loss) else LOSSES.get(name)
    if not params:
        return loss if isinstance(name, Loss) else loss.with_params()  # a copy: never the registry's own object
    # a Loss object of the registry's is held to its parameters too (one of the user's own takes any)
    accepted = loss_parameters(loss.name) if LOSSES.get(loss.name, None) is not None else None
    unknown = sorted(set(params) - set(accepted)) if accepted is not None else []
    if unknown:
        raise ValueError(f"loss {loss.name!r} has no parameter {', '.join(unknown)}; its parameters: "
                         f"{', '.join(accepted) or 'none'}")
    return loss.with_params(**params)


def loss_parameters(name: str) -> list[str]:
    """The parameters a registered loss takes (``scale`` for ``si``), besides logits, labels and target."""
    return [p for p in list(inspect.signature(LOSSES.get(name).fn).parameters)[2:] if p != "target"]


# ---------------------------------------------------------------- helpers

def cosine_logits(out: ModelOutput) -> torch.Tensor:
    """cos θ_k = W_k·z / (‖W_k‖‖z‖), (B, K); the bias is ignored (paper Sec. 4.2)."""
    if out.features is None or out.weight is None:
        raise ValueError("cosine_logits needs the penultimate features and head weight (run with need_features=True)")
    # fp32 even under bf16 autocast (the fast path): cos θ rounded to bf16 is off by ~2e-3, s·2e-3 in the logit
    with fp32_island(out.features.device):
        z = F.normalize(out.features.float(), dim=1, eps=_EPS_NORM)
        w = F.normalize(out.weight.float(), dim=1, eps=_EPS_NORM)
        return z @ w.t()


def _other_max(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{i≠y} logits_i, (B,)."""
    masked = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return masked.max(1).values


def _true(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, y[:, None]).squeeze(1)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The margin f_y − max_{j≠y} f_j, (B,): positive while ``y`` is the predicted class (Carlini & Wagner 2017).
    The CW loss is its negative; Square and SPSA minimise it; a targeted attack reads it with ``y`` = target."""
    return _true(logits, y) - _other_max(logits, y)


# ---------------------------------------------------------------- losses

@register_loss("ce")
def ce(out: ModelOutput, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the logits, CE(g(x), y)."""
    return F.cross_entropy(out.logits, y, reduction="none")


@register_loss("cw")
def cw(out: ModelOutput, y: torch.Tensor) -> torch.Tensor:
    """C&W margin on logits: max_{i≠y} g_i − g_y (> 0 iff misclassified)."""
    return -margin(out.logits, y)


@register_loss("dlr")
def dlr(out: ModelOutput, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020): −(g_y − max_{i≠y} g_i) / (g_π1 − g_π3).

    Invariant to shifting and to positive scaling of the logits. Needs K ≥ 3.
    """
    g = out.logits
    if g.shape[1] < 3:
        raise ValueError(f"the dlr loss needs at least 3 classes, got {g.shape[1]}")
    top = g.sort(1, descending=True).values
    return -margin(g, y) / (top[:, 0] - top[:, 2] + 1e-12)


@register_loss("dlr-targeted", takes_target=True)
def dlr_targeted(out: ModelOutput, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Targeted DLR (Croce & Hein 2020): −(g_y − g_t) / (g_π1 − (g_π3 + g_π4)/2). Needs K ≥ 4."""
    if target is None:
        raise ValueError("dlr-targeted needs a target class (target=...)")
    g = out.logits
    if g.shape[1] < 4:
        raise ValueError(f"the dlr-targeted loss needs at least 4 classes, got {g.shape[1]}")
    top = g.sort(1, descending=True).values
    return -(_true(g, y) - _true(g, target)) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


@register_loss("kl")
def kl(out: ModelOutput, y: torch.Tensor, clean_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(f(x) ‖ f(x')) with f(x) from ``clean_logits`` (TRADES' inner objective); ``y`` unused."""
    if clean_logits is None:
        raise ValueError("the kl loss needs the clean logits (clean_logits=...)")
    p_clean = F.log_softmax(clean_logits.detach(), dim=1)
    p_adv = F.log_softmax(out.logits, dim=1)
    return F.kl_div(p_adv, p_clean, reduction="none", log_target=True).sum(1)


@register_loss("si", needs_features=True)
def si(out: ModelOutput, y: torch.Tensor, scale: float = 15.0) -> torch.Tensor:
    """SI loss, CE(s · cos θ, y) (paper Eq. 24). Unchanged by any positive rescaling of z, W or the logits."""
    return F.cross_entropy(scale * cosine_logits(out), y, reduction="none")


@register_loss("si-margin", needs_features=True)
def si_margin(out: ModelOutput, y: torch.Tensor, scale: float = 15.0, margin: float = 0.2) -> torch.Tensor:
    """CosFace-style loss, CE(s · (cos θ − m · onehot(y)), y) (paper Eq. 25)."""
    return F.cross_entropy(margin_cosine_logits(out, y, scale, margin), y, reduction="none")


def margin_cosine_logits(out: ModelOutput, y: torch.Tensor, scale: float = 15.0, margin: float = 0.2) -> torch.Tensor:
    """s · (cos θ − m · onehot(y)): the margin is subtracted on the true class only (HE and SI-margin)."""
    cos = cosine_logits(out)
    return scale * (cos - margin * F.one_hot(y, cos.shape[1]).to(cos.dtype))
