"""Evaluation sanity flags, after AutoAttack's ``checks.py`` (Croce & Hein 2020).

Each check returns a flag dict (``name``, ``triggered``, ``value``, ``message``);
triggered flags are printed and every flag is recorded in the report, so a
robustness number never travels without the warnings that qualify it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _flag(name: str, triggered: bool, value, message: str) -> dict:
    return {"name": name, "triggered": bool(triggered), "value": value, "message": message if triggered else ""}


@torch.no_grad()
def check_probabilities(logits: torch.Tensor) -> dict:
    """Outputs in [0,1] whose rows sum to 1 look like softmax probabilities, not logits."""
    looks = bool(logits.min() >= 0 and logits.max() <= 1 and
                 torch.allclose(logits.sum(1), torch.ones_like(logits[:, 0]), atol=1e-4))
    return _flag("softmax_outputs", looks, looks,
                 "the model's outputs look like probabilities (in [0,1], rows sum to 1); attacks expect logits: "
                 "CE on probabilities is weak, so robust accuracy may be overestimated. Return logits.")


@torch.no_grad()
def check_randomness(model: nn.Module, x: torch.Tensor) -> dict:
    """Two identical forward passes that differ mean a randomised model (gradients are then noisy: use EOT)."""
    diff = (model(x) - model(x)).abs().max().item()
    return _flag("random_outputs", diff > 1e-5, diff,
                 f"two identical forward passes differ by up to {diff:.3g}: the model is randomised; plain "
                 "white-box attacks underestimate such defenses (use expectation over transformation).")


def check_train_mode(was_training: bool) -> dict:
    return _flag("model_in_train_mode", was_training, was_training,
                 "the model was in train mode when handed over (batch-norm statistics and dropout change per "
                 "batch); it was evaluated in eval mode and its mode restored afterwards.")


def check_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threshold: float = 0.01) -> tuple[dict, dict]:
    """Shares of examples whose input gradient of CE is non-finite, and exactly zero (the
    gradient masking that saturated, e.g. rescaled, logits cause; paper Sec. 4.1)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y, reduction="sum")
        grad, = torch.autograd.grad(loss, x)
    share = (grad.flatten(1).abs().amax(1) == 0).float().mean().item()
    nonfinite = (~torch.isfinite(grad.flatten(1)).all(1)).float().mean().item()
    return _flag("nonfinite_gradients", nonfinite > 0, nonfinite,
                 f"{nonfinite:.1%} of the examples have a NaN or infinite input gradient of the CE loss: gradient "
                 "attacks cannot move there and will stop with an error; the model is not differentiable at "
                 "these inputs."), _flag("zero_gradients", share > threshold, share,
                 f"{share:.1%} of the examples have an exactly-zero input gradient of the CE loss: gradient "
                 "masking (saturated softmax, e.g. rescaled logits) makes CE-based attacks like PGD fail; "
                 "trust scale-invariant attacks (si-pgd, pgd-dlr) and the worst case instead.")


def run_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, was_training: bool) -> list[dict]:
    """All checks on one batch (the model in eval mode)."""
    with torch.no_grad():
        logits = model(x)
    return [check_probabilities(logits), check_randomness(model, x), check_train_mode(was_training),
            *check_gradients(model, x, y)]
