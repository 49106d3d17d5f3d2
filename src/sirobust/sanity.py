"""Evaluation sanity flags (after AutoAttack's ``checks.py``, Croce & Hein 2020): on the model, then on the results.

Each check returns a flag dict (``name``, ``triggered``, ``value``, ``message``);
triggered flags are printed and every flag is recorded in the report, so a
robustness number never travels without the warnings that qualify it.
"""
from __future__ import annotations

from typing import Optional

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
                 "white-box attacks underestimate such defenses: use aa-rand (APGD with expectation over 20 "
                 "transformations).")


def check_train_mode(in_train_mode) -> dict:
    """``in_train_mode``: the modules that were in train mode and behave differently there
    (:func:`~sirobust.modes.modules_in_train_mode`), or a bool."""
    names = [] if isinstance(in_train_mode, bool) else list(in_train_mode)
    which = f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""
    return _flag("model_in_train_mode", bool(in_train_mode), bool(in_train_mode),
                 f"the model was in train mode when handed over{which}: batch-norm statistics and dropout change "
                 "per batch there; it was evaluated in eval mode and its mode restored afterwards.")


def check_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threshold: float = 0.01) -> tuple[dict, dict]:
    """Shares of examples whose input gradient of CE is non-finite, and exactly zero (the
    gradient masking that saturated, e.g. rescaled, logits cause; paper Sec. 4.1)."""
    x = x.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            logits = model(x)
            loss = F.cross_entropy(logits, y, reduction="sum")
            grad, = torch.autograd.grad(loss, x, retain_graph=True)
            # the margin (largest other logit − true logit) does not saturate: its gradient tells a softmax that
            # saturated (CE's gradient zero, the margin's not) from a model that gives none (both zero: rounding,
            # quantisation, a step function inside)
            other = logits.detach().scatter(1, y[:, None], float("-inf")).argmax(1)
            margin = (logits.gather(1, other[:, None]) - logits.gather(1, y[:, None])).sum()
            margin_grad, = torch.autograd.grad(margin, x)
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:  # a model that only answers queries (an API, a non-differentiable pipeline)
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        message = (f"not checked: the model gives no input gradient ({why}); only the black-box attacks "
                   "(square, spsa, rays) can evaluate it")
        return tuple({"name": name, "triggered": False, "value": None, "message": message}
                     for name in ("nonfinite_gradients", "zero_gradients"))
    zero = grad.flatten(1).abs().amax(1) == 0
    share = zero.float().mean().item()
    both = (zero & (margin_grad.flatten(1).abs().amax(1) == 0)).float().mean().item()  # the margin's is zero too
    nonfinite = (~torch.isfinite(grad.flatten(1)).all(1)).float().mean().item()
    if both >= share / 2:
        cause = (f"on {both:.1%} the gradient of the logit margin is zero too, so the model itself gives no "
                 "gradient there (rounding or quantising the input, a step function): every gradient attack fails, "
                 "scale-invariant ones included; trust only the black-box attacks (square, rays, spsa), or attack "
                 "a differentiable approximation of that step (BPDA, Athalye et al. 2018).")
    else:
        cause = ("the gradient of the logit margin is not zero there, so the softmax saturates (e.g. rescaled "
                 "logits): CE-based attacks like PGD fail; trust scale-invariant attacks (si-pgd, pgd-dlr) and "
                 "the worst case instead.")
    return _flag("nonfinite_gradients", nonfinite > 0, nonfinite,
                 f"{nonfinite:.1%} of the examples have a NaN or infinite input gradient of the CE loss: gradient "
                 "attacks cannot move there and will stop with an error; the model is not differentiable at "
                 "these inputs."), _flag("zero_gradients", share > threshold, share,
                 f"{share:.1%} of the examples have an exactly-zero input gradient of the CE loss: gradient "
                 f"masking; {cause}")


def gives_gradients(flags: list[dict]) -> bool:
    """False when :func:`check_gradients` found that the model gives no input gradient at all."""
    return not any(f["name"] == "zero_gradients" and f["value"] is None for f in flags)


def run_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, was_training) -> list[dict]:
    """All checks on one batch (the model in eval mode). ``was_training``: as :func:`check_train_mode` takes it."""
    with torch.no_grad():
        logits = model(x)
    return [check_probabilities(logits), check_randomness(model, x), check_train_mode(was_training),
            *check_gradients(model, x, y)]


def check_scale_sensitivity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str,
                            seed: int = 0, steps: int = 5, alphas=(1e-2, 1e2), precision: str = "auto") -> dict:
    """Does rescaling the logits change what PGD-CE measures, while SI-PGD's number stays (paper Sec. 4.1)?

    On the clean-correct examples given (evaluate passes up to :data:`SCALE_CHECK_EXAMPLES`): PGD-CE and
    SI-PGD accuracy of ``model`` and of ``α·model`` for each α. PGD breaking more examples at another scale
    while SI-PGD does not move means that what PGD-CE measures on this model depends on the logit scale, so its
    number at the model's own scale is inflated (the rule: :func:`scale_sensitivity_flag`). The share of these
    examples whose CE input gradient is exactly zero at the model's own scale is recorded too, so that the
    message can say whether the cause is the saturation of the paper's Fig. 1 or a weaker objective.
    ``precision``: the evaluation's (its attacks are built with it, so that ``fp32`` runs the model as given)."""
    from .attacks import PGD, SIPGD
    from .features import FeatureAccessError
    from .models import ScaledLogits
    name = "scale_sensitivity"
    if x.shape[0] == 0 or eps == 0:
        return _flag(name, False, None, "")

    def acc(m, cls):
        atk = cls(m, eps=eps, norm=norm, steps=steps, seed=seed, precision=precision)
        keys = torch.arange(x.shape[0], device=x.device)
        with torch.no_grad():
            return (m(atk(x, y, keys=keys)).argmax(1) == y).float().mean().item()

    try:
        base = {cls: acc(model, cls) for cls in (PGD, SIPGD)}
        scaled = {cls: [acc(ScaledLogits(model, a), cls) for a in alphas] for cls in (PGD, SIPGD)}
    except FeatureAccessError:
        return {"name": name, "triggered": False, "value": None, "message": "",
                "note": "not checked: SI-PGD cannot run on this model (no linear head)"}
    value = {"pgd_accuracy": base[PGD], "pgd_accuracy_rescaled": dict(zip(map(str, alphas), scaled[PGD])),
             "si_pgd_change": max(abs(v - base[SIPGD]) for v in scaled[SIPGD]), "n": int(x.shape[0]),
             "zero_gradient_share": check_gradients(model, x, y)[1]["value"]}
    return scale_sensitivity_flag(value)


SCALE_CHECK_EXAMPLES = 256  # clean-correct examples evaluate gives the check: 1 point is 2.6 of them


def scale_sensitivity_flag(value: dict) -> dict:
    """The ``scale_sensitivity`` flag judged from its measured ``value`` (also a stored one: a table built
    from evaluations stored under an earlier rule judges them by this one, :mod:`sirobust.reproduce.runner`).

    It fires when PGD-CE, at some rescaling α, breaks more than one point more of the examples, and at least
    two examples more, while SI-PGD moves by at most a point. What matters is PGD finding MORE adversarial
    examples at another scale: then the number measured at the model's own scale is inflated. One example is
    not evidence: on 64 examples it is 1.6 points, and PGD's CE at α = 100 is close to a margin loss, which
    breaks a different example now and then on any model (the rule before this one fired so on Table 4's
    TRADES-SI β = 0.1 and 0.3)."""
    name, n = "scale_sensitivity", int(value["n"])
    drops = {a: value["pgd_accuracy"] - v for a, v in value["pgd_accuracy_rescaled"].items()}
    worst_alpha = max(drops, key=drops.get)
    pgd_drop, si_move = drops[worst_alpha], value["si_pgd_change"]
    more = round(pgd_drop * n)  # examples PGD breaks at α and not at the model's scale, net
    return _flag(name, pgd_drop > 0.01 and more >= 2 and si_move <= 0.01, value,
                 f"PGD-CE breaks {100 * pgd_drop:.1f} points ({more} of {n} examples) more once the logits are "
                 f"multiplied by {float(worst_alpha):g} (SI-PGD changes by {100 * si_move:.1f}): what CE measures on "
                 f"this model depends on the logit scale: {_scale_cause(float(worst_alpha), value)}; so pgd's and "
                 "apgd-ce's numbers are inflated, and aa's can be (its DLR, FAB and Square stages may or may not take "
                 "what APGD-CE misses); trust si-pgd, apgd-si, aa-si and the worst case.")


def _scale_cause(alpha: float, value: dict) -> str:
    """Why PGD-CE gains at ``alpha``. Shrinking the logits (α < 1) relieves a saturated softmax, whose CE
    gradients vanish: the paper's Fig. 1. Enlarging them (α > 1) saturates more, so a gain there is the other
    cause: CE at the model's own scale is a weaker objective than CE of enlarged logits, which is close to a
    margin loss (as on a model whose logits are cosines). The measured share of exactly-zero CE gradients at
    the model's own scale is quoted where it was recorded (evaluations stored before it was are not)."""
    share, n = value.get("zero_gradient_share"), int(value["n"])
    zeros = "" if share is None else f" ({round(share * n)} of the {n} examples have an exactly-zero CE gradient)"
    if alpha < 1:
        return f"its softmax saturates at the model's own scale, as in the paper's Fig. 1{zeros}"
    return (f"CE at the model's own scale is a weaker objective than CE of logits ×{alpha:g}, which is close to a "
            f"margin loss (not saturation, which that rescaling would worsen){zeros}")


BLACK_BOX = ("square", "spsa", "rays")  # the registered attacks that never ask for a gradient (Attack.black_box)


def result_flags(results: dict, n: int, black_box: Optional[set] = None) -> list:
    """Flags that read the results: a black-box attack beating the white-box ones (Croce & Hein's
    check_square_sr; Carlini et al. 2019), and ensemble stages skipped for want of classes.

    ``black_box``: the names in ``results`` of attacks that ask for no gradient (``evaluate`` passes those of
    its attacks whose class says so, whatever their label: "spsa[samples=64]" is SPSA); by default, the
    results whose name is a registered black-box attack's (:data:`BLACK_BOX`). Without any white-box result
    there is nothing to compare: SPSA is not a white-box attack for RayS to beat."""
    black_box = {name for name in results if name in BLACK_BOX} if black_box is None else set(black_box)
    flags = []
    white = [r.robust_acc for name, r in results.items() if name not in black_box and not r.excluded
             and not r.stages]
    for name, r in results.items():
        gain = 0.0
        if name in black_box and white:
            gain = min(white) - r.robust_acc  # below every white-box column
        for stage in r.stages:
            if stage["name"] in BLACK_BOX:
                gain = max(gain, stage["broke"] / n)  # broke points every white-box stage before it missed
        triggered = gain > 0.002
        flags.append({"name": "black_box_beats_white_box", "triggered": triggered, "value": gain,
                      "message": (f"{name}: a black-box attack broke {100 * gain:.1f}% of the examples that the "
                                  "gradient-based attacks could not: a sign of gradient masking, so the white-box "
                                  "numbers overstate robustness. Run the black-box attacks with more queries and "
                                  "restarts, or an adaptive attack (see docs/flags.md).") if triggered else ""} if (
            name in black_box or r.stages) else None)
        if r.max_perturbation == 0 and not r.excluded and any(r.robust):
            # every example it attacked came back unchanged (a broken one would have moved): the column is
            # clean accuracy under another name, e.g. a forced step size that overflows after normalisation
            flags.append({"name": "attack_did_not_move", "triggered": True, "value": name,
                          "message": f"{name} returned every example it attacked unchanged (‖δ‖ = 0): its robust "
                                     "accuracy is the clean accuracy, not a robustness number. Check its step size "
                                     "and parameters (docs/flags.md)."})
        if r.stats.get("skipped"):
            flags.append({"name": "too_few_classes", "triggered": True, "value": r.stats["skipped"],
                          "message": f"{name} skipped {'; '.join(r.stats['skipped'])}."})
    return [f for f in flags if f is not None]
