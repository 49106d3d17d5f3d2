"""The one training loop: every defense plugs in as a loss over a batch.

SGD with the paper's schedules as presets (Sec. 5.1), per-epoch validation of
clean and PGD accuracy on a held-out split of the *training* set (``val_size=0``:
none, as TRADES' and MART's code: train on all of it, no ``best``), ``last`` and
``best`` checkpoints written atomically, and exact resume (weights, optimiser,
scheduler, epoch and every RNG state), so that N epochs straight and k epochs +
``--resume`` give the same weights.

This module is the loop; its parts live beside it: the config and its presets
(:mod:`~sirobust.train_config`, :mod:`~sirobust.schedule`), the resume state
(:mod:`~sirobust.train_state`), the per-epoch measurements (:mod:`~sirobust.train_eval`)
and the files a run writes (:mod:`~sirobust.train_files`). What differs between
defenses is an attribute or hook of the :class:`~sirobust.defenses.Defense`.

Example::

    from sirobust.train import TrainConfig, fit
    result = fit(TrainConfig(dataset="fashion-mnist-mini", model="cnn-small", defense="at", epochs=2, out="runs/at"))
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn

from .checkpoint import USER_MODEL_PREFIX
from .data import BatchLoader, ImageDataset, get_dataset_info, load_dataset, train_val_split
from .defenses import Defense, InnerAttack, SIConfig, build_defense
from .distributed import Group
from .distributed import current as current_group
from .fastpath import FastPath, resolve_precision, restore_deterministic, set_deterministic
from .interrupts import RunInterrupted, StopRequest, graceful_stop
from .models import build_model
from .rng import generator, seed_global
from .runfolder import RunFolder
from .schedule import SCHEDULES, learning_rate
from .train_config import NEWER_FIELDS, ResumeMismatch, TrainConfig, recorded_config
from .train_eval import guard_overfitting, validate
from .train_files import (CONFIG_NAME, METRICS_NAME, check_same_data, prepare_folder, record_epoch, save_weights,
                          tensorboard_writer, write_summary)
from .train_state import STATE_NAME, restore_train_state, resume_state, save_train_state

# the public names of the trainer, wherever they live
__all__ = ["TrainConfig", "fit", "learning_rate", "recorded_config", "ResumeMismatch", "TrainingDiverged",
           "SCHEDULES", "NEWER_FIELDS", "NO_VALIDATION", "STATE_NAME", "METRICS_NAME", "CONFIG_NAME"]

NO_VALIDATION = "val_size 0: no validation split; report the last epoch's weights"
_RANK_SEED_STRIDE = 1_000_003  # process k of a distributed run seeds its attack generator with seed + k·stride


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last complete epoch's checkpoint is untouched."""


def fit(config: TrainConfig, resume: bool = False, overwrite: bool = False, log=print,
        model: Optional[nn.Module] = None) -> dict:
    """Train per ``config``; returns the summary written to ``out/summary.json``.

    ``out`` is claimed as a :class:`~sirobust.runfolder.RunFolder`: a folder that
    holds a run is refused unless ``resume`` (continue it; its recorded config
    must match) or ``overwrite`` (move it aside, start again). The first SIGINT
    or SIGTERM saves the progress of the epoch in flight and raises
    :class:`~sirobust.interrupts.RunInterrupted`. The run seeds and checkpoints
    its own RNG streams; the caller's global RNG state and cuDNN settings are
    restored on return.

    ``model``: a model of your own (any ``nn.Module`` taking [0, 1] pixels of ``config.dataset``, normalising
    them itself, and returning logits), trained in place instead of ``config.model``, which the run records as
    ``user:ClassName``. Its weights are saved as its state dict (``model.safetensors``, ``best.safetensors``):
    load them with ``model.load_state_dict(safetensors.torch.load_file(path))`` or evaluate them with
    ``sirobust evaluate --model-def FILE.py:FACTORY --weights PATH``. With ``config.si`` the linear layer it
    declares (``sirobust_head = "NAME"``), else its last ``nn.Linear``, must produce the logits (SI uses its
    input and weights). Resuming such a run takes the model again. It is
    checked on two random images before the run folder is claimed; the fast path leaves its memory layout
    alone (a forward may flatten with ``.view``).
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run, or move it aside and start again")
    if model is not None:  # recorded as user:ClassName; resolved with that name (no zoo schedule preset)
        model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: its own parameters, plain names
        config = dataclasses.replace(config, model=user_model_name(model))
    else:
        recorded = (recorded_config(config.out) or {}) if resume else {}
        own = str(recorded.get("model", config.model))
        if own.startswith(USER_MODEL_PREFIX):
            raise ValueError(f"the run in {config.out} trains a model of your own ({own}): give it again, built as "
                             "it was (--model-def FILE.py:FACTORY with --resume; fit(config, model=..., resume=True) "
                             "in Python)")
    cfg = config.resolved()
    if model is not None:
        check_user_model(model, cfg)
    group = current_group(cfg.device)  # under torchrun: this process's rank among the others
    device = group.device(cfg.device)
    if group.enabled and cfg.batch_size < 2 * group.world:
        raise ValueError(f"batch_size (--batch-size) {cfg.batch_size} is the global batch of {group.world} processes: "
                         f"it must be at least {2 * group.world}, so that each process trains on 2 or more examples")
    mode = "resume" if resume else "overwrite" if overwrite else "new"
    benchmark = torch.backends.cudnn.benchmark
    if not group.main:
        log = lambda *_a, **_k: None  # noqa: E731 (rank 0 speaks for the run)

    def claim(stack):  # rank 0 owns the folder; what it found is sent to the others
        folder = stack.enter_context(RunFolder(cfg.out, "train", mode, config=dataclasses.asdict(cfg), log=log))
        return folder, {"path": str(folder.path), "record": folder.record, "resumed": folder.resumed}

    with contextlib.ExitStack() as stack:
        claimed = group.first(claim, stack, share=False)
        seen = group.broadcast(claimed[1] if claimed else None)
        folder = claimed[0] if claimed else SimpleNamespace(path=Path(seen["path"]), record=seen["record"],
                                                            resumed=seen["resumed"])
        stop = stack.enter_context(graceful_stop())
        determinism = set_deterministic(cfg.deterministic)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if device.type == "cuda" and not cfg.deterministic:
                    # fixed input shapes: let cuDNN pick the fastest kernels (bit-exact GPU resume needs
                    # --deterministic; on a CPU it is always exact)
                    torch.backends.cudnn.benchmark = True
                return _fit(cfg, device, folder, stop, log, group, model)
        finally:
            torch.backends.cudnn.benchmark = benchmark
            restore_deterministic(determinism)


@dataclass
class _Data:
    """The run's examples: the training batches, the held-out split and the overfitting guard's subset."""
    val: Optional[ImageDataset]
    val_idx: torch.Tensor   # the held-out examples' indices in the training set, recorded in config.json
    val_n: int              # how many of them each epoch validates
    loader: BatchLoader
    overfit: Optional[ImageDataset]


@dataclass
class _Parts:
    """What the run trains: the model, what the defense calls (``runner``: the model compiled and/or
    wrapped for DDP), the defense, the optimiser, the attack generator and the fast path."""
    model: nn.Module
    runner: nn.Module
    defense: Defense
    opt: torch.optim.Optimizer
    gen: torch.Generator
    fast: FastPath


@dataclass
class _Progress:
    """Where the run stands: the first epoch to train, the progress saved inside it, the best epoch so far
    (by ``best["metric"]``) and why it stopped early, if it did."""
    best: dict
    start_epoch: int = 0
    partial: Optional[dict] = None
    stopped_early: Optional[str] = None


def _fit(cfg: TrainConfig, device: torch.device, folder: RunFolder, stop: StopRequest, log,
         group: Optional[Group] = None, user_model: Optional[nn.Module] = None) -> dict:
    """The run in ``folder``: set up (or restore), then one epoch after another, each trained, validated,
    guarded, recorded and checkpointed."""
    group = group or Group()
    out, metrics_path = folder.path, folder.path / METRICS_NAME
    state = resume_state(cfg, folder, log, group)
    if state is not None:
        check_same_data(cfg, out)
    data = _data(cfg, device, group, log)
    parts = _parts(cfg, device, group, user_model)
    progress = _progress(cfg, state, data, parts, device, group, log, out)
    if group.main:  # rank 0 writes every file of the run; the others only compute
        prepare_folder(cfg, out, state is None, data.val is not None, data.val_idx, parts.defense,
                       progress.start_epoch, group.world)

    def save(epoch_done: int, partial: Optional[dict]) -> None:
        save_train_state(out, cfg, folder, parts.model, parts.opt, parts.defense, parts.gen, device, group,
                         epoch_done, partial, progress.best, progress.stopped_early)

    tb = tensorboard_writer(out) if cfg.tensorboard and group.main else None
    try:
        for epoch in range(progress.start_epoch, cfg.epochs):
            t0 = time.time()
            stats, progress.partial = _train_epoch(parts.model, parts.defense, parts.opt, data.loader, parts.gen,
                                                   epoch, cfg, progress.partial, stop, parts.runner, parts.fast, group)
            train_seconds = time.time() - t0  # the defense's own cost, without validation
            if progress.partial is not None:  # stopped by a signal inside the epoch: keep what the batches did
                save(epoch, progress.partial)
                pos = progress.partial["loader"]["position"]
                raise RunInterrupted(f"stopped by {stop.name or 'a signal to another process'} in epoch {epoch + 1}, "
                                     f"after batch {pos}/{len(data.loader)}; progress saved in {out / STATE_NAME}. "
                                     f"Continue with: sirobust train --out {out} --resume", stop.signum)
            # every process validates rank 0's model (each updated its own batch-norm statistics from its slice)
            group.broadcast_buffers(parts.model)
            val = {} if data.val is None else validate(  # (no adversary and no ball: PGD accuracy is the clean one)
                parts.model, data.val, data.val_n, cfg, device, epoch, group,
                attacked=parts.defense.uses_attack or cfg.si or cfg.eps != 0)
            row = {"epoch": epoch + 1, "lr": parts.opt.param_groups[0]["lr"], **stats, **val,
                   "seconds": time.time() - t0, "train_seconds": train_seconds}
            collapsed = data.overfit is not None and guard_overfitting(row, parts.model, data.overfit, cfg, device,
                                                                       epoch, metrics_path, bool(val), group, log)
            record_epoch(row, out, tb, group.main)
            progress.best = save_weights(cfg, out, parts.model, parts.defense, progress.best, val, collapsed, epoch,
                                         group.main)
            if collapsed and cfg.early_stop:
                progress.stopped_early = f"catastrophic overfitting in epoch {epoch + 1}"
            save(epoch + 1, None)  # the resume state is written last: a kill before it completes redoes the epoch
            log(f"epoch {epoch + 1}/{cfg.epochs}  loss {stats['loss']:.4f}  train-acc {stats['train_acc']:.3f}  "
                + (f"val clean {val['val_clean_acc']:.3f}  val PGD-{cfg.val_steps} {val['val_robust_acc']:.3f}  "
                   if val else "no validation  ")
                + f"({row['seconds']:.1f}s)")
            if progress.stopped_early:
                break
            if group.any(stop.requested) and epoch + 1 < cfg.epochs:
                raise RunInterrupted(f"stopped by {stop.name or 'a signal to another process'} after epoch "
                                     f"{epoch + 1}/{cfg.epochs}; its checkpoint is saved. Continue with: "
                                     f"sirobust train --out {out} --resume", stop.signum)
    finally:
        if tb is not None:
            tb.close()
    if not group.main:
        return {"out": str(out), "epochs": cfg.epochs, "best": progress.best, "rank": group.rank}
    return write_summary(cfg, folder, device, parts.model, parts.fast, progress.best,
                         progress.stopped_early or (state or {}).get("stopped_early"), data.val is not None,
                         group.world)


def _data(cfg: TrainConfig, device: torch.device, group: Group, log=print) -> _Data:
    full = group.local_first(load_dataset, cfg.dataset, "train", data_dir=cfg.data_dir,
                             accept_checksum_mismatch=cfg.accept_checksum_mismatch)
    if cfg.val_size == 0:  # the whole training set is trained on (TRADES' and MART's protocol): nothing held out
        train_ds, val_ds, val_idx = full, None, torch.zeros(0, dtype=torch.int64)
    else:
        train_ds, val_ds, val_idx = train_val_split(full, cfg.val_size, seed=cfg.seed)
        if len(val_ds) > len(train_ds):  # legal, but almost always a typo (0.999 for 0.1, a count for a fraction)
            log(f"warning: val_size (--val-size) {cfg.val_size!r} holds out {len(val_ds)} of {len(full)} examples, "
                f"leaving {len(train_ds)} for training; the usual value is a fraction like 0.1")
    if cfg.train_n is not None:
        train_ds = train_ds.subset(torch.arange(min(cfg.train_n, len(train_ds))))
    # with N processes every one walks the same global batches and trains on its slice of each
    tail = len(train_ds) % cfg.batch_size
    loader = BatchLoader.from_dataset(train_ds, cfg.batch_size, shuffle=True, augment=cfg.augment,
                                      drop_last=group.enabled and 0 < tail < 2 * group.world,
                                      device=device, seed=cfg.seed)
    # catastrophic overfitting (Wong et al. 2020): PGD accuracy on a fixed, unaugmented training subset
    overfit = train_ds.subset(torch.arange(min(cfg.overfit_n, len(train_ds)))) if cfg.overfit_check else None
    return _Data(val_ds, val_idx, 0 if val_ds is None else min(cfg.val_n, len(val_ds)), loader, overfit)


def _parts(cfg: TrainConfig, device: torch.device, group: Group, user_model: Optional[nn.Module] = None) -> _Parts:
    info = get_dataset_info(cfg.dataset)
    seed_global(cfg.seed)  # model init; everything after is checkpointed
    fast = resolve_precision(cfg.precision, device)
    if user_model is not None:  # trained in place, in the layout its forward was written for
        model = user_model.to(device)
        fast = dataclasses.replace(fast, channels_last=False)
    else:
        model = build_model(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels,
                            mean=info.mean, std=info.std).to(device)
    if fast.channels_last:
        model = model.to(memory_format=torch.channels_last)  # the layout the fastest convolutions use
    si = SIConfig(cfg.si_scale, cfg.si_margin, cfg.si_weight) if cfg.si else None
    defense = build_defense(cfg.defense, attack=InnerAttack(eps=cfg.eps, alpha=cfg.attack_alpha, steps=cfg.attack_steps,
                                                            norm=cfg.norm, model_mode=cfg.attack_mode,
                                                            random_start=cfg.attack_random_start,
                                                            start=cfg.attack_start),
                            si=si, **cfg.defense_params)
    defense.prepare_model(model)  # HE's cosine head
    # the training forward passes may run compiled; state and checkpoints always come from `model` itself
    runner = torch.compile(model) if cfg.compile else model
    if group.enabled:  # DDP averages the gradients (of the parameters the defense's objective uses)
        from torch.nn.parallel import DistributedDataParallel
        runner = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=defense.leaves_parameters_unused)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # each process's attacks draw their own random starts (rank 0's stream is the single-process one)
    gen = generator(cfg.seed + _RANK_SEED_STRIDE * group.rank, device)
    return _Parts(model, runner, defense, opt, gen, fast)


def _progress(cfg: TrainConfig, state: Optional[dict], data: _Data, parts: _Parts, device, group: Group, log,
              out: Path) -> _Progress:
    """A fresh start, or where the saved state left off (restored into ``parts`` and the loader)."""
    # model selection on the held-out split: robust accuracy for defenses, clean accuracy for standard training;
    # without one (val_size 0) there is none: "best" says so, and the last epoch's weights are the result
    select = "val_robust_acc" if parts.defense.uses_attack else "val_clean_acc"
    progress = _Progress(best={"epoch": None, "metric": select, select: -1.0} if data.val is not None
                         else {"epoch": None, "metric": None, "reason": NO_VALIDATION})
    if state is None:
        return progress
    progress.start_epoch, progress.best, progress.partial = restore_train_state(
        state, parts.model, parts.opt, parts.defense, parts.gen, data.loader, device, group)
    if state.get("stopped_early"):
        log(f"{out} stopped early at epoch {progress.start_epoch} ({state['stopped_early']}); nothing to resume")
        progress.start_epoch = cfg.epochs
    elif progress.start_epoch >= cfg.epochs:
        log(f"{out} already finished its {progress.start_epoch} epochs (pass a larger --epochs, with explicit "
            "--milestones, to extend it)")
    else:
        where = f"epoch {progress.start_epoch + 1}/{cfg.epochs}" + (
            f", batch {progress.partial['loader']['position'] + 1}" if progress.partial else "")
        log(f"resuming {out} at {where}")
    return progress


def _train_epoch(model, defense, opt, loader, gen, epoch: int, cfg: TrainConfig, partial: Optional[dict],
                 stop: StopRequest, runner=None, fast=None, group: Optional[Group] = None
                 ) -> tuple[dict, Optional[dict]]:
    """One epoch (or the rest of one, from ``partial``). Returns (mean stats, None), or
    (stats so far, the partial state to save) when a stop signal arrived between two batches.
    ``runner`` is what the defense calls (the model, compiled or wrapped for DDP); ``fast`` the fast path.
    With a distributed ``group`` each process trains on its slice of every batch, and the stats and the
    decision to stop are the whole group's."""
    runner = model if runner is None else runner
    fast = fast or resolve_precision("fp32", "cpu")
    group = group or Group()
    from tqdm.auto import tqdm

    model.train()
    defense.start_epoch(epoch, cfg.epochs)
    if partial is None:
        loader.set_epoch(epoch)
        totals: dict[str, float] = {}
        n = 0
    else:  # the loader already points at the saved batch
        totals, n = dict(partial["totals"]), int(partial["n"])
    bar = tqdm(loader, total=len(loader), initial=loader.state_dict()["position"],
               desc=f"epoch {epoch + 1}/{cfg.epochs} {defense.name}{'-si' if defense.si else ''}",
               disable=None if cfg.progress and group.main else True, leave=False, dynamic_ncols=True)
    for x, y in bar:
        whole = len(y)
        if group.enabled:  # this process's slice of the global batch
            x, y = x.tensor_split(group.world)[group.rank], y.tensor_split(group.world)[group.rank]
        x = fast.inputs(x)
        batch = loader.state_dict()["position"]  # 1-based index of this batch in the epoch
        for param_group in opt.param_groups:
            param_group["lr"] = learning_rate(cfg, epoch, batch - 1, len(loader))
        defense.start_batch(batch - 1)
        for _ in range(defense.replays):  # FreeAT: the same minibatch m times, one update each
            with fast.autocast_context(x.device):  # the forward passes; losses are fp32 (ModelOutput)
                loss, stats = defense(runner, x, y, generator=gen)
            if group.any(not torch.isfinite(loss)):  # every process stops, not only the one that diverged
                raise TrainingDiverged(f"non-finite training loss ({loss.item()}) at epoch {epoch + 1}, batch {batch}; "
                                       f"the checkpoints of the last complete epoch are kept (lower --lr?)")
            opt.zero_grad(set_to_none=True)
            # DDP averages the processes' gradients; weighting each by its slice's share makes that the mean
            # over the global batch even when the slices differ in size
            (loss * (len(y) * group.world / whole) if group.enabled else loss).backward()
            defense.after_backward()
            opt.step()
            b = len(y)
            n += b
            stats = {"loss": loss.item(), **stats}
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v * b
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
        if group.any(stop.requested) and batch < len(loader):
            bar.close()
            everyone = group.sum({**totals, "__n": n})  # rank 0 keeps the whole group's sums
            n_all = int(everyone.pop("__n"))
            return everyone, {"loader": loader.state_dict(), "totals": everyone, "n": n_all}
    totals = group.sum({**totals, "__n": n})
    n = int(totals.pop("__n"))
    out = {k: v / max(n, 1) for k, v in totals.items()}
    out["train_acc"] = out.get("adv_acc", out.get("clean_acc", math.nan))
    return out, None


def user_model_name(model: nn.Module) -> str:
    """``user:ClassName``: how a run records a model of the user's own."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return USER_MODEL_PREFIX + type(model).__qualname__


def check_user_model(model: nn.Module, cfg: TrainConfig) -> None:
    """Refuse, before any run folder or data, a model of the user's own that this run cannot train: one whose
    output on two random images of ``cfg.dataset`` is not (2, classes) logits, one without a linear head for SI,
    or HE (whose cosine head replaces a zoo model's own)."""
    from .checks import logits_of, model_device
    from .defenses import DEFENSES
    from .features import forward_with_features
    from .modes import model_mode
    why = DEFENSES.get(cfg.defense).zoo_models_only
    if why:
        raise ValueError(f"{cfg.defense} cannot train a model of your own: {why}; use another defense")
    info = get_dataset_info(cfg.dataset)
    x = torch.rand(2, *info.image_shape, generator=torch.Generator().manual_seed(0))
    x = x.to(model_device(model) or "cpu")
    with torch.no_grad(), model_mode(model, "eval"):
        try:
            logits = logits_of(model(x))
        except Exception as e:  # noqa: BLE001 (whatever it raises, say which input it was given)
            raise ValueError(f"the model failed on a batch of {cfg.dataset} images, {(2, *info.image_shape)} "
                             f"pixels in [0, 1]: {type(e).__name__}: {e}") from e
        if logits.dim() != 2 or logits.shape[1] != info.num_classes:
            raise ValueError(f"the model returns {tuple(logits.shape)} for 2 images of {cfg.dataset}; it must return "
                             f"(2, {info.num_classes}) logits, one per class")
        if cfg.si:
            forward_with_features(model, x)  # its last linear layer must give the logits (else a clear error)
