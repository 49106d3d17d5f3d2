"""PGD and its presets: PGD-CW, PGD-DLR, SI-PGD, FGSM, FGSM-RS and R+FGSM.

One class; the variants differ only in the loss, the number of steps and the
start (DESIGN: "a variant is a parameter"). SI-PGD is ``PGD(loss="si")``: PGD on
``CE(s · cos θ, y)`` (paper Sec. 4.2, Eq. 24), which no positive rescaling of
the logits can weaken.
"""
from __future__ import annotations

from typing import Optional, Union

from torch import nn

from ..checks import check_float, check_int, check_step_size
from ..features import find_head
from ..losses import Loss
from .base import Attack, attack_loss, fixed_loss
from .loop import pgd_loop


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018) on any per-example loss.

    Defaults follow the paper (Sec. 5.1): 20 steps of ε/4 from a uniform random start.
    A step size above ε is refused unless ``force=True``.

    Example::

        atk = PGD(model, eps=8/255, alpha=2/255, steps=20, loss="ce")
        x_adv = atk(x, y)
    """

    name = "pgd"
    default_loss = "ce"  # the loss it runs when given none (a subclass that fixes its loss names that one)
    autocast_ok = True  # the loss and the step are fp32; only the model runs in bf16 on the fast path
    fixed: tuple = ()  # shared evaluation settings this preset ignores (it fixes them itself)

    def __init__(self, model: nn.Module, eps: Optional[float] = None, alpha: Optional[float] = None, steps: int = 20,
                 loss: Union[str, Loss] = "ce", random_start: bool = True, norm: str = "Linf",
                 restarts: int = 1, seed: Optional[int] = 0, head=None, model_mode: str = "eval",
                 early_stop: bool = True, force: bool = False, precision: str = "auto", **loss_params):
        super().__init__(model, eps, norm=norm, restarts=restarts, seed=seed, model_mode=model_mode,
                         early_stop=early_stop, precision=precision)
        self.steps = check_int("steps", steps, min=1)
        self.alpha = check_step_size(self.eps / 4 if alpha is None else alpha, self.eps, self.steps, "alpha", force)
        self.loss = attack_loss(self, loss, loss_params)
        self.random_start = bool(random_start)
        self.head = head
        if self.loss.needs_features:
            find_head(model, head)  # fail now, not on the first batch, if there is no linear head

    def run(self, x, y, target, noise):
        return pgd_loop(self.model, x, y, loss=self.loss, threat=self.threat, alpha=self.alpha,
                        steps=self.steps, random_start=self.random_start, target=target,
                        early_stop=self.early_stop, noise=noise, head=self.head)

    def forward_passes(self, num_classes: int) -> float:  # Attack.forward_passes: a step, a start, a verdict
        return (3.0 * self.steps + 2) * self.restarts + 2

    def params(self) -> dict:
        head = self.head if self.head is None or isinstance(self.head, str) else type(self.head).__name__
        return {**super().params(), "alpha": self.alpha, "steps": self.steps, "random_start": self.random_start,
                "loss": {"name": self.loss.name, **self.loss.params}, "early_stop": self.early_stop, "head": head}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps:.6g}, alpha={self.alpha:.6g}, steps={self.steps}, "
                f"loss={self.loss.name}, norm={self.norm}, random_start={self.random_start}, restarts={self.restarts})")


class SIPGD(PGD):
    """SI-PGD (paper Sec. 4.2): PGD on CE(s · cos θ, y), s = 15, immune to rescaled logits.

    Needs a classifier whose last layer is linear (zoo model or any ``nn.Module``
    whose last ``nn.Linear`` produces the logits, up to a positive scale; name
    another one with ``head=``).

    Example::

        x_adv = SIPGD(model, eps=8/255)(x, y)
    """

    name = "si-pgd"
    default_loss = "si"

    def __init__(self, model: nn.Module, eps: Optional[float] = None, alpha: Optional[float] = None, steps: int = 20,
                 scale: float = 15.0, **kw):
        check_float("scale", scale, min=0.0, min_open=True)
        super().__init__(model, eps, alpha, steps, loss=fixed_loss(self, kw), scale=scale, **kw)


class PGDCW(PGD):
    """PGD on the C&W margin max_{i≠y} g_i − g_y (paper Sec. 3.2)."""

    name = "pgd-cw"
    default_loss = "cw"

    def __init__(self, model: nn.Module, eps: Optional[float] = None, alpha: Optional[float] = None, steps: int = 20,
                 **kw):
        super().__init__(model, eps, alpha, steps, loss=fixed_loss(self, kw), **kw)


class PGDDLR(PGD):
    """PGD on the difference-of-logits-ratio loss (Croce & Hein 2020; paper Sec. 3.2); needs 3+ classes."""

    name = "pgd-dlr"
    default_loss = "dlr"

    def __init__(self, model: nn.Module, eps: Optional[float] = None, alpha: Optional[float] = None, steps: int = 20,
                 **kw):
        super().__init__(model, eps, alpha, steps, loss=fixed_loss(self, kw), **kw)


class FGSM(PGD):
    """FGSM (Goodfellow et al. 2015): one step of size ε from the clean point."""

    name = "fgsm"
    fixed = ("steps", "alpha", "random_start", "force")

    def __init__(self, model: nn.Module, eps: Optional[float] = None, loss: Union[str, Loss] = "ce", **kw):
        super().__init__(model, eps, alpha=None, steps=1, loss=loss, random_start=False, force=True, **kw)
        self.alpha = self.eps  # set after the base resolved ε (None: the model's dataset's)


class FGSMRS(PGD):
    """FGSM from a uniform random start in the ε-ball, step 1.25 ε, projected (Wong et al. 2020,
    "Fast is better than free"; the attack of FGSM-RS / fast adversarial training)."""

    name = "fgsm-rs"
    fixed = ("steps", "alpha", "random_start", "force")

    def __init__(self, model: nn.Module, eps: Optional[float] = None, alpha: Optional[float] = None,
                 loss: Union[str, Loss] = "ce", **kw):
        super().__init__(model, eps, alpha=alpha, steps=1, loss=loss, random_start=True, force=True, **kw)
        if alpha is None:
            self.alpha = 1.25 * self.eps


class RFGSM(PGD):
    """R+FGSM (Tramèr et al. 2018), as torchattacks runs it: a random step α·sign(N(0, I)), then
    ``steps`` gradient-sign steps of α, projected. The defaults (α = ε/2, one step) are the paper's
    x' + (ε − α)·sign(∇), since then ε − α = α."""

    name = "rfgsm"
    fixed = ("steps", "alpha", "random_start", "force")

    def __init__(self, model: nn.Module, eps: Optional[float] = None, alpha: Optional[float] = None, steps: int = 1,
                 loss: Union[str, Loss] = "ce", **kw):
        super().__init__(model, eps, alpha=None, steps=steps, loss=loss, random_start=True, **kw)
        self.alpha = check_float("alpha", self.eps / 2 if alpha is None else alpha, min=0.0, max=self.eps)
        if self.norm != "Linf":
            raise ValueError("rfgsm (R+FGSM) is an L∞ attack; use norm='Linf'")

    def run(self, x, y, target, noise):
        start = x + self.alpha * (2 * (noise.uniform(x) > 0.5).to(x.dtype) - 1)  # α·sign(N(0, I))
        return pgd_loop(self.model, x, y, loss=self.loss, threat=self.threat, alpha=self.alpha,
                        steps=self.steps, target=target, early_stop=self.early_stop, head=self.head,
                        start=start.clamp(0, 1))
