"""``sirobust reproduce NAME``: a table or figure of the paper, from its packaged config (or yours)."""
from __future__ import annotations

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
        print(describe(a.name, a.preset, overrides, a.device))
        return 0
    reproduce(a.name, preset=a.preset, out=a.out, overrides=overrides, device=a.device,
              progress=not a.no_progress, overwrite=a.overwrite, model_dir=a.model_dir,
              accept_unpinned=a.accept_unpinned)
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
    for key, value in a.set:
        section, _, name = key.partition(".")
        if section not in out or not name:
            raise ValueError(f"--set {key}={value}: the key must be train.FIELD, eval.FIELD or figure.FIELD")
        out[section][name] = value
    return out


def describe(name: str, preset: str, overrides: dict, device: str) -> str:
    """The plan of one experiment: its runs and what it would cost."""
    from ..reproduce import load_experiment
    from ..reproduce.cost import estimate, human
    from ..reproduce.plan import make_plan
    exp = load_experiment(name)
    plan = make_plan(exp, preset, overrides, device=device)
    est = estimate(plan)
    lines = [f"{exp.name} --preset {preset}: {exp.title}", f"  {exp.presets[preset].description}",
             f"  {est['cells']} cells, {est['runs']} training runs:"]
    lines += [f"    {k}" for k in plan.runs]
    lines.append(f"  estimated cost: {est['flops']:.2g} FLOP, about {human(est['cpu_hours'])} on this CPU, "
                 f"{human(est['gpu_hours'])} on one H200-class GPU (see sirobust.reproduce.cost)")
    return "\n".join(lines)


def listing(device: str) -> str:
    """Every packaged experiment with each preset's estimated cost."""
    from ..reproduce import list_experiments, load_experiment
    from ..reproduce.cost import estimate, human
    from ..reproduce.plan import make_plan
    lines = ["| experiment | what | smoke (CPU) | mini (CPU) | paper (one GPU) |", "|---|---|---:|---:|---:|"]
    for name in list_experiments():
        exp = load_experiment(name)
        cells = []
        for preset, unit in (("smoke", "cpu_hours"), ("mini", "cpu_hours"), ("paper", "gpu_hours")):
            if preset not in exp.presets:
                cells.append("–")
                continue
            est = estimate(make_plan(exp, preset, device=device))
            cells.append(f"{human(est[unit])}, {est['runs']} run{'s' if est['runs'] != 1 else ''}")
        lines.append(f"| {name} | {exp.title} | " + " | ".join(cells) + " |")
    lines += ["", "Estimates: FLOPs counted per model × forward passes, at 30 GFLOP/s for this 2-core CPU (measured) "
              "and 100 TFLOP/s for an H200-class GPU (assumed); an order of magnitude, not a promise.",
              "Run one: sirobust reproduce NAME --preset smoke|mini|paper [--out DIR]; --dry-run shows its runs."]
    return "\n".join(lines)


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
