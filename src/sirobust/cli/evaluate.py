"""``sirobust evaluate``: robust accuracy of one model under a list of attacks, as a report."""
from __future__ import annotations

import argparse
from pathlib import Path

from .args import add_common_args, add_data_args, parse_list, parse_number

DEFAULT_REPORT = "report.json"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model to attack, the data to attack it on, and the threat model."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="a run folder from `sirobust train`")
    src.add_argument("--weights", help="a sirobust .safetensors file")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="with --model-dir: the best (by validation robust accuracy; clean for standard training) "
                        "or the last epoch's weights (default best)")
    p.add_argument("--dataset", default=None, help="default: the dataset recorded in the weights")
    p.add_argument("--split", default="test", choices=["test", "train", "val"],
                   help="test (default), train, or val: the run's own held-out validation split")
    add_data_args(p)
    p.add_argument("--eps", type=parse_number, default=None,
                   help="ε (accepts 8/255); default per dataset: 0.1 fashion-mnist, 0.3 mnist, 8/255 cifar/svhn")
    p.add_argument("--steps", type=int, default=20, help="attack steps (default 20)")
    p.add_argument("--alpha", type=parse_number, default=None, help="step size (default ε/4)")
    p.add_argument("--restarts", type=int, default=1, help="random restarts; robust only if all fail (default 1)")
    p.add_argument("--norm", choices=["Linf", "L2"], default="Linf", help="threat model (default Linf)")
    p.add_argument("--n", type=int, default=None, help="evaluate the first n examples (default all)")
    p.add_argument("--batch-size", type=int, default=256, help="(default 256)")
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    add_common_args(p)


def load_model_and_data(a):
    from ..checkpoint import BEST_NAME_ALIASES, load
    from ..data import get_dataset_info, load_dataset, train_val_split
    from ..io import read_json
    from ..train import pick_device

    device = pick_device(a.device)
    path = Path(a.weights) if a.weights else Path(a.model_dir) / BEST_NAME_ALIASES[a.checkpoint]
    if a.model_dir and not path.exists():  # a run without validation has only the last weights
        path = Path(a.model_dir) / BEST_NAME_ALIASES["last"]
    model = load(path, device=device)
    dataset = a.dataset or model.sirobust_metadata.get("dataset") or None
    if not dataset:
        raise ValueError("--dataset is needed (the weights do not record one)")
    info = get_dataset_info(dataset)
    if a.split == "val":  # the run's own held-out split, as recorded in its config.json
        run_cfg = Path(a.model_dir or Path(a.weights).parent) / "config.json"
        if not run_cfg.exists():
            raise ValueError(f"--split val needs the run's config.json (its recorded validation split); "
                             f"none at {run_cfg}: use --model-dir with the run folder")
        saved = read_json(run_cfg)["config"]
        full = load_dataset(dataset, "train", data_dir=a.data_dir, accept_checksum_mismatch=a.accept_checksum_mismatch)
        _, ds, idx = train_val_split(full, saved["val_size"], seed=saved["seed"])
    else:
        ds = load_dataset(dataset, a.split, data_dir=a.data_dir, accept_checksum_mismatch=a.accept_checksum_mismatch)
        idx = None
    eps = info.default_eps if a.eps is None else a.eps
    return model, ds, idx, eps, device, str(path)


def report_path(a) -> Path:
    """Where the report goes, checked before any work: an existing report is replaced only with --overwrite."""
    from ..io import check_output_file
    from ..runfolder import fresh_name
    if a.out is None:
        out = fresh_name(DEFAULT_REPORT)
    else:
        out = Path(a.out)
        if out.is_dir():
            check_output_file(out, "the report")  # "it is a folder": one message for every command
        if out.suffix != ".json":
            raise ValueError(f"--out must name a .json file (the Markdown table goes beside it), got {out}")
        if not a.overwrite and out.exists():
            raise ValueError(f"--out {out} already holds a report; pass --overwrite to replace it, or choose "
                             "another name")
    check_output_file(out, "the report")
    check_output_file(out.with_suffix(".md"), "the report")
    return out


def cmd_evaluate(a) -> int:
    from ..evaluate import evaluate
    out = report_path(a)
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
    report.save(out)
    print(f"report: {out} and {out.with_suffix('.md')}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="clean and robust accuracy under attacks, worst case, JSON + Markdown report")
    add_model_args(p)
    p.add_argument("--attacks", default="pgd,pgd-cw,pgd-dlr,si-pgd",
                   help="comma-separated attack names (default pgd,pgd-cw,pgd-dlr,si-pgd)")
    p.add_argument("--out", default=None, help=f"report file (default {DEFAULT_REPORT}; when that exists, the first "
                                               "free report-2.json, report-3.json, ...); a .md table goes beside it")
    p.add_argument("--overwrite", action="store_true", help="replace the report --out names if it exists")
    p.set_defaults(func=cmd_evaluate)
