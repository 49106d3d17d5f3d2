"""Attacks that are not ours: a torchattacks object or any ``(x, y) -> x_adv`` callable.

Users must be able to add any attack to an evaluation (a stronger one lowers the
worst case). :class:`ExternalAttack` gives such an attack a name and the
evaluation's threat model; ``evaluate`` then holds its outputs to the same rules
as ours (ε-ball, [0, 1], shape, finite) and reports, rather than counts, an
attack that breaks them.
"""
from __future__ import annotations

import inspect
import numbers
from typing import Callable, Optional

import torch

from ..threat import ThreatModel, canonical_norm, make_threat


def external_name(fn) -> str:
    """``torchattacks:PGD`` for an attack object, the function's name for a function."""
    if inspect.isfunction(fn) or inspect.ismethod(fn):
        return "callable" if fn.__name__ == "<lambda>" else fn.__name__
    module = type(fn).__module__.split(".")[0]
    return type(fn).__name__ if module in ("__main__", "builtins", "functools") else f"{module}:{type(fn).__name__}"


def is_torchattacks(fn) -> bool:
    return type(fn).__module__.split(".")[0] == "torchattacks"


class ExternalAttack:
    """Wrap ``fn(x, y) -> x_adv`` for :func:`sirobust.evaluate`.

    Example::

        evaluate(model, data, attacks=["pgd", torchattacks.APGDT(model, eps=8/255), ("mine", my_fn)], eps=8/255)
    """

    black_box = False  # unknown: a callable may well ask for gradients, so it counts as a white-box attack

    def __init__(self, fn: Callable, eps: float, norm: str, name: Optional[str] = None):
        if not callable(fn):
            raise TypeError(f"an attack must be a name, a sirobust Attack or a callable (x, y) -> x_adv, "
                            f"got {type(fn).__name__}")
        self.fn = fn
        self.name = name or external_name(fn)
        self.threat: ThreatModel = make_threat(norm, eps)
        self.eps, self.norm = self.threat.eps, self.threat.norm
        own = getattr(fn, "eps", None)
        if isinstance(own, numbers.Real) and abs(float(own) - self.eps) > 1e-9:
            raise ValueError(f"attack {self.name!r} uses ε = {float(own):.6g} but the evaluation is {self.norm} "
                             f"ε = {self.eps:.6g}: build it with the same ε, so that the worst case means one threat model")
        own_norm = attack_norm(fn)
        if own_norm is not None and own_norm.lower() != self.norm.lower():
            raise ValueError(f"attack {self.name!r} attacks in the {own_norm} norm but the evaluation is {self.norm}: "
                             "build it for the same norm, so that the worst case means one threat model")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.fn(x, y)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"attack {self.name!r} returned a {type(out).__name__}, not a tensor of images")
        return out.detach()

    def params(self) -> dict:
        """Whatever simple settings the object exposes (torchattacks: eps, alpha, steps, ...)."""
        out = {"name": self.name, "external": True, "eps": self.eps, "norm": self.norm,
               "source": f"{type(self.fn).__module__}.{type(self.fn).__qualname__}"}
        for key, value in (vars(self.fn).items() if hasattr(self.fn, "__dict__") else ()):
            if key.startswith("_") or key in out or not isinstance(value, (bool, numbers.Real, str)):
                continue
            if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
                value = float(value)
            out[key] = value
        return out

    def __repr__(self) -> str:
        return f"ExternalAttack({self.name}, {self.norm} ε={self.eps:.6g})"


def attack_norm(fn) -> Optional[str]:
    """The norm an outside attack object says it uses: its ``norm`` attribute (torchattacks' APGD, FAB, Square,
    AutoAttack; ART's ``norm``), else an ``L2``/``L1`` suffix of a torchattacks class's name (PGDL2, PGDRSL2,
    EADL1); None when it says nothing (a plain function)."""
    norm = getattr(fn, "norm", None)
    if isinstance(norm, numbers.Real) and not isinstance(norm, bool):  # ART: np.inf, 2, 1
        return "Linf" if float(norm) == float("inf") else f"L{float(norm):g}"
    if isinstance(norm, str) and norm:
        if norm.strip().lower() in ("1", "l1"):
            return "L1"
        try:  # every spelling sirobust reads ("L_inf", "inf", "2"); anything else ("batch") says nothing
            return canonical_norm(norm)
        except ValueError:
            return None
    if type(fn).__module__.split(".")[0] != "torchattacks":
        return None
    return next((n for n in ("L2", "L1") if type(fn).__name__.endswith(n)), None)
