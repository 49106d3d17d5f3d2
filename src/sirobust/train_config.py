"""TrainConfig: every knob of a training run, its resolution to the presets and its record on disk.

:meth:`TrainConfig.resolved` fills each None from the schedule preset (:mod:`sirobust.schedule`), the
defense's own preset (its ``inner_preset``, ``lr_schedule_preset``, ``replays``, ``guard_overfitting``)
or the dataset's default, and checks every field (:mod:`sirobust.checks`) before any data is loaded.
:meth:`TrainConfig.identity` is what ``--resume`` must find unchanged; :func:`recorded_config` reads a
run folder's config back, with the fields a run may predate filled in (:data:`NEWER_FIELDS`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .checks import check_eps, check_float, check_int, check_step_size, resolve_name
from .data import get_dataset_info
from .data.loader import AUGMENTATIONS
from .defenses import InnerAttack, SIConfig, build_defense
from .defenses.base import START_KINDS
from .device import pick_device
from .fastpath import check_precision, resolve_precision
from .io import read_json
from .runfolder import RUN_FILE, ConfigMismatch, RunFolder, config_difference
from .schedule import LR_SCHEDULES, MODEL_SCHEDULE, SCHEDULES
from .threat import canonical_norm

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
        from .checkpoint import USER_MODEL_PREFIX
        dataset = canonical_dataset(self.dataset)
        # a model of the user's own (fit(config, model=...)) is recorded as user:ClassName
        model = self.model if str(self.model).startswith(USER_MODEL_PREFIX) else canonical_model(self.model)
        defense, norm = canonical_defense(self.defense), canonical_norm(self.norm)
        info = get_dataset_info(dataset)
        sched_name = resolve_name("schedule", self.schedule or MODEL_SCHEDULE.get(model, "resnet"), SCHEDULES)
        preset = SCHEDULES[sched_name]
        eps = check_eps(info.eps_for(norm) if self.eps is None else self.eps, norm, "eps")
        # the defense and its own parameters (unknown ones, HE with SI, a norm it is not defined for) fail here,
        # not after the data loaded
        kind = build_defense(defense, attack=InnerAttack(eps=eps, norm=norm),
                             si=SIConfig(self.si_scale, self.si_margin, self.si_weight) if self.si else None,
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
        steps = check_int("attack_steps (--steps)", inner.get("steps", 10) if self.attack_steps is None
                          else self.attack_steps, min=1 if kind.uses_attack else 0)
        if "steps" in kind.unused_attack_settings and steps != inner.get("steps", 10):
            raise ValueError(f"attack_steps (--steps) does not apply to {defense}: "
                             f"{kind.unused_attack_settings['steps']}")
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
            if kind.own_start:
                raise ValueError(f"attack_start (--attack-start) {attack_start!r} does not apply to {defense}: "
                                 f"{kind.own_start}; use 'uniform'")
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


# fields added after runs were first recorded: a recorded config without them had their (then only) behaviour
NEWER_FIELDS = {"lr_schedule": "piecewise", "attack_random_start": True, "overfit_check": False, "overfit_n": 256,
                "early_stop": False, "precision": "fp32", "compile": False, "deterministic": False,
                "attack_start": "uniform"}


def recorded_config(out) -> Optional[dict]:
    """The config a run folder recorded when it started (run.json), or None."""
    path = Path(out) / RUN_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    if not (isinstance(record, dict) and record.get("kind") == "train" and isinstance(record.get("config"), dict)):
        return None
    return {**NEWER_FIELDS, **record["config"]}  # a field the run predates had its then only behaviour


def resume_mismatch(where, diff: list[str]) -> ResumeMismatch:
    hint = (" (the preset's milestones scale with --epochs: pass --milestones explicitly to extend a run)"
            if diff == ["milestones"] else "")
    return ResumeMismatch(f"--resume: the run in {where} was started with a different configuration "
                          f"(differs in: {', '.join(diff)}){hint}; use the same flags, or --overwrite to start again")


def check_resumable(cfg: TrainConfig, folder: RunFolder) -> None:
    """Compare the config with the one the run recorded when it started (before any data is loaded)."""
    saved = folder.record.get("config")
    if not saved:
        return  # a run from before run.json: the state file's identity is checked instead
    try:
        saved = {**NEWER_FIELDS, **saved}  # a run recorded before a field existed had that field's only behaviour
        saved_identity = json.loads(json.dumps(TrainConfig(**{**saved, "milestones": tuple(saved["milestones"] or ())})
                                               .identity()))
    except TypeError as e:
        raise ResumeMismatch(f"--resume: {folder.path / RUN_FILE} records a config this version cannot read ({e})") \
            from None
    diff = config_difference(saved_identity, json.loads(json.dumps(cfg.identity())))
    if diff:
        raise resume_mismatch(folder.path, diff)

