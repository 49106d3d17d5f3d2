"""What a plan will cost, before it runs: forward passes × FLOPs per forward ÷ a throughput.

An estimate, said to be one: the FLOPs per forward are counted (benchmarks/scaling.md, FlopCounterMode,
convolutions and matrix products), a backward pass counts as two forwards, an attack's cost is its
step or query count, and the throughputs are

- this project's CPU (2 cores): 30 GFLOP/s, measured on PGD-10 AT of cnn-small (benchmarks/scaling.md);
- one H200-class GPU: 100 TFLOP/s sustained in bf16, an assumption (no GPU figure has been measured yet).

Small models do not reach a device's throughput and early stopping shortens attacks on weak models,
so the figures are the order of magnitude, not a promise.
"""
from __future__ import annotations

from ..defenses import InnerAttack, build_defense

# forward FLOPs per image (benchmarks/scaling.md)
FORWARD_FLOPS = {"cnn-small": 6.08e6, "resnet18": 1.11e9, "preact-resnet18": 1.11e9,
                 "preact-resnet18-wong": 1.11e9, "preact-resnet18-gradalign": 1.11e9,
                 "wrn-28-10": 10.5e9, "wrn-34-10": 13.3e9, "resnet50": 2.6e9}
TRAIN_SIZE = {"cifar10": 50000, "cifar100": 50000, "svhn": 73257, "mnist": 60000, "fashion-mnist": 60000,
              "fashion-mnist-mini": 6000}
THROUGHPUT = {"cpu": 30e9, "gpu": 100e12}
# forward-equivalents per training image and pass, beyond the attack: the update (forward + backward)
# and the clean forward the defense also takes (FreeAT: the update alone, its attack rides on it)
_DEFENSE_EXTRA = {"standard": 3, "at": 3, "trades": 7, "alp": 6, "mart": 6, "he": 7, "free": 3, "fgsm-rs": 3,
                  "gat": 6, "gradalign": 9}


def train_flops(cfg) -> float:
    per_forward = FORWARD_FLOPS.get(cfg.model, 1e9)
    size = TRAIN_SIZE.get(cfg.dataset, 50000)
    if cfg.val_size and cfg.val_size != 0:
        size = size * (1 - cfg.val_size) if cfg.val_size < 1 else size - cfg.val_size
    if cfg.train_n:
        size = min(size, cfg.train_n)
    kind = build_defense(cfg.defense, attack=InnerAttack(eps=cfg.eps, norm=cfg.norm), **cfg.defense_params)
    own_passes = kind.uses_attack and not kind.attack_reuses_training_backward
    attack = 3 * cfg.attack_steps if own_passes else 0
    per_image = (attack + _DEFENSE_EXTRA.get(cfg.defense, 6)) * kind.replays
    validation = 0 if not cfg.val_size else min(cfg.val_n, size) * (3 * cfg.val_steps + 1)
    return cfg.epochs * (size * per_image + validation) * per_forward


def attack_passes(attack: str, params: dict, steps: int, restarts: int = 1, num_classes: int = 10) -> float:
    """Forward passes per attacked image, at most: the attack's own count (:meth:`Attack.forward_passes`, the
    bound ``evaluate`` logs), the attack built with these settings on a stand-in model of ``num_classes``."""
    from torch import nn

    from ..attacks import build_attack
    stand_in = nn.Sequential(nn.Flatten(), nn.Linear(1, num_classes))  # a linear head, for the SI attacks
    atk = build_attack(attack, stand_in, overrides=params, eps=8 / 255, steps=steps, restarts=restarts)
    return atk.forward_passes(num_classes)


# a published model's architecture, as configs write it, to the zoo model of the same cost
_ARCHITECTURES = {"RN-18": "resnet18", "PARN-18": "preact-resnet18", "RN-50": "resnet50", "W-28-10": "wrn-28-10",
                  "W-34-10": "wrn-34-10"}


def eval_flops(plan, cell) -> float:
    model = cell.train.model if cell.train is not None else _ARCHITECTURES.get(cell.published.architecture,
                                                                               "wrn-28-10")
    per_forward = FORWARD_FLOPS.get(model, 1e9)
    total = 0.0
    for job in cell.jobs:
        passes = 1 + sum(attack_passes(a, p, plan.eval["steps"], job.restarts) for _n, a, p in job.attacks)
        total += job.n * passes * per_forward
    return total


def figure_flops(plan) -> float:
    fig, cells = plan.figure, plan.cells
    per_forward = FORWARD_FLOPS.get(cells[0].train.model, 1e9) if cells[0].train is not None else 1e9
    kind = plan.experiment.figure_kind
    if kind == "fig1":
        return fig.get("points", 13) * plan.eval["n"] * 2 * 3 * plan.eval["steps"] * per_forward
    if kind == "fig3":
        return fig.get("images", 10) * (fig.get("grid", 21) ** 2 + 3 * fig.get("steps", 10)) * per_forward
    if kind == "fig4":
        return len(cells) * fig.get("directions", 1) * len(fig.get("deltas", [0] * 11)) * fig.get("n", 1000) * 3 \
            * fig.get("steps", 10) * per_forward
    return len(cells) * fig.get("n", 1000) * 3 * fig.get("steps", 10) * per_forward


def estimate(plan) -> dict:
    """{"flops", "cpu_hours", "gpu_hours", "runs", "cells"} of a plan (training, then evaluation)."""
    flops = sum(train_flops(cfg) for cfg in plan.runs.values())
    if plan.experiment.kind == "figure":
        flops += figure_flops(plan)
    else:
        flops += sum(eval_flops(plan, c) for c in plan.cells)
    return {"flops": flops, "cpu_hours": flops / THROUGHPUT["cpu"] / 3600,
            "gpu_hours": flops / THROUGHPUT["gpu"] / 3600, "runs": len(plan.runs), "cells": len(plan.cells)}


def human(hours: float) -> str:
    if hours < 1 / 60:
        return "< 1 min"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.0f} days"
