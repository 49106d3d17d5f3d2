"""``sirobust train``: one defense, one run folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from .args import (add_common_args, add_data_args, add_output_args, choices_type, optional_store_true, output_path,
                   parse_list, parse_number, parse_param)

DEFAULT_OUT = "runs/train"

# flag dest -> TrainConfig field, for the flags whose names differ from their field
_FIELD = {"defense_param": "defense_params"}


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every flag defaults to None ("not given"): TrainConfig supplies the defaults, and ``--resume``
    takes the run's recorded value for every flag not given."""
    from ..data import list_datasets
    from ..defenses import list_defenses
    from ..models import list_models
    from ..train import TrainConfig as C

    p.add_argument("--dataset", type=choices_type(list_datasets(), "dataset"), default=None,
                   help=f"one of {', '.join(list_datasets())} (default {C.dataset})")
    p.add_argument("--model", type=choices_type(list_models(), "model"), default=None,
                   help=f"one of {', '.join(list_models())} (default {C.model})")
    p.add_argument("--defense", type=choices_type(list_defenses(), "defense"), default=None,
                   help=f"one of {', '.join(list_defenses())} (default {C.defense})")
    p.add_argument("--defense-param", type=parse_param, action="append", default=None, metavar="KEY=VALUE",
                   help="a defense's own parameter, repeatable: lam=6 (trades, mart, he, alp), alpha=0.5 and "
                        "pairing=mse|l2 (alp), scale=15 and margin=0.2 (he)")
    optional_store_true(p, "--si", help="add the SI mechanism: SI-PGD inner attack + β·CosFace term (paper Sec. 4.3)")
    p.add_argument("--si-scale", type=float, default=None, help=f"s (default {C.si_scale:g})")
    p.add_argument("--si-margin", type=float, default=None, help=f"m (default {C.si_margin:g})")
    p.add_argument("--si-weight", type=float, default=None, help=f"β (default {C.si_weight:g})")
    p.add_argument("--epochs", type=int, default=None,
                   help="default: the schedule preset's (120 ResNet, 90 WRN, 30 cnn-small)")
    p.add_argument("--batch-size", type=int, default=None, help=f"(default {C.batch_size})")
    p.add_argument("--lr", type=float, default=None, help="default: preset (0.01 ResNet, 0.1 WRN, 0.05 cnn-small)")
    p.add_argument("--momentum", type=float, default=None, help="default: preset (0.9)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: preset (5e-4 ResNet, 7e-4 WRN)")
    p.add_argument("--milestones", type=lambda s: tuple(int(v) for v in parse_list(s)), default=None,
                   help="comma-separated epochs where lr is divided by 10 (default: preset, rescaled to --epochs)")
    p.add_argument("--schedule", choices=["resnet", "wideresnet", "small"], default=None,
                   help="optimiser preset (default: by model)")
    p.add_argument("--eps", type=parse_number, default=None, help="training ε, e.g. 8/255 (default: the dataset's)")
    p.add_argument("--attack-steps", type=int, default=None, help=f"inner PGD steps (default {C.attack_steps})")
    p.add_argument("--attack-alpha", type=parse_number, default=None, help="inner PGD step size (default ε/4)")
    p.add_argument("--attack-mode", choices=["eval", "train"], default=None,
                   help=f"model mode while making training examples (default {C.attack_mode}, as TRADES)")
    p.add_argument("--norm", choices=["Linf", "L2"], default=None, help=f"(default {C.norm})")
    p.add_argument("--augment", choices=["none", "crop", "flip", "crop-flip"], default=None,
                   help="default: the dataset's")
    p.add_argument("--val-size", type=lambda t: int(t) if t.strip().isdigit() else float(t), default=None,
                   help=f"held-out share (0.1) or count (500) of the training set (default {C.val_size})")
    p.add_argument("--val-n", type=int, default=None, help=f"validation examples evaluated per epoch (default {C.val_n})")
    p.add_argument("--val-steps", type=int, default=None, help=f"PGD steps of the validation attack (default {C.val_steps})")
    p.add_argument("--train-n", type=int, default=None, help="train on the first n training examples only (quick runs)")
    p.add_argument("--seed", type=int, default=None, help=f"(default {C.seed})")
    add_data_args(p, train=True)
    p.add_argument("--device", default=None, help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    add_output_args(p, DEFAULT_OUT, "run folder (metrics.jsonl, model.safetensors, best.safetensors)", resume=True)
    add_common_args(p, device=False)
    optional_store_true(p, "--tensorboard", help="also log per-epoch metrics to OUT/tensorboard")


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
    out = output_path(a, DEFAULT_OUT)
    a.out = str(out)
    recorded = recorded_config(out) if a.resume else None
    summary = fit(train_config_from_args(a, recorded), resume=a.resume, overwrite=a.overwrite)
    metric = summary["best"]["metric"].replace("val_", "validation ").replace("_acc", " accuracy").replace("_", " ")
    best = (f"best by {metric}: {summary['best_weights']} (epoch {summary['best']['epoch']})"
            if summary["best"]["epoch"] is not None and Path(summary["best_weights"]).exists() else "")
    print(f"weights: {summary['weights']} (last epoch); {best}".rstrip("; "))
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model with a defense (standard, at, ...; --si adds SI)",
                       description="Train one model with one defense into a run folder. The folder is owned by the "
                                   "run: it is refused when it holds another run unless --resume or --overwrite.")
    add_train_args(p)
    p.set_defaults(func=cmd_train)
