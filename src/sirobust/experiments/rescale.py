"""The logit-rescaling study (paper Fig. 1, Sec. 4.1).

Multiplying the logits by α > 0 changes no decision, yet for large α the
softmax saturates, the CE gradient underflows to exactly 0 in float32 and PGD
stops moving, so PGD's robust accuracy rises. SI-PGD works on cos θ, which no
rescaling changes, so its curve stays flat.

Example::

    rows = rescale_study(model, (x, y), alphas=log_grid(1e-3, 1e3, 7), attacks=["pgd", "si-pgd"], eps=0.1)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from ..evaluate import evaluate
from ..io import PathLike, write_json
from ..models import ScaledLogits
from ..provenance import model_description


def log_grid(lo: float = 1e-3, hi: float = 1e3, points: int = 7) -> list[float]:
    """``points`` values evenly spaced in log10 from ``lo`` to ``hi`` (rounded to 4 significant digits)."""
    if not (0 < lo < hi):
        raise ValueError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
    if points < 2:
        raise ValueError(f"points must be >= 2, got {points}")
    a, b = math.log10(lo), math.log10(hi)
    return [float(f"{10 ** (a + i * (b - a) / (points - 1)):.4g}") for i in range(points)]


def rescale_study(model: nn.Module, data, alphas: Sequence[float], attacks: Sequence[str] = ("pgd", "si-pgd"),
                  progress: bool = True, log=None, **eval_kw) -> dict:
    """Evaluate ``α · model`` for each α; returns {"alphas", "attacks", "accuracy": {attack: [...]}, "clean": [...], "reports"}."""
    acc = {a: [] for a in attacks}
    clean, reports = [], []
    for alpha in alphas:
        rep = evaluate(ScaledLogits(model, alpha), data, attacks=attacks, progress=progress, **eval_kw)
        clean.append(rep.clean_acc)
        for name, r in zip(attacks, rep.attacks.values()):
            acc[name].append(r.robust_acc)
        zero = next(f for f in rep.flags if f["name"] == "zero_gradients")["value"]
        reports.append({"alpha": alpha, "clean_acc": rep.clean_acc, "zero_gradient_share": zero,
                        **{f"{k}_acc": v.robust_acc for k, v in rep.attacks.items()}})
        if log:
            log(f"α = {alpha:<8g} " + "  ".join(f"{k} {100 * v.robust_acc:6.2f}%" for k, v in rep.attacks.items()))
    # the model rescaled, not the α wrapper around it (a model of the user's is named by the caller)
    provenance = {**rep.provenance, "model": (eval_kw.get("provenance") or {}).get("model") or model_description(model)}
    return {"alphas": list(alphas), "attacks": list(attacks), "accuracy": acc, "clean": clean, "rows": reports,
            "n": rep.n, "config": rep.config, "environment": rep.environment, "provenance": provenance}


def format_table(result: dict) -> str:
    names = result["attacks"]
    head = f"{'alpha':>10}  {'clean':>7}  " + "  ".join(f"{n:>8}" for n in names) + "  zero-grad"
    lines = [head]
    for i, a in enumerate(result["alphas"]):
        lines.append(f"{a:>10g}  {100 * result['clean'][i]:6.2f}%  " +
                     "  ".join(f"{100 * result['accuracy'][n][i]:7.2f}%" for n in names) +
                     f"  {100 * result['rows'][i]['zero_gradient_share']:7.1f}%")
    return "\n".join(lines)


def plot(result: dict, path: PathLike, title: Optional[str] = None) -> Path:
    """Accuracy vs α (log axis), one line per attack, written atomically as PNG at ``path`` and as PDF
    beside it (same stem, ``.pdf``; see :func:`~sirobust.experiments.plotting.save_figure`). Returns ``path``."""
    from .plotting import new_figure, save_figure

    fig = new_figure((6, 4))
    ax = fig.add_subplot()
    for name in result["attacks"]:
        ax.plot(result["alphas"], [100 * v for v in result["accuracy"][name]], marker="o", label=name)
    ax.plot(result["alphas"], [100 * v for v in result["clean"]], linestyle="--", color="gray", label="clean")
    ax.set_xscale("log")
    ax.set_xlabel("logit scale α  (model outputs α · logits)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "Robust accuracy under logit rescaling (paper Fig. 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    saved = save_figure(fig, path)
    return saved.pdf if Path(path).suffix.lower() == ".pdf" else saved.png


def save(result: dict, json_path: PathLike, png_path: Optional[PathLike] = None) -> None:
    write_json(json_path, result)
    if png_path is not None:
        plot(result, png_path)
