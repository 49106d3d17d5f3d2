"""From an experiment and a preset to the list of cells to compute, every setting resolved and checked.

A cell is one row of the table within one combination of the axes (say ``TRADES-SI`` on CIFAR-10
with ResNet18): a training run (or a published model) and the evaluations its columns need. The
training settings of a cell stack in this order, each over the previous one:

    [train]  <  preset.train  <  the axes' values  <  the row's train  <  preset.force  <  command line

so a preset can shrink the runs (``force`` = ``{dataset = "fashion-mnist-mini", model = "cnn-small"}``)
without touching what the rows vary. Two cells with the same resolved training config are one run:
it is trained once, under ``OUT/runs/``, and shared by every table that needs it.

``seeds`` (the config's, the preset's, or ``--seeds``) is one more axis, over everything: each cell is
computed once per training seed, and the table shows the mean ± sd over them. A run's seed is part of its
resolved config, so the runs of seed 0 are those of a table without seeds, and finished seeds are reused.

A plan's work splits into shards (:func:`shard_runs`): each run with the evaluations of its cells goes to
one shard, balanced by estimated cost, the same way on every machine, so ``--shard K/N`` processes (a
SLURM array) together compute the whole grid and each run is trained by one of them.
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
    seed: Optional[int] = None     # the training seed (None: a published model)

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
    data: dict = field(default_factory=dict)  # data_dir, accept_checksum_mismatch: for the test set too
    seeds: list = field(default_factory=list)        # the seed axis ([the runs' seed] without one)
    comparisons: list = field(default_factory=list)  # (base label, other label) pairs tested under the table

    @property
    def column_groups(self) -> list:
        return list(dict.fromkeys(c.column_group for c in self.cells))

    @property
    def row_groups(self) -> list:
        return list(dict.fromkeys(c.row_group for c in self.cells))


# The figures that compare methods, whose data is computed for each training seed and compared across the seeds
# (Fig. 4: how fast TRADES' and TRADES-SI's adversarial loss rises along random weight directions; Fig. 5: their
# cos θ_y); the others describe one model (Figs. 1, 3).
SEEDED_FIGURES = ("fig4", "fig5")


def preset_of(exp: Experiment, name: str) -> Preset:
    if name not in exp.presets:
        raise ConfigError(f"{exp.name} has no preset {name!r} (it has: {', '.join(exp.presets) or 'none'})")
    return exp.presets[name]


def make_plan(exp: Experiment, preset: str, overrides: Optional[dict] = None, device: str = "auto") -> Plan:
    """Every cell of ``exp`` under ``preset`` with the command line's ``overrides`` ({"train": {...},
    "eval": {...}, "figure": {...}}); any bad setting fails here, before anything trains."""
    from ..train import TrainConfig
    overrides = figure_flags(exp, check_overrides(exp, overrides or {}))
    p = preset_of(exp, preset)
    # a flag that repeats the preset's own value changes nothing (and does not make a "+HASH" result)
    unset = object()
    base = {"eval": {**EVAL_DEFAULTS, **exp.eval, **p.eval}, "figure": {**exp.figure, **p.figure}}
    overrides = {**overrides, **{section: {k: v for k, v in overrides[section].items()
                                           if base[section].get(k, unset) != v} for section in base}}
    configured_seeds = p.seeds if p.seeds is not None else exp.seeds
    if overrides.get("seeds") is not None and overrides["seeds"] == configured_seeds:
        overrides = {k: v for k, v in overrides.items() if k != "seeds"}
    if overrides.get("seeds") is not None and "seed" in overrides.get("train", {}):
        raise ConfigError("command line: --seed and --seeds together; --seeds sets each run's training seed "
                          "(give one of them)")
    if configured_seeds is not None and overrides.get("seeds") is None and "seed" in overrides.get("train", {}):
        # --seed S on a config with a seed axis: that one seed (a change the result folder's name records)
        overrides = {**overrides, "seeds": [overrides["train"]["seed"]]}
    seeds = overrides.get("seeds") or configured_seeds
    if seeds is not None and exp.kind == "figure" and len(seeds) > 1 and exp.figure_kind not in SEEDED_FIGURES:
        raise ConfigError(f"{exp.source}: seeds = {seeds}: {exp.figure_kind} is drawn from one seed's runs (give one "
                          f"seed, or --seed; a seed axis is for {', '.join(SEEDED_FIGURES)}: a comparison of methods)")
    eval_cfg = {**EVAL_DEFAULTS, **exp.eval, **p.eval, **overrides.get("eval", {})}
    for key in ("attack_params", "attack_n"):
        eval_cfg[key] = attack_table({**exp.eval.get(key, {}), **p.eval.get(key, {}),
                                      **overrides.get("eval", {}).get(key, {})}, f"{exp.source}: eval.{key}")
    _check_eval(exp, preset, eval_cfg, overrides.get("eval", {}))
    figure = {**exp.figure, **p.figure, **overrides.get("figure", {})}
    axes = {**exp.axes, **p.axes}
    for key, value in overrides.get("train", {}).items():
        if key in axes:  # --dataset cifar10 on a table whose column groups are datasets: that group alone
            axes[key] = [value]
    rows = [r for r in exp.rows if p.rows is None or r.label in p.rows]
    models = {m.name: m for m in exp.models}
    cells, runs = [], {}
    for seed_index, values in itertools.product(range(len(seeds or [None])), itertools.product(*axes.values())):
        seed = seeds[seed_index] if seeds else None
        combo = dict(zip(axes, values))
        for row in rows:
            where = f"{exp.source}: row {row.label!r}" + (f" ({combo})" if combo else "") \
                + (f" (seed {seed})" if seed is not None else "")
            if row.model is not None:
                if seed_index:  # a published model is not trained: one cell, whatever the seeds
                    continue
                cell = Cell(row, combo, None, models[row.model])
            else:
                settings = {**exp.train, **p.train, **combo, **row.train}
                top = {**p.force, **overrides.get("train", {}), **({"seed": seed} if seed is not None else {})}
                try:  # the defense's own settings go to the defense the run ends up with (after force and flags)
                    from ..defenses import canonical_defense
                    defense = canonical_defense({**settings, **top}.get("defense", "standard"))
                    settings = {**settings, **p.defense_train.get(defense, {}), **top}
                    cfg = TrainConfig(**settings, device=device).resolved()
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"{where}: {e}") from None
                name = run_name(cfg)
                runs.setdefault(name, cfg)
                cell = Cell(row, combo, cfg, None, seed=cfg.seed)
            cell.column_group = _group(exp.column_group_by, cell)
            cell.row_group = _group(exp.row_group_by, cell)
            cell.jobs = eval_jobs(exp.columns, eval_cfg)
            cells.append(cell)
    seen = set()
    for c in cells:
        key = (c.row.label, c.column_group, c.row_group, c.seed)
        if key in seen:
            raise ConfigError(f"{exp.source}: preset {preset!r} puts row {c.row.label!r} twice in the same place of "
                              f"the table ({c.column_group or 'no column group'}, {c.row_group or 'no row group'}): "
                              "an axis it varies is not shown; give the preset one value of that axis")
        seen.add(key)
    if not cells:
        raise ConfigError(f"{exp.source}: the preset {preset!r} leaves no cell to compute")
    if eval_cfg["which"] == "best":
        blind = [name for name, cfg in runs.items() if cfg.val_size == 0]
        if blind:
            raise ConfigError(f"{exp.source}: eval.which = \"best\" needs a validation split, but {blind[0]} trains "
                              "with val_size 0 (no best checkpoint); evaluate the last epoch's weights (\"last\")")
    _check_attacks(exp, eval_cfg)
    _check_figure(exp, figure, [c.row.label for c in cells], overrides.get("figure", {}), preset)
    data = {k: {**exp.train, **p.train, **p.force, **overrides.get("train", {})}.get(k)
            for k in ("data_dir", "accept_checksum_mismatch")}
    pairs = exp.comparisons if exp.comparisons is not None else default_pairs(rows)
    labels = {r.label for r in rows}
    pairs = [pair for pair in pairs if pair[0] in labels and pair[1] in labels]  # a preset may drop rows
    used_seeds = list(seeds) if seeds else sorted({c.seed for c in cells if c.seed is not None})
    return Plan(exp, preset, eval_cfg, figure, cells, runs, overrides, data, seeds=used_seeds, comparisons=pairs)


def shard_runs(plan: Plan, index: int, count: int) -> set:
    """The runs (folder names) and published models (``published:NAME``) of shard ``index`` of ``count``
    (1-based): the units sorted by estimated cost (training plus the evaluations of their cells), largest
    first, each given to the least loaded shard (ties: the lower shard). The same plan gives the same split
    on every machine."""
    if not 1 <= index <= count:
        raise ConfigError(f"--shard K/N: K must be between 1 and N, got {index}/{count}")
    from .cost import eval_flops, train_flops
    cost: dict = {}
    for name, cfg in plan.runs.items():
        cost[name] = train_flops(cfg)
    for cell in plan.cells:
        unit = unit_of(cell)
        cost[unit] = cost.get(unit, 0.0) + eval_flops(plan, cell)
    load = [0.0] * count
    mine = set()
    for unit in sorted(cost, key=lambda u: (-cost[u], u)):
        k = min(range(count), key=lambda i: (load[i], i))
        load[k] += cost[unit]
        if k == index - 1:
            mine.add(unit)
    return mine


def unit_of(cell: Cell) -> str:
    """The unit of work a cell belongs to: its run (trained, then evaluated, by one process) or its
    published model."""
    return run_name(cell.train) if cell.train is not None else f"published:{cell.published.name}"


def default_pairs(rows: list) -> list:
    from .stats import default_pairs as pairs
    return pairs(rows)


def _check_eval(exp: Experiment, preset: str, eval_cfg: dict, cli: dict) -> None:
    """The evaluation's numbers, in range, each error naming the key and where its value came from
    (hours of training must not end in a rejected ``n``)."""
    from ..checks import parse_number

    def where(key):
        return _origin(exp, preset, "eval", key, cli, {"n": "-n", "steps": "--steps", "eps": "--eps", "seed": "--seed"})

    for key, low in (("n", 1), ("steps", 1), ("batch_size", 1), ("seed", 0)):
        value = eval_cfg[key]
        if value is None and key == "n":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{where(key)}: expected an integer >= {low}, got {value!r}")
    if eval_cfg.get("eps") is not None:
        try:
            eps = parse_number(eval_cfg["eps"], "eval.eps") if isinstance(eval_cfg["eps"], str) \
                else float(eval_cfg["eps"])
        except ValueError as e:
            raise ConfigError(f"{where('eps')}: {e}") from None
        if not 0 < eps <= 1:
            raise ConfigError(f"{where('eps')}: ε is in pixel units of images in [0, 1]: expected 0 < ε <= 1, "
                              f"got {eps} (8/255 is written \"8/255\" or 0.031372...)")
        eval_cfg["eps"] = eps


def _origin(exp: Experiment, preset: str, section: str, key: str, cli: dict, flags: dict) -> str:
    """Where a setting's value came from, for an error message: the command line (its flag), the preset, or
    the config's own section."""
    if key in cli:
        flag = flags.get(key)
        return f"command line ({flag + ' or ' if flag else ''}--set {section}.{key})"
    if key in getattr(exp.presets[preset], section):
        return f"{exp.source}: presets.{preset}.{section}.{key}"
    return f"{exp.source}: {section}.{key}"


# settings that say where things are, not what is computed: they neither rename nor re-label a result
_LOCATION_KEYS = ("data_dir",)


def changed_settings(overrides: dict) -> list[str]:
    """The command line's settings that change what a table or figure computes ("train.epochs = 3")."""
    seeds = (overrides or {}).get("seeds")
    return ([f"seeds = {json.dumps(seeds)}"] if seeds is not None else []) + [
        f"{section}.{key} = {json.dumps(value, default=str)}" for section in ("train", "eval", "figure")
        for key, value in sorted((overrides or {}).get(section, {}).items()) if key not in _LOCATION_KEYS]


def result_folder(name: str, preset: str, overrides: dict) -> str:
    """``NAME-PRESET``; with overrides, ``NAME-PRESET+HASH``, so a quick ``--epochs 3`` never replaces the
    preset's own table (nor is it collected as the preset's result)."""
    changed = changed_settings(overrides)
    return f"{name}-{preset}" + (f"+{digest(changed, 8)}" if changed else "")


def attack_table(d: dict, where: str) -> dict:
    """{attack: value} with every attack name known (canonical names), so a typo is an error, not a no-op."""
    from ..attacks.registry import canonical_attack_name
    out = {}
    for key, value in d.items():
        try:
            out[canonical_attack_name(key)] = value
        except ValueError as e:
            raise ConfigError(f"{where}.{key}: {e}") from None
    return out


def _check_attacks(exp: Experiment, eval_cfg: dict) -> None:
    """Every attack built once with its parameters, on a stand-in model, before anything trains."""
    for name, params in eval_cfg["attack_params"].items():
        _try_attack(name, params, eval_cfg, f"{exp.source}: eval.attack_params.{name}")
    for i, col in enumerate(exp.columns):
        if col.attack:
            _try_attack(col.attack, {**eval_cfg["attack_params"].get(col.attack, {}), **col.params}, eval_cfg,
                        f"{exp.source}: columns[{i}]", restarts=col.restarts)
    for name, n in eval_cfg["attack_n"].items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"{exp.source}: eval.attack_n.{name}: expected a positive integer, got {n!r}")


def _try_attack(name: str, params, eval_cfg: dict, where: str, restarts: int = 1) -> None:
    import torch

    from ..attacks import build_attack
    from ..attacks.registry import attack_parameters
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: expected a table of {name}'s parameters, got {params!r}")
    allowed = attack_parameters(name)
    unknown = sorted(set(params) - set(allowed)) if allowed is not None else []
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: {name} has no such parameter (its parameters: {', '.join(allowed)})")
    stand_in = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    eps = eval_cfg.get("eps") or 0.03
    try:
        atk = build_attack(name, stand_in, overrides=params, eps=eps, alpha=eps / 4, steps=eval_cfg["steps"],
                           restarts=restarts, seed=eval_cfg["seed"], precision=eval_cfg["precision"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {name} with {params}: {e}") from None
    ran = getattr(atk, "restarts", 1)
    if restarts > 1 and ran != restarts:  # a column headed "5 restarts" must not run once
        try:  # does it take restarts as a parameter of its own?
            own = getattr(build_attack(name, stand_in, overrides={**params, "restarts": restarts}, eps=eps,
                                       alpha=eps / 4, steps=eval_cfg["steps"], seed=eval_cfg["seed"],
                                       precision=eval_cfg["precision"]), "restarts", 1) == restarts
        except (TypeError, ValueError):
            own = False
        raise ConfigError(f"{where}.restarts: {name} does not take the evaluation's restarts (it would run {ran} "
                          f"time(s) under a column that says {restarts}); "
                          + (f"give them as its own parameter, params = {{ restarts = {restarts} }}" if own else
                             "it has no restarts of its own: remove restarts, or use pgd, pgd-cw, pgd-dlr, si-pgd"))


def _check_figure(exp: Experiment, figure: dict, labels: list, cli: dict, preset: str) -> None:
    if exp.kind != "figure":
        return

    def where(key):  # -n, --steps and --seed reach a figure as its own settings (see figure_flags)
        flags = {key: f"-{flag}" if flag == "n" else f"--{flag}"
                 for flag, key in _FIGURE_FLAGS.get(exp.figure_kind, {}).items()}
        return _origin(exp, preset, "figure", key, cli, flags)

    wanted = figure.get("models") or ([figure["model"]] if figure.get("model") else [])
    missing = [w for w in wanted if w not in labels]
    if missing:
        raise ConfigError(f"{exp.source}: figure.model(s): no row labelled {', '.join(map(repr, missing))} "
                          f"(rows: {', '.join(labels)})")
    if figure.get("attacks"):
        figure["attacks"] = list(attack_table({a: None for a in figure["attacks"]}, f"{exp.source}: figure.attacks"))
    grid = figure.get("grid")
    if grid is not None and (grid < 3 or grid % 2 == 0):
        raise ConfigError(f"{where('grid')}: must be odd and at least 3 (0 on the grid), got {grid}")
    lows = {"images": 1, "n": 1, "steps": 1, "seed": 0, "points": 2, "bins": 2, "directions": 1}
    for key, low in lows.items():
        if key in figure and figure[key] < low:
            raise ConfigError(f"{where(key)}: expected an integer >= {low}, got {figure[key]}")
    if "deltas" in figure and not any(d != 0 for d in figure["deltas"]):
        raise ConfigError(f"{where('deltas')}: give at least one step δ ≠ 0 along the direction (the figure is "
                          f"the loss's change away from δ = 0), got {figure['deltas']}")
    lo, hi = figure.get("alpha_min"), figure.get("alpha_max")
    if (lo is not None and lo <= 0) or (hi is not None and hi <= 0) or (lo and hi and lo >= hi):
        raise ConfigError(f"{where('alpha_min' if 'alpha_min' in cli else 'alpha_max')}: expected 0 < alpha_min < "
                          f"alpha_max (the logits are multiplied by α, on a log scale), got {lo} and {hi}")


# what -n, --steps and --seed mean for a figure that has its own settings for them
_FIGURE_FLAGS = {"fig3": {"n": "images", "steps": "steps", "seed": "seed"}, "fig4": {"n": "n", "steps": "steps",
                 "seed": "seed"}, "fig5": {"n": "n", "steps": "steps", "seed": "seed"}}


# the evaluation settings each figure's result depends on (its reuse key) ...
FIGURE_EVAL_KEYS = {"fig1": ("n", "steps", "seed", "eps", "which", "precision"),
                    "fig3": ("eps", "which"), "fig4": ("eps", "which"), "fig5": ("eps", "which")}
# ... and those the command line may set for it (batch size changes no number; --precision also trains the
# runs); any other is refused, never silently ignored
_FIGURE_CLI_EVAL = {"fig1": FIGURE_EVAL_KEYS["fig1"] + ("batch_size",), "fig3": ("eps", "which"),
                    "fig4": ("eps", "which"), "fig5": ("eps", "which")}


def figure_flags(exp: Experiment, overrides: dict) -> dict:
    """For figures 3-5, the evaluation flags become the figure's own settings (never silently ignored)."""
    if exp.kind != "figure":
        return overrides
    mapping = _FIGURE_FLAGS.get(exp.figure_kind, {})
    evaluation, figure = dict(overrides["eval"]), dict(overrides["figure"])
    for flag, key in mapping.items():
        if flag in evaluation:
            figure.setdefault(key, evaluation.pop(flag))
    if "precision" not in _FIGURE_CLI_EVAL[exp.figure_kind] and evaluation.get("precision") is not None \
            and evaluation["precision"] == overrides["train"].get("precision"):
        evaluation.pop("precision")  # --precision: it trains the runs; this figure's own computation is fp32
    unused = sorted(set(evaluation) - set(_FIGURE_CLI_EVAL[exp.figure_kind]))
    if unused:
        raise ConfigError(f"command line: {exp.figure_kind} does not use eval.{unused[0]} (it reads "
                          f"{', '.join(_FIGURE_CLI_EVAL[exp.figure_kind])}"
                          + (f", and -n/--steps/--seed as figure.{', figure.'.join(mapping.values())}" if mapping else "")
                          + ")")
    return {**overrides, "eval": evaluation, "figure": figure}


def check_overrides(exp: Experiment, overrides: dict) -> dict:
    """The command line's settings, checked like the config's (an error names the section and key)."""
    from .schema import EVAL_SCHEMA, FIGURE_SCHEMAS, check_table, train_table
    from .schema import check_seeds
    unknown = sorted(set(overrides) - {"train", "eval", "figure", "seeds"})
    if unknown:
        raise ConfigError(f"overrides: unknown section {unknown[0]!r} (allowed: train, eval, figure, seeds)")
    seeds = overrides.get("seeds")
    return {**({"seeds": check_seeds(seeds, "command line (--seeds)")} if seeds is not None else {}),
            "train": train_table(overrides.get("train", {}), "command line (train)"),
            "eval": check_table(overrides.get("eval", {}), EVAL_SCHEMA, "command line (eval)"),
            "figure": check_table(overrides.get("figure", {}), FIGURE_SCHEMAS.get(exp.figure_kind, {}),
                                  "command line (figure)")}


def _group(by: Optional[str], cell: Cell) -> str:
    if by is None:
        return ""
    if cell.train is not None:
        return display(by, getattr(cell.train, by))
    return display(by, getattr(cell.published, by, ""))


def run_key(cfg) -> dict:
    """What makes a training run the one it is (its resolved config, without where and how it is computed)."""
    key = {"identity": cfg.identity(), "epochs": cfg.epochs}
    if cfg.accept_checksum_mismatch:  # trained on files that failed their checksum: never the genuine run's folder
        key["data"] = "checksum mismatch accepted"
    return key


def run_name(cfg) -> str:
    """The folder of a training run under OUT/runs: readable, and unique to its resolved config."""
    tag = cfg.defense + ("-si" if cfg.si else "")
    return f"{cfg.dataset}/{cfg.model}/{tag}-e{cfg.epochs}-{digest(run_key(cfg))}"


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
