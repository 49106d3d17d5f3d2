"""SPSA (Uesato, O'Donoghue, van den Oord & Kohli 2018): a score-based black-box attack.

Each iteration estimates the gradient of the margin loss ``f_y − max_{j≠y} f_j`` from ``samples``
random Rademacher directions v (entries ±1), two queries each::

    ĝ = mean_v [L(x + δv) − L(x − δv)] / (2δ) · v

and takes an Adam step (learning rate ``lr``) on the perturbation, projected back into the ε-ball and
[0, 1]. An example stops as soon as it is misclassified. The paper's Table 9 settings are the
defaults: δ = 0.001, lr = 0.01, 100 iterations. ``samples`` counts directions (advertorch's
``nb_sample``); the "batch size" of Uesato et al. and cleverhans counts evaluations, two per
direction: the paper's batches 128 / 256 / 512 are ``samples`` 64 / 128 / 256 (``reproduce table9``).

The model is only ever asked for outputs, under ``torch.no_grad()``: SPSA sees through gradient
masking, which is why the paper runs it on the SI defenses. The ±δ probes are evaluated in chunks
of at most ``chunk`` images per model call, so memory is bounded for any sample count; with ``keys``
(as ``evaluate`` passes them) the draws are keyed per example and per sample, so the result does not
depend on ``chunk`` or on the batch. The probes x ± δv are not clipped to [0, 1] (as in cleverhans and
advertorch): the model is queried up to δ outside the image range.

Example::

    x_adv = SPSA(model, eps=8/255, samples=256)(x, y)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..checks import check_float, check_int, logits_of
from ..losses import margin
from .base import Attack
from .result import AttackOutput


def margin_loss(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
    """What SPSA minimises: the true-class margin (untargeted) or, targeted, max_{j≠t} f_j − f_t; < 0 means done."""
    return margin(logits, y) if target is None else -margin(logits, target)


class SPSA(Attack):
    """SPSA (Uesato et al. 2018): score-based black box, Adam on a gradient estimated from ±δ probes.

    Args:
        samples: random directions per gradient estimate (2 queries each).
        iterations: Adam steps.
        delta: the probes' size δ.
        lr: Adam's learning rate.
        chunk: the most probe images sent to the model in one call (bounds memory for any ``samples``;
            the check of the current points is one call on the batch itself).
        random_start: start from a uniform point of the ε-ball (cleverhans' SPSA; default) or, with
            False, from the clean image (torchattacks' SPSA).
    """

    name = "spsa"
    measures = ("queries",)
    black_box = True
    fixed: tuple = ("steps", "alpha", "random_start", "force")

    def __init__(self, model: nn.Module, eps: Optional[float] = None, samples: int = 128, iterations: int = 100,
                 delta: float = 0.001, lr: float = 0.01, chunk: int = 1024, norm: str = "Linf", restarts: int = 1,
                 seed: Optional[int] = 0, model_mode: str = "eval", early_stop: bool = True, precision: str = "auto",
                 random_start: bool = True):
        super().__init__(model, eps, norm=norm, restarts=restarts, seed=seed, model_mode=model_mode,
                         early_stop=early_stop, precision=precision)
        self.samples = check_int("samples", samples, min=1)
        self.iterations = check_int("iterations", iterations, min=1)
        self.delta = check_float("delta", delta, min=0, max=1, min_open=True)
        self.lr = check_float("lr", lr, min=0, min_open=True)
        self.chunk = check_int("chunk", chunk, min=2)
        self.random_start = bool(random_start)

    @torch.no_grad()
    def run(self, x, y, target, noise):
        b = x.shape[0]
        x_adv = self.threat.random_init(x, noise.derive("init")) if self.random_start else x.clone()
        # Adam's moments (β = 0.9, 0.999, as torch.optim.Adam), kept per example so that finished
        # examples can leave the batch without disturbing the others
        m1, m2 = torch.zeros_like(x), torch.zeros_like(x)
        queries = torch.zeros(b, device=x.device)
        act = torch.arange(b, device=x.device)
        for it in range(self.iterations + 1):
            loss = margin_loss(logits_of(self.model(x_adv[act])), y[act], None if target is None else target[act])
            queries[act] += 1
            if self.early_stop:
                act = act[loss >= 0]                       # misclassified (or on target): stop there
            if act.numel() == 0 or it == self.iterations:
                break
            t = None if target is None else target[act]
            grad = self.estimate_gradient(x_adv[act], y[act], t, noise.subset(act).derive(f"iteration-{it}"))
            queries[act] += 2 * self.samples
            m1[act] = 0.9 * m1[act] + 0.1 * grad
            m2[act] = 0.999 * m2[act] + 0.001 * grad * grad
            step = self.lr * (m1[act] / (1 - 0.9 ** (it + 1))) / ((m2[act] / (1 - 0.999 ** (it + 1))).sqrt() + 1e-8)
            x_adv[act] = self.threat.project(x_adv[act] - step, x[act])
        return AttackOutput(x_adv, queries=queries)

    def estimate_gradient(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor],
                          noise) -> torch.Tensor:
        """SPSA's estimate of ∇ₓ margin_loss at ``x`` (B, C, H, W) from ``samples`` Rademacher probes.

        Probe j of an example uses the numbers at positions [j·D, (j+1)·D) of its stream (D pixels),
        so any chunking draws the same probes."""
        b, d = x.shape[0], x[0].numel()
        pairs = max(1, self.chunk // 2)                    # (example, probe) pairs per model call
        per_ex = min(self.samples, pairs)                  # probes of one example per call
        n_ex = max(1, pairs // per_ex)                     # examples per call
        grad = torch.zeros_like(x)
        for e0 in range(0, b, n_ex):
            rows = torch.arange(e0, min(b, e0 + n_ex), device=x.device)
            sub, xe, ye = noise.subset(rows), x[rows], y[rows]
            te = None if target is None else target[rows]
            for j0 in range(0, self.samples, per_ex):
                k = min(per_ex, self.samples - j0)
                u = sub.uniform(x.new_empty(len(rows), k, *x.shape[1:]), offset=j0 * d)
                v = torch.where(u < 0.5, -1.0, 1.0).to(x.dtype)               # (E, k, C, H, W)
                probes = torch.cat([xe[:, None] + self.delta * v, xe[:, None] - self.delta * v]).flatten(0, 1)
                labels = ye.repeat_interleave(k).repeat(2)
                tl = None if te is None else te.repeat_interleave(k).repeat(2)
                losses = margin_loss(logits_of(self.model(probes)), labels, tl).view(2, len(rows), k)
                diff = (losses[0] - losses[1]).to(x.dtype)                      # (E, k)
                grad[rows] += (diff.view(len(rows), k, *([1] * (x.dim() - 1))) * v).sum(1)
        return grad / (2 * self.delta * self.samples)

    def forward_passes(self, num_classes: int) -> float:  # 2 queries per direction, per iteration
        return ((2.0 * self.samples + 1) * self.iterations + 4) * self.restarts  # + the loss at each iterate

    def params(self) -> dict:
        return {**super().params(), "samples": self.samples, "iterations": self.iterations, "delta": self.delta,
                "lr": self.lr, "chunk": self.chunk, "random_start": self.random_start}

    def __repr__(self) -> str:
        return (f"SPSA(eps={self.eps:.6g}, norm={self.norm}, samples={self.samples}, iterations={self.iterations}, "
                f"delta={self.delta:g}, lr={self.lr:g})")
