"""The attack object users know from torchattacks: ``x_adv = atk(x, y)``.

The base class owns what every attack must get right and no attack should
repeat: input checks, the model's train/eval mode (set for the attack, then
restored), a private random generator (the global RNG is never touched),
never mutating the caller's tensors, and restarts where a point counts as
robust only if it survives every restart.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..checks import check_images, check_labels, model_channels, check_positive
from ..modes import model_mode
from ..threat import ThreatModel, make_threat
from .loop import is_fooled

_MODES = ("eval", "train", "keep")


class Attack:
    """Base class. Subclasses implement :meth:`run` for one restart.

    Args:
        model: any classifier taking [0,1] pixels and returning logits.
        eps: radius of the threat model, in pixel units (8/255 for CIFAR).
        norm: ``"Linf"`` or ``"L2"``.
        restarts: independent runs; an example is robust only if it survives all.
        seed: seeds the attack's own ``torch.Generator`` (created once, so repeated
            calls draw fresh noise in a reproducible sequence).
        model_mode: ``"eval"`` (default) runs the attack with ``model.eval()``,
            ``"train"`` with ``model.train()``, ``"keep"`` leaves it; the mode is restored.
        early_stop: evaluation mode (default): points the model already gets wrong
            are not attacked, and an example stops at the first iterate that fools
            the model. ``False`` (for training): every example takes every step.
    """

    name = "attack"

    def __init__(self, model: nn.Module, eps: float, norm: str = "Linf", restarts: int = 1,
                 seed: Optional[int] = 0, model_mode: str = "eval", early_stop: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_positive("eps", eps)
        if int(restarts) != restarts or restarts < 1:
            raise ValueError(f"restarts must be an integer >= 1, got {restarts}")
        if model_mode not in _MODES:
            raise ValueError(f"model_mode must be one of {_MODES}, got {model_mode!r}")
        self.model = model
        self.threat: ThreatModel = make_threat(norm, eps)
        self.eps = float(eps)
        self.norm = self.threat.norm
        self.restarts = int(restarts)
        self.seed = seed
        self.model_mode = model_mode
        self.early_stop = bool(early_stop)
        self._generator: Optional[torch.Generator] = None

    # ------------------------------------------------------------------ api
    def __call__(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.perturb(x, y, target)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Adversarial examples for (x, y); ``target`` makes the attack targeted."""
        check_images(x, "x", model_channels(self.model))
        check_labels(y, x.shape[0], name="y")
        if target is not None:
            check_labels(target, x.shape[0], name="target")
        with model_mode(self.model, None if self.model_mode == "keep" else self.model_mode):
            return self._perturb_with_restarts(x.detach(), y.detach().long(),
                                               None if target is None else target.detach().long())

    def generator(self, device: torch.device) -> torch.Generator:
        """The attack's private generator on ``device`` (created on first use)."""
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
            if self.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(int(self.seed))
        return self._generator

    def run(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------ internals
    def _check_classes(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(x)
        if logits.dim() != 2:
            raise ValueError(f"the model must return logits of shape (B, K), got {tuple(logits.shape)}")
        check_labels(y, x.shape[0], logits.shape[1], name="y")
        if target is not None:
            check_labels(target, x.shape[0], logits.shape[1], name="target")
        return logits

    def _perturb_with_restarts(self, x, y, target):
        logits = self._check_classes(x, y, target)
        if self.eps == 0:
            return x.clone()
        x_best = x.clone()
        # already-misclassified points are not attacked (they are not robust anyway)
        robust = ~is_fooled(logits, y, target) if self.early_stop else torch.ones_like(y, dtype=torch.bool)
        for _ in range(self.restarts):
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            t = None if target is None else target[idx]
            x_adv = self.run(x[idx], y[idx], t)
            with torch.no_grad():
                fooled = is_fooled(self.model(x_adv), y[idx], t)
            # keep the last restart's point for survivors, the fooling point for the rest
            x_best[idx] = x_adv
            robust[idx[fooled]] = False
        return x_best

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:.6g}, norm={self.norm}, restarts={self.restarts})"
