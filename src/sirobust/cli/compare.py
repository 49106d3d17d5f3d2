"""``sirobust compare``: several defenses, each with and without SI, in one table."""
from __future__ import annotations

from .args import add_common_args, add_output_args, choices_type, output_path, parse_list, parse_number, run_mode

DEFAULT_OUT = "runs/compare"


def cmd_compare(a) -> int:
    from ..experiments.compare import compare_defenses
    si_modes = {"both": (False, True), "on": (True,), "off": (False,)}[a.si]
    compare_defenses(a.dataset, a.model, parse_list(a.defenses), si_modes=si_modes, epochs=a.epochs,
                     out=str(output_path(a, DEFAULT_OUT)), mode=run_mode(a), eval_n=a.n, steps=a.steps, eps=a.eps,
                     device=a.device, seed=a.seed, progress=not a.no_progress, which=a.checkpoint,
                     train_kw={"train_n": a.train_n} if a.train_n else None)
    return 0


def register(sub) -> None:
    from ..data import list_datasets
    from ..defenses import list_defenses
    from ..models import list_models
    p = sub.add_parser("compare", help="train several defenses with and without SI and compare them in one table")
    p.add_argument("--dataset", type=choices_type(list_datasets(), "dataset"), default="fashion-mnist-mini",
                   help="(default fashion-mnist-mini)")
    p.add_argument("--model", type=choices_type(list_models(), "model"), default="cnn-small", help="(default cnn-small)")
    p.add_argument("--defenses", default="standard,at,trades,alp,mart,he",
                   help=f"comma-separated, from {', '.join(list_defenses())} (default standard,at,trades,alp,mart,he)")
    p.add_argument("--si", choices=["both", "on", "off"], default="both",
                   help="train each defense with and without SI (both, default), only with, or only without")
    p.add_argument("--epochs", type=int, default=None, help="default: the schedule preset's")
    p.add_argument("--train-n", type=int, default=None, help="train on the first n training examples only")
    p.add_argument("--eps", type=parse_number, default=None, help="default: the dataset's")
    p.add_argument("--steps", type=int, default=20, help="attack steps at evaluation (default 20)")
    p.add_argument("--n", type=int, default=1000, help="test images evaluated (default 1000)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best", help="weights evaluated (default best)")
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    add_output_args(p, DEFAULT_OUT, "folder of the runs and the table", resume=True)
    add_common_args(p)
    p.set_defaults(func=cmd_compare)
