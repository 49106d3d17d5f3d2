"""The one training loop: every defense plugs in as a loss over a batch.

SGD with the paper's schedules as presets (Sec. 5.1), per-epoch validation of
clean and PGD accuracy on a held-out split of the *training* set, ``last`` and
``best`` checkpoints written atomically, and exact resume (weights, optimiser,
scheduler, epoch and every RNG state), so that N epochs straight and k epochs +
``--resume`` give the same weights.

Example::

    from sirobust.train import TrainConfig, fit
    result = fit(TrainConfig(dataset="fashion-mnist-mini", model="cnn-small", defense="at", epochs=2, out="runs/at"))
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import __version__
from .attacks import PGD
from .checkpoint import BEST_NAME, WEIGHTS_NAME, CheckpointError, save_model
from .data import BatchLoader, get_dataset_info, load_dataset, train_val_split
from .defenses import InnerAttack, SIConfig, build_defense
from .io import append_jsonl, atomic_write, read_jsonl, write_json
from .metrics import correct_mask, eval_mode
from .models import build_model
from .provenance import environment_info

STATE_NAME = "train_state.pt"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"

# Paper Sec. 5.1 (and SPEC.md): SGD, momentum 0.9. Milestones are epochs for the
# preset's own length and are rescaled when --epochs differs.
SCHEDULES = {
    "resnet": dict(lr=0.01, momentum=0.9, weight_decay=5e-4, milestones=(75, 90, 100), epochs=120),
    "wideresnet": dict(lr=0.1, momentum=0.9, weight_decay=7e-4, milestones=(75,), epochs=90),
    # not in the paper: the small CNN for 28×28 data, tuned to learn in a few epochs on CPU
    "small": dict(lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=(23, 27), epochs=30),
}
_MODEL_SCHEDULE = {"resnet18": "resnet", "preact-resnet18": "resnet", "resnet50": "resnet",
                   "wrn-34-10": "wideresnet", "wrn-28-10": "wideresnet", "cnn-small": "small"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last complete epoch's checkpoint is untouched."""


class ResumeMismatch(ValueError):
    """--resume found a checkpoint written with a different configuration."""


@dataclass
class TrainConfig:
    dataset: str = "fashion-mnist-mini"
    model: str = "cnn-small"
    defense: str = "standard"
    out: str = "runs/train"
    epochs: Optional[int] = None          # None: the schedule preset's
    batch_size: int = 128
    lr: Optional[float] = None            # None: preset
    momentum: Optional[float] = None
    weight_decay: Optional[float] = None
    milestones: Optional[tuple] = None    # epochs at which lr ÷= 10; None: preset (rescaled)
    lr_gamma: float = 0.1
    schedule: Optional[str] = None        # resnet | wideresnet | small; None: by model
    eps: Optional[float] = None           # None: the dataset's default ε
    attack_alpha: Optional[float] = None  # None: ε/4
    attack_steps: int = 10
    attack_mode: str = "eval"             # model mode while making training examples
    norm: str = "Linf"
    si: bool = False
    si_scale: float = 15.0
    si_margin: float = 0.2
    si_weight: float = 0.2
    augment: Optional[str] = None         # None: the dataset's default
    val_size: float = 0.1                 # fraction (or count) of the training set held out
    train_n: Optional[int] = None         # use only the first n training examples (quick runs)
    val_n: int = 1000                     # validation examples evaluated per epoch
    val_steps: int = 10                   # PGD steps for validation robust accuracy
    seed: int = 0
    data_dir: Optional[str] = None
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = False             # also log per-epoch metrics to out/tensorboard (needs tensorboard)
    defense_params: dict = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        """A copy with every None replaced by its preset or dataset default, validated."""
        info = get_dataset_info(self.dataset)
        sched_name = self.schedule or _MODEL_SCHEDULE.get(self.model, "resnet")
        if sched_name not in SCHEDULES:
            raise ValueError(f"unknown schedule {sched_name!r}; valid schedules: {', '.join(SCHEDULES)}")
        preset = SCHEDULES[sched_name]
        epochs = preset["epochs"] if self.epochs is None else int(self.epochs)
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        milestones = self.milestones
        if milestones is None:
            milestones = tuple(sorted({max(1, round(m * epochs / preset["epochs"])) for m in preset["milestones"]}))
            milestones = tuple(m for m in milestones if m < epochs)
        eps = info.default_eps if self.eps is None else float(self.eps)
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        cfg = dataclasses.replace(
            self, schedule=sched_name, epochs=epochs,
            lr=preset["lr"] if self.lr is None else float(self.lr),
            momentum=preset["momentum"] if self.momentum is None else float(self.momentum),
            weight_decay=preset["weight_decay"] if self.weight_decay is None else float(self.weight_decay),
            milestones=tuple(int(m) for m in milestones), eps=eps,
            attack_alpha=eps / 4 if self.attack_alpha is None else float(self.attack_alpha),
            augment=info.augment if self.augment is None else self.augment,
        )
        if cfg.lr <= 0:
            raise ValueError(f"lr must be > 0, got {cfg.lr}")
        return cfg

    def identity(self) -> dict:
        """The fields that must match for --resume to continue a run."""
        d = dataclasses.asdict(self)
        for k in ("out", "epochs", "device", "progress", "data_dir", "tensorboard"):
            d.pop(k)
        d["milestones"] = list(d["milestones"] or [])
        return d


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    return dev


def _scheduler(opt, cfg: TrainConfig):
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.lr_gamma)


def _rng_state(gen: torch.Generator, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "attack": gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["attack"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def fit(config: TrainConfig, resume: bool = False, log=print) -> dict:
    """Train per ``config``; returns the summary written to ``out/summary.json``.

    The run seeds and checkpoints its own RNG streams; the caller's global RNG state
    and cuDNN settings are restored on return.
    """
    cfg = config.resolved()
    device = pick_device(cfg.device)
    benchmark = torch.backends.cudnn.benchmark
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if device.type == "cuda":
                # fixed input shapes: let cuDNN pick the fastest kernels (bit-exact resume is a CPU guarantee)
                torch.backends.cudnn.benchmark = True
            return _fit(cfg, device, resume, log)
    finally:
        torch.backends.cudnn.benchmark = benchmark


def _fit(cfg: TrainConfig, device: torch.device, resume: bool, log) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    info = get_dataset_info(cfg.dataset)

    full = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir)
    train_ds, val_ds, val_idx = train_val_split(full, cfg.val_size, seed=cfg.seed)
    if cfg.train_n is not None:
        if cfg.train_n < 1:
            raise ValueError(f"train_n must be >= 1, got {cfg.train_n}")
        train_ds = train_ds.subset(torch.arange(min(cfg.train_n, len(train_ds))))
    loader = BatchLoader.from_dataset(train_ds, cfg.batch_size, shuffle=True, augment=cfg.augment,
                                      drop_last=False, device=device, seed=cfg.seed)
    val_n = min(cfg.val_n, len(val_ds))

    torch.manual_seed(cfg.seed)  # model init; everything after is checkpointed
    model = build_model(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels,
                        mean=info.mean, std=info.std).to(device)
    si = SIConfig(cfg.si_scale, cfg.si_margin, cfg.si_weight) if cfg.si else None
    if cfg.defense == "he":
        # HE's classifier is s · cos θ (Pang et al. 2020): train, validate and save it that way
        model.use_cosine_head(cfg.defense_params.get("scale", 15.0))
    defense = build_defense(cfg.defense, attack=InnerAttack(eps=cfg.eps, alpha=cfg.attack_alpha, steps=cfg.attack_steps,
                                                            norm=cfg.norm, model_mode=cfg.attack_mode),
                            si=si, **cfg.defense_params)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = _scheduler(opt, cfg)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    # model selection on the held-out split: robust accuracy for defenses, clean accuracy for standard training
    select = "val_clean_acc" if cfg.defense == "standard" else "val_robust_acc"
    start_epoch, best = 0, {"epoch": None, "metric": select, select: -1.0}
    state_path = out / STATE_NAME
    if resume:
        if not state_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint {state_path}; start without --resume")
        try:  # weights_only: a checkpoint can never run code
            state = torch.load(state_path, map_location=device, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"--resume: {state_path} is not a readable sirobust training state: {e}") from None
        saved = json.loads(state["identity"])
        if saved != cfg.identity():
            diff = sorted(k for k in set(saved) | set(cfg.identity()) if saved.get(k) != cfg.identity().get(k))
            hint = (" (the preset's milestones scale with --epochs: pass --milestones explicitly to extend a run)"
                    if diff == ["milestones"] else "")
            raise ResumeMismatch(f"--resume: the checkpoint in {out} was written with a different configuration "
                                 f"(differs in: {', '.join(diff)}){hint}; use the same flags or a new --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], gen, device)
        start_epoch = int(state["epoch"])
        best = json.loads(state["best"])
        rows = [r for r in read_jsonl(out / METRICS_NAME) if r.get("epoch", 0) <= start_epoch] \
            if (out / METRICS_NAME).exists() else []
        atomic_write(out / METRICS_NAME, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))
        log(f"resuming {out} at epoch {start_epoch + 1}/{cfg.epochs}")
    else:  # a fresh run: nothing from an earlier run in this folder may be mistaken for its output
        for stale in (METRICS_NAME, "summary.json", BEST_NAME, WEIGHTS_NAME, STATE_NAME):
            (out / stale).unlink(missing_ok=True)
    write_json(out / CONFIG_NAME, {"config": dataclasses.asdict(cfg), "defense": defense.describe(),
                                   "val_indices": val_idx, "environment": environment_info()})

    tb = _tensorboard_writer(out) if cfg.tensorboard else None
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        stats = _train_epoch(model, defense, opt, loader, gen, epoch, cfg)
        sched.step()
        val = _validate(model, val_ds, val_n, cfg, device, epoch)
        row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **stats, **val, "seconds": time.time() - t0}
        append_jsonl(out / METRICS_NAME, row)
        if tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, epoch + 1)
            tb.flush()
        save_model(model, out / WEIGHTS_NAME, model_name=cfg.model, dataset=cfg.dataset,
                   extra={"epoch": epoch + 1, "defense": defense.describe()})
        if val[select] > best[select]:
            best = {"epoch": epoch + 1, "metric": select, "val_robust_acc": val["val_robust_acc"],
                    "val_clean_acc": val["val_clean_acc"]}
            save_model(model, out / BEST_NAME, model_name=cfg.model, dataset=cfg.dataset,
                       extra={"epoch": epoch + 1, "defense": defense.describe(), "best": best})
        # the resume state is written last: a kill before this line redoes the epoch
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "rng": _rng_state(gen, device), "epoch": epoch + 1, "best": json.dumps(best),
                 "identity": json.dumps(cfg.identity()), "version": __version__}
        atomic_write(state_path, lambda p: torch.save(state, p))
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {stats['loss']:.4f}  train-acc {stats['train_acc']:.3f}  "
            f"val clean {val['val_clean_acc']:.3f}  val PGD-{cfg.val_steps} {val['val_robust_acc']:.3f}  "
            f"({row['seconds']:.1f}s)")

    if tb is not None:
        tb.close()
    summary = {"out": str(out), "epochs": cfg.epochs, "identity": cfg.identity(), "best": best,
               "last": read_jsonl(out / METRICS_NAME)[-1] if cfg.epochs > 0 else None,
               "weights": str(out / WEIGHTS_NAME), "best_weights": str(out / BEST_NAME)}
    write_json(out / "summary.json", summary)
    return summary


def _tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'sirobust[tensorboard]'") from None
    return SummaryWriter(str(out / "tensorboard"))


def _train_epoch(model, defense, opt, loader, gen, epoch: int, cfg: TrainConfig) -> dict:
    from tqdm.auto import tqdm

    model.train()
    loader.set_epoch(epoch)
    totals: dict[str, float] = {}
    n = 0
    bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs} {defense.name}{'-si' if defense.si else ''}",
               disable=None if cfg.progress else True, leave=False, dynamic_ncols=True)
    for batch, (x, y) in enumerate(bar):
        loss, stats = defense(model, x, y, generator=gen)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite training loss ({loss.item()}) at epoch {epoch + 1}, batch {batch + 1}; "
                                   f"the checkpoints of the last complete epoch are kept (lower --lr?)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        b = len(y)
        n += b
        stats = {"loss": loss.item(), **stats}
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v * b
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
    out = {k: v / max(n, 1) for k, v in totals.items()}
    out["train_acc"] = out.get("adv_acc", out.get("clean_acc", math.nan))
    return out


def _validate(model, val_ds, n: int, cfg: TrainConfig, device, epoch: int) -> dict:
    x, y = val_ds.images[:n], val_ds.labels[:n]
    with eval_mode(model):
        clean = correct_mask(model, x, y, batch_size=256, device=device)
        if cfg.defense == "standard" and not cfg.si and cfg.eps == 0:
            robust = clean
        else:
            atk = PGD(model, eps=cfg.eps, alpha=cfg.eps / 4, steps=cfg.val_steps, norm=cfg.norm, seed=cfg.seed + epoch)
            robust = correct_mask(model, x, y, batch_size=256, attack=atk, device=device)
    return {"val_clean_acc": clean.float().mean().item(), "val_robust_acc": robust.float().mean().item(), "val_n": n}
