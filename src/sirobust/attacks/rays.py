"""RayS (Chen & Gu 2020): a hard-label attack that searches for the nearest L∞ decision boundary.

An L∞ adversary's best direction is, for a locally linear model, a sign vector. RayS keeps the best
sign vector s found so far and its boundary distance d (the smallest r for which clamp(x + r·s, 0, 1)
is misclassified), and tries flipping the signs of one block of coordinates at a time, blocks
halving in size level by level (the whole image, its halves, its quarters, ... down to single
pixels, then again). A flip is kept when the new ray is misclassified at the current d; one query
tells, and only then is a binary search run for its own distance. So most trials cost one query.

RayS sees only the predicted label (``argmax`` of the outputs) under ``torch.no_grad()``, never a
score or a gradient. Its outputs:

- robust accuracy at ε: an example is robust if the boundary found lies farther than ε;
- ADBD, the average decision-boundary distance over the clean-correct examples where a boundary was
  found: an ε-free measure of robustness (the RayS paper's). Each distance is an upper bound on that
  example's true distance (RayS may not find the closest boundary within its budget); examples with
  no boundary found are counted apart, not averaged in.

``atk(x, y)`` returns adversarial examples like every attack (the boundary point when it lies within
ε, else the point at distance ε on the best ray); ``atk.perturb(x, y)`` returns them with the distances
and the queries spent (an :class:`~sirobust.attacks.result.AttackOutput`), and ``atk.distances(x, y)``
the distances of the whole search. The search is deterministic (it starts from the all-ones sign vector), so there are no
restarts.

Example::

    atk = RayS(model, eps=8/255, queries=10000)
    dist, queries = atk.distances(x, y)     # dist: L∞ distance of the boundary found (inf if none)
"""
from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
from torch import nn

from ..checks import check_float, check_int, logits_of
from .base import Attack
from .result import AttackOutput


class RayS(Attack):
    """RayS (Chen & Gu 2020): hard-label ray search for the L∞ decision boundary; robust accuracy and ADBD.

    Args:
        queries: the query budget per example (the paper's 10,000; RayS's leaderboard uses 40,000), beyond the
            one prediction that tells whether the example is correctly classified at all.
        rtol: the binary search stops when the boundary is bracketed within ``rtol`` (relative).
        stop_at_eps: stop an example once a boundary within ε is found (fewer queries, no ADBD);
            by default the search runs the whole budget, so the distances and ADBD are as tight as it gets.
    """

    name = "rays"
    measures = ("queries", "distances")
    black_box = True
    uses_fast_model = False  # decisions on the model as given: its distances are reported
    fixed: tuple = ("steps", "alpha", "restarts", "random_start", "force")

    def __init__(self, model: nn.Module, eps: Optional[float] = None, queries: int = 10000, rtol: float = 1e-4,
                 stop_at_eps: bool = False, norm: str = "Linf", seed: Optional[int] = 0, model_mode: str = "eval",
                 early_stop: bool = True, precision: str = "auto"):
        super().__init__(model, eps, norm=norm, restarts=1, seed=seed, model_mode=model_mode, early_stop=early_stop, precision=precision)
        if self.norm != "Linf":
            raise ValueError(f"norm must be 'Linf' for rays (it searches along L∞ sign directions), got {norm!r}")
        self.queries = check_int("queries", queries, min=1)
        self.rtol = check_float("rtol", rtol, min=0, max=1, min_open=True, max_open=True)
        self.stop_at_eps = bool(stop_at_eps)

    # ------------------------------------------------------------------ api
    def distances(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(distance, queries), each (B,): the L∞ distance from each x to the decision boundary RayS found
        (0 for an example already misclassified, inf when none was found within the budget) and the queries
        it spent. Always the full search, whatever ``stop_at_eps``."""
        full = copy.copy(self)  # this attack with the whole budget (self is left as it is)
        full.stop_at_eps = False
        out = full.perturb(x, y)
        return out.distances, out.queries

    # ------------------------------------------------------------ internals
    def run(self, x, y, target, noise) -> AttackOutput:
        """The search on these examples (the deterministic search draws no random numbers: ``noise`` is unused)."""
        if target is not None:
            raise ValueError("rays is untargeted: call it without target")
        d, s, q = self._search(x, y)
        shape = (-1, *([1] * (x.dim() - 1)))
        point = (x + d.clamp(max=1).to(x.dtype).view(shape) * s).clamp(0, 1)
        # the distance of the point returned (clamping to [0, 1] can only bring it closer)
        dist = torch.where(torch.isfinite(d), self.threat.distance(point, x).double(), d)
        # the boundary point when it lies within ε, else the point at distance ε on the best ray
        ray = torch.where(torch.isfinite(d), d, torch.full_like(d, self.eps)).to(x.dtype)
        x_adv = self.threat.project((x + ray.clamp(max=self.eps).view(shape) * s).clamp(0, 1), x)
        return AttackOutput(x_adv, queries=q, distances=dist)

    def _adversarial(self, x, y, s, r) -> torch.Tensor:
        """One query per example: is clamp(x + r·s, 0, 1) misclassified?"""
        point = (x + r.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) * s).clamp(0, 1)
        with torch.no_grad():
            return logits_of(self.model(point)).argmax(1) != y

    @torch.no_grad()
    def _search(self, x, y):
        b = x.shape[0]
        flat = x[0].numel()
        best_d = torch.full((b,), float("inf"), device=x.device, dtype=torch.float64)
        best_s = torch.ones_like(x)
        queries = torch.zeros(b, device=x.device)
        level, block = 0, 0
        active = torch.ones(b, dtype=torch.bool, device=x.device)
        while True:
            active &= queries < self.queries
            if self.stop_at_eps:
                active &= best_d > self.eps
            act = active.nonzero().squeeze(1)
            if act.numel() == 0:
                break
            size = -(-flat // 2 ** level)                   # ceil: the blocks of this level
            start, end = block * size, min(flat, (block + 1) * size)
            trial = best_s[act].flatten(1).clone()
            trial[:, start:end] *= -1
            trial = trial.view_as(x[act])
            self._try(x[act], y[act], trial, act, best_d, best_s, queries)
            block += 1
            if block == 2 ** level or end == flat:
                level, block = level + 1, 0
        return best_d, best_s, queries

    def _try(self, x, y, s, act, best_d, best_s, queries) -> None:
        """The ray ``s`` for the examples ``act``: kept, with its own boundary distance, where it beats theirs."""
        # beyond r = 1 every pixel is clamped to 0 or 1: the point no longer moves
        hi = best_d[act].clamp(max=1.0)
        queries[act] += 1
        hit = self._adversarial(x, y, s, hi)
        lo = torch.zeros_like(hi)
        search = hit.nonzero().squeeze(1)                   # hi is misclassified for these: bracket the boundary
        while search.numel():
            search = search[queries[act[search]] < self.queries]
            if search.numel() == 0:
                break
            mid = (lo[search] + hi[search]) / 2
            queries[act[search]] += 1
            bad = self._adversarial(x[search], y[search], s[search], mid)
            hi[search] = torch.where(bad, mid, hi[search])
            lo[search] = torch.where(bad, lo[search], mid)
            # relative precision, with a floor far below a float32 pixel step (a point on the boundary)
            search = search[(hi[search] - lo[search]) > (self.rtol * hi[search]).clamp(min=1e-9)]
        better = hit & (hi < best_d[act])
        keep = act[better]
        best_d[keep], best_s[keep] = hi[better], s[better]

    def forward_passes(self, num_classes: int) -> float:  # one query a forward pass
        return (self.queries + 4.0) * self.restarts

    def params(self) -> dict:
        out = {**super().params(), "queries": self.queries, "rtol": self.rtol, "stop_at_eps": self.stop_at_eps}
        out.pop("restarts")
        return out

    def __repr__(self) -> str:
        return f"RayS(eps={self.eps:.6g}, queries={self.queries}, rtol={self.rtol:g})"
