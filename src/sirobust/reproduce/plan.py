"""From an experiment and a preset to the list of cells to compute, every setting resolved and checked.

A cell is one row of the table within one combination of the axes (say ``TRADES-SI`` on CIFAR-10
with ResNet18): a training run (or a published model) and the evaluations its columns need. The
training settings of a cell stack in this order, each over the previous one:

    [train]  <  preset.train  <  the axes' values  <  the row's train  <  preset.force  <  command line

so a preset can shrink the runs (``force`` = ``{dataset = "fashion-mnist-mini", model = "cnn-small"}``)
without touching what the rows vary. Two cells with the same resolved training config are one run:
it is trained once, under ``OUT/runs/``, and shared by every table that needs it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .schema import Column, ConfigError, Experiment, Preset, Row

# how tables name datasets and models (the paper's spelling)
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "mnist": "MNIST",
                 "fashion-mnist": "Fashion-MNIST", "fashion-mnist-mini": "Fashion-MNIST (mini)"}
MODEL_NAMES = {"resnet18": "ResNet18", "preact-resnet18": "PreActResNet18", "preact-resnet18-wong": "PreActResNet18",
               "preact-resnet18-gradalign": "PreActResNet18", "wrn-34-10": "WideResNet-34-10",
               "wrn-28-10": "WideResNet-28-10", "resnet50": "ResNet-50", "cnn-small": "cnn-small"}
EVAL_DEFAULTS = {"n": 1000, "steps": 20, "batch_size": 256, "seed": 0, "which": "last", "precision": "auto",
                 "attack_params": {}, "attack_n": {}}


def display(field_name: str, value) -> str:
    if field_name == "dataset":
        return DATASET_NAMES.get(value, value)
    if field_name == "model":
        return MODEL_NAMES.get(value, value)
    return f"{field_name} = {value}"


def digest(obj, length: int = 10) -> str:
    """A short stable hash of a JSON-able object (run and evaluation folder names)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


@dataclass
class EvalJob:
    """One ``evaluate`` call of a cell: the attacks of the columns that share restarts and image count."""
    restarts: int
    n: int
    attacks: list  # (result name, attack name, params)


@dataclass
class Cell:
    row: Row
    combo: dict                    # the axes' values of this cell
    train: Optional[object]        # resolved TrainConfig (None: a published model)
    published: Optional[object]    # PublishedModel
    column_group: str = ""
    row_group: str = ""
    jobs: list = field(default_factory=list)

    @property
    def dataset(self) -> str:
        return self.train.dataset if self.train is not None else self.published.dataset


@dataclass
class Plan:
    experiment: Experiment
    preset: str
    eval: dict
    figure: dict
    cells: list
    runs: dict                     # run folder name -> resolved TrainConfig (each trained once)
    overrides: dict

    @property
    def column_groups(self) -> list:
        return list(dict.fromkeys(c.column_group for c in self.cells))

    @property
    def row_groups(self) -> list:
        return list(dict.fromkeys(c.row_group for c in self.cells))


def preset_of(exp: Experiment, name: str) -> Preset:
    if name not in exp.presets:
        raise ConfigError(f"{exp.name} has no preset {name!r} (it has: {', '.join(exp.presets) or 'none'})")
    return exp.presets[name]


def make_plan(exp: Experiment, preset: str, overrides: Optional[dict] = None, device: str = "auto") -> Plan:
    """Every cell of ``exp`` under ``preset`` with the command line's ``overrides`` ({"train": {...},
    "eval": {...}, "figure": {...}}); any bad setting fails here, before anything trains."""
    from ..train import TrainConfig
    overrides = check_overrides(exp, overrides or {})
    p = preset_of(exp, preset)
    eval_cfg = {**EVAL_DEFAULTS, **exp.eval, **p.eval, **overrides.get("eval", {})}
    eval_cfg["attack_params"] = {**exp.eval.get("attack_params", {}), **p.eval.get("attack_params", {}),
                                 **overrides.get("eval", {}).get("attack_params", {})}
    figure = {**exp.figure, **p.figure, **overrides.get("figure", {})}
    axes = {**exp.axes, **p.axes}
    for key, value in overrides.get("train", {}).items():
        if key in axes:  # --dataset cifar10 on a table whose column groups are datasets: that group alone
            axes[key] = [value]
    rows = [r for r in exp.rows if p.rows is None or r.label in p.rows]
    models = {m.name: m for m in exp.models}
    cells, runs = [], {}
    for values in itertools.product(*axes.values()):
        combo = dict(zip(axes, values))
        for row in rows:
            where = f"{exp.source}: row {row.label!r}" + (f" ({combo})" if combo else "")
            if row.model is not None:
                cell = Cell(row, combo, None, models[row.model])
            else:
                settings = {**exp.train, **p.train, **combo, **row.train}
                settings.update(p.defense_train.get(settings.get("defense", "standard"), {}))
                settings.update({**p.force, **overrides.get("train", {})})
                try:
                    cfg = TrainConfig(**settings, device=device).resolved()
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"{where}: {e}") from None
                name = run_name(cfg)
                runs.setdefault(name, cfg)
                cell = Cell(row, combo, cfg, None)
            cell.column_group = _group(exp.column_group_by, cell)
            cell.row_group = _group(exp.row_group_by, cell)
            cell.jobs = eval_jobs(exp.columns, eval_cfg)
            cells.append(cell)
    seen = set()
    for c in cells:
        key = (c.row.label, c.column_group, c.row_group)
        if key in seen:
            raise ConfigError(f"{exp.source}: preset {preset!r} puts row {c.row.label!r} twice in the same place of "
                              f"the table ({c.column_group or 'no column group'}, {c.row_group or 'no row group'}): "
                              "an axis it varies is not shown; give the preset one value of that axis")
        seen.add(key)
    if not cells:
        raise ConfigError(f"{exp.source}: the preset {preset!r} leaves no cell to compute")
    return Plan(exp, preset, eval_cfg, figure, cells, runs, overrides)


def check_overrides(exp: Experiment, overrides: dict) -> dict:
    """The command line's settings, checked like the config's (an error names the section and key)."""
    from .schema import EVAL_SCHEMA, FIGURE_SCHEMAS, check_table, train_table
    unknown = sorted(set(overrides) - {"train", "eval", "figure"})
    if unknown:
        raise ConfigError(f"overrides: unknown section {unknown[0]!r} (allowed: train, eval, figure)")
    return {"train": train_table(overrides.get("train", {}), "command line (train)"),
            "eval": check_table(overrides.get("eval", {}), EVAL_SCHEMA, "command line (eval)"),
            "figure": check_table(overrides.get("figure", {}), FIGURE_SCHEMAS.get(exp.figure_kind, {}),
                                  "command line (figure)")}


def _group(by: Optional[str], cell: Cell) -> str:
    if by is None:
        return ""
    if cell.train is not None:
        return display(by, getattr(cell.train, by))
    return display(by, getattr(cell.published, by, ""))


def run_name(cfg) -> str:
    """The folder of a training run under OUT/runs: readable, and unique to its resolved config."""
    ident = cfg.identity()
    tag = cfg.defense + ("-si" if cfg.si else "")
    return f"{cfg.dataset}/{cfg.model}/{tag}-e{cfg.epochs}-{digest({'identity': ident, 'epochs': cfg.epochs})}"


def eval_jobs(columns: list[Column], eval_cfg: dict) -> list[EvalJob]:
    """The evaluate calls the columns need: attacks grouped by (restarts, image count)."""
    jobs: dict = {}
    caps = eval_cfg.get("attack_n", {})
    for col in columns:
        if not col.attack:
            continue
        n = eval_cfg["n"] if col.attack not in caps else min(caps[col.attack], eval_cfg["n"] or caps[col.attack])
        params = {**eval_cfg["attack_params"].get(col.attack, {}), **col.params}
        name = result_name(col)
        job = jobs.setdefault((col.restarts, n), EvalJob(col.restarts, n, []))
        if all(a[0] != name for a in job.attacks):
            job.attacks.append((name, col.attack, params))
    if not jobs:  # a table of clean accuracy alone still needs one pass
        jobs[(1, eval_cfg["n"])] = EvalJob(1, eval_cfg["n"], [])
    return list(jobs.values())


def result_name(col: Column) -> str:
    """The name an attack's result has in its report: the attack, with its own parameters if any."""
    if not col.params:
        return col.attack
    return col.attack + "[" + ",".join(f"{k}={v}" for k, v in sorted(col.params.items())) + "]"


def resolved_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def runs_root(out) -> Path:
    return Path(out) / "runs"
