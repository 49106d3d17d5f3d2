"""``sirobust train``: one defense, one run folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from .args import (add_common_args, add_data_args, add_output_args, add_speed_args, float_arg, int_arg, name_arg,
                   number_arg, optional_store_true, output_path, parse_list, parse_param)

DEFAULT_OUT = "runs/train"

# flag dest -> TrainConfig field, for the flags whose names differ from their field
_FIELD = {"defense_param": "defense_params"}


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every flag defaults to None ("not given"): TrainConfig supplies the defaults, and ``--resume``
    takes the run's recorded value for every flag not given. Values are checked at parse time."""
    from ..data import list_datasets
    from ..data.registry import canonical_dataset
    from ..defenses import canonical_defense, list_defenses
    from ..models import canonical_model, list_models
    from ..threat import canonical_norm
    from ..train import TrainConfig as C

    p.add_argument("--dataset", type=name_arg(canonical_dataset), default=None,
                   help=f"one of {', '.join(list_datasets())} (default {C.dataset})")
    p.add_argument("--model", type=name_arg(canonical_model), default=None,
                   help=f"one of {', '.join(list_models())} (default {C.model})")
    own = p.add_argument_group("a model of your own (instead of --model)")
    own.add_argument("--model-def", metavar="FILE.py:FACTORY",
                     help="your model: FACTORY(**model args) in FILE.py returns an nn.Module that takes [0, 1] pixels "
                          "(normalising them itself) and returns logits; trained in place of a zoo model, its weights "
                          "saved as its state dict (evaluate it with the same --model-def and --weights); give it "
                          "again with --resume")
    own.add_argument("--model-arg", type=parse_param, action="append", default=[], metavar="KEY=VALUE",
                     help="an argument of the factory, repeatable (e.g. num_classes=10)")
    own.add_argument("--head", default=None, metavar="NAME",
                     help="with --with-si, the linear layer whose input and weights SI uses (default: the one the "
                          "model declares with a sirobust_head attribute, else its last nn.Linear)")
    p.add_argument("--defense", type=name_arg(canonical_defense), default=None,
                   help=f"one of {', '.join(list_defenses())} (default {C.defense})")
    p.add_argument("--defense-param", type=parse_param, action="append", default=None, metavar="KEY=VALUE",
                   help="a defense's own parameter, repeatable: lam=6 (trades, mart, he, alp), alpha=0.5 and "
                        "pairing=mse|l2 (alp), scale=15 and margin=0.2 (he), m=8 (free), lam=10, lam_multiplier=4 "
                        "and start_noise=0.5 (gat), lam (gradalign)")
    optional_store_true(p, "--with-si", dest="si",
                        help="add the SI mechanism: SI-PGD inner attack + β·CosFace term (paper Sec. 4.3)")
    p.add_argument("--si-scale", type=float_arg("--si-scale", min=0, min_open=True), default=None,
                   help=f"s (default {C.si_scale:g})")
    p.add_argument("--si-margin", type=float_arg("--si-margin", min=0), default=None, help=f"m (default {C.si_margin:g})")
    p.add_argument("--si-weight", type=float_arg("--si-weight", min=0), default=None, help=f"β (default {C.si_weight:g})")
    p.add_argument("--epochs", type=int_arg("--epochs", min=1), default=None,
                   help="default: the schedule preset's (120 ResNet, 90 WRN, 30 cnn-small)")
    p.add_argument("--batch-size", type=int_arg("--batch-size", min=1), default=None, help=f"(default {C.batch_size})")
    p.add_argument("--lr", type=float_arg("--lr", min=0, min_open=True), default=None,
                   help="default: preset (0.01 ResNet, 0.1 WRN, 0.05 cnn-small)")
    p.add_argument("--momentum", type=float_arg("--momentum", min=0, max=1, max_open=True), default=None,
                   help="default: preset (0.9)")
    p.add_argument("--weight-decay", type=float_arg("--weight-decay", min=0), default=None,
                   help="default: preset (5e-4 ResNet, 7e-4 WRN)")
    p.add_argument("--milestones", type=milestones_arg, default=None,
                   help="comma-separated epochs m after which lr is divided by 10: m lowers it from epoch m+1 on "
                        "(1-based), as torch's MultiStepLR stepped per epoch (default: the preset, rescaled to "
                        "--epochs: 74,89,99 of 120 for ResNet and 74 of 90 for WRN, i.e. TRADES' and MART's "
                        "`epoch >= 75` (90, 100) with 1-based epochs)")
    p.add_argument("--schedule", choices=["resnet", "wideresnet", "small"], default=None,
                   help="optimiser preset (default: by model)")
    p.add_argument("--eps", type=number_arg("--eps"), default=None,
                   help="training ε in pixel units, e.g. 8/255 (default: the dataset's)")
    p.add_argument("--norm", type=name_arg(canonical_norm), default=None, help=f"Linf or L2 (default {C.norm})")
    p.add_argument("--steps", "--attack-steps", dest="attack_steps", type=int_arg("--steps", min=0), default=None,
                   help="steps of the training attack (default: the defense's, 10 for the multi-step ones, 1 for "
                        "the single-step ones)")
    p.add_argument("--step-size", "--attack-alpha", "--alpha", dest="attack_alpha", type=number_arg("--step-size"),
                   default=None, help="step size of the training attack (default: the defense's, ε/4 for the "
                                      "multi-step ones, 1.25ε for fgsm-rs; above ε only with --force-step-size)")
    optional_store_true(p, "--force-step-size", help="accept a step size above ε")
    p.add_argument("--attack-mode", choices=["eval", "train"], default=None,
                   help="model mode while making training examples (default: the defense's reference code's: eval "
                        "as TRADES, train for fgsm-rs, free and gradalign)")
    p.add_argument("--attack-start", choices=["uniform", "normal"], default=None,
                   help="random start of the training attack: uniform in the ε-ball (default), or normal: "
                        "x + 0.001·N(0, I) clipped to [0, 1], as TRADES' and MART's reference code (needs a "
                        "defense whose attack has a random start)")
    p.add_argument("--lr-schedule", choices=["piecewise", "cyclic", "onecycle"], default=None,
                   help="piecewise (milestones; the paper's), cyclic (triangular, peak --lr at half the run; Wong et "
                        "al.), onecycle (linear, peak at 2/5; Andriushchenko & Flammarion); default: the defense's")
    optional_store_true(p, "--overfit-check", help="each epoch, PGD accuracy on a fixed training subset, to catch "
                        "catastrophic overfitting (default: on for the single-step defenses)")
    p.add_argument("--no-overfit-check", dest="overfit_check", action="store_const", const=False,
                   help="turn that check off")
    p.add_argument("--overfit-n", type=int_arg("--overfit-n", min=1), default=None,
                   help=f"unaugmented training images that check runs PGD-5 on (default {C.overfit_n})")
    optional_store_true(p, "--early-stop", help="stop at a catastrophic-overfitting collapse; best.safetensors stays "
                                                "the checkpoint from before it")
    p.add_argument("--augment", choices=["none", "crop", "flip", "crop-flip"], default=None,
                   help="default: the dataset's")
    p.add_argument("--val-size", type=_val_size, default=None,
                   help=f"held-out share in (0, 1), e.g. 0.1, or count >= 1, e.g. 500, of the training set, or 0: "
                        f"none (train on all of it, as TRADES' and MART's code; no per-epoch validation and no "
                        f"best.safetensors: the last epoch's weights are the result) (default {C.val_size})")
    p.add_argument("--val-n", type=int_arg("--val-n", min=1), default=None,
                   help=f"validation examples evaluated per epoch (default {C.val_n})")
    p.add_argument("--val-steps", type=int_arg("--val-steps", min=1), default=None,
                   help=f"PGD steps of the validation attack (default {C.val_steps})")
    p.add_argument("--train-n", type=int_arg("--train-n", min=1), default=None,
                   help="train on the first n training examples only (quick runs)")
    p.add_argument("--seed", type=int_arg("--seed", min=0), default=None, help=f"(default {C.seed})")
    add_data_args(p, train=True)
    p.add_argument("--device", default=None, help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    add_output_args(p, DEFAULT_OUT, "run folder (metrics.jsonl, model.safetensors, best.safetensors)", resume=True)
    add_common_args(p, device=False)
    add_speed_args(p, train=True)
    optional_store_true(p, "--tensorboard", help="also log per-epoch metrics to OUT/tensorboard")


def _val_size(text: str):
    from ..checks import check_float, check_int
    allowed = "0 (no validation split), a share in (0, 1) or a count >= 1"
    try:
        if text.strip().isdigit():
            value = int(text)
            return 0 if value == 0 else check_int("--val-size", value, min=1)
        value = float(text)
        if value == 0:
            return 0
        return check_float("--val-size", value, min=0, max=1, min_open=True, max_open=True)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--val-size must be {allowed}, got {text!r}") from None


def train_config_from_args(a, recorded: dict | None = None):
    """TrainConfig from the flags given; with ``recorded`` (a resumed run's config) the flags not given
    keep their recorded values."""
    import dataclasses
    from ..train import TrainConfig

    given = {}
    for f in dataclasses.fields(TrainConfig):
        dest = next((d for d, field in _FIELD.items() if field == f.name), f.name)
        value = getattr(a, dest, None)
        if value is not None:
            given[f.name] = value
    if "defense_params" in given:
        given["defense_params"] = dict(given["defense_params"])
    if a.no_progress:
        given["progress"] = False
    base = dict(recorded or {})
    base.pop("progress", None)  # the terminal of the run that stopped says nothing about this one
    if "milestones" in base and base["milestones"] is not None:
        base["milestones"] = tuple(base["milestones"])
    return TrainConfig(**{**base, **given})


def cmd_train(a) -> int:
    from ..train import fit, recorded_config
    from ..distributed import current
    group = current(a.device or "auto")  # under torchrun: rank 0 chooses the folder and reads its record
    out = group.first(output_path, a, DEFAULT_OUT)
    a.out = str(out)
    recorded = group.first(recorded_config, out) if a.resume else None
    summary = fit(train_config_from_args(a, recorded), resume=a.resume, overwrite=a.overwrite, model=_own_model(a))
    if summary.get("rank"):  # under torchrun, rank 0 reports for the run
        return 0
    if summary["best"].get("metric") is None:  # val_size 0: no validation split, no model selection
        print(f"weights: {summary['weights']} (last epoch; no validation split, so no best checkpoint)")
        return 0
    metric = summary["best"]["metric"].replace("val_", "validation ").replace("_acc", " accuracy").replace("_", " ")
    best = (f"best by {metric}: {summary['best_weights']} (epoch {summary['best']['epoch']})"
            if summary["best"]["epoch"] is not None and Path(summary["best_weights"]).exists() else "")
    print(f"weights: {summary['weights']} (last epoch); {best}".rstrip("; "))
    return 0


def _own_model(a):
    """The model of --model-def (with its --model-arg and --head), or None."""
    if a.model_def is None:
        for flag, given in (("--model-arg", a.model_arg), ("--head", a.head)):
            if given:
                raise ValueError(f"{flag} goes with --model-def")
        return None
    if a.model is not None:
        raise ValueError("give --model (a zoo model) or --model-def (your own), not both")
    from ..foreign import build_user_model
    model, _ = build_user_model(a.model_def, None, dict(a.model_arg))
    if a.head is not None:
        model.sirobust_head = a.head  # read by sirobust.features (a name that is no submodule is an error there)
    return model


def milestones_arg(text: str) -> tuple:
    """``--milestones 74,89``: whole epochs >= 1, comma-separated (an empty list means none)."""
    try:
        values = tuple(int(v) for v in parse_list(text))
    except ValueError:
        values = None
    if values is None or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"takes comma-separated whole epochs >= 1 (e.g. 74,89), got {text!r}")
    return values


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model with a defense (standard, at, ...; --with-si adds SI)",
                       description="Train one model with one defense into a run folder. The folder is owned by the "
                                   "run: it is refused when it holds another run unless --resume or --overwrite.")
    add_train_args(p)
    p.set_defaults(func=cmd_train)
