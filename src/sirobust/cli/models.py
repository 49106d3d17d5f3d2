"""Where the model to attack comes from (evaluate, rescale): a run folder, a sirobust weights file,
your own definition with its weights, or a TorchScript archive; and the data it is attacked on."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .args import add_common_args, add_data_args, add_threat_args, int_arg, name_arg, parse_numbers, parse_param


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model, the data and the threat model, shared by evaluate and rescale."""
    from ..data.registry import canonical_dataset
    src = p.add_argument_group("the model (exactly one of --model-dir, --weights, --model-def, --model, --robustbench)")
    src.add_argument("--model-dir", help="a run folder from `sirobust train`; with --robustbench, the folder of "
                                         "RobustBench's files (default ./models)")
    src.add_argument("--weights", help="a sirobust .safetensors file; with --model-def, your weights (.safetensors or "
                                       "a torch.save state dict, loaded weights-only)")
    src.add_argument("--model-def", metavar="FILE.py:FACTORY",
                     help="your model: FACTORY(**model args) in FILE.py returns an nn.Module taking [0, 1] pixels")
    src.add_argument("--model-arg", type=parse_param, action="append", default=[], metavar="KEY=VALUE",
                     help="an argument of the factory, repeatable (e.g. num_classes=10)")
    src.add_argument("--model", dest="torchscript", metavar="FILE", help="a TorchScript archive (torch.jit.save)")
    src.add_argument("--mean", type=parse_numbers, default=None,
                     help="per-channel mean your model expects its inputs normalised with (with --std); neither: "
                          "the model is given [0, 1] pixels")
    src.add_argument("--std", type=parse_numbers, default=None, help="per-channel std (with --mean)")
    src.add_argument("--robustbench", metavar="NAME",
                     help="a published model by its RobustBench name (e.g. Carmon2019Unlabeled): the file "
                          "MODEL_DIR/DATASET/THREAT_MODEL/NAME.pt in RobustBench's layout, downloaded through the "
                          "robustbench package when missing, read weights-only into RobustBench's architecture")
    src.add_argument("--robustbench-dataset", default=None, metavar="DATASET",
                     help="with --robustbench: RobustBench's dataset (cifar10, cifar100, imagenet; default --dataset, "
                          "else cifar10)")
    src.add_argument("--threat-model", default=None, metavar="THREAT",
                     help="with --robustbench: RobustBench's threat model (Linf (default), L2, corruptions)")
    src.add_argument("--head", default=None,
                     help="name of the final linear layer for SI attacks (default: the last nn.Linear)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="with --model-dir: the best (by validation robust accuracy; clean for standard training) "
                        "or the last epoch's weights (default best)")
    p.add_argument("--dataset", type=name_arg(canonical_dataset), default=None,
                   help="default: the dataset recorded in sirobust weights (required for your own model)")
    p.add_argument("--split", default="test", choices=["test", "train", "val"],
                   help="test (default), train, or val: the run's own held-out validation split")
    add_data_args(p)
    add_threat_args(p, 20, "attack steps")
    p.add_argument("--restarts", type=int_arg("--restarts", min=1), default=1,
                   help="random restarts; an example is robust only if it survives all (default 1)")
    p.add_argument("-n", "--num-examples", dest="n", type=int_arg("--num-examples", min=1), default=None,
                   help="evaluate the first n examples (default all)")
    p.add_argument("--batch-size", type=int_arg("--batch-size", min=1), default=256, help="(default 256)")
    p.add_argument("--seed", type=int_arg("--seed", min=0), default=0, help="(default 0)")
    add_common_args(p)


@dataclass
class Source:
    """Which model, from where, with what it records (cheap to build: no weights are read)."""

    kind: str                   # run, weights, definition, torchscript, robustbench
    path: Optional[Path]
    dataset: Optional[str]      # what the weights record, or --dataset
    published: Optional[object] = None  # with --robustbench: its sirobust.foreign.published.PublishedModel


def resolve_source(a) -> Source:
    """Check the model flags together and find the dataset, before anything heavy is loaded."""
    from ..checkpoint import read_metadata, resolve_weights_path
    if getattr(a, "robustbench", None):
        return _robustbench_source(a)
    if getattr(a, "robustbench_dataset", None) or getattr(a, "threat_model", None):
        raise ValueError("--robustbench-dataset and --threat-model go with --robustbench NAME")
    given = [f for f, v in (("--model-dir", a.model_dir), ("--model-def", a.model_def), ("--model", a.torchscript))
             if v]
    if a.weights and not a.model_def:
        given.append("--weights")
    if len(given) != 1:
        raise ValueError("give exactly one model: --model-dir DIR, --weights FILE.safetensors, --model-def "
                         f"FILE.py:FACTORY [--weights FILE], or --model FILE.ts (got {', '.join(given) or 'none'})")
    if (a.mean is not None or a.std is not None) and not (a.model_def or a.torchscript):
        raise ValueError("--mean/--std apply to your own model (--model-def, --model); sirobust models carry theirs")
    if a.model_arg and not a.model_def:
        raise ValueError("--model-arg goes with --model-def")
    if a.model_dir:
        if Path(a.model_dir).is_file():
            raise ValueError(f"--model-dir takes a run folder; {a.model_dir} is a file: give it with --weights")
        path, kind = resolve_weights_path(a.model_dir, a.checkpoint), "run"  # as sirobust.load(folder) resolves it
    elif a.model_def:
        path, kind = (Path(a.weights) if a.weights else None), "definition"
    elif a.torchscript:
        path, kind = Path(a.torchscript), "torchscript"
    else:
        path, kind = Path(a.weights), "weights"
    meta = read_metadata(path) if kind in ("run", "weights") else {}
    recorded = meta.get("dataset") or None
    dataset = a.dataset or recorded
    if not dataset:
        raise ValueError("--dataset is needed: the model records none (e.g. --dataset cifar10)")
    if a.dataset and meta:
        _check_dataset_fits(a.dataset, meta, path)
    return Source(kind, path, dataset)


def _check_dataset_fits(dataset: str, meta: dict, path: Path) -> None:
    """A --dataset whose images or classes the sirobust model cannot take is refused before any data is read
    (or downloaded): its channels and classes against those the weights record."""
    from ..data import get_dataset_info
    info = get_dataset_info(dataset)
    wants = {"channels": meta.get("in_channels"), "classes": meta.get("num_classes")}
    has = {"channels": str(info.in_channels), "classes": str(info.num_classes)}
    wrong = [k for k in wants if wants[k] is not None and wants[k] != has[k]]
    if wrong:
        said = f" (trained on {meta['dataset']})" if meta.get("dataset") else ""
        raise ValueError(f"--dataset {dataset}: its images have {has['channels']} channel(s) and "
                         f"{has['classes']} classes, the model in {path}{said} takes {wants['channels']} and "
                         f"{wants['classes']}; choose a dataset of that shape")


def _robustbench_source(a) -> Source:
    """--robustbench NAME: a published model in RobustBench's layout under --model-dir (default ./models)."""
    from ..data.registry import canonical_dataset
    from ..foreign.published import DEFAULT_MODEL_DIR, PublishedModel, weights_path
    others = [f for f, v in (("--model-def", a.model_def), ("--weights", a.weights), ("--model", a.torchscript)) if v]
    if others:
        raise ValueError(f"give exactly one model: --robustbench NAME cannot go with {', '.join(others)} "
                         "(--model-dir, with --robustbench, is the folder of RobustBench's files)")
    if a.mean is not None or a.std is not None:
        raise ValueError("--mean/--std apply to your own model (--model-def, --model); RobustBench's models "
                         "normalise their inputs themselves")
    if a.model_arg:
        raise ValueError("--model-arg goes with --model-def")
    try:
        spec = PublishedModel(name=a.robustbench, robustbench=a.robustbench, threat_model=a.threat_model or "Linf",
                              dataset=a.robustbench_dataset or a.dataset or "cifar10")
    except ValueError as e:  # a name that cannot be part of a path: say it with the flag's name
        detail = getattr(e, "detail", str(e))
        for key, flag in (("'name'", "--robustbench"), ("'dataset'", "--robustbench-dataset"),
                          ("'threat_model'", "--threat-model")):
            detail = detail.replace(f"key {key}", flag)
        raise ValueError(detail) from None
    dataset = a.dataset or canonical_dataset(spec.dataset)
    return Source("robustbench", weights_path(spec, a.model_dir or DEFAULT_MODEL_DIR), dataset, spec)


def load_model(a, source: Source, device):
    """(model on ``device`` in eval mode, provenance fields)."""
    from ..checkpoint import load
    from ..foreign import build_user_model, load_torchscript
    if source.kind in ("run", "weights"):
        model = load(source.path, device=device)
        return model, {}
    if source.kind == "robustbench":
        from ..foreign.published import DEFAULT_MODEL_DIR, load_published
        return load_published(source.published, a.model_dir or DEFAULT_MODEL_DIR, device=device)
    if source.kind == "definition":
        model, prov = build_user_model(a.model_def, a.weights, dict(a.model_arg), a.mean, a.std)
        return model.to(device), prov
    model, prov = load_torchscript(source.path, a.mean, a.std, device=device)
    return model.to(device), prov


def load_data(a, source: Source):
    """(dataset, indices in the source split or None)."""
    from ..data import load_dataset, train_val_split
    from ..io import read_json
    kw = dict(data_dir=a.data_dir, accept_checksum_mismatch=a.accept_checksum_mismatch)
    if a.split != "val":
        return load_dataset(source.dataset, a.split, **kw), None
    if source.kind != "run":
        raise ValueError("--split val is the held-out split of a training run: use it with --model-dir")
    run_cfg = Path(a.model_dir) / "config.json"
    if not run_cfg.exists():
        raise ValueError(f"--split val needs the run's config.json (its recorded validation split); none at {run_cfg}")
    saved = read_json(run_cfg)
    saved = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(saved, dict) or not isinstance(saved.get("val_size"), (int, float)) \
            or not isinstance(saved.get("seed"), int):
        raise ValueError(f"--split val: {run_cfg} records no validation split (it needs config.val_size and "
                         "config.seed, as sirobust train writes them); the file is damaged or not a run's")
    _, ds, idx = train_val_split(load_dataset(source.dataset, "train", **kw), saved["val_size"], seed=saved["seed"])
    return ds, idx


def threat_settings(a, source: Source) -> tuple[float, str]:
    """(ε, norm) after every check: the dataset's ε by default, --eps in range, the step size legal."""
    from ..data import get_dataset_info
    from .args import check_threat
    norm = a.norm or "Linf"
    eps = get_dataset_info(source.dataset).eps_for(norm) if a.eps is None else a.eps
    check_threat(a, eps, norm)
    return eps, norm
