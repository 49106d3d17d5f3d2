"""The single attacks by name (every attack but the AutoAttack ensembles), and building an attack from its settings.

AutoAttack composes its ensembles from these names; :mod:`.registry` adds the ensembles on top, so that the
registry imports AutoAttack and AutoAttack never imports the registry.
"""
from __future__ import annotations

import inspect
from typing import Optional, Type

from torch import nn

from ..registry import Registry
from .apgd import APGDCE, APGDDLR, APGDSI, APGDT
from .base import Attack
from .fab import FAB, FABT
from .pgd import FGSM, FGSMRS, PGD, PGDCW, PGDDLR, RFGSM, SIPGD
from .rays import RayS
from .spsa import SPSA
from .square import Square

STAGES: Registry[Type[Attack]] = Registry("AutoAttack stage", {
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
}, aliases={"pgdcw": "pgd-cw", "pgdlr": "pgd-dlr", "pgddlr": "pgd-dlr", "sipgd": "si-pgd", "fgsmrs": "fgsm-rs",
            "r+fgsm": "rfgsm", "si-apgd": "apgd-si", "apgdt": "apgd-t", "fabt": "fab-t"})


def build_from(registry: Registry[Type[Attack]], name: str, model: nn.Module, overrides: Optional[dict] = None,
               **shared) -> Attack:
    """The attack ``registry`` names ``name``, built with ``shared`` settings (those a preset fixes itself, the
    step count of FGSM say, are dropped) and its own ``overrides`` (always passed, checked against its
    parameters)."""
    name = registry.canonical(name)
    cls = registry[name]
    overrides = dict(overrides or {})
    allowed = parameters_of(cls)
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


def parameters_of(cls: Type[Attack]) -> Optional[list[str]]:
    """The keyword arguments an attack class accepts (for ``--attack-param``), None if it takes any."""
    names: list[str] = []
    for c in cls.__mro__:  # **kw passes on to the parent's __init__
        if "__init__" not in vars(c):
            continue
        params = inspect.signature(c.__init__).parameters
        names += [k for k, p in params.items() if k not in ("self", "model") and k not in names
                  and p.kind is not inspect.Parameter.VAR_KEYWORD]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return names
        if c.__name__ in ("PGD", "APGD"):  # their **loss_params go to the loss: any name may be valid
            return None
    return names
