"""The one training loop: every defense plugs in as a loss over a batch.

SGD with the paper's schedules as presets (Sec. 5.1), per-epoch validation of
clean and PGD accuracy on a held-out split of the *training* set (``val_size=0``:
none, as TRADES' and MART's code: train on all of it, no ``best``), ``last`` and
``best`` checkpoints written atomically, and exact resume (weights, optimiser,
scheduler, epoch and every RNG state), so that N epochs straight and k epochs +
``--resume`` give the same weights.

Example::

    from sirobust.train import TrainConfig, fit
    result = fit(TrainConfig(dataset="fashion-mnist-mini", model="cnn-small", defense="at", epochs=2, out="runs/at"))
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from ._version import __version__
from .attacks import PGD
from .checks import check_eps, check_float, check_int, check_step_size, resolve_name
from .checkpoint import BEST_NAME, WEIGHTS_NAME, save_model
from .data import BatchLoader, get_dataset_info, load_dataset, train_val_split
from .data.loader import AUGMENTATIONS
from .distributed import Group
from .distributed import current as current_group
from .fastpath import check_precision, resolve_precision, restore_deterministic, set_deterministic
from .defenses import InnerAttack, SIConfig, build_defense
from .defenses.base import START_KINDS
from .interrupts import RunInterrupted, StopRequest, graceful_stop
from .io import append_jsonl, atomic_write_text, file_sha256, read_json, read_jsonl, write_json
from .metrics import correct_mask, eval_mode
from .models import build_model
from .provenance import environment_info, precision_of
from .runfolder import RUN_FILE, ConfigMismatch, RunFolder, RunFolderError, command_line, config_difference, utc_now
from .statefile import StateFileError, load_state, save_state
from .threat import canonical_norm

STATE_NAME = "train_state.pt"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"

# Paper Sec. 5.1 (and SPEC.md): SGD, momentum 0.9. A milestone m means "after m epochs": the rate is
# divided by 10 from the (m+1)-th epoch on, 1-based (torch's MultiStepLR stepped once per epoch).
# The paper's "divided at epochs 75, 90 and 100" is TRADES' and MART's code, `for epoch in range(1,
# epochs + 1)` with `if epoch >= 75: lr = 0.1 · lr` (and 90, 100): the 75th epoch already runs at the
# lower rate, so the presets are 74, 89, 99 (ResNet) and 74 (WRN). Preset milestones are for the
# preset's own length and are rescaled when --epochs differs (an explicit --milestones never is).
SCHEDULES = {
    "resnet": dict(lr=0.01, momentum=0.9, weight_decay=5e-4, milestones=(74, 89, 99), epochs=120),
    "wideresnet": dict(lr=0.1, momentum=0.9, weight_decay=7e-4, milestones=(74,), epochs=90),
    # not in the paper: the small CNN for 28×28 data, tuned to learn in a few epochs on CPU
    "small": dict(lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=(23, 27), epochs=30),
}
_MODEL_SCHEDULE = {"resnet18": "resnet", "preact-resnet18": "resnet", "preact-resnet18-wong": "resnet",
                   "preact-resnet18-gradalign": "resnet", "resnet50": "resnet",
                   "wrn-34-10": "wideresnet", "wrn-28-10": "wideresnet", "cnn-small": "small"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last complete epoch's checkpoint is untouched."""


ResumeMismatch = ConfigMismatch  # --resume found a run started with a different configuration


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
    milestones: Optional[tuple] = None    # m: lr ×= lr_gamma after m epochs, i.e. from epoch m+1 on (1-based);
    #                                       None: the preset's (TRADES' `epoch >= 75` is m = 74), rescaled
    lr_gamma: float = 0.1
    schedule: Optional[str] = None        # resnet | wideresnet | small (lr, momentum, decay, epochs); None: by model
    lr_schedule: Optional[str] = None     # piecewise | cyclic | onecycle; None: the defense's preset, else piecewise
    eps: Optional[float] = None           # None: the dataset's default ε
    attack_alpha: Optional[float] = None  # None: the defense's preset (a multiple of ε), else ε/4
    attack_steps: Optional[int] = None    # None: the defense's preset, else 10
    attack_mode: Optional[str] = None     # model mode while making training examples; None: preset, else eval
    attack_random_start: Optional[bool] = None  # None: the defense's preset, else True
    attack_start: Optional[str] = None    # the random start's kind: uniform (in the ε-ball; None) or normal
    #                                       (x + 0.001·N(0, I), clipped: TRADES' and MART's code); needs the
    #                                       random start on
    norm: str = "Linf"
    si: bool = False
    si_scale: float = 15.0
    si_margin: float = 0.2
    si_weight: float = 0.2
    augment: Optional[str] = None         # None: the dataset's default
    val_size: float = 0.1                 # fraction in (0, 1) or count >= 1 of the training set held out; 0: none
    #                                       (train on all of it, no per-epoch validation, no best checkpoint)
    train_n: Optional[int] = None         # use only the first n training examples (quick runs)
    val_n: int = 1000                     # validation examples evaluated per epoch
    val_steps: int = 10                   # PGD steps for validation robust accuracy
    seed: int = 0
    data_dir: Optional[str] = None
    accept_checksum_mismatch: bool = False  # use dataset files whose checksum differs from the published one
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = False             # also log per-epoch metrics to out/tensorboard (needs tensorboard)
    force_step_size: bool = False         # accept an attack step size above ε
    defense_params: dict = field(default_factory=dict)
    overfit_check: Optional[bool] = None  # PGD accuracy on a fixed training subset each epoch; None: on for
    #                                       single-step defenses (catastrophic overfitting, Wong et al. 2020)
    overfit_n: int = 256                  # examples of that subset
    early_stop: bool = False              # stop at a catastrophic-overfitting collapse, keeping the weights from before it
    precision: str = "auto"               # auto | fp32 | fp32-fast | bf16 (sirobust.fastpath); auto: bf16 on CUDA
    compile: bool = False                 # torch.compile the model for the training forward passes
    deterministic: bool = False           # deterministic GPU kernels: a GPU run resumes bit-exactly (slower)

    def resolved(self) -> "TrainConfig":
        """A copy with every None replaced by its preset or dataset default, every field checked
        (:mod:`sirobust.checks`): an error names the field and the allowed values."""
        from .data.registry import canonical_dataset
        from .defenses import canonical_defense
        from .models import canonical_model
        dataset, model = canonical_dataset(self.dataset), canonical_model(self.model)
        defense, norm = canonical_defense(self.defense), canonical_norm(self.norm)
        info = get_dataset_info(dataset)
        sched_name = resolve_name("schedule", self.schedule or _MODEL_SCHEDULE.get(model, "resnet"), SCHEDULES)
        preset = SCHEDULES[sched_name]
        # the defense and its own parameters (unknown ones, HE with SI) fail here, not after the data loaded
        kind = build_defense(defense, si=SIConfig(self.si_scale, self.si_margin, self.si_weight) if self.si else None,
                             **self.defense_params)
        # a replaying defense (FreeAT, m replays) runs m× the updates per pass: its preset divides the passes by m
        preset_epochs = max(1, round(preset["epochs"] / kind.replays))
        epochs = check_int("epochs", preset_epochs if self.epochs is None else self.epochs, min=1)
        lr_schedule = resolve_name("lr_schedule (--lr-schedule)",
                                   self.lr_schedule or kind.lr_schedule_preset or "piecewise", LR_SCHEDULES)
        inner = kind.inner_preset
        milestones = self.milestones
        if milestones is None:
            milestones = tuple(sorted({max(1, round(m * epochs / preset["epochs"])) for m in preset["milestones"]}))
            milestones = tuple(m for m in milestones if m < epochs)
        milestones = tuple(check_int("milestones", m, min=1) for m in milestones)
        eps = check_eps(info.eps_for(norm) if self.eps is None else self.eps, norm, "eps")
        steps = check_int("attack_steps (--steps)", inner.get("steps", 10) if self.attack_steps is None
                          else self.attack_steps, min=0 if defense == "standard" else 1)
        if self.attack_alpha is not None:  # the preset's own step again (a resolved config resolved once more) is fine
            own = "alpha" in inner and math.isclose(self.attack_alpha, inner["alpha"] * eps, rel_tol=1e-9)
            alpha = check_step_size(self.attack_alpha, eps, steps, "attack_alpha (--step-size)",
                                    self.force_step_size or own)
        else:  # a preset's step (FGSM-RS: 1.25ε) is the method's own: no --force-step-size needed
            alpha = check_step_size(inner.get("alpha", 0.25) * eps, eps, steps, "attack_alpha (--step-size)",
                                    force="alpha" in inner)
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise ValueError(f"data_dir (--data-dir) {self.data_dir} does not exist or is not a folder")
        val_size = _check_val_size(self.val_size)
        random_start = bool(inner.get("random_start", True) if self.attack_random_start is None
                            else self.attack_random_start)
        attack_start = resolve_name("attack_start (--attack-start)", self.attack_start or "uniform", START_KINDS)
        if attack_start != "uniform":
            if not random_start:
                raise ValueError(f"attack_start (--attack-start) {attack_start!r} needs the attack's random start, "
                                 f"which is off for {defense} (attack_random_start False): use 'uniform'")
            if defense in _OWN_START:
                raise ValueError(f"attack_start (--attack-start) {attack_start!r} does not apply to {defense}: "
                                 f"{_OWN_START[defense]}; use 'uniform'")
        return dataclasses.replace(
            self, dataset=dataset, model=model, defense=defense, norm=norm, schedule=sched_name, epochs=epochs,
            batch_size=check_int("batch_size", self.batch_size, min=1),
            lr=check_float("lr", preset["lr"] if self.lr is None else self.lr, min=0, min_open=True),
            momentum=check_float("momentum", preset["momentum"] if self.momentum is None else self.momentum,
                                 min=0, max=1, max_open=True),
            weight_decay=check_float("weight_decay", preset["weight_decay"] if self.weight_decay is None
                                     else self.weight_decay, min=0),
            lr_gamma=check_float("lr_gamma", self.lr_gamma, min=0, max=1, min_open=True),
            milestones=milestones, eps=eps, attack_alpha=alpha, attack_steps=steps,
            attack_mode=resolve_name("attack_mode", self.attack_mode or inner.get("model_mode", "eval"),
                                     ("eval", "train")),
            attack_random_start=random_start, attack_start=attack_start,
            lr_schedule=lr_schedule,
            overfit_check=bool(kind.guard_overfitting if self.overfit_check is None else self.overfit_check),
            overfit_n=check_int("overfit_n", self.overfit_n, min=1),
            early_stop=bool(self.early_stop),
            si_scale=check_float("si_scale", self.si_scale, min=0, min_open=True),
            si_margin=check_float("si_margin", self.si_margin, min=0),
            si_weight=check_float("si_weight", self.si_weight, min=0),
            augment=resolve_name("augment", info.augment if self.augment is None else self.augment, AUGMENTATIONS),
            val_size=val_size,
            train_n=None if self.train_n is None else check_int("train_n", self.train_n, min=1),
            val_n=check_int("val_n", self.val_n, min=1), val_steps=check_int("val_steps", self.val_steps, min=1),
            seed=check_int("seed", self.seed, min=0),
            precision=resolve_precision(check_precision(self.precision), pick_device(self.device)).precision,
            compile=bool(self.compile), deterministic=bool(self.deterministic),
        )

    def identity(self) -> dict:
        """The fields that must match for --resume to continue a run."""
        d = dataclasses.asdict(self)
        for k in ("out", "epochs", "device", "progress", "data_dir", "tensorboard", "accept_checksum_mismatch",
                  "force_step_size", "compile", "deterministic"):
            if k == "epochs" and self.lr_schedule in ("cyclic", "onecycle"):
                continue  # a cyclic rate is shaped by the run's length: another --epochs is another schedule
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


LR_SCHEDULES = ("piecewise", "cyclic", "onecycle")
# defenses whose adversary does not start from InnerAttack's random start, so attack_start cannot apply
_OWN_START = {"free": "its δ carries over from replay to replay (zero at the first batch)",
              "gat": "its attack starts at its own random-sign point"}
NO_VALIDATION = "val_size 0: no validation split; report the last epoch's weights"


def _check_val_size(value):
    """0 (no split), a fraction in (0, 1) or a whole count >= 1 (a whole float counts as a count)."""
    allowed = "0 (no validation split), a fraction in (0, 1) or a count >= 1"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"val_size (--val-size) must be {allowed}, got {value!r}")
    if value == 0:
        return 0
    if isinstance(value, float) and not value.is_integer():
        if not 0 < value < 1:
            raise ValueError(f"val_size (--val-size) must be {allowed}, got {value}")
        return check_float("val_size", value)
    if value < 1:
        raise ValueError(f"val_size (--val-size) must be {allowed}, got {value}")
    return check_int("val_size", value, min=1)


_RANK_SEED_STRIDE = 1_000_003  # process k of a distributed run seeds its attack generator with seed + k·stride
# fields added after runs were first recorded: a recorded config without them had their (then only) behaviour
_NEWER_FIELDS = {"lr_schedule": "piecewise", "attack_random_start": True, "overfit_check": False, "overfit_n": 256,
                 "early_stop": False, "precision": "fp32", "compile": False, "deterministic": False,
                 "attack_start": "uniform"}


def learning_rate(cfg: TrainConfig, epoch: int, batch: int, batches: int) -> float:
    """The learning rate of batch ``batch`` (0-based) of epoch ``epoch`` (0-based), a pure function of the
    position in the run (so resume is exact with no scheduler state).

    - piecewise: ``lr`` times lr_gamma per milestone m with m <= epoch (0-based): a milestone m lowers the
      rate from the (m+1)-th epoch on, 1-based (the paper's schedules; see SCHEDULES);
    - cyclic: triangular, 0 → ``lr`` at half the run → 0 (Wong et al. 2020's CyclicLR for FGSM-RS);
    - onecycle: piecewise linear, 0 → ``lr`` at 2/5 of the run → 0 (Andriushchenko & Flammarion 2020's
      schedule for GradAlign).
    Both cyclic kinds move per batch, evaluated after the batch ((batch + 1) / batches of the epoch done),
    so the first batch already has a positive rate."""
    if cfg.lr_schedule == "piecewise":
        return cfg.lr * cfg.lr_gamma ** sum(1 for m in cfg.milestones if m <= epoch)
    t = epoch + (batch + 1) / batches
    peak = (0.5 if cfg.lr_schedule == "cyclic" else 0.4) * cfg.epochs
    frac = t / peak if t <= peak else max(0.0, (cfg.epochs - t) / (cfg.epochs - peak))
    return cfg.lr * min(1.0, frac)


def _cpu(tree):
    """Every tensor of a (nested) dict on the CPU: what is sent between processes or saved."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    return tree


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


def fit(config: TrainConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """Train per ``config``; returns the summary written to ``out/summary.json``.

    ``out`` is claimed as a :class:`~sirobust.runfolder.RunFolder`: a folder that
    holds a run is refused unless ``resume`` (continue it; its recorded config
    must match) or ``overwrite`` (move it aside, start again). The first SIGINT
    or SIGTERM saves the progress of the epoch in flight and raises
    :class:`~sirobust.interrupts.RunInterrupted`. The run seeds and checkpoints
    its own RNG streams; the caller's global RNG state and cuDNN settings are
    restored on return.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run, or move it aside and start again")
    cfg = config.resolved()
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
                return _fit(cfg, device, folder, stop, log, group)
        finally:
            torch.backends.cudnn.benchmark = benchmark
            restore_deterministic(determinism)


def recorded_config(out) -> Optional[dict]:
    """The config a run folder recorded when it started (run.json), or None."""
    path = Path(out) / RUN_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    if not (isinstance(record, dict) and record.get("kind") == "train" and isinstance(record.get("config"), dict)):
        return None
    return {**_NEWER_FIELDS, **record["config"]}  # a field the run predates had its then only behaviour


def _mismatch(where, diff: list[str]) -> ResumeMismatch:
    hint = (" (the preset's milestones scale with --epochs: pass --milestones explicitly to extend a run)"
            if diff == ["milestones"] else "")
    return ResumeMismatch(f"--resume: the run in {where} was started with a different configuration "
                          f"(differs in: {', '.join(diff)}){hint}; use the same flags, or --overwrite to start again")


def _check_resumable(cfg: TrainConfig, folder: RunFolder) -> None:
    """Compare the config with the one the run recorded when it started (before any data is loaded)."""
    saved = folder.record.get("config")
    if not saved:
        return  # a run from before run.json: the state file's identity is checked instead
    try:
        saved = {**_NEWER_FIELDS, **saved}  # a run recorded before a field existed had that field's only behaviour
        saved_identity = json.loads(json.dumps(TrainConfig(**{**saved, "milestones": tuple(saved["milestones"] or ())})
                                               .identity()))
    except TypeError as e:
        raise ResumeMismatch(f"--resume: {folder.path / RUN_FILE} records a config this version cannot read ({e})") \
            from None
    diff = config_difference(saved_identity, json.loads(json.dumps(cfg.identity())))
    if diff:
        raise _mismatch(folder.path, diff)


def _load_resume_state(cfg: TrainConfig, folder: RunFolder, device, log) -> Optional[dict]:
    run_id = folder.record.get("run_id")
    identity = json.loads(json.dumps(cfg.identity()))

    def check(state: dict, path: Path) -> None:
        for key in ("model", "optimizer", "scheduler", "rng", "epoch", "best"):
            if key not in state:
                raise StateFileError(f"{path} is not a sirobust training state (no {key!r})")
        if run_id and state.get("run_id") and state["run_id"] != run_id:
            raise StateFileError(f"{path} belongs to another run (run id {state['run_id']}, this folder's is "
                                 f"{run_id})")
        if "identity" in state:
            older = {k: v for k, v in _NEWER_FIELDS.items() if k in identity}  # fields a state may predate
            diff = config_difference({**older, **json.loads(state["identity"])}, identity)
            if diff:
                raise _mismatch(path, diff)

    # read on the CPU: RNG states must stay CPU byte tensors, and under torchrun the state is sent to the other
    # processes, each of which moves what it needs to its own device
    found = load_state(folder.path / STATE_NAME, device="cpu", log=log, check=check)
    return None if found is None else found[0]


def _fit(cfg: TrainConfig, device: torch.device, folder: RunFolder, stop: StopRequest, log,
         group: Optional[Group] = None) -> dict:
    group = group or Group()
    out = folder.path
    if folder.resumed:
        _check_resumable(cfg, folder)
        # rank 0 reads (and checks) the state; every process continues from it
        state = group.first(_load_resume_state, cfg, folder, device, log)
        if state is not None and int(state.get("world_size", 1)) != group.world:
            raise ResumeMismatch(f"--resume: the run in {out} was trained by {state.get('world_size', 1)} "
                                 f"process(es), this is {group.world}: each process's random streams and batch "
                                 "slices are part of the run; resume it with the same number of processes")
        if state is None and folder.record.get("legacy"):
            raise RunFolderError(f"--resume: {out} holds no training checkpoint ({STATE_NAME}) to continue from")
        if state is None:
            log(f"{out} has no checkpoint yet (stopped before its first epoch ended): starting over with its "
                "recorded config")
    else:
        state = None
    info = get_dataset_info(cfg.dataset)

    full = group.local_first(load_dataset, cfg.dataset, "train", data_dir=cfg.data_dir,
                             accept_checksum_mismatch=cfg.accept_checksum_mismatch)
    if cfg.val_size == 0:  # the whole training set is trained on (TRADES' and MART's protocol): nothing held out
        train_ds, val_ds, val_idx = full, None, torch.zeros(0, dtype=torch.int64)
    else:
        train_ds, val_ds, val_idx = train_val_split(full, cfg.val_size, seed=cfg.seed)
    if cfg.train_n is not None:
        train_ds = train_ds.subset(torch.arange(min(cfg.train_n, len(train_ds))))
    # with N processes every one walks the same global batches and trains on its slice of each
    tail = len(train_ds) % cfg.batch_size
    loader = BatchLoader.from_dataset(train_ds, cfg.batch_size, shuffle=True, augment=cfg.augment,
                                      drop_last=group.enabled and 0 < tail < 2 * group.world,
                                      device=device, seed=cfg.seed)
    val_n = 0 if val_ds is None else min(cfg.val_n, len(val_ds))

    torch.manual_seed(cfg.seed)  # model init; everything after is checkpointed
    model = build_model(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels,
                        mean=info.mean, std=info.std).to(device)
    fast = resolve_precision(cfg.precision, device)
    if fast.channels_last:
        model = model.to(memory_format=torch.channels_last)  # the layout the fastest convolutions use
    si = SIConfig(cfg.si_scale, cfg.si_margin, cfg.si_weight) if cfg.si else None
    if cfg.defense == "he":
        # HE's classifier is s · cos θ (Pang et al. 2020): train, validate and save it that way
        model.use_cosine_head(cfg.defense_params.get("scale", 15.0))
    defense = build_defense(cfg.defense, attack=InnerAttack(eps=cfg.eps, alpha=cfg.attack_alpha, steps=cfg.attack_steps,
                                                            norm=cfg.norm, model_mode=cfg.attack_mode,
                                                            random_start=cfg.attack_random_start,
                                                            start=cfg.attack_start),
                            si=si, **cfg.defense_params)
    # the training forward passes may run compiled; state and checkpoints always come from `model` itself
    runner = torch.compile(model) if cfg.compile else model
    if group.enabled:  # DDP averages the gradients; HE's cosine head leaves its bias without one
        from torch.nn.parallel import DistributedDataParallel
        runner = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=cfg.defense == "he")
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # each process's attacks draw their own random starts (rank 0's stream is the single-process one)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + _RANK_SEED_STRIDE * group.rank)
    # catastrophic overfitting (Wong et al. 2020): PGD accuracy on a fixed, unaugmented training subset
    overfit_set = (train_ds.subset(torch.arange(min(cfg.overfit_n, len(train_ds)))) if cfg.overfit_check else None)

    # model selection on the held-out split: robust accuracy for defenses, clean accuracy for standard training;
    # without one (val_size 0) there is none: "best" says so, and the last epoch's weights are the result
    select = "val_clean_acc" if cfg.defense == "standard" else "val_robust_acc"
    best = ({"epoch": None, "metric": select, select: -1.0} if val_ds is not None
            else {"epoch": None, "metric": None, "reason": NO_VALIDATION})
    start_epoch, partial, stopped_early = 0, None, None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        mine = state["ranks"][group.rank] if state.get("ranks") else state  # this process's streams
        for name, buf in model.named_buffers():
            if name in (mine.get("buffers") or {}):
                buf.copy_(mine["buffers"][name])
        defense.load_state_dict(mine.get("defense") or {})
        _set_rng_state(mine["rng"], gen, device)
        start_epoch = int(state["epoch"])
        best = json.loads(state["best"])
        partial = state.get("partial")  # progress inside epoch start_epoch + 1, saved on a stop signal
        if partial is not None:
            loader.load_state_dict(partial["loader"])
            if not group.main:  # the saved sums are the whole run's, kept by rank 0
                partial = {**partial, "totals": {}, "n": 0}
        if state.get("stopped_early"):
            log(f"{out} stopped early at epoch {start_epoch} ({state['stopped_early']}); nothing to resume")
            start_epoch = cfg.epochs
        elif start_epoch >= cfg.epochs:
            log(f"{out} already finished its {start_epoch} epochs (pass a larger --epochs, with explicit --milestones, "
                "to extend it)")
        else:
            where = f"epoch {start_epoch + 1}/{cfg.epochs}" + (f", batch {partial['loader']['position'] + 1}"
                                                              if partial else "")
            log(f"resuming {out} at {where}")
    metrics_path = out / METRICS_NAME
    if group.main:  # rank 0 writes every file of the run; the others only compute
        rows = [r for r in read_jsonl(metrics_path) if r.get("epoch", 0) <= start_epoch] if metrics_path.exists() \
            else []
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        if state is None:  # a fresh start: nothing from a stopped attempt may be mistaken for this run's output
            for stale in ("summary.json", BEST_NAME, WEIGHTS_NAME):
                (out / stale).unlink(missing_ok=True)
        if val_ds is None:  # no model selection: a best.safetensors here could only mislead
            (out / BEST_NAME).unlink(missing_ok=True)
        write_json(out / CONFIG_NAME, {"config": dataclasses.asdict(cfg), "defense": defense.describe(),
                                       "val_indices": val_idx, "environment": environment_info(),
                                       "processes": group.world})

    def save_state_now(epoch_done: int, partial_now: Optional[dict]) -> None:
        # every process's random streams and defense state (FreeAT's δ is per slice), written by rank 0
        # and batch-norm statistics: each process updates them from its own slice between DDP's broadcasts
        ranks = group.gather({"rng": _cpu(_rng_state(gen, device)), "defense": _cpu(defense.state_dict()),
                              "buffers": {k: v.cpu() for k, v in model.named_buffers()}} if group.enabled else None)
        if not group.main:
            return
        save_state(out / STATE_NAME, {
            # "scheduler": the learning rate is a function of the position (learning_rate); kept for old readers
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": {},
            "defense": defense.state_dict(), "stopped_early": stopped_early,
            "rng": _rng_state(gen, device), "epoch": epoch_done, "best": json.dumps(best), "partial": partial_now,
            "identity": json.dumps(cfg.identity()), "run_id": folder.record.get("run_id"), "version": __version__,
            "world_size": group.world, "ranks": ranks if group.enabled else None})

    tb = _tensorboard_writer(out) if cfg.tensorboard and group.main else None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            stats, partial = _train_epoch(model, defense, opt, loader, gen, epoch, cfg, partial, stop, runner, fast,
                                          group)
            train_seconds = time.time() - t0  # the defense's own cost, without validation
            if partial is not None:  # stopped by a signal inside the epoch: keep what the finished batches did
                save_state_now(epoch, partial)
                pos = partial["loader"]["position"]
                who = stop.name or "a signal to another process"
                raise RunInterrupted(f"stopped by {who} in epoch {epoch + 1}, after batch {pos}/{len(loader)}; "
                                     f"progress saved in {out / STATE_NAME}. Continue with: "
                                     f"sirobust train --out {out} --resume", stop.signum)
            # every process validates rank 0's model (each updated its own batch-norm statistics from its slice)
            group.broadcast_buffers(model)
            val = {} if val_ds is None else _validate(model, val_ds, val_n, cfg, device, epoch, group)
            row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **stats, **val, "seconds": time.time() - t0,
                   "train_seconds": train_seconds}
            collapsed = False
            if overfit_set is not None:
                before = group.first(lambda: [r["overfit_pgd_acc"] for r in read_jsonl(metrics_path)
                                              if "overfit_pgd_acc" in r])
                row.update(_overfit_check(model, overfit_set, cfg, device, epoch, before, group))
                collapsed = row["overfit_collapse"]
                if collapsed:
                    log(f"warning: catastrophic overfitting in epoch {epoch + 1}: PGD accuracy on {len(overfit_set)} "
                        f"training images fell to {row['overfit_pgd_acc']:.3f} from a best of {max(before):.3f}"
                        + (("; stopping (--early-stop)" + (", best.safetensors is from before the collapse"
                                                            if val else ""))
                           if cfg.early_stop else "; pass --early-stop to stop at a collapse"))
            if group.main:
                append_jsonl(metrics_path, row)
            if tb is not None:
                for k, v in row.items():
                    if k != "epoch" and isinstance(v, (int, float)):
                        tb.add_scalar(k, v, epoch + 1)
                tb.flush()
            # Wong et al.'s early stop keeps the weights from before a collapse as the run's result: the collapsed
            # epoch's weights are not saved over the previous epoch's (with or without a validation split)
            if group.main and not (collapsed and cfg.early_stop):
                save_model(model, out / WEIGHTS_NAME, model_name=cfg.model, dataset=cfg.dataset,
                           extra={"epoch": epoch + 1, "defense": defense.describe()})
            if val and val[select] > best[select] and not collapsed:
                best = {"epoch": epoch + 1, "metric": select, "val_robust_acc": val["val_robust_acc"],
                        "val_clean_acc": val["val_clean_acc"]}
                if group.main:
                    save_model(model, out / BEST_NAME, model_name=cfg.model, dataset=cfg.dataset,
                               extra={"epoch": epoch + 1, "defense": defense.describe(), "best": best})
            if collapsed and cfg.early_stop:
                stopped_early = f"catastrophic overfitting in epoch {epoch + 1}"
            # the resume state is written last: a kill before it completes redoes the epoch
            save_state_now(epoch + 1, None)
            log(f"epoch {epoch + 1}/{cfg.epochs}  loss {stats['loss']:.4f}  train-acc {stats['train_acc']:.3f}  "
                + (f"val clean {val['val_clean_acc']:.3f}  val PGD-{cfg.val_steps} {val['val_robust_acc']:.3f}  "
                   if val else "no validation  ")
                + f"({row['seconds']:.1f}s)")
            if stopped_early:
                break
            if group.any(stop.requested) and epoch + 1 < cfg.epochs:
                who = stop.name or "a signal to another process"
                raise RunInterrupted(f"stopped by {who} after epoch {epoch + 1}/{cfg.epochs}; its checkpoint is "
                                     f"saved. Continue with: sirobust train --out {out} --resume", stop.signum)
    finally:
        if tb is not None:
            tb.close()

    if not group.main:
        return {"out": str(out), "epochs": cfg.epochs, "best": best, "rank": group.rank}
    rows = read_jsonl(metrics_path)
    env = environment_info()
    weights = {name: file_sha256(out / name) for name in (WEIGHTS_NAME, BEST_NAME) if (out / name).exists()}
    stopped = stopped_early or (state or {}).get("stopped_early")
    summary = {"out": str(out), "epochs": cfg.epochs, "identity": cfg.identity(), "best": best,
               "stopped_early": stopped,
               # the epoch whose weights weights.safetensors holds (the one before the collapse, after an early stop)
               "last": (rows[-2] if stopped and len(rows) > 1 else rows[-1]) if rows else None,
               "weights": str(out / WEIGHTS_NAME),
               "best_weights": None if val_ds is None else str(out / BEST_NAME),
               "provenance": {"run_id": folder.record.get("run_id"), "weights_sha256": weights,
                              "command": folder.record.get("command"), "resumed_by": command_line(),
                              "started": folder.record.get("created"), "finished": utc_now(), "device": str(device),
                              "precision": precision_of(model), "fast_path": fast.describe(),
                              "processes": group.world,
                              "sirobust": env["sirobust"], "torch": env["torch"],
                              "python": env["python"], "git_commit": env["git_commit"]}}
    write_json(out / "summary.json", summary)
    return summary


def _tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'sirobust[tensorboard]'") from None
    return SummaryWriter(str(out / "tensorboard"))


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


def _overfit_check(model, subset, cfg: TrainConfig, device, epoch: int, before: list,
                   group: Optional[Group] = None) -> dict:
    """PGD-5 accuracy (steps of ε/4) on a fixed training subset, and whether it collapsed: more than 0.2 below
    the best so far (Wong et al. 2020 stop FGSM training there: catastrophic overfitting)."""
    x, y, keys = _slice(subset.images, subset.labels, group)
    with eval_mode(model):
        atk = PGD(model, eps=cfg.eps, alpha=cfg.eps / 4, steps=5, norm=cfg.norm, seed=cfg.seed + epoch,
                  precision=cfg.precision)
        hits = correct_mask(model, x, y, batch_size=256, attack=atk, device=device, keys=keys).sum().item()
    acc = (group or Group()).sum({"hits": hits})["hits"] / len(subset.labels)
    return {"overfit_pgd_acc": acc, "overfit_collapse": bool(before) and acc < max(before) - 0.2}


def _slice(images: torch.Tensor, labels: torch.Tensor, group: Optional[Group]):
    """This process's contiguous share of a fixed example set, and the examples' indices (which key the
    attack's random starts, so the result does not depend on how the set is shared)."""
    keys = torch.arange(len(labels))
    if group is not None and group.enabled:
        keys = keys.tensor_split(group.world)[group.rank]
    return images[keys], labels[keys], keys


def _validate(model, val_ds, n: int, cfg: TrainConfig, device, epoch: int, group: Optional[Group] = None) -> dict:
    """Clean and PGD accuracy on the first ``n`` held-out examples (shared among the processes of a group)."""
    x, y, keys = _slice(val_ds.images[:n], val_ds.labels[:n], group)
    with eval_mode(model):
        clean = correct_mask(model, x, y, batch_size=256, device=device)
        if cfg.defense == "standard" and not cfg.si and cfg.eps == 0:
            robust = clean
        else:
            atk = PGD(model, eps=cfg.eps, alpha=cfg.eps / 4, steps=cfg.val_steps, norm=cfg.norm, seed=cfg.seed + epoch,
                      precision=cfg.precision)
            robust = correct_mask(model, x, y, batch_size=256, attack=atk, device=device, keys=keys)
    hits = (group or Group()).sum({"clean": clean.sum().item(), "robust": robust.sum().item()})
    return {"val_clean_acc": hits["clean"] / n, "val_robust_acc": hits["robust"] / n, "val_n": n}
