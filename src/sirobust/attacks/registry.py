"""Attack names used by the CLI and reports (resolved here, nowhere deeper)."""
from __future__ import annotations

import inspect
from typing import Dict, Optional, Type

from torch import nn

from ..checks import resolve_name
from .apgd import APGDCE, APGDDLR, APGDSI, APGDT
from .autoattack import AutoAttackPlus, AutoAttackRand, AutoAttackSI, AutoAttackStandard
from .base import Attack
from .fab import FAB, FABT
from .pgd import FGSM, FGSMRS, PGD, PGDCW, PGDDLR, RFGSM, SIPGD
from .rays import RayS
from .spsa import SPSA
from .square import Square

ATTACKS: Dict[str, Type[Attack]] = {
    "pgd": PGD,
    "pgd-cw": PGDCW,
    "pgd-dlr": PGDDLR,
    "si-pgd": SIPGD,
    "fgsm": FGSM,
    "fgsm-rs": FGSMRS,
    "rfgsm": RFGSM,
    "apgd-ce": APGDCE,
    "apgd-dlr": APGDDLR,
    "apgd-si": APGDSI,
    "apgd-t": APGDT,
    "fab": FAB,
    "fab-t": FABT,
    "square": Square,
    "spsa": SPSA,
    "rays": RayS,
    "aa": AutoAttackStandard,
    "aa-plus": AutoAttackPlus,
    "aa-rand": AutoAttackRand,
    "aa-si": AutoAttackSI,
}
_ALIASES = {"pgdcw": "pgd-cw", "pgdlr": "pgd-dlr", "pgddlr": "pgd-dlr", "sipgd": "si-pgd", "fgsmrs": "fgsm-rs",
            "r+fgsm": "rfgsm", "autoattack": "aa", "aa-standard": "aa", "si-apgd": "apgd-si", "apgdt": "apgd-t",
            "fabt": "fab-t"}


def list_attacks() -> list[str]:
    return sorted(ATTACKS)


def describe_attack(name: str) -> str:
    """The first line of the attack's docstring."""
    return (ATTACKS[canonical_attack_name(name)].__doc__ or "").strip().splitlines()[0]


def canonical_attack_name(name: str) -> str:
    return resolve_name("attack", name, ATTACKS, _ALIASES)


def build_attack(name: str, model: nn.Module, overrides: Optional[dict] = None, **shared) -> Attack:
    """``build_attack("si-pgd", model, eps=8/255, steps=20)``. ``shared`` settings a preset fixes
    itself (the step count of FGSM, say) are dropped; ``overrides`` are this attack's own and always passed."""
    name = canonical_attack_name(name)
    cls = ATTACKS[name]
    overrides = dict(overrides or {})
    allowed = attack_parameters(name)
    unknown = sorted(set(overrides) - set(allowed)) if allowed is not None else []
    if unknown:
        raise ValueError(f"attack {name!r} has no parameter {', '.join(map(repr, unknown))}; its parameters are "
                         f"{', '.join(allowed)}")
    owned = sorted(k for k in ("eps", "norm") if k in overrides and k in shared and overrides[k] != shared[k])
    if owned:  # a per-attack ε or norm would measure another threat model than the report states
        raise ValueError(f"attack {name!r}: {' and '.join(owned)} belong to the whole evaluation (--eps, --norm), "
                         "not to one attack")
    kw = {k: v for k, v in shared.items() if k not in getattr(cls, "fixed", ())}
    kw.update(overrides)
    return cls(model, **kw)


def attack_parameters(name: str) -> Optional[list[str]]:
    """The keyword arguments an attack accepts (for ``--attack-param``), None if it takes any."""
    names: list[str] = []
    for cls in ATTACKS[canonical_attack_name(name)].__mro__:  # **kw passes on to the parent's __init__
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters
        names += [k for k, p in params.items() if k not in ("self", "model") and k not in names
                  and p.kind is not inspect.Parameter.VAR_KEYWORD]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return names
        if cls.__name__ in ("PGD", "APGD"):  # their **loss_params go to the loss: any name may be valid
            return None
    return names
