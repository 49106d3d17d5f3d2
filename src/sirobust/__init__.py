"""sirobust: scale-invariant adversarial attacks and defenses.

Implements "Scale-Invariant Adversarial Attack for Evaluating and Enhancing
Adversarial Defenses" (Xu, Zhang, Li, Zhang): SI-PGD, the PGD family it is
compared with, and the SI defense mechanism inside AT/TRADES/ALP/MART.

    import sirobust
    model = sirobust.load("runs/at")                     # a run folder or .safetensors file
    atk = sirobust.SIPGD(model, eps=8/255)
    x_adv = atk(x, y)
"""
from ._version import __version__  # noqa: E402

import os as _os  # noqa: E402
import sys as _sys  # noqa: E402


STARTUP_INTERRUPTED = "sirobust: interrupted while starting; nothing was done"


def _started_as_command() -> bool:
    """Whether this process is the ``sirobust`` command: the console script, ``python -m sirobust`` or
    ``torchrun ... -m sirobust`` (whose children run ``python -u -m sirobust``)."""
    argv = list(getattr(_sys, "orig_argv", _sys.argv))
    return _os.path.basename(_sys.argv[0] if _sys.argv else "") == "sirobust" or any(
        a == "-m" and b in ("sirobust", "sirobust.cli") for a, b in zip(argv, argv[1:]))


try:  # importing torch takes seconds: a Ctrl-C then is one line and exit 130 for the command, not a traceback
    from .attacks import (APGD, APGDT, FAB, FGSM, FGSMRS, PGD, PGDCW, PGDDLR, RFGSM, SIPGD, Attack,  # noqa: E402
                          AutoAttack, Square, SPSA, RayS, build_attack, list_attacks)
    from .checkpoint import load, save_model  # noqa: E402
    from .evaluate import Report, evaluate  # noqa: E402
    from .train import TrainConfig, fit  # noqa: E402
    from .features import FeatureAccessError, ModelOutput, forward_with_features  # noqa: E402
    from .losses import get_loss, list_losses  # noqa: E402
    from .models import build_model, list_models  # noqa: E402
except KeyboardInterrupt:
    if not _started_as_command():
        raise  # a library import: the caller's Ctrl-C, as always
    _sys.stderr.write(STARTUP_INTERRUPTED + "\n")
    raise SystemExit(130) from None

__all__ = ["__version__", "Attack", "PGD", "SIPGD", "PGDCW", "PGDDLR", "FGSM", "FGSMRS", "RFGSM", "APGD", "APGDT",
           "FAB", "Square", "SPSA", "RayS", "AutoAttack", "build_attack", "list_attacks",
           "load", "save_model", "forward_with_features", "ModelOutput", "FeatureAccessError", "get_loss",
           "list_losses", "build_model", "list_models", "evaluate", "Report", "fit", "TrainConfig"]
