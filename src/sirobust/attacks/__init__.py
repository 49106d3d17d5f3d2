"""Attacks. ``atk = SIPGD(model, eps=8/255); x_adv = atk(x, y)``."""
from .base import Attack
from .loop import pgd_loop, is_fooled
from .apgd import APGD, APGDCE, APGDDLR, APGDSI, APGDT
from .autoattack import AutoAttack
from .fab import FAB, FABT
from .pgd import FGSM, FGSMRS, PGD, PGDCW, PGDDLR, RFGSM, SIPGD
from .rays import RayS
from .registry import ATTACKS, build_attack, canonical_attack_name, describe_attack, list_attacks
from .spsa import SPSA
from .square import Square

__all__ = ["Attack", "PGD", "SIPGD", "PGDCW", "PGDDLR", "FGSM", "FGSMRS", "RFGSM", "APGD", "APGDCE", "APGDDLR",
           "APGDSI", "APGDT", "FAB", "FABT", "Square", "SPSA", "RayS", "AutoAttack", "pgd_loop", "is_fooled",
           "ATTACKS", "build_attack", "canonical_attack_name", "describe_attack", "list_attacks"]
