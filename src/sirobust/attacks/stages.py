"""The single attacks by name (every attack but the AutoAttack ensembles), and building an attack from its settings.

AutoAttack composes its ensembles from these names; :mod:`.registry` adds the ensembles on top, so that the
registry imports AutoAttack and AutoAttack never imports the registry.
"""
from __future__ import annotations

import inspect
import re
from typing import Optional, Type

from torch import nn

from ..registry import Registry
from .apgd import APGDCE, APGDDLR, APGDSI, APGDT
from .base import Attack, check_fixed_loss, init_parameters, named_parameters_of
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
    check_overrides(registry, name, overrides)
    owned = sorted(k for k in ("eps", "norm") if k in overrides and k in shared and overrides[k] != shared[k])
    if owned:  # a per-attack ε or norm would measure another threat model than the report states
        raise ValueError(f"attack {name!r}: {' and '.join(owned)} belong to the whole evaluation (--eps, --norm), "
                         "not to one attack")
    kw = {k: v for k, v in shared.items() if k not in getattr(cls, "fixed", ())}
    kw.update(overrides)
    try:
        return cls(model, **kw)
    except TypeError as e:  # a setting the preset fixes itself (fgsm's steps, say), given as an override
        taken = re.search(r"got multiple values for keyword argument '(\w+)'", str(e))
        if not taken:
            raise
        raise ValueError(f"attack {name!r} sets {taken.group(1)} itself; it is not one of its parameters") from None


def check_overrides(registry: Registry[Type[Attack]], name: str, overrides: dict) -> None:
    """Refuse, naming the attack and what it accepts, a parameter the attack ``name`` does not take, before any
    model exists (the CLI checks ``--attack-param`` with this before loading anything). The PGD and APGD
    families pass other names on to their loss, so theirs are checked against the loss they will run; those
    that fix their loss accept ``loss=`` only naming it, as their constructors do (:func:`.base.fixed_loss`)."""
    cls = registry[registry.canonical(name)]
    own, loss_note = named_parameters_of(cls), ""
    accepted = own
    if getattr(cls, "default_loss", None):
        from ..losses import LOSSES, loss_parameters
        loss = overrides.get("loss", cls.default_loss)
        if "loss" not in init_parameters(cls):  # SI-PGD, PGD-CW, the APGD stages: the loss is the attack's own
            check_fixed_loss(cls.name, cls.default_loss, overrides.get("loss"))
            own, loss = [p for p in own if p != "loss"], cls.default_loss
        if not isinstance(loss, str) and LOSSES.get(loss.name, None) is None:
            return  # a Loss of the user's own (Python only): it takes whatever parameters its function does
        loss = LOSSES.canonical(getattr(loss, "name", loss))  # an unknown loss: the registry's error, with the names
        accepted = own + ["loss"] + loss_parameters(loss)
        loss_note = f"; and those of its loss {loss!r}: {', '.join(loss_parameters(loss)) or 'none'}"
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(f"attack {name!r} has no parameter {', '.join(map(repr, unknown))}; its parameters are "
                         f"{', '.join(own)}{loss_note}")


def parameters_of(cls: Type[Attack]) -> Optional[list[str]]:
    """The keyword arguments an attack class accepts (for ``--attack-param``), None if it takes any: the PGD and
    APGD families (those with a ``default_loss``) pass unknown names on to their loss."""
    return None if getattr(cls, "default_loss", None) else named_parameters_of(cls)
