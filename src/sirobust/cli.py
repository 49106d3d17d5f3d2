"""Command line: ``sirobust {demo,train,evaluate,rescale,list}``. Names become objects here and nowhere deeper."""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence


def parse_number(text: str) -> float:
    """A float or a fraction such as ``8/255`` (never eval'd)."""
    try:
        return float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.03 or 8/255, got {text!r}") from None


def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_numbers(text: str) -> list[float]:
    return [parse_number(t) for t in parse_list(text)]


def parse_param(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE a number (``8/255`` allowed) or a word."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. lam=6 or pairing=l2), got {text!r}")
    key, value = (t.strip() for t in text.split("=", 1))
    try:
        num = parse_number(value)
        return key, int(num) if num.is_integer() and "." not in value and "/" not in value else num
    except argparse.ArgumentTypeError:
        return key, value


def _choices_type(valid: Sequence[str], what: str):
    def check(text: str) -> str:
        if text not in valid:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; valid: {', '.join(valid)}")
        return text
    return check


# ------------------------------------------------------------------------------ train
def add_train_args(p: argparse.ArgumentParser) -> None:
    from .data import list_datasets
    from .defenses import list_defenses
    from .models import list_models

    p.add_argument("--dataset", type=_choices_type(list_datasets(), "dataset"), default="fashion-mnist-mini",
                   help=f"one of {', '.join(list_datasets())} (default fashion-mnist-mini)")
    p.add_argument("--model", type=_choices_type(list_models(), "model"), default="cnn-small",
                   help=f"one of {', '.join(list_models())} (default cnn-small)")
    p.add_argument("--defense", type=_choices_type(list_defenses(), "defense"), default="standard",
                   help=f"one of {', '.join(list_defenses())} (default standard)")
    p.add_argument("--defense-param", type=parse_param, action="append", default=[], metavar="KEY=VALUE",
                   help="a defense's own parameter, repeatable: lam=6 (trades, mart, he, alp), alpha=0.5 and "
                        "pairing=mse|l2 (alp), scale=15 and margin=0.2 (he)")
    p.add_argument("--si", action="store_true", help="add the SI mechanism: SI-PGD inner attack + β·CosFace term (paper Sec. 4.3)")
    p.add_argument("--si-scale", type=float, default=15.0, help="s (default 15)")
    p.add_argument("--si-margin", type=float, default=0.2, help="m (default 0.2)")
    p.add_argument("--si-weight", type=float, default=0.2, help="β (default 0.2)")
    p.add_argument("--epochs", type=int, default=None, help="default: the schedule preset's (120 ResNet, 90 WRN, 30 cnn-small)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="default: preset (0.01 ResNet, 0.1 WRN, 0.05 cnn-small)")
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--milestones", type=lambda s: tuple(int(v) for v in parse_list(s)), default=None,
                   help="comma-separated epochs where lr is divided by 10 (default: preset, rescaled to --epochs)")
    p.add_argument("--schedule", choices=["resnet", "wideresnet", "small"], default=None)
    p.add_argument("--eps", type=parse_number, default=None, help="training ε, e.g. 8/255 (default: the dataset's)")
    p.add_argument("--attack-steps", type=int, default=10, help="inner PGD steps (default 10)")
    p.add_argument("--attack-alpha", type=parse_number, default=None, help="inner PGD step (default ε/4)")
    p.add_argument("--attack-mode", choices=["eval", "train"], default="eval",
                   help="model mode while making training examples (default eval, as TRADES)")
    p.add_argument("--norm", choices=["Linf", "L2"], default="Linf")
    p.add_argument("--augment", choices=["none", "crop", "flip", "crop-flip"], default=None)
    p.add_argument("--val-size", type=lambda t: int(t) if t.strip().isdigit() else float(t), default=0.1,
                   help="held-out share (0.1) or count (500) of the training set")
    p.add_argument("--val-n", type=int, default=1000, help="validation examples evaluated per epoch")
    p.add_argument("--train-n", type=int, default=None, help="train on the first n training examples only (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/train", help="run folder (metrics.jsonl, model.safetensors, best.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last complete epoch")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tensorboard", action="store_true", help="also log per-epoch metrics to OUT/tensorboard")


def train_config_from_args(a) -> "TrainConfig":
    from .train import TrainConfig
    return TrainConfig(dataset=a.dataset, model=a.model, defense=a.defense, out=a.out, epochs=a.epochs,
                       batch_size=a.batch_size, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
                       milestones=a.milestones, schedule=a.schedule, eps=a.eps, attack_alpha=a.attack_alpha,
                       attack_steps=a.attack_steps, attack_mode=a.attack_mode, norm=a.norm, si=a.si,
                       si_scale=a.si_scale, si_margin=a.si_margin, si_weight=a.si_weight, augment=a.augment,
                       val_size=a.val_size, val_n=a.val_n, train_n=a.train_n, seed=a.seed, data_dir=a.data_dir, device=a.device,
                       progress=not a.no_progress, tensorboard=a.tensorboard, defense_params=dict(a.defense_param))


def cmd_train(a) -> int:
    from .train import fit
    summary = fit(train_config_from_args(a), resume=a.resume)
    metric = summary["best"]["metric"].replace("val_", "validation ").replace("_acc", " accuracy").replace("_", " ")
    print(f"weights: {summary['weights']} (last epoch); best by {metric}: {summary['best_weights']} "
          f"(epoch {summary['best']['epoch']})")
    return 0


# --------------------------------------------------------------------------- evaluate
def add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="a run folder from `sirobust train`")
    src.add_argument("--weights", help="a sirobust .safetensors file")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="with --model-dir: the best (by validation robust accuracy; clean for standard training) or the last epoch's weights")
    p.add_argument("--dataset", default=None, help="default: the dataset recorded in the weights")
    p.add_argument("--split", default="test", choices=["test", "train", "val"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--eps", type=parse_number, default=None,
                   help="ε (accepts 8/255); default per dataset: 0.1 fashion-mnist, 0.3 mnist, 8/255 cifar/svhn")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--alpha", type=parse_number, default=None, help="step size (default ε/4)")
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--norm", choices=["Linf", "L2"], default="Linf")
    p.add_argument("--n", type=int, default=None, help="evaluate the first n examples (default all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")


def load_model_and_data(a):
    from .checkpoint import BEST_NAME_ALIASES, load
    from .data import get_dataset_info, load_dataset, train_val_split
    from .train import pick_device

    device = pick_device(a.device)
    path = Path(a.weights) if a.weights else Path(a.model_dir) / BEST_NAME_ALIASES[a.checkpoint]
    if a.model_dir and not path.exists():  # a run without validation has only the last weights
        path = Path(a.model_dir) / BEST_NAME_ALIASES["last"]
    model = load(path, device=device)
    dataset = a.dataset or model.sirobust_metadata.get("dataset") or None
    if not dataset:
        raise SystemExit("error: --dataset is needed (the weights do not record one)")
    info = get_dataset_info(dataset)
    split = a.split
    if split == "val":  # the run's own held-out split, as recorded in its config.json
        full = load_dataset(dataset, "train", data_dir=a.data_dir)
        run_cfg = Path(a.model_dir or Path(a.weights).parent) / "config.json"
        if not run_cfg.exists():
            raise ValueError(f"--split val needs the run's config.json (its recorded validation split); "
                             f"none at {run_cfg}: use --model-dir with the run folder")
        saved = json.loads(run_cfg.read_text())["config"]
        _, ds, idx = train_val_split(full, saved["val_size"], seed=saved["seed"])
    else:
        ds = load_dataset(dataset, split, data_dir=a.data_dir)
        idx = None
    eps = info.default_eps if a.eps is None else a.eps
    return model, ds, idx, eps, device, str(path)


def cmd_evaluate(a) -> int:
    from .evaluate import evaluate
    model, ds, idx, eps, device, path = load_model_and_data(a)
    report = evaluate(model, ds, attacks=parse_list(a.attacks), eps=eps, steps=a.steps, alpha=a.alpha,
                      restarts=a.restarts, norm=a.norm, n=a.n, batch_size=a.batch_size, seed=a.seed, device=device,
                      progress=not a.no_progress, indices=None if idx is None else idx.tolist(),
                      config={"weights": path, "dataset": ds.name, "split": a.split,
                              "model_description": model.sirobust_metadata.get("model")})
    print(report.table())
    for f in report.flags:
        if f["triggered"]:
            print(f"warning [{f['name']}]: {f['message']}")
    report.save(a.out)
    print(f"report: {a.out} and {Path(a.out).with_suffix('.md')}")
    return 0


def cmd_rescale(a) -> int:
    from .experiments import rescale
    model, ds, idx, eps, device, path = load_model_and_data(a)
    alphas = a.alphas if a.alphas else rescale.log_grid(a.alpha_min, a.alpha_max, a.points)
    result = rescale.rescale_study(model, ds, alphas, attacks=parse_list(a.attacks), eps=eps, steps=a.steps,
                                   alpha=a.alpha, restarts=a.restarts, norm=a.norm, n=a.n, batch_size=a.batch_size,
                                   seed=a.seed, device=device, progress=not a.no_progress,
                                   config={"weights": path, "dataset": ds.name, "split": a.split})
    print(rescale.format_table(result))
    out = Path(a.out)
    rescale.save(result, out / "rescale.json", out / "rescale.png")
    print(f"results: {out / 'rescale.json'}, plot: {out / 'rescale.png'}")
    return 0


def cmd_compare(a) -> int:
    from .experiments.compare import compare_defenses
    si_modes = {"both": (False, True), "on": (True,), "off": (False,)}[a.si]
    compare_defenses(a.dataset, a.model, parse_list(a.defenses), si_modes=si_modes, epochs=a.epochs, out=a.out,
                     eval_n=a.n, steps=a.steps, eps=a.eps, device=a.device, seed=a.seed,
                     progress=not a.no_progress, which=a.checkpoint,
                     train_kw={"train_n": a.train_n} if a.train_n else None)
    return 0


def cmd_list(a) -> int:
    from .attacks import list_attacks
    from .data import list_datasets
    from .defenses import list_defenses
    from .losses import list_losses
    from .models import list_models
    for what, names in [("datasets", list_datasets()), ("models", list_models()), ("attacks", list_attacks()),
                        ("losses", list_losses()), ("defenses", list_defenses())]:
        print(f"{what}: {', '.join(names)}")
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo
    run_demo(out=a.out, quick=a.quick, device=a.device, progress=not a.no_progress)
    return 0


# ------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="sirobust", description="Scale-invariant adversarial attacks and defenses.")
    parser.add_argument("--version", action="version", version=f"sirobust {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train a robust model on the bundled data, attack it, run the rescaling study")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (for smoke tests)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a model with a defense (standard, at, ...; --si adds SI)")
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="clean and robust accuracy under attacks, worst case, JSON + Markdown report")
    add_model_args(p)
    p.add_argument("--attacks", default="pgd,pgd-cw,pgd-dlr,si-pgd", help="comma-separated attack names")
    p.add_argument("--out", default="report.json")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("rescale", help="the logit-rescaling study (paper Fig. 1): accuracy of α·model vs α")
    add_model_args(p)
    p.add_argument("--attacks", default="pgd,si-pgd")
    p.add_argument("--alphas", type=parse_numbers, default=None, help="comma-separated α values (default: log grid)")
    p.add_argument("--alpha-min", type=float, default=1e-3)
    p.add_argument("--alpha-max", type=float, default=1e3)
    p.add_argument("--points", type=int, default=7)
    p.add_argument("--out", default="runs/rescale")
    p.set_defaults(func=cmd_rescale)

    p = sub.add_parser("compare", help="train several defenses with and without SI and compare them in one table")
    from .data import list_datasets
    from .defenses import list_defenses
    from .models import list_models
    p.add_argument("--dataset", type=_choices_type(list_datasets(), "dataset"), default="fashion-mnist-mini")
    p.add_argument("--model", type=_choices_type(list_models(), "model"), default="cnn-small")
    p.add_argument("--defenses", default="standard,at,trades,alp,mart,he",
                   help=f"comma-separated, from {', '.join(list_defenses())}")
    p.add_argument("--si", choices=["both", "on", "off"], default="both", help="train each defense with/without SI")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-n", type=int, default=None)
    p.add_argument("--eps", type=parse_number, default=None)
    p.add_argument("--steps", type=int, default=20, help="attack steps at evaluation")
    p.add_argument("--n", type=int, default=1000, help="test images evaluated")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("list", help="list datasets, models, attacks, losses and defenses")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import ChecksumError, DataNotFoundError
    from .features import FeatureAccessError
    from .train import ResumeMismatch, TrainingDiverged
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, CheckpointError, DataNotFoundError, ChecksumError,
            FeatureAccessError, ResumeMismatch, TrainingDiverged, pickle.UnpicklingError) as e:
        if isinstance(e, TypeError) and not str(e):
            raise
        print(f"sirobust {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
