"""Square Attack (Andriushchenko, Croce, Flammarion & Hein 2020): a score-based black-box random
search. Each query changes one random square window of the current perturbation (L∞: to ±ε per
channel; L2: a re-weighted pattern that keeps ‖δ‖₂ at ε) and keeps the change when the margin loss
decreases. The window's side follows a schedule that shrinks with the queries (``p_init`` = 0.8).

It asks the model for outputs only, never for a gradient: a defense that masks gradients does not
slow it down, which is why AutoAttack runs it last and why its beating the white-box attacks is a
warning sign. Windows and signs are drawn per example (not shared across the batch, as in the
reference), so results do not depend on the batching.

Example::

    x_adv = Square(model, eps=8/255, queries=5000)(x, y)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..checks import check_float, check_int, logits_of
from ..fastpath import inference_copy
from .base import Attack
from .loop import margin_checked, sync_every
from .result import AttackOutput


def square_p(it: int, p_init: float = 0.8, queries: int = 10000, rescale: bool = False) -> float:
    """The fraction of pixels the window covers at query ``it`` (the reference's schedule: p_init halved
    at queries 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000; ``rescale`` stretches it to ``queries``)."""
    if rescale:
        it = int(it / queries * 10000)
    for bound, div in ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32), (500, 16), (200, 8),
                       (50, 4), (10, 2)):
        if it > bound:
            return p_init / div
    return p_init


def square_side(p: float, n_features: int, channels: int, h: int, w: int, norm: str) -> int:
    """The window's side for a fraction ``p`` of the pixels (at least 1 for L∞, an odd 3 or more for L2)."""
    s = int(round(math.sqrt(p * n_features / channels)))
    if norm == "Linf":
        s = max(s, 1)
    else:
        s = max(s, 3)
        s += 1 - s % 2
    return min(s, h, w)


def _windows(b: int, s: int, h: int, w: int, u: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) bool masks of one s×s window per example, placed by the uniforms ``u`` (B, 2)."""
    vh = (u[:, 0] * (h - s + 1)).long().clamp(max=h - s)
    vw = (u[:, 1] * (w - s + 1)).long().clamp(max=w - s)
    r = torch.arange(h, device=u.device)
    c = torch.arange(w, device=u.device)
    rows = (r[None, :] >= vh[:, None]) & (r[None, :] < vh[:, None] + s)
    cols = (c[None, :] >= vw[:, None]) & (c[None, :] < vw[:, None] + s)
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def _eta_rectangles(x: int, y: int) -> torch.Tensor:
    """Nested rectangles whose weights fall off as 1/k², centred, normalised in L2 (the reference's pattern)."""
    delta = torch.zeros(x, y)
    cx, cy = x // 2, y // 2
    for k in range(max(cx + 1, cy + 1)):
        delta[max(cx - k, 0):min(cx - k + 2 * k + 1, x), max(cy - k, 0):min(cy - k + 2 * k + 1, y)] += 1.0 / (k + 1) ** 2
    return delta / delta.norm().clamp_min(1e-12)


def _eta(s: int) -> torch.Tensor:
    """The L2 window pattern: two rectangles of opposite signs, unit L2 norm."""
    delta = torch.zeros(s, s)
    delta[:s // 2] = _eta_rectangles(s // 2, s)
    delta[s // 2:] = -_eta_rectangles(s - s // 2, s)
    return delta / delta.norm()


class _QueryDraws:
    """Each example's uniforms for query ``it``: positions ``it·per … (it+1)·per`` of its own keyed stream,
    hashed for the whole batch a block of queries at a time (one stream, not one per query: deriving and
    hashing a stream per query cost a tenth of the attack's time on a CPU)."""

    BLOCK = 128  # queries hashed at once: B × 128 × per values (about 1 MB for B = 250, per = 8)

    def __init__(self, noise, b: int, per: int, like: torch.Tensor):
        self.noise, self.b, self.per, self.like = noise, b, per, like
        self.start, self.table = -1, None

    def at(self, it: int, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), per) uniforms in (0, 1) for query ``it`` of the batch's examples ``rows``."""
        start = it - it % self.BLOCK
        if start != self.start:
            shape = self.like.new_empty(self.b, self.BLOCK * self.per)
            self.table, self.start = self.noise.uniform(shape, offset=start * self.per), start
        k = (it - start) * self.per
        return self.table[rows, k:k + self.per]


class Square(Attack):
    """Square Attack (Andriushchenko et al. 2020): black-box random search, 5,000 queries, p_init 0.8.

    Example::

        x_adv = Square(model, eps=8/255)(x, y)
    """

    name = "square"
    measures = ("queries",)
    black_box = True
    autocast_ok = True  # bf16 forwards on the fast path; margins near or past 0 are retaken in fp32 (_margin)
    fixed: tuple = ("steps", "alpha", "restarts", "random_start", "force")
    # Part of params(), hence of every stored evaluation's key (see FAB.revision). 2: each query's window and
    # signs are read from one keyed stream per example (positions it·per onwards) instead of a stream derived
    # per query: the same distribution, other draws.
    revision = 2

    def __init__(self, model: nn.Module, eps: Optional[float] = None, queries: int = 5000, p_init: float = 0.8,
                 norm: str = "Linf", restarts: int = 1, seed: Optional[int] = 0, rescale_schedule: bool = False,
                 model_mode: str = "eval", early_stop: bool = True, precision: str = "auto"):
        super().__init__(model, eps, norm=norm, restarts=restarts, seed=seed, model_mode=model_mode,
                         early_stop=early_stop, precision=precision)
        self.queries = check_int("queries", queries, min=1)
        self.p_init = check_float("p_init", p_init, min=0, max=1, min_open=True)
        self.rescale_schedule = bool(rescale_schedule)

    @torch.no_grad()
    def run(self, x, y, target, noise):
        if target is not None:
            raise ValueError("square is untargeted here")
        b, c, h, w = x.shape
        n_features = c * h * w
        if self.norm == "Linf":
            signs = 2 * (noise.derive("init").uniform(x[:, :, :1, :]) > 0.5).to(x.dtype) - 1  # vertical stripes
            x_best = (x + self.eps * signs).clamp(0, 1)
        else:
            x_best = (x + self._l2_init(x, noise.derive("init"))).clamp(0, 1)
        query = inference_copy(self.model, x[:8])  # the copy traced and frozen on a CPU (1.2× faster)
        m_best = self._margin(query, x_best, y)
        queries = torch.ones(b, device=x.device)
        act = (m_best > 0).nonzero().squeeze(1)
        draws = _QueryDraws(noise.derive("queries"), b, 2 + c if self.norm == "Linf" else 5 + c, x)
        # the working set, gathered again only when an example finishes (most queries finish none); on a GPU,
        # whether one did is asked only every few queries (a host sync): a finished example is frozen meanwhile
        xc, xb, mb, yc = x[act], x_best[act], m_best[act], y[act]
        spent = torch.zeros(act.numel(), device=x.device)  # queries each example made since the gathering
        every = sync_every(x.device)
        for it in range(self.queries):
            if act.numel() == 0:
                break
            p = square_p(it, self.p_init, self.queries, self.rescale_schedule)
            s = square_side(p, n_features, c, h, w, self.norm)
            u = draws.at(it, act)
            if self.norm == "Linf":
                x_new = self._linf_step(xc, xb, s, u)
            else:
                x_new = self._l2_step(xc, xb, s, u)
            m = self._margin(query, x_new, yc)
            live = mb > 0  # not fooled yet: a fooled example makes no more queries
            better = (m < mb) & live  # the margin is the loss (the reference's default): keep improvements
            xb = torch.where(better.view(-1, 1, 1, 1), x_new, xb)
            mb = torch.where(better, m, mb)
            spent += live
            if it + 1 == self.queries or ((it + 1) % every == 0 and bool((mb <= 0).any())):
                x_best[act], m_best[act] = xb, mb  # write the working set back, keep the unfinished
                queries[act] += spent
                keep = mb > 0
                act, xc, xb, mb, yc, spent = act[keep], xc[keep], xb[keep], mb[keep], yc[keep], spent[keep] * 0
        return AttackOutput(x_best, queries=queries)

    def _margin(self, model, x, y):
        """The margin loss of ``x``; under bf16 autocast (the fast path on CUDA), every example within the bf16
        error of the boundary, or past it, gets its margin from an fp32 forward: whether an example is fooled,
        and so whether it stops, is decided in fp32. The other comparisons (keep a window or not) take bf16
        margins, good to about 1 % of the logits: a random search either way."""
        return margin_checked(model, x, logits_of(model(x)), y)

    def _linf_step(self, x, x_best, s, u):
        """One query's candidate: the window placed by ``u[:, :2]``, one sign per channel from ``u[:, 2:]``."""
        b, c, h, w = x.shape
        window = _windows(b, s, h, w, u[:, :2])                             # (B, 1, H, W)
        signs = (2 * (u[:, 2:] > 0.5).to(x.dtype) - 1)[:, :, None, None]    # one sign per channel
        x_new = torch.where(window, x_best + 2 * self.eps * signs, x_best)
        return self.threat.project(x_new, x)

    def _l2_init(self, x, noise):
        """The reference's start: a grid of s×s patterns (s = H/5) with random signs, scaled to ε."""
        b, c, h, w = x.shape
        s = max(h // 5, 1)
        start = (h - s * 5) // 2
        delta = torch.zeros_like(x)
        pattern = _eta(s).to(x)
        signs = 2 * (noise.uniform(x.new_empty(b, c, h // s, w // s)) > 0.5).to(x.dtype) - 1
        transpose = noise.derive("transpose").uniform(x.new_empty(b, h // s, w // s)) > 0.5
        for i, vh in enumerate(range(start, start + s * (h // s), s)):
            for j, vw in enumerate(range(start, start + s * (w // s), s)):
                if vh + s > h or vw + s > w:
                    continue
                pat = torch.where(transpose[:, i, j, None, None], pattern.t(), pattern)[:, None]  # (B, 1, s, s)
                delta[:, :, vh:vh + s, vw:vw + s] += pat * signs[:, :, i, j, None, None]
        return self.eps * delta / self.threat.magnitude(delta).clamp_min(1e-12)

    def _l2_step(self, x, x_best, s, u):
        """Move the mass of one window (and clear a second) so that ‖δ‖₂ stays ε (the reference's update);
        ``u`` (B, 5 + C) places both windows, orients the pattern and signs each channel."""
        b, c, h, w = x.shape
        win1, win2 = _windows(b, s, h, w, u[:, :2]), _windows(b, s, h, w, u[:, 2:4])
        delta = x_best - x
        in1 = delta.masked_select(win1.expand_as(delta)).view(b, c, s, s)
        norm1 = in1.flatten(2).norm(dim=2)[:, :, None, None]
        norm_all = self.threat.magnitude(delta)
        norm_windows = (delta * (win1 | win2)).flatten(2).norm(dim=2)[:, :, None, None]
        pattern = torch.where((u[:, 4] > 0.5)[:, None, None], _eta(s).to(x).t(), _eta(s).to(x))[:, None]
        signs = (2 * (u[:, 5:] > 0.5).to(x.dtype) - 1)[:, :, None, None]
        new = pattern * signs + in1 / (norm1 + 1e-12)
        budget = ((self.eps ** 2 - norm_all ** 2).clamp_min(0) / c + norm_windows ** 2).sqrt()
        new = new / new.flatten(2).norm(dim=2)[:, :, None, None].clamp_min(1e-12) * budget
        delta = torch.where(win2, torch.zeros_like(delta), delta)
        delta = delta.masked_scatter(win1.expand_as(delta), new)
        x_new = x + self.eps * delta / self.threat.magnitude(delta).clamp_min(1e-12)
        return self.threat.project(x_new.clamp(0, 1), x)

    def forward_passes(self, num_classes: int) -> float:  # one query a forward pass
        return (self.queries + 4.0) * self.restarts

    def params(self) -> dict:
        return {**super().params(), "queries": self.queries, "p_init": self.p_init,
                "rescale_schedule": self.rescale_schedule, "revision": self.revision}

    def __repr__(self) -> str:
        return f"Square(eps={self.eps:.6g}, norm={self.norm}, queries={self.queries}, p_init={self.p_init})"
