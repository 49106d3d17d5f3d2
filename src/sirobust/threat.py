"""Threat models: an ε-ball around the clean input, intersected with the pixel box [0, 1].

A threat model is three operations (MadryLab/robustness' ``AttackerStep``):
``random_init`` (a uniform start inside the ball), ``step`` (steepest ascent for
the norm: the gradient's sign for L∞, its normalised direction for L2) and
``project`` (back onto the ball and [0, 1]). The PGD loop is written once on top.
The rest of the geometry the attacks need lives here too: per-example norms
(``magnitude``, ``distance``), the steepest-ascent ``direction`` and random points on
the sphere (``random_sphere``: APGD's start; ``random_unit``: FAB's restarts).
"""
from __future__ import annotations

from typing import Dict, Type

import torch

from .checks import resolve_name
from .rng import as_noise


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm, shaped (B, 1, ..., 1) for broadcasting."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def cast_toward(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x_adv`` in ``x``'s dtype, every coordinate rounded toward ``x`` where rounding to nearest would move it
    away: ``|x'ᵢ − xᵢ| ≤ |x_advᵢ − xᵢ|`` exactly, so a point inside any norm ball around ``x`` and inside [0, 1]
    stays inside both in a coarser dtype (``x`` itself is on that dtype's grid). Rounding to nearest, or projecting
    in the coarse dtype (where x ± ε rounds), left bf16 points up to 6 % of ε outside an 8/255 ball."""
    out = x_adv.to(x.dtype)
    if out.dtype == x_adv.dtype:
        return out
    away = (out.double() - x.double()).abs() > (x_adv.double() - x.double()).abs()
    if bool(away.any()):
        try:
            step = torch.nextafter(out, x)
        except RuntimeError:  # a device whose nextafter lacks the dtype: the same arithmetic on the CPU
            step = torch.nextafter(out.cpu(), x.cpu()).to(out.device)
        out = torch.where(away, step, out)
    return out


class ThreatModel:
    norm: str = ""

    def __init__(self, eps: float):
        eps = float(eps)
        if not eps >= 0 or eps == float("inf"):
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
        self.eps = eps

    def random_init(self, x: torch.Tensor, noise=None) -> torch.Tensor:
        """A uniform start inside the ball around ``x``. ``noise``: a torch.Generator, None (global RNG) or
        a :class:`~sirobust.rng.KeyedNoise` (per-example draws, independent of batching)."""
        raise NotImplementedError

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, alpha: float) -> torch.Tensor:
        raise NotImplementedError

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The unit steepest-ascent direction for ``grad`` in this norm (sign for L∞, g / ‖g‖₂ for L2)."""
        raise NotImplementedError

    def magnitude(self, t: torch.Tensor) -> torch.Tensor:
        """Per-example norm of ``t`` in this norm, shaped (B, 1, ..., 1) for broadcasting."""
        raise NotImplementedError

    def _sphere_noise(self, x: torch.Tensor, noise) -> torch.Tensor:
        """A random direction, not normalised (the references' draws: uniform in [−1, 1]^D for L∞, N(0, I) for L2)."""
        raise NotImplementedError

    def random_sphere(self, x: torch.Tensor, noise, radius: float) -> torch.Tensor:
        """A random point at distance ``radius`` from ``x`` in this norm, clipped to [0, 1]: APGD's start
        (Croce & Hein 2020), computed as its reference does, x + r·t / ‖t‖."""
        t = self._sphere_noise(x, noise)
        return (x + radius * t / self.magnitude(t).clamp_min(1e-12)).clamp(0, 1)

    def random_unit(self, x: torch.Tensor, noise) -> torch.Tensor:
        """A random direction t / ‖t‖ of norm 1 (FAB's restarts scale it themselves: x + r·(t / ‖t‖))."""
        t = self._sphere_noise(x, noise)
        return t / self.magnitude(t).clamp_min(1e-12)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-example distance in this norm, (B,)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:.6g})"


class LinfBall(ThreatModel):
    """{x' : ‖x' − x‖∞ ≤ ε, 0 ≤ x' ≤ 1}."""

    norm = "Linf"

    def random_init(self, x, noise=None):
        u = as_noise(noise).uniform(x)
        return self.project(x + (2 * u - 1) * self.eps, x)

    def step(self, x_adv, grad, alpha):
        return x_adv + alpha * grad.sign()

    def direction(self, grad):
        return grad.sign()

    def magnitude(self, t):
        return t.flatten(1).abs().amax(1).view(-1, *([1] * (t.dim() - 1)))

    def _sphere_noise(self, x, noise):
        return 2 * noise.uniform(x) - 1

    def project(self, x_adv, x):
        # min/max rather than clamp(x-ε, x+ε): tensors' bounds; x ± ε is rounded to nearest, so |x' − x| may exceed ε
        # by one rounding step of the dtype (2.4e-8 at ε = 0.1 in float32; torchattacks' projection does the same)
        return torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0, 1)

    def distance(self, x_adv, x):
        return (x_adv - x).flatten(1).abs().amax(1)


class L2Ball(ThreatModel):
    """{x' : ‖x' − x‖₂ ≤ ε, 0 ≤ x' ≤ 1}."""

    norm = "L2"

    def random_init(self, x, noise=None):
        # uniform in the ball: a Gaussian direction, radius ε·U^(1/d)
        noise = as_noise(noise)
        d = x[0].numel()
        direction = self.random_unit(x, noise)
        u = noise.uniform(x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)), salt=7)
        return self.project(x + direction * self.eps * u.pow(1.0 / d), x)

    def step(self, x_adv, grad, alpha):
        # (α·g) / ‖g‖, not α·direction(g): the two differ in the last bit, and trained weights depend on it
        return x_adv + alpha * grad / _flat_norm(grad).clamp_min(1e-12)

    def direction(self, grad):
        return grad / _flat_norm(grad).clamp_min(1e-12)

    def magnitude(self, t):
        return _flat_norm(t)

    def _sphere_noise(self, x, noise):
        return noise.normal(x)

    def project(self, x_adv, x):
        delta = x_adv - x
        factor = (self.eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        # clamping to [0,1] after scaling into the ball can only shrink ‖δ‖, so both constraints hold
        return (x + delta * factor).clamp(0, 1)

    def distance(self, x_adv, x):
        return (x_adv - x).flatten(1).norm(dim=1)


_THREATS: Dict[str, Type[ThreatModel]] = {"Linf": LinfBall, "L2": L2Ball}
_ALIASES = {"inf": "Linf", "l-inf": "Linf", "linfty": "Linf", "2": "L2"}


def canonical_norm(norm: str) -> str:
    """``"Linf"`` or ``"L2"`` from any common spelling (case-insensitive)."""
    return resolve_name("norm", norm, _THREATS, _ALIASES)


def make_threat(norm: str, eps: float) -> ThreatModel:
    """``make_threat("Linf", 8/255)``; norm in {Linf, L2} (case-insensitive)."""
    return _THREATS[canonical_norm(norm)](eps)
