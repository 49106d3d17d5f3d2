"""The training checkpoint, train_state.pt: what a run saves after each epoch (or inside one, on a stop
signal) and how ``--resume`` reads, checks and restores it.

It holds the weights, the optimiser, the defense's own state (FreeAT's δ), every RNG stream of every
process, the epoch, the best checkpoint so far and the position inside an interrupted epoch, so that N
epochs straight and k epochs + ``--resume`` give the same weights.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ._version import __version__
from .data import BatchLoader
from .defenses import Defense
from .distributed import Group
from .rng import rng_state, set_rng_state
from .runfolder import RUN_FILE, RunFolder, RunFolderError, config_difference
from .statefile import StateFileError, load_state, save_state
from .train_config import NEWER_FIELDS, ResumeMismatch, TrainConfig, check_resumable, resume_mismatch

STATE_NAME = "train_state.pt"
_KEYS = ("model", "optimizer", "scheduler", "rng", "epoch", "best")


def _cpu(tree):
    """Every tensor of a (nested) dict on the CPU: what is sent between processes or saved."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    return tree


def load_resume_state(cfg: TrainConfig, folder: RunFolder, log) -> Optional[dict]:
    """The run's saved state, checked against this folder's run id and the config's identity; None if
    the run stopped before its first save."""
    run_id = folder.record.get("run_id")
    identity = json.loads(json.dumps(cfg.identity()))

    def check(state: dict, path: Path) -> None:
        for key in _KEYS:
            if key not in state:
                raise StateFileError(f"{path} is not a sirobust training state (no {key!r})")
        if run_id and state.get("run_id") and state["run_id"] != run_id:
            raise StateFileError(f"{path} belongs to another run (run id {state['run_id']}, this folder's is "
                                 f"{run_id})")
        if "identity" in state:
            older = {k: v for k, v in NEWER_FIELDS.items() if k in identity}  # fields a state may predate
            diff = config_difference({**older, **json.loads(state["identity"])}, identity)
            if diff and not (folder.path / RUN_FILE).exists():  # the record --resume takes the settings from
                raise ResumeMismatch(f"--resume: {folder.path / RUN_FILE} is missing, so the run's settings cannot "
                                     f"be read from it, and the flags given differ from those its state records "
                                     f"(in: {', '.join(diff)}); give the flags the run started with, put run.json "
                                     "back, or --overwrite to start again")
            if diff:
                raise resume_mismatch(path, diff)

    # read on the CPU: RNG states must stay CPU byte tensors, and under torchrun the state is sent to the other
    # processes, each of which moves what it needs to its own device
    found = load_state(folder.path / STATE_NAME, device="cpu", log=log, check=check)
    return None if found is None else found[0]


def resume_state(cfg: TrainConfig, folder: RunFolder, log, group: Group) -> Optional[dict]:
    """The state to continue from (None: a fresh start), checked against the recorded config."""
    if not folder.resumed:
        return None
    out = folder.path
    check_resumable(cfg, folder)
    # rank 0 reads (and checks) the state; every process continues from it
    state = group.first(load_resume_state, cfg, folder, log)
    if state is not None and int(state.get("world_size", 1)) != group.world:
        raise ResumeMismatch(f"--resume: the run in {out} was trained by {state.get('world_size', 1)} "
                             f"process(es), this is {group.world}: each process's random streams and batch "
                             "slices are part of the run; resume it with the same number of processes")
    if state is None and folder.record.get("legacy"):
        raise RunFolderError(f"--resume: {out} holds no training checkpoint ({STATE_NAME}) to continue from")
    if state is None:
        log(f"{out} has no checkpoint yet (stopped before its first epoch ended): starting over with its "
            "recorded config")
    return state


def save_train_state(out: Path, cfg: TrainConfig, folder: RunFolder, model: nn.Module, opt, defense: Defense,
                     gen: torch.Generator, device: torch.device, group: Group, epoch_done: int,
                     partial: Optional[dict], best: dict, stopped_early: Optional[str]) -> None:
    """Write the state after ``epoch_done`` epochs (and ``partial``: the progress inside the next one)."""
    # every process's random streams and defense state (FreeAT's δ is per slice), written by rank 0
    # and batch-norm statistics: each process updates them from its own slice between DDP's broadcasts
    ranks = group.gather({"rng": _cpu(rng_state(gen, device)), "defense": _cpu(defense.state_dict()),
                          "buffers": {k: v.cpu() for k, v in model.named_buffers()}} if group.enabled else None)
    if not group.main:
        return
    save_state(out / STATE_NAME, {
        # "scheduler": the learning rate is a function of the position (learning_rate); kept for old readers
        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": {},
        "defense": defense.state_dict(), "stopped_early": stopped_early,
        "rng": rng_state(gen, device), "epoch": epoch_done, "best": json.dumps(best), "partial": partial,
        "identity": json.dumps(cfg.identity()), "run_id": folder.record.get("run_id"), "version": __version__,
        "world_size": group.world, "ranks": ranks if group.enabled else None})


def restore_train_state(state: dict, model: nn.Module, opt, defense: Defense, gen: torch.Generator,
                        loader: BatchLoader, device: torch.device, group: Group) -> tuple[int, dict, Optional[dict]]:
    """Put a saved state back into the run's parts; returns (epochs done, the best so far, the progress
    inside the next epoch or None)."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    mine = state["ranks"][group.rank] if state.get("ranks") else state  # this process's streams
    for name, buf in model.named_buffers():
        if name in (mine.get("buffers") or {}):
            buf.copy_(mine["buffers"][name])
    defense.load_state_dict(mine.get("defense") or {})
    set_rng_state(mine["rng"], gen, device)
    partial = state.get("partial")  # progress inside epoch start_epoch + 1, saved on a stop signal
    if partial is not None:
        loader.load_state_dict(partial["loader"])
        if not group.main:  # the saved sums are the whole run's, kept by rank 0
            partial = {**partial, "totals": {}, "n": 0}
    return int(state["epoch"]), json.loads(state["best"]), partial
