"""``sirobust compare``: several defenses, each with and without SI, in one table."""
from __future__ import annotations

from .args import (add_common_args, add_data_args, add_output_args, int_arg, name_arg, names_arg, number_arg,
                   output_path, parse_param, run_mode)

DEFAULT_OUT = "runs/compare"
DEFAULT_DEFENSES = "standard,at,trades,alp,mart,he"


def cmd_compare(a) -> int:
    from ..reproduce.compare import compare_defenses
    si_modes = {"both": (False, True), "on": (True,), "off": (False,)}[a.si]
    # the training and validation settings given (the rest: each defense's and the schedule's presets)
    train_kw = {k: getattr(a, k) for k in ("train_n", "val_n", "val_steps", "val_size", "batch_size", "attack_steps")
                if getattr(a, k) is not None}
    if a.data_dir:
        train_kw["data_dir"] = a.data_dir
    if a.accept_checksum_mismatch:
        train_kw["accept_checksum_mismatch"] = True
    compare_defenses(a.dataset, a.model, a.defenses, si_modes=si_modes, epochs=a.epochs,
                     out=str(output_path(a, DEFAULT_OUT)), mode=run_mode(a), eval_n=a.n, steps=a.steps, eps=a.eps,
                     device=a.device, seed=a.seed, progress=not a.no_progress, which=a.checkpoint,
                     train_kw=train_kw or None, defense_params=dict(a.defense_param), seeds=a.seeds)
    return 0


def register(sub) -> None:
    from .reproduce import seeds_arg
    from .train import _val_size
    from ..data.registry import canonical_dataset
    from ..defenses import canonical_defense, list_defenses
    from ..models import canonical_model
    p = sub.add_parser("compare", help="train several defenses with and without SI and compare them in one table")
    p.add_argument("--dataset", type=name_arg(canonical_dataset), default="fashion-mnist-mini",
                   help="(default fashion-mnist-mini)")
    p.add_argument("--model", type=name_arg(canonical_model), default="cnn-small", help="(default cnn-small)")
    p.add_argument("--defenses", type=names_arg("defense", canonical_defense, list_defenses),
                   default=DEFAULT_DEFENSES.split(","),
                   help=f"comma-separated, from {', '.join(list_defenses())} (default {DEFAULT_DEFENSES})")
    p.add_argument("--defense-param", type=parse_param, action="append", default=[], metavar="DEFENSE.KEY=VALUE",
                   help="a defense's own parameter, repeatable: trades.lam=6 (or lam=6 for every defense that takes it)")
    p.add_argument("--with-si", dest="si", choices=["both", "on", "off"], default="both",
                   help="train each defense with and without SI (both, default), only with, or only without")
    p.add_argument("--epochs", type=int_arg("--epochs", min=1), default=None, help="default: the schedule preset's")
    p.add_argument("--train-n", type=int_arg("--train-n", min=1), default=None,
                   help="train on the first n training examples only")
    p.add_argument("--batch-size", type=int_arg("--batch-size", min=1), default=None,
                   help="training batch size (default: train's, 128)")
    p.add_argument("--train-steps", dest="attack_steps", type=int_arg("--train-steps", min=1), default=None,
                   help="steps of the training attack (default: each defense's); --steps is the evaluation's")
    p.add_argument("--val-size", type=_val_size, default=None,
                   help="held-out share or count of the training set for per-epoch validation, 0: none (default: "
                        "train's, 0.1)")
    p.add_argument("--val-n", type=int_arg("--val-n", min=1), default=None,
                   help="validation examples evaluated per epoch (default: train's, 1000)")
    p.add_argument("--val-steps", type=int_arg("--val-steps", min=1), default=None,
                   help="PGD steps of the per-epoch validation attack (default: train's, 10)")
    p.add_argument("--eps", type=number_arg("--eps"), default=None, help="ε in pixel units (default: the dataset's)")
    p.add_argument("--steps", type=int_arg("--steps", min=1), default=20, help="attack steps at evaluation (default 20)")
    p.add_argument("-n", "--num-examples", dest="n", type=int_arg("--num-examples", min=1), default=1000,
                   help="test images evaluated (default 1000)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best", help="weights evaluated (default best)")
    p.add_argument("--seed", type=int_arg("--seed", min=0), default=0, help="(default 0)")
    p.add_argument("--seeds", type=seeds_arg, default=None, metavar="S1,S2,...",
                   help="train every run once per seed (e.g. 0,1,2): each cell a mean ± sd, and a difference between "
                        "a defense and its SI version stated only with paired tests across the seeds")
    add_data_args(p)
    add_output_args(p, DEFAULT_OUT, "folder of the runs and the table", resume=True)
    add_common_args(p)
    p.set_defaults(func=cmd_compare)
