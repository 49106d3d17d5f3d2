"""The attack object users know from torchattacks: ``x_adv = atk(x, y)``.

The base class owns what every attack must get right and no attack should
repeat: argument and input checks (:mod:`sirobust.checks`), the model's
train/eval mode (set for the attack, then restored), randomness that never
touches the global RNG (a private generator, or draws keyed per example when
the caller gives the examples' ``keys``), never mutating the caller's tensors,
and restarts where a point counts as robust only if it survives every restart
(:func:`~sirobust.attacks.robust.attack_still_robust`); :meth:`Attack.perturb` returns an
:class:`~sirobust.attacks.result.AttackOutput`.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import replace
from typing import Optional, Union

import torch
from torch import nn

from ..checks import (check_eps, check_images, check_int, check_labels, check_same_device, logits_of,
                      model_channels, model_dtype, resolve_name)
from ..fastpath import FastPath, attack_model, check_precision, resolve_precision
from ..modes import model_mode
from ..rng import GeneratorNoise, KeyedNoise, Noise, generator
from ..threat import ThreatModel, canonical_norm, cast_toward, make_threat
from .loop import is_fooled
from .result import AttackOutput, as_output
from .robust import attack_still_robust

_MODES = ("eval", "train", "keep")


def fixed_loss(attack: "Attack", kw: dict) -> str:
    """The loss of an attack that fixes its own (SI-PGD runs ``si``, APGD-CE ``ce``: its ``default_loss``), taken
    out of ``kw``. A ``loss=`` naming it (any spelling the registry accepts) is fine; another loss, or a Loss
    object (whose parameters the attack's own would overwrite), is refused rather than silently dropped."""
    check_fixed_loss(attack.name, attack.default_loss, kw.pop("loss", None))
    return attack.default_loss


def check_fixed_loss(name: str, default: str, given) -> None:
    """Refuse ``given`` as the ``loss=`` of the attack ``name``, which runs ``default`` (see :func:`fixed_loss`)."""
    from ..losses import LOSSES
    if given is None:
        return
    if isinstance(given, str):
        try:
            if LOSSES.canonical(given) == default:
                return
        except ValueError:  # an unknown name is another loss
            pass
    as_object = "" if isinstance(given, str) else ", a Loss object: give its parameters to the attack itself"
    raise ValueError(f"{name} runs the {default!r} loss and takes no other (got loss={getattr(given, 'name', given)!r}"
                     f"{as_object}); pgd, fgsm, fgsm-rs and rfgsm take loss=")


def named_parameters_of(cls: type) -> list[str]:
    """Every named keyword argument along ``cls``'s chain of ``__init__``s (up to the first without ``**kw``)."""
    names: list[str] = []
    for c in cls.__mro__:
        if "__init__" not in vars(c):
            continue
        params = inspect.signature(c.__init__).parameters
        names += [k for k, p in params.items() if k not in ("self", "model") and k not in names
                  and p.kind is not inspect.Parameter.VAR_KEYWORD]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break
    return names


def init_parameters(cls: type) -> list[str]:
    """The named keyword arguments of the first ``__init__`` along ``cls``'s MRO."""
    init = next(c for c in cls.__mro__ if "__init__" in vars(c)).__init__
    return [k for k, p in inspect.signature(init).parameters.items() if k not in ("self", "model")
            and p.kind is not inspect.Parameter.VAR_KEYWORD]


def attack_loss(attack: "Attack", loss, loss_params: dict):
    """The loss an attack of the PGD and APGD families runs: ``loss`` bound to the keywords the attack did not
    take itself. A keyword neither takes is refused as the attack's (a torchattacks habit, ``random_init``,
    gets "did you mean random_start"), not as a parameter the loss lacks."""
    import difflib

    from ..losses import LOSSES, get_loss, loss_parameters
    registered = loss if isinstance(loss, str) else getattr(loss, "name", None)
    if loss_params and registered is not None and (isinstance(loss, str) or LOSSES.get(registered, None) is not None):
        accepted = loss_parameters(LOSSES.canonical(registered))
        unknown = sorted(set(loss_params) - set(accepted))
        if unknown:
            fixed = set(getattr(type(attack), "fixed", ())) | ({"loss"} if getattr(type(attack), "default_loss", None)
                                                               and "loss" not in init_parameters(type(attack)) else set())
            own = [k for k in named_parameters_of(type(attack)) if k not in fixed]
            close = difflib.get_close_matches(unknown[0], list(dict.fromkeys(own + accepted)), n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ValueError(f"{type(attack).__name__} has no parameter {', '.join(unknown)}{hint}; its parameters: "
                             f"{', '.join(own)}; and those of its loss {LOSSES.canonical(registered)!r}: "
                             f"{', '.join(accepted) or 'none'}")
    return get_loss(loss, **loss_params)


def recorded_dataset(model: nn.Module) -> Optional[str]:
    """The dataset a sirobust checkpoint recorded for ``model`` (looking through one wrapper), if any."""
    for m in (model, getattr(model, "model", None)):
        meta = getattr(m, "sirobust_metadata", None)
        if isinstance(meta, dict) and meta.get("dataset"):
            return meta["dataset"]
    return None


def default_eps(model: nn.Module, norm: str, eps=None, name: str = "eps") -> float:
    """``eps`` checked, or when it is None the budget of the dataset the model records; else an error."""
    if eps is None:
        dataset = recorded_dataset(model)
        if dataset is None:
            raise ValueError(f"{name} is required: the model records no dataset whose customary ε could be used "
                             "(pass e.g. eps=8/255 for CIFAR-10 L∞)")
        from ..data import get_dataset_info
        eps = get_dataset_info(dataset).eps_for(norm)
    return check_eps(eps, norm, name)


class Attack:
    """Base class. Subclasses implement :meth:`run` for one restart.

    Args:
        model: any classifier taking [0,1] pixels and returning logits (B, K).
        eps: radius of the threat model, in pixel units (8/255 for CIFAR); None takes the
            budget of the dataset a sirobust checkpoint records, else it is required.
        norm: ``"Linf"`` or ``"L2"``.
        restarts: independent runs; an example is robust only if it survives all.
        seed: seeds the attack's randomness (None: fresh each time the attack is built).
        model_mode: ``"eval"`` (default) runs the attack with ``model.eval()``,
            ``"train"`` with ``model.train()``, ``"keep"`` leaves it; the mode is restored. In train mode
            every forward pass updates batch norm's running statistics (as in torchattacks): those are not
            restored, since training with adversarial examples wants them.
        early_stop: evaluation mode (default): points the model already gets wrong
            are not attacked, and an example stops at the first iterate that fools
            the model. ``False`` (for training): every example takes every step.
        precision: ``"auto"`` (default: bf16 autocast on CUDA for the gradient attacks,
            channels_last and batch-norm folding everywhere), ``"fp32"`` (the model exactly
            as given), ``"fp32-fast"`` or ``"bf16"``; see :mod:`sirobust.fastpath`. Whatever the
            precision, each restart's verdict is taken on the model as given, in its own dtype.

    ``atk(x, y)`` returns the adversarial points; ``atk.perturb(x, y)`` returns them in an
    :class:`~sirobust.attacks.result.AttackOutput` with what the attack measured (queries, say).

    ``atk(x, y, keys=idx)`` keys each example's random start on its index ``idx`` (B,), so
    the result for an example does not depend on the batch it came in; without ``keys``
    a private generator is used, and repeated calls draw fresh starts in a reproducible sequence.
    """

    name = "attack"
    autocast_ok = False  # may the model run under bf16 autocast? (PGD, APGD, Square: not FAB's, SPSA's or RayS')
    uses_fast_model = True  # False: the attack runs the model as given (ensembles: their stages choose)
    measures: tuple = ()  # what run() measures besides x_adv: "queries", "distances" (see AttackOutput)
    # never asks the model for a gradient (Square, SPSA, RayS): it may run on a model that gives none, and it is
    # the black-box side of the check "a black-box attack beat the white-box ones" (sanity.result_flags). A class
    # attribute, not a name: an evaluation may label an attack anything ("spsa[samples=64]", "my-spsa")
    black_box = False
    # the registry name an evaluation built this attack from ("pgd"), so that a message can say which list to
    # pass instead; None for an attack object of the user's (it cannot be spelt as a name)
    built_from: Optional[str] = None

    def __init__(self, model: nn.Module, eps: Optional[float] = None, norm: str = "Linf", restarts: int = 1,
                 seed: Optional[int] = 0, model_mode: str = "eval", early_stop: bool = True,
                 precision: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        norm = canonical_norm(norm)
        self.model = model
        self.eps = default_eps(model, norm, eps)
        self.threat: ThreatModel = make_threat(norm, self.eps)
        self.norm = self.threat.norm
        self.restarts = check_int("restarts", restarts, min=1)
        if seed is not None:
            seed = check_int("seed", seed, min=0)
        self.seed = seed
        self._keyed_seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.model_mode = resolve_name("model_mode", model_mode, _MODES)
        self.early_stop = bool(early_stop)
        self.precision = check_precision(precision)
        self.compile = False  # torch.compile the private copy of the model (set by evaluate(compile=True))
        self.ran_as: Optional[dict] = None  # how the last call ran the model (precision, folded copy or not)
        self._generator: Optional[torch.Generator] = None
        self.current_restart = 0  # which restart :meth:`run` is serving (FAB starts later restarts at random)

    def forward_passes(self, num_classes: int) -> Optional[float]:
        """At most how many forward passes one example costs, a backward counted as two (so a gradient step is
        3), every restart taking every step, with the forward passes that check a start and a verdict: an upper
        bound for a cost estimate (early stopping, the default in evaluation, makes it less on examples that
        break early; tests/test_evaluation_cost.py counts the passes). None: unknown (an attack of your own
        that does not say; the evaluation's cost line then names it as not counted)."""
        return None

    # ------------------------------------------------------------------ api
    def __call__(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                 keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.perturb(x, y, target, keys=keys).x_adv

    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                keys: Optional[torch.Tensor] = None) -> AttackOutput:
        """Adversarial examples for (x, y), same shape and dtype as ``x``, with what the attack measured;
        ``target`` makes the attack targeted."""
        check_images(x, "x", model_channels(self.model))
        check_labels(y, x.shape[0], name="y")
        if target is not None:
            check_labels(target, x.shape[0], name="target")
        if keys is not None and (not isinstance(keys, torch.Tensor) or keys.dtype.is_floating_point
                                 or keys.shape != (x.shape[0],)):
            raise ValueError(f"keys must be an integer tensor of shape ({x.shape[0]},): one index per example")
        check_same_device(self.model, x)
        if x.shape[0] == 0:
            return AttackOutput(x.detach().clone())
        work_dtype = model_dtype(self.model)
        xw = x.detach().to(work_dtype)  # the model's precision (a float64 batch for a float32 model)
        fast = resolve_precision(self.precision, x.device, compile=self.compile)
        if work_dtype != torch.float32:  # autocast and folding are for fp32 models; others run as given
            fast = resolve_precision("fp32", x.device)
        with model_mode(self.model, None if self.model_mode == "keep" else self.model_mode):
            runner, how = (attack_model(self.model, fast, probe=xw[:8]) if self.uses_fast_model
                           else (self.model, "as given"))
            autocast = fast.autocast and self.autocast_ok  # FAB, SPSA, RayS: never bf16
            self.ran_as = {"precision": "bf16" if autocast else "fp32-fast" if runner is not self.model else "fp32",
                           "autocast": autocast, "model": how}
            out = self._perturb_with_restarts(xw, y.detach().to(x.device).long(),
                                              None if target is None else target.detach().to(x.device).long(),
                                              None if keys is None else keys.detach().long(), runner, fast)
        if out.x_adv.dtype != x.dtype or x.dtype in (torch.float16, torch.bfloat16):
            # back to the caller's dtype, inside the ball around the caller's own x in that dtype too: projected
            # in float64 (the work copy may have rounded x; a projection in bf16 or fp16 rounds x ± ε itself),
            # then each coordinate rounded toward x (exact for L∞ and L2: no |δᵢ| grows)
            exact = self.threat.project(out.x_adv.double(), x.detach().double())
            out = replace(out, x_adv=cast_toward(exact, x.detach()))
        return out

    def generator(self, device: torch.device) -> torch.Generator:
        """The attack's private generator on ``device`` (created on first use)."""
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = generator(self.seed, device)
        return self._generator

    def noise(self, x: torch.Tensor, keys: Optional[torch.Tensor], restart: int) -> Noise:
        """Where restart ``restart`` draws its random numbers (its own stream, named after the attack)."""
        if keys is None:
            return GeneratorNoise(self.generator(x.device))
        return KeyedNoise(self._keyed_seed, f"{self.name}/restart-{restart}", keys)

    def run(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor],
            noise: Noise) -> Union[torch.Tensor, AttackOutput]:
        """One restart on the examples given: their adversarial points, or an :class:`AttackOutput` with them
        and what was measured (the attack's :attr:`measures`)."""
        raise NotImplementedError

    def stage_plan(self, num_classes: int) -> Optional[tuple[list[str], list[tuple[str, str]]]]:
        """An ensemble's stages on a model with ``num_classes`` classes: (the names of those it runs, in the
        order ``AttackOutput.stages`` counts them; (name, why) of those it skips). None: not an ensemble."""
        return None

    def params(self) -> dict:
        """What defines this attack, for reports (subclasses add theirs)."""
        return {"name": self.name, "eps": self.eps, "norm": self.norm, "restarts": self.restarts, "seed": self.seed,
                "model_mode": self.model_mode, "precision": self.precision, "ran_as": self.ran_as}

    # ------------------------------------------------------------ internals
    def _check_classes(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            logits = logits_of(self.model(x))
        check_labels(y, x.shape[0], logits.shape[1], name="y")
        if target is not None:
            check_labels(target, x.shape[0], logits.shape[1], name="target")
        return logits

    def _run_fast(self, runner: nn.Module, fast: FastPath, x, y, target, noise) -> AttackOutput:
        """:meth:`run` on the fast model (``self.model`` is ``runner`` meanwhile), under autocast when allowed."""
        model, self.model = self.model, runner
        head = getattr(self, "head", None)
        if isinstance(head, nn.Module) and runner is not model:  # the copy's head is found by its name
            self.head = next((name for name, m in model.named_modules() if m is head), head)
        try:
            with fast.autocast_context(x.device, self.autocast_ok):
                out = as_output(self.run(fast.inputs(x) if runner is not model else x, y, target, noise))
            return replace(out, x_adv=out.x_adv.contiguous())
        finally:
            self.model = model
            if isinstance(head, nn.Module):
                self.head = head

    def _perturb_with_restarts(self, x, y, target, keys, runner=None, fast=None) -> AttackOutput:
        logits = self._check_classes(x, y, target)
        b = x.shape[0]
        queries = torch.zeros(b, device=x.device) if "queries" in self.measures else None  # summed over restarts
        distances = torch.zeros(b, dtype=torch.float64, device=x.device) if "distances" in self.measures else None
        if self.eps == 0 and distances is None:  # a boundary search still measures its distances at ε = 0
            return AttackOutput(x.clone(), queries=queries)
        # already-misclassified points are not attacked (they are not robust anyway)
        robust = ~is_fooled(logits, y, target) if self.early_stop else torch.ones_like(y, dtype=torch.bool)

        def restart(r: int, idx: torch.Tensor):
            t = None if target is None else target[idx]
            noise = self.noise(x, None if keys is None else keys[idx], r)
            self.current_restart = r
            if runner is None:
                out = as_output(self.run(x[idx], y[idx], t, noise))
            else:
                out = self._run_fast(runner, fast, x[idx], y[idx], t, noise)
            if out.queries is not None:
                queries[idx] += out.queries.to(queries)
            if out.distances is not None:
                distances[idx] = out.distances.to(distances)
            with torch.no_grad():
                return out.x_adv, is_fooled(logits_of(self.model(out.x_adv)), y[idx], t)

        # survivors keep the last restart's point, the others the point that fooled the model
        x_best, _ = attack_still_robust(x, robust, range(self.restarts), restart, keep_last=True)
        return AttackOutput(x_best, queries=queries, distances=distances)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:.6g}, norm={self.norm}, restarts={self.restarts})"
