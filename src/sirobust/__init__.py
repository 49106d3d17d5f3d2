"""sirobust: scale-invariant adversarial attacks and defenses.

Implements "Scale-Invariant Adversarial Attack for Evaluating and Enhancing
Adversarial Defenses" (Xu, Zhang, Li, Zhang): SI-PGD, the PGD family it is
compared with, and the SI defense mechanism inside AT/TRADES/ALP/MART.

    import sirobust
    model = sirobust.load("runs/at")                     # a run folder or .safetensors file
    atk = sirobust.SIPGD(model, eps=8/255)
    x_adv = atk(x, y)
"""
from ._version import __version__
from .attacks import (APGD, APGDT, FAB, FGSM, FGSMRS, PGD, PGDCW, PGDDLR, RFGSM, SIPGD, Attack,
                      AutoAttack, Square, SPSA, RayS, build_attack, list_attacks)
from .checkpoint import load, save_model
from .evaluate import Report, evaluate
from .train import TrainConfig, fit
from .features import FeatureAccessError, ModelOutput, forward_with_features
from .losses import get_loss, list_losses
from .models import build_model, list_models

__all__ = ["__version__", "Attack", "PGD", "SIPGD", "PGDCW", "PGDDLR", "FGSM", "FGSMRS", "RFGSM", "APGD", "APGDT",
           "FAB", "Square", "SPSA", "RayS", "AutoAttack", "build_attack", "list_attacks",
           "load", "save_model", "forward_with_features", "ModelOutput", "FeatureAccessError", "get_loss",
           "list_losses", "build_model", "list_models", "evaluate", "Report", "fit", "TrainConfig"]
