"""Attack names used by the CLI and reports (resolved here, nowhere deeper)."""
from __future__ import annotations

from typing import Dict, Type

from torch import nn

from .base import Attack
from .pgd import FGSM, PGD, PGDCW, PGDDLR, RFGSM, SIPGD

ATTACKS: Dict[str, Type[Attack]] = {
    "pgd": PGD,
    "pgd-cw": PGDCW,
    "pgd-dlr": PGDDLR,
    "si-pgd": SIPGD,
    "fgsm": FGSM,
    "rfgsm": RFGSM,
}
_ALIASES = {"pgdcw": "pgd-cw", "pgd_cw": "pgd-cw", "pgdlr": "pgd-dlr", "pgd_dlr": "pgd-dlr", "pgddlr": "pgd-dlr",
            "sipgd": "si-pgd", "si_pgd": "si-pgd"}


def list_attacks() -> list[str]:
    return sorted(ATTACKS)


def canonical_attack_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid attacks: {', '.join(list_attacks())}")
    return key


def build_attack(name: str, model: nn.Module, **kw) -> Attack:
    """``build_attack("si-pgd", model, eps=8/255, steps=20)``; options the attack
    does not take (``steps`` for FGSM) are dropped."""
    cls = ATTACKS[canonical_attack_name(name)]
    if cls in (FGSM, RFGSM):  # one-step attacks fix their own step count, step size and start
        for key in ("steps", "alpha", "random_start"):
            kw.pop(key, None)
    return cls(model, **kw)
