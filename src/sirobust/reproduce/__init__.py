"""``sirobust reproduce NAME``: every table and figure of the paper from one command.

Each experiment is a config file shipped in ``sirobust/reproduce/configs/`` (``fig1``, ``fig3`` … ``fig5``,
``table2`` … ``table10``), read and checked by :mod:`.schema`, expanded into cells by :mod:`.plan`,
computed by :mod:`.runner` (every run and evaluation reused when it already exists, so an interrupted
grid continues where it stopped) and written by :mod:`.tables` or :mod:`.figures`.

Example::

    from sirobust.reproduce import reproduce
    reproduce("table6", preset="smoke", out="runs/reproduce")
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Callable, Optional

from ..io import atomic_write_text, write_json
from .plan import make_plan, result_folder
from .schema import PRESETS, ConfigError, Experiment, parse_experiment, read_config_file

__all__ = ["reproduce", "load_experiment", "list_experiments", "ConfigError", "PRESETS"]


def _configs_dir() -> Path:
    return Path(str(resources.files("sirobust.reproduce").joinpath("configs")))


def list_experiments() -> list[str]:
    """The names of the packaged experiments, figures first, in the paper's order."""
    names = [p.stem for p in _configs_dir().glob("*.toml")]
    return sorted(names, key=lambda n: (not n.startswith("fig"), int("".join(ch for ch in n if ch.isdigit()) or 0)))


def load_experiment(name_or_path: str) -> Experiment:
    """A packaged experiment by name (``"table6"``) or a config file by path (.toml, .yaml)."""
    path = Path(name_or_path)
    if path.suffix.lower() in (".toml", ".yaml", ".yml"):
        return parse_experiment(read_config_file(path), str(path))
    names = list_experiments()
    if name_or_path not in names:
        raise ConfigError(f"no experiment named {name_or_path!r}; the experiments are {', '.join(names)} "
                          "(or give a config file: path/to/config.toml)")
    path = _configs_dir() / f"{name_or_path}.toml"
    return parse_experiment(read_config_file(path), path.name)


def reproduce(name: str, preset: str = "mini", out: str = "runs/reproduce", overrides: Optional[dict] = None,
              device: str = "auto", progress: bool = True, overwrite: bool = False,
              model_dir: Optional[str] = None, accept_unpinned: bool = False, log: Callable = print) -> dict:
    """Compute experiment ``name`` (a packaged name or a config path) under ``preset`` into ``out``;
    returns the summary written beside the table or figure (``OUT/NAME-PRESET/``, or ``OUT/NAME-PRESET+HASH/``
    when ``overrides`` change what is computed: the preset's own result is never replaced). ``model_dir`` holds
    published models' files (Table 5); ``accept_unpinned`` lets one whose config gives no sha256 run."""
    import contextlib

    from ..distributed import current as current_group
    from ..experiments.published import DEFAULT_MODEL_DIR
    from .runner import Runner, open_root
    exp = load_experiment(name)
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    plan = make_plan(exp, preset, overrides, device=device)  # every setting checked before anything runs
    model_dir = Path(model_dir or DEFAULT_MODEL_DIR).expanduser()
    group = current_group(device)  # under torchrun: rank 0 writes, every process trains and attacks its share
    if not group.main:
        log = _silent

    def claim(stack):  # the output checked first, then every published file, before any work
        root = stack.enter_context(open_root(out, overwrite=overwrite, log=log))
        if exp.models:
            check_published(plan, model_dir, accept_unpinned)  # a wrong file stops the grid before any attack
        return root.path

    with contextlib.ExitStack() as stack:
        path = group.broadcast(group.first(claim, stack, share=False))
        target = Path(path) / result_folder(exp.name, preset, plan.overrides)
        log(f"sirobust reproduce {exp.name} --preset {preset}: {exp.title}\n"
            f"{len(plan.cells)} cells, {len(plan.runs)} training runs; results in {target}/"
            + (f" ({group.world} processes)" if group.enabled else ""))
        runner = Runner(plan, path, device=device, progress=progress, log=log, group=group)
        runner.model_dir = model_dir
        if exp.kind == "figure":
            from .figures import make_figure
            summary = make_figure(runner, target)
        else:
            summary = runner.run()
            if group.main:
                write_outputs(summary, target)
        log(f"\n{exp.name} ({preset}) written to {target}/: {runner.trained} runs trained, {runner.reused_runs} "
            f"reused; {runner.evaluated} evaluations computed, {runner.reused_evals} reused")
        return summary


def _silent(*_a, **_k) -> None:
    pass


def check_published(plan, model_dir: Path, accept_unpinned: bool) -> None:
    """Every published model the plan evaluates: its file present with the config's sha256 (all checked
    before the first is loaded); a model the config does not pin runs only with ``accept_unpinned``."""
    from ..experiments.published import verify
    used = list({c.published.name: c.published for c in plan.cells if c.published is not None}.values())
    unpinned = [m.name for m in used if not m.sha256 or (m.definition and not m.definition_sha256)]
    if unpinned and not accept_unpinned:
        raise ConfigError(f"{plan.experiment.source}: no sha256 is given for {', '.join(unpinned)} (of the weights "
                          "file, or of the definition file, which is code that runs), so nothing proves the files are "
                          "the published ones. Add sha256 = \"...\" (and definition_sha256) to each entry of a copy "
                          "of the config, or pass --accept-unpinned (accept_unpinned=True): the digests of the files "
                          "used are then recorded in every result")
    verify(used, model_dir, download=True)


def write_outputs(summary: dict, target: Path) -> None:
    from . import tables
    target.mkdir(parents=True, exist_ok=True)
    write_json(target / "table.json", summary)
    atomic_write_text(target / "table.md", tables.to_markdown(summary))
    atomic_write_text(target / "table.csv", tables.to_csv(summary))
    atomic_write_text(target / "table.tex", tables.to_latex(summary))
