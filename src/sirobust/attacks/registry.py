"""Attack names used by the CLI and reports (resolved here, nowhere deeper): the single attacks and the
AutoAttack ensembles, in one :class:`~sirobust.registry.Registry`."""
from __future__ import annotations

from typing import Optional, Type

from torch import nn

from ..registry import Registry
from .autoattack import AutoAttackPlus, AutoAttackRand, AutoAttackSI, AutoAttackStandard
from .base import Attack
from .stages import STAGES, build_from, parameters_of

ATTACKS: Registry[Type[Attack]] = Registry(
    "attack", {**STAGES, "aa": AutoAttackStandard, "aa-plus": AutoAttackPlus, "aa-rand": AutoAttackRand,
               "aa-si": AutoAttackSI},
    aliases={**STAGES.aliases(), "autoattack": "aa", "aa-standard": "aa"})


def list_attacks() -> list[str]:
    return ATTACKS.names()


def describe_attack(name: str) -> str:
    """The first line of the attack's docstring."""
    return ATTACKS.describe(name)


def canonical_attack_name(name: str) -> str:
    return ATTACKS.canonical(name)


def build_attack(name: str, model: nn.Module, overrides: Optional[dict] = None, **shared) -> Attack:
    """``build_attack("si-pgd", model, eps=8/255, steps=20)``. ``shared`` settings a preset fixes
    itself (the step count of FGSM, say) are dropped; ``overrides`` are this attack's own and always passed."""
    return build_from(ATTACKS, name, model, overrides, **shared)


def attack_parameters(name: str) -> Optional[list[str]]:
    """The keyword arguments an attack accepts (for ``--attack-param``), None if it takes any."""
    return parameters_of(ATTACKS.get(name))
