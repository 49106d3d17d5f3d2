"""``sirobust reproduce NAME``: a table or figure of the paper, from its packaged config (or yours)."""
from __future__ import annotations

import sys
from typing import Optional

from .args import add_common_args, add_data_args, int_arg, name_arg, number_arg, parse_param

DEFAULT_OUT = "runs/reproduce"
# command-line flags that set a training field for every run (over the config and the preset)
TRAIN_FLAGS = ("dataset", "model", "epochs", "train_n", "batch_size", "data_dir")


def cmd_reproduce(a) -> int:
    from ..reproduce import list_experiments, reproduce
    if a.list:
        print(listing(a.device))
        return 0
    if not a.name:
        raise ValueError(f"name an experiment ({', '.join(list_experiments())}), a config file, or pass --list")
    overrides = overrides_from_args(a)
    if a.dry_run:
        print(describe(a.name, a.preset, overrides, a.device, a.shard))
        return 0
    from ..reproduce import IncompleteGrid
    from ..reproduce.jobs import JobsFailed
    try:
        reproduce(a.name, preset=a.preset, out=a.out, overrides=overrides, device=a.device,
                  progress=not a.no_progress and a.jobs == 1, overwrite=a.overwrite, model_dir=a.model_dir,
                  accept_unpinned=a.accept_unpinned, shard=a.shard, jobs=a.jobs, collect=a.collect,
                  ledger=a.ledger)
    except (IncompleteGrid, JobsFailed) as e:  # nothing is lost: what finished is in --out
        print(f"sirobust reproduce: {e}", file=sys.stderr)
        return 1
    return 0


def overrides_from_args(a) -> dict:
    train = {k: getattr(a, k) for k in TRAIN_FLAGS if getattr(a, k, None) is not None}
    evaluation = {k: getattr(a, k) for k in ("n", "steps", "eps") if getattr(a, k, None) is not None}
    if a.seed is not None:
        train["seed"] = evaluation["seed"] = a.seed
    if a.accept_checksum_mismatch:
        train["accept_checksum_mismatch"] = True
    if a.precision is not None:
        train["precision"] = evaluation["precision"] = a.precision
    out = {"train": train, "eval": evaluation, "figure": {}}
    if a.seeds is not None:
        out["seeds"] = a.seeds
    for key, value in a.set:
        section, _, name = key.partition(".")
        if section not in out or not name:
            raise ValueError(f"--set {key}={value}: the key must be train.FIELD, eval.FIELD or figure.FIELD")
        out[section][name] = value
    return out


def describe(name: str, preset: str, overrides: dict, device: str, shard: Optional[tuple] = None) -> str:
    """The plan of one experiment: its runs and what it would cost."""
    from ..reproduce import load_experiment
    from ..reproduce.cost import estimate, human
    from ..reproduce.plan import make_plan
    exp = load_experiment(name)
    plan = make_plan(exp, preset, overrides, device=device)
    est = estimate(plan)
    lines = [f"{exp.name} --preset {preset}: {exp.title}", f"  {exp.presets[preset].description}",
             f"  {est['cells']} cells, {est['runs']} training runs"
             + (f", seeds {', '.join(map(str, plan.seeds))}" if len(plan.seeds) > 1 else "") + ":"]
    if shard is not None:
        from ..reproduce.plan import shard_runs
        mine = shard_runs(plan, *shard)
        lines.append(f"  shard {shard[0]}/{shard[1]} trains {len([k for k in plan.runs if k in mine])} of them "
                     "and evaluates their cells:")
        lines += [f"    {k}" for k in plan.runs if k in mine]
        lines += [f"    {u} (evaluated)" for u in sorted(mine - set(plan.runs))]
    else:
        lines += [f"    {k}" for k in plan.runs]
    lines.append(f"  estimated cost: {est['flops']:.2g} FLOP, about {human(est['cpu_hours'])} on this CPU, "
                 f"{human(est['gpu_hours'])} on one H200-class GPU (see sirobust.reproduce.cost)")
    return "\n".join(lines)


def listing(device: str) -> str:
    """Every packaged experiment with each preset's estimated cost."""
    from ..markdown import markdown_table
    from ..reproduce import list_experiments, load_experiment
    from ..reproduce.cost import estimate, human
    from ..reproduce.plan import make_plan
    rows = []
    for name in list_experiments():
        exp = load_experiment(name)
        cells = []
        for preset, unit in (("smoke", "cpu_hours"), ("mini", "cpu_hours"), ("paper", "gpu_hours")):
            if preset not in exp.presets:
                cells.append("–")
                continue
            est = estimate(make_plan(exp, preset, device=device))
            cells.append(f"{human(est[unit])}, {est['runs']} run{'s' if est['runs'] != 1 else ''}")
        rows.append([name, exp.title, *cells])
    lines = markdown_table(["experiment", "what", "smoke (CPU)", "mini (CPU)", "paper (one GPU)"], rows, "llrrr")
    lines += ["", "Estimates: FLOPs counted per model × forward passes, at 30 GFLOP/s for this 2-core CPU (measured) "
              "and 100 TFLOP/s for an H200-class GPU (assumed); an order of magnitude, not a promise.",
              "Run one: sirobust reproduce NAME --preset smoke|mini|paper [--out DIR]; --dry-run shows its runs."]
    return "\n".join(lines)


def seeds_arg(text: str) -> list:
    """``--seeds 0,1,2``: distinct integers >= 0."""
    import argparse
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if not parts or not all(x.isdigit() for x in parts):
        raise argparse.ArgumentTypeError(f"--seeds takes integers >= 0 separated by commas (0,1,2), got {text!r}")
    seeds = [int(x) for x in parts]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds: a seed is given twice in {text!r}")
    return seeds


def shard_arg(text: str) -> tuple:
    """``--shard K/N``: the K-th of N parts, 1 <= K <= N."""
    import argparse
    k, sep, n = text.partition("/")
    if not sep or not k.strip().isdigit() or not n.strip().isdigit() or not 1 <= int(k) <= int(n):
        raise argparse.ArgumentTypeError(f"--shard takes K/N with 1 <= K <= N (2/4: the second of four parts), "
                                         f"got {text!r}")
    return int(k), int(n)


def setting(text: str) -> tuple:
    """``KEY=VALUE`` with VALUE a TOML value (numbers, true/false, "text", [lists], {tables}); a bare word or
    a fraction (8/255) is taken as the command line takes it elsewhere."""
    from ..reproduce.schema import toml_module
    tomllib = toml_module()
    key, value = parse_param(text)
    raw = text.split("=", 1)[1].strip()
    try:
        return key, tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value


def register(sub) -> None:
    from ..data.registry import canonical_dataset
    from ..models import canonical_model
    from ..reproduce.schema import PRESETS
    p = sub.add_parser("reproduce", help="reproduce a table or figure of the paper (sirobust reproduce --list)",
                       description="Train and evaluate what one table or figure of the paper needs, from a "
                                   "packaged config, and write it (Markdown, CSV, LaTeX; PNG and PDF). Runs and "
                                   "evaluations that already exist in --out are reused: run the same command again "
                                   "to continue an interrupted grid.")
    p.add_argument("name", nargs="?", help="fig1, fig3, fig4, fig5, table2 ... table10, or a config file "
                                           "(.toml, .yaml)")
    p.add_argument("--list", action="store_true", help="list the experiments with each preset's estimated cost")
    p.add_argument("--preset", choices=PRESETS, default="mini",
                   help="smoke: minutes, for tests; mini: this CPU, fashion-mnist-mini and cnn-small (default); "
                        "paper: the paper's datasets, models, epochs and attacks (a GPU)")
    p.add_argument("--dry-run", action="store_true", help="show the runs and the estimated cost, run nothing")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"results folder, shared by every experiment (default {DEFAULT_OUT}); what it holds is reused")
    p.add_argument("--overwrite", action="store_true",
                   help="start from nothing: what --out holds is moved aside to a dated folder, never deleted")
    p.add_argument("--dataset", type=name_arg(canonical_dataset), help="every run on this dataset")
    p.add_argument("--model", type=name_arg(canonical_model), help="every run with this model")
    p.add_argument("--epochs", type=int_arg("--epochs", min=1), help="every run this many epochs")
    p.add_argument("--train-n", type=int_arg("--train-n", min=1), help="train on the first n training images")
    p.add_argument("--batch-size", type=int_arg("--batch-size", min=1), help="training batch size")
    p.add_argument("-n", "--num-examples", dest="n", type=int_arg("--num-examples", min=1),
                   help="test images evaluated")
    p.add_argument("--steps", type=int_arg("--steps", min=1), help="attack steps at evaluation")
    p.add_argument("--eps", type=number_arg("--eps"), help="ε in pixel units (8/255 accepted)")
    p.add_argument("--seed", type=int_arg("--seed", min=0), help="seed of every run and evaluation")
    p.add_argument("--seeds", type=seeds_arg, metavar="S,S,...",
                   help="training seeds, a grid axis (0,1,2): each cell is the mean ± sd over them, with paired "
                        "tests under the table; finished seeds are reused")
    p.add_argument("--jobs", type=int_arg("--jobs", min=1), default=1, metavar="N",
                   help="run N parts of the grid at once, each on its own GPU or its share of the CPU threads, "
                        "then write the table (default 1)")
    p.add_argument("--shard", type=shard_arg, metavar="K/N",
                   help="compute the K-th of N deterministic parts of the grid (1 <= K <= N; a SLURM array: "
                        "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=1-N); the shard that "
                        "finds every part done writes the table")
    p.add_argument("--ledger", metavar="DIR",
                   help="a folder (one you may commit) that keeps a copy of every finished evaluation of a table "
                        "with every example's outcome, under the training that made the weights it attacked; a run "
                        "one training there covers whole is not trained, so a grid continues on another machine "
                        "(figures need the weights: not used)")
    p.add_argument("--collect", action="store_true",
                   help="compute nothing: write the table (or figure) from what --out holds, naming what is missing")
    p.add_argument("--precision", choices=["auto", "fp32", "fp32-fast", "bf16"], help="arithmetic (sirobust.fastpath)")
    p.add_argument("--set", type=setting, action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any other setting, repeatable; VALUE as in a TOML config: train.lr=0.1, "
                        "eval.batch_size=512, 'train.milestones=[10, 20]', 'figure.deltas=[-0.5, 0, 0.5]'")
    p.add_argument("--model-dir", default=None,
                   help="folder of published models' files (table5: DIR/cifar10/Linf/NAME.pt, RobustBench's layout)")
    p.add_argument("--accept-unpinned", action="store_true",
                   help="table5: use a published model whose config gives no sha256 (its digest is recorded)")
    add_data_args(p)
    add_common_args(p)
    p.set_defaults(func=cmd_reproduce)
