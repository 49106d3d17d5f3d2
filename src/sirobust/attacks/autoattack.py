"""AutoAttack (Croce & Hein 2020): a fixed ensemble of diverse parameter-free attacks, each run only on
the points the earlier ones left robust, with the reference's versions and settings:

* ``standard``: APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5,000 queries);
* ``plus``: APGD-CE and APGD-DLR with 5 restarts, FAB with 5 restarts, Square, APGD-T, FAB-T;
* ``rand``: APGD-CE and APGD-DLR with expectation over 20 transformations (randomised defenses);
* ``si`` (ours): standard plus SI-APGD, whose loss no rescaling of the logits can saturate, so that
  an AutoAttack number cannot be inflated that way either (the paper's point, Sec. 4.1);
* ``custom``: a list of names, e.g. ``attacks=["apgd-ce", "square"]``.

Stages that cannot run on the model (DLR needs 3 classes, targeted DLR 4) are skipped with the reason
recorded; the number of classes is read from the model. Each stage draws its random numbers from its
own stream (named after the stage), keyed per example when the caller gives keys.

Example::

    x_adv = AutoAttack(model, eps=8/255, version="standard")(x, y)
    out = atk.perturb(x, y); out.stages   # which stage of atk.stage_plan(K) broke each example
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..checks import logits_of, resolve_name
from .base import Attack
from .loop import is_fooled
from .result import AttackOutput
from .robust import attack_still_robust
from .stages import STAGES, build_from

# (stage, its own settings): the reference's (autoattack.py, set_version)
VERSIONS: dict[str, list[tuple[str, dict]]] = {
    "standard": [("apgd-ce", {}), ("apgd-t", {}), ("fab-t", {}), ("square", {"queries": 5000})],
    "plus": [("apgd-ce", {"restarts": 5}), ("apgd-dlr", {"restarts": 5}), ("fab", {"restarts": 5}),
             ("square", {"queries": 5000}), ("apgd-t", {}), ("fab-t", {})],
    "rand": [("apgd-ce", {"eot_iter": 20}), ("apgd-dlr", {"eot_iter": 20})],
    "si": [("apgd-ce", {}), ("apgd-t", {}), ("apgd-si", {}), ("fab-t", {}), ("square", {"queries": 5000})],
}
# classes a stage needs (DLR: π1 − π3; targeted DLR: π1 − (π3 + π4)/2)
MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}


class AutoAttack(Attack):
    """AutoAttack (Croce & Hein 2020), the reference's versions plus ``si`` (standard + SI-APGD, ours).

    Example::

        x_adv = AutoAttack(model, eps=8/255, version="si")(x, y)
    """

    name = "aa"
    uses_fast_model = False  # each stage runs its own fast path
    version = "standard"  # the default; each preset below fixes its own
    fixed: tuple = ("steps", "alpha", "restarts", "random_start", "force")

    def __init__(self, model: nn.Module, eps: Optional[float] = None, norm: str = "Linf",
                 version: Optional[str] = None, attacks: Optional[Sequence[Union[str, tuple]]] = None,
                 seed: Optional[int] = 0, model_mode: str = "eval", head=None,
                 stage_params: Optional[dict] = None, precision: str = "auto"):
        super().__init__(model, eps, norm=norm, restarts=1, seed=seed, model_mode=model_mode, early_stop=True,
                         precision=precision)
        version = resolve_name("AutoAttack version", version or self.version, [*VERSIONS, "custom"])
        if version == "custom":
            if not attacks:
                raise ValueError("version='custom' needs attacks=[...] (names, or (name, settings) pairs)")
            plan = [(a, {}) if isinstance(a, str) else (a[0], dict(a[1])) for a in attacks]
        elif attacks:
            raise ValueError(f"attacks= is for version='custom'; version {version!r} runs "
                             f"{', '.join(n for n, _ in VERSIONS[version])}")
        else:
            plan = VERSIONS[version]
        self.version = version
        self.name = {"standard": "aa", "plus": "aa-plus", "rand": "aa-rand", "si": "aa-si"}.get(version, "aa-custom")
        self.head = head
        # stage_params: {"square": {"queries": 500}} changes a stage's settings (a cheaper run; recorded)
        custom = {STAGES.canonical(k): dict(v) for k, v in (stage_params or {}).items()}
        self.stages: list[tuple[str, Attack]] = []
        for stage, settings in plan:
            stage = STAGES.canonical(stage)  # an ensemble is no stage: the names are the single attacks'
            extra = {"head": head} if head is not None and stage == "apgd-si" else {}
            self.stages.append((stage, build_from(STAGES, stage, model, overrides={**settings, **extra,
                                                                             **custom.pop(stage, {})},
                                                    eps=self.eps, norm=self.norm, seed=seed,
                                                    precision=precision)))
        if custom:
            raise ValueError(f"stage_params names {', '.join(custom)}, not stages of this ensemble "
                             f"({', '.join(n for n, _ in self.stages)})")
        # the stages the last call ran and skipped, for params() and repr (all of them before any call)
        self.skipped: list[tuple[str, str]] = []
        self.stage_names: list[str] = [n for n, _ in self.stages]

    def stage_plan(self, num_classes: int) -> tuple[list[str], list[tuple[str, str]]]:
        runs, skipped = [], []
        for name, _ in self.stages:
            need = MIN_CLASSES.get(name, 2)
            if num_classes < need:
                skipped.append((name, f"{name} needs at least {need} classes; the model has {num_classes}"))
            else:
                runs.append(name)
        return runs, skipped

    def _runnable(self, num_classes: int) -> list[tuple[str, Attack]]:
        self.stage_names, self.skipped = self.stage_plan(num_classes)
        return [(name, atk) for name, atk in self.stages if name in self.stage_names]

    def _perturb_with_restarts(self, x, y, target, keys, runner=None, fast=None):
        if target is not None:
            raise ValueError("AutoAttack is untargeted (its targeted stages choose their own targets)")
        logits = self._check_classes(x, y, None)
        stages = self._runnable(logits.shape[1])
        robust = ~is_fooled(logits, y)

        def stage(i: int, idx: torch.Tensor):
            adv = stages[i][1].perturb(x[idx], y[idx], keys=None if keys is None else keys[idx]).x_adv
            with torch.no_grad():
                return adv, is_fooled(logits_of(self.model(adv)), y[idx])

        out, broken = attack_still_robust(x, robust, range(len(stages)) if self.eps > 0 else (), stage)
        broken[~robust] = -2  # misclassified without attack
        return AttackOutput(out, stages=broken)

    def forward_passes(self, num_classes: int) -> float:
        """Every stage on every example: the upper bound (a stage attacks only what the earlier ones left)."""
        return 1 + sum(atk.forward_passes(num_classes) + 1 for name, atk in self.stages  # the class check,
                       if name in self.stage_plan(num_classes)[0])                    # each stage's verdict

    def params(self) -> dict:
        return {**super().params(), "version": self.version,
                "stages": {name: atk.params() for name, atk in self.stages},
                "skipped": [f"{n}: {why}" for n, why in self.skipped]}

    def __repr__(self) -> str:
        return f"AutoAttack(version={self.version}, eps={self.eps:.6g}, norm={self.norm}, stages={self.stage_names})"


class AutoAttackStandard(AutoAttack):
    """AutoAttack, standard version: APGD-CE, APGD-T, FAB-T, Square (the number reviewers trust)."""

    name, version = "aa", "standard"


class AutoAttackPlus(AutoAttack):
    """AutoAttack+ : APGD-CE/DLR and FAB with 5 restarts, Square, APGD-T, FAB-T (slower, stronger)."""

    name, version = "aa-plus", "plus"


class AutoAttackRand(AutoAttack):
    """AutoAttack for randomised defenses: APGD-CE and APGD-DLR with EOT over 20 passes."""

    name, version = "aa-rand", "rand"


class AutoAttackSI(AutoAttack):
    """AutoAttack-SI (ours): the standard ensemble plus SI-APGD, immune to rescaled or saturated logits."""

    name, version = "aa-si", "si"
