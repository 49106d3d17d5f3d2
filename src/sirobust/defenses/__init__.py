"""Defenses: each a loss over a batch; ``--with-si`` adds the SI mechanism to any of them."""
from __future__ import annotations

import inspect
from typing import Optional, Type

from ..registry import Registry
from .alp import ALP
from .at import AT
from .base import Defense, InnerAttack
from .fgsm_rs import FGSMRS
from .free import FreeAT
from .gat import GAT
from .gradalign import GradAlign
from .he import HE
from .mart import MART
from .si import SIConfig, si_regulariser
from .standard import Standard
from .trades import TRADES

DEFENSES: Registry[Type[Defense]] = Registry(
    "defense", {"standard": Standard, "at": AT, "trades": TRADES, "alp": ALP, "mart": MART, "he": HE,
                "fgsm-rs": FGSMRS, "free": FreeAT, "gat": GAT, "gradalign": GradAlign},
    aliases={"rfgsm-at": "fgsm-rs", "fast-at": "fgsm-rs", "fast": "fgsm-rs", "freeat": "free", "free-at": "free",
             "grad-align": "gradalign"})


def list_defenses() -> list[str]:
    return DEFENSES.names()


def canonical_defense(name: str) -> str:
    return DEFENSES.canonical(name)


def describe_defense(name: str) -> str:
    """The first line of the defense's docstring."""
    return DEFENSES.describe(name)


def build_defense(name: str, attack: Optional[InnerAttack] = None, si: Optional[SIConfig] = None, **kw) -> Defense:
    cls = DEFENSES.get(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "attack", "si")]
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise ValueError(f"defense {name!r} has no parameter {', '.join(unknown)}; "
                         f"its parameters: {', '.join(accepted) or 'none'}")
    return cls(attack=attack, si=si, **kw)


__all__ = ["Defense", "InnerAttack", "SIConfig", "si_regulariser", "DEFENSES", "build_defense", "list_defenses",
           "canonical_defense", "describe_defense",
           "AT", "Standard", "TRADES", "ALP", "MART", "HE", "FGSMRS", "FreeAT", "GAT", "GradAlign"]
