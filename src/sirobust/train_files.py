"""The files a training run writes besides its resume state: config.json, metrics.jsonl (one row per
epoch, also to TensorBoard), the last and the best weights, and summary.json with the run's provenance.

Rank 0 writes them all; under torchrun the other processes only compute.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .checkpoint import BEST_NAME, USER_MODEL_PREFIX, WEIGHTS_NAME, save_model, save_user_model
from .defenses import Defense
from .io import append_jsonl, atomic_write_text, file_sha256, read_jsonl, write_json
from .provenance import environment_info, precision_of
from .runfolder import RunFolder, command_line, utc_now
from .train_config import TrainConfig

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
SUMMARY_NAME = "summary.json"


def prepare_folder(cfg: TrainConfig, out: Path, fresh: bool, validated: bool, val_idx: torch.Tensor,
                   defense: Defense, start_epoch: int, processes: int) -> None:
    """The metrics of the epochs kept, no stale output of a stopped attempt, and the run's config.json."""
    metrics_path = out / METRICS_NAME
    rows = [r for r in read_jsonl(metrics_path) if r.get("epoch", 0) <= start_epoch] if metrics_path.exists() \
        else []
    atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
    if fresh:  # a fresh start: nothing from a stopped attempt may be mistaken for this run's output
        for stale in (SUMMARY_NAME, BEST_NAME, WEIGHTS_NAME):
            (out / stale).unlink(missing_ok=True)
    if not validated:  # no model selection: a best.safetensors here could only mislead
        (out / BEST_NAME).unlink(missing_ok=True)
    write_json(out / CONFIG_NAME, {"config": dataclasses.asdict(cfg), "defense": defense.describe(),
                                   "val_indices": val_idx, "environment": environment_info(),
                                   "processes": processes, "data_sha256": data_sha256(cfg)})


def data_sha256(cfg: TrainConfig) -> Optional[str]:
    """The digest of a dataset registered in this process (register_dataset), None for a built-in one."""
    from .data import get_dataset_info
    return get_dataset_info(cfg.dataset).data_sha256


def check_same_data(cfg: TrainConfig, out: Path) -> None:
    """A resumed run on a registered dataset continues on the data it was trained on: the name alone does not
    say so (another process may register other images under it)."""
    path = out / CONFIG_NAME
    recorded = json.loads(path.read_text()).get("data_sha256") if path.exists() else None
    now = data_sha256(cfg)
    if recorded and now and recorded != now:
        from .train_config import ResumeMismatch
        raise ResumeMismatch(f"--resume: the dataset {cfg.dataset!r} registered in this process holds other images "
                             f"or labels than the run in {out} was trained on (sha256 {now[:12]}…, the run's "
                             f"{recorded[:12]}…): register the same data under that name, or --overwrite to start "
                             "again")


def tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'sirobust[tensorboard]'") from None
    return SummaryWriter(str(out / "tensorboard"))


def record_epoch(row: dict, out: Path, tb, main: bool) -> None:
    """One epoch's row into metrics.jsonl (rank 0) and TensorBoard (when asked for)."""
    if main:
        append_jsonl(out / METRICS_NAME, row)
    if tb is not None:
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)):
                tb.add_scalar(k, v, row["epoch"])
        tb.flush()


def save_weights(cfg: TrainConfig, out: Path, model: nn.Module, defense: Defense, best: dict, val: dict,
                 collapsed: bool, epoch: int, main: bool) -> dict:
    """The epoch's weights (weights.safetensors) and, when it beats ``best`` on the held-out split,
    best.safetensors; returns the best epoch so far."""
    # Wong et al.'s early stop keeps the weights from before a collapse as the run's result: the collapsed
    # epoch's weights are not saved over the previous epoch's (with or without a validation split)
    if main and not (collapsed and cfg.early_stop):
        _save(model, out / WEIGHTS_NAME, model_name=cfg.model, dataset=cfg.dataset,
              extra={"epoch": epoch + 1, "defense": defense.describe()})
    select = best["metric"]
    if val and val[select] > best[select] and not collapsed:
        best = {"epoch": epoch + 1, "metric": select, "val_robust_acc": val["val_robust_acc"],
                "val_clean_acc": val["val_clean_acc"]}
        if main:
            _save(model, out / BEST_NAME, model_name=cfg.model, dataset=cfg.dataset,
                  extra={"epoch": epoch + 1, "defense": defense.describe(), "best": best})
    return best


def _save(model: nn.Module, path: Path, *, model_name: str, **kw) -> None:
    """A zoo model with what rebuilds it; a model of the user's own (``user:Name``) as its state dict."""
    (save_user_model if model_name.startswith(USER_MODEL_PREFIX) else save_model)(model, path, model_name=model_name,
                                                                                  **kw)


def write_summary(cfg: TrainConfig, folder: RunFolder, device, model: nn.Module, fast, best: dict,
                  stopped: Optional[str], validated: bool, processes: int) -> dict:
    """summary.json: the run's result (the epoch its weights are from, the best one) and its provenance."""
    out = folder.path
    rows = read_jsonl(out / METRICS_NAME)
    env = environment_info()
    weights = {name: file_sha256(out / name) for name in (WEIGHTS_NAME, BEST_NAME) if (out / name).exists()}
    summary = {"out": str(out), "epochs": cfg.epochs, "identity": cfg.identity(), "best": best,
               "stopped_early": stopped,
               # the epoch whose weights weights.safetensors holds (the one before the collapse, after an early stop)
               "last": (rows[-2] if stopped and len(rows) > 1 else rows[-1]) if rows else None,
               "weights": str(out / WEIGHTS_NAME),
               "best_weights": str(out / BEST_NAME) if validated else None,
               "provenance": {"run_id": folder.record.get("run_id"), "weights_sha256": weights,
                              "command": folder.record.get("command"), "resumed_by": command_line() if getattr(folder, "resumed", False) else None,
                              "started": folder.record.get("created"), "finished": utc_now(), "device": str(device),
                              "precision": precision_of(model), "fast_path": fast.describe(),
                              "processes": processes, "data_sha256": data_sha256(cfg),
                              "cpu": env["cpu"], "threads": env["threads"],
                              "sirobust": env["sirobust"], "torch": env["torch"],
                              "python": env["python"], "git_commit": env["git_commit"]}}
    write_json(out / SUMMARY_NAME, summary)
    return summary
