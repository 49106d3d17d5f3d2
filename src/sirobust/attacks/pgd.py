"""PGD and its presets: FGSM, RFGSM, PGD-CW, PGD-DLR and SI-PGD.

One class; the variants differ only in the loss and the number of steps
(DESIGN: "a variant is a parameter"). SI-PGD is ``PGD(loss="si")``: PGD on
``CE(s · cos θ, y)`` (paper Sec. 4.2, Eq. 24), which no positive rescaling of
the logits can weaken.
"""
from __future__ import annotations

from typing import Optional, Union

from torch import nn

from ..checks import check_positive
from ..features import find_head
from ..losses import Loss, get_loss
from .base import Attack
from .loop import pgd_loop


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018) on any per-example loss.

    Defaults follow the paper (Sec. 5.1): 20 steps of ε/4 from a uniform random start.

    Example::

        atk = PGD(model, eps=8/255, alpha=2/255, steps=20, loss="ce")
        x_adv = atk(x, y)
    """

    name = "pgd"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: Optional[float] = None, steps: int = 20,
                 loss: Union[str, Loss] = "ce", random_start: bool = True, norm: str = "Linf",
                 restarts: int = 1, seed: Optional[int] = 0, head=None, model_mode: str = "eval",
                 early_stop: bool = True, **loss_params):
        super().__init__(model, eps, norm=norm, restarts=restarts, seed=seed, model_mode=model_mode,
                         early_stop=early_stop)
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps}")
        self.steps = int(steps)
        self.alpha = self.eps / 4 if alpha is None else float(alpha)
        # a zero step would report clean accuracy as robust accuracy
        check_positive("alpha", self.alpha, allow_zero=self.steps == 0 or self.eps == 0)
        self.loss = get_loss(loss, **loss_params)
        self.random_start = bool(random_start)
        self.head = head
        if self.loss.needs_features:
            find_head(model, head)  # fail now, not on the first batch, if there is no linear head

    def run(self, x, y, target):
        return pgd_loop(self.model, x, y, loss=self.loss, threat=self.threat, alpha=self.alpha,
                        steps=self.steps, random_start=self.random_start, target=target,
                        early_stop=self.early_stop, generator=self.generator(x.device), head=self.head)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps:.6g}, alpha={self.alpha:.6g}, steps={self.steps}, "
                f"loss={self.loss.name}, norm={self.norm}, random_start={self.random_start}, restarts={self.restarts})")


class SIPGD(PGD):
    """SI-PGD (paper Sec. 4.2): PGD on CE(s · cos θ, y), s = 15 by default.

    Needs a classifier whose last layer is linear (zoo model or any ``nn.Module``
    whose last ``nn.Linear`` produces the logits, up to a positive scale).

    Example::

        x_adv = SIPGD(model, eps=8/255)(x, y)
    """

    name = "si-pgd"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: Optional[float] = None, steps: int = 20,
                 scale: float = 15.0, **kw):
        check_positive("scale", scale, allow_zero=False)
        super().__init__(model, eps, alpha, steps, loss="si", scale=scale, **kw)


class PGDCW(PGD):
    """PGD on the C&W margin max_{i≠y} g_i − g_y (paper Sec. 3.2)."""

    name = "pgd-cw"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: Optional[float] = None, steps: int = 20, **kw):
        super().__init__(model, eps, alpha, steps, loss="cw", **kw)


class PGDDLR(PGD):
    """PGD on the difference-of-logits-ratio loss (Croce & Hein 2020; paper Sec. 3.2)."""

    name = "pgd-dlr"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: Optional[float] = None, steps: int = 20, **kw):
        super().__init__(model, eps, alpha, steps, loss="dlr", **kw)


class FGSM(PGD):
    """FGSM (Goodfellow et al. 2015): one step of size ε from the clean point."""

    name = "fgsm"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, loss: Union[str, Loss] = "ce", **kw):
        super().__init__(model, eps, alpha=eps, steps=1, loss=loss, random_start=False, **kw)


class RFGSM(PGD):
    """FGSM from a uniform random start in the ε-ball, step α = 1.25 ε, projected
    (Wong et al. 2020, "Fast is better than free")."""

    name = "rfgsm"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: Optional[float] = None,
                 loss: Union[str, Loss] = "ce", **kw):
        super().__init__(model, eps, alpha=1.25 * eps if alpha is None else alpha, steps=1, loss=loss,
                         random_start=True, **kw)
