"""``sirobust reproduce NAME``: every table and figure of the paper from one command.

Each experiment is a config file shipped in ``sirobust/reproduce/configs/`` (``fig1``, ``fig3`` … ``fig5``,
``table2`` … ``table10``), read and checked by :mod:`.schema`, expanded into cells by :mod:`.plan`,
computed by :mod:`.runner` (every run and evaluation reused when it already exists, so an interrupted
grid continues where it stopped) and written by :mod:`.tables` or :mod:`.figures`.
``sirobust compare`` (:mod:`.compare`) builds an experiment from its flags and runs it the same way.

Example::

    from sirobust.reproduce import reproduce
    reproduce("table6", preset="smoke", out="runs/reproduce")
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

from ..io import atomic_write_text, write_json
from ..markdown import count
from .plan import make_plan, result_folder
from .schema import PRESETS, ConfigError, Experiment, parse_experiment, read_config_file

__all__ = ["reproduce", "load_experiment", "list_experiments", "ConfigError", "IncompleteGrid", "PRESETS"]


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


class IncompleteGrid(RuntimeError):
    """``--collect`` (or a shard) found runs or evaluations that are not done yet; the message names them."""


def reproduce(name: str, preset: str = "mini", out: str = "runs/reproduce", overrides: Optional[dict] = None,
              device: str = "auto", progress: bool = True, overwrite: bool = False,
              model_dir: Optional[str] = None, accept_unpinned: bool = False, log: Callable = print,
              shard: Optional[tuple] = None, jobs: int = 1, collect: bool = False,
              steal: bool = False, ledger: Optional[str] = None, ledger_read: bool = True) -> Optional[dict]:
    """Compute experiment ``name`` (a packaged name or a config path) under ``preset`` into ``out``;
    returns the summary written beside the table or figure (``OUT/NAME-PRESET/``, or ``OUT/NAME-PRESET+HASH/``
    when ``overrides`` change what is computed: the preset's own result is never replaced). ``model_dir`` holds
    published models' files (Table 5); ``accept_unpinned`` lets one whose config gives no sha256 run.

    In parallel: ``shard=(K, N)`` computes the K-th of N deterministic parts of the grid (:func:`.plan.shard_runs`)
    and writes the table only if it finds every part done (else returns None); ``jobs=N`` runs N such shards
    at once on this machine (:mod:`.jobs`: one GPU each, or a share of the CPU threads) and then the table;
    ``collect`` computes nothing and writes the table from what ``out`` holds (:class:`IncompleteGrid` names
    what is missing). ``steal`` (what each job of ``jobs`` does): the shard's units first, then any unit of the
    grid that no other process has claimed, so that no job sits idle while another has a queue. ``ledger`` (a
    folder, :mod:`.ledger`): every finished evaluation of a table is filed there too, and a run whose
    evaluations are all there is not trained (with ``overwrite``, or ``ledger_read`` False, nothing is taken
    from it: everything is computed again, and filed where the ledger has nothing yet)."""
    import contextlib

    from ..distributed import current as current_group
    from ..foreign.published import DEFAULT_MODEL_DIR
    from .plan import shard_runs
    from .runner import Runner, open_root, prepare_root
    exp = load_experiment(name)
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    _check_parallel(shard, jobs, collect, overwrite, device)
    plan = make_plan(exp, preset, overrides, device=device)  # every setting checked before anything runs
    if ledger is not None:
        from .ledger import Ledger
        ledger_read = ledger_read and not overwrite
        book = Ledger(ledger, read=ledger_read, log=log)  # a bad --ledger stops here, before any job starts
    units = shard_runs(plan, *shard) if shard is not None else None
    if steal and shard is None:
        raise ConfigError("steal takes work from other shards: it needs shard=(K, N)")
    prefer, units = (units, None) if steal else (None, units)
    if jobs > 1:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--jobs under torchrun: each process would start its own jobs; use --jobs alone (one "
                              "GPU per job), or torchrun alone (one large run over the GPUs)")
        from .jobs import run_jobs
        run_jobs(name, preset=preset, out=out, overrides=overrides, device=device, jobs=jobs, overwrite=overwrite,
                 model_dir=model_dir, accept_unpinned=accept_unpinned, log=log, ledger=ledger,
                 ledger_read=ledger_read)
        return reproduce(name, preset=preset, out=out, overrides=overrides, device=device, progress=progress,
                         model_dir=model_dir, accept_unpinned=accept_unpinned, log=log, collect=True,
                         ledger=ledger, ledger_read=ledger_read)
    model_dir = Path(model_dir or DEFAULT_MODEL_DIR).expanduser()
    group = current_group(device)  # under torchrun: rank 0 writes, every process trains and attacks its share
    if not group.main:
        log = _silent
    beside_others = shard is not None or collect  # other processes may share `out`: no lifelong claim

    def claim(stack):  # the output checked first, then every published file, before any work
        if beside_others:
            path = prepare_root(out, log=log)
        else:
            path = stack.enter_context(open_root(out, overwrite=overwrite, log=log)).path
        if exp.models and not collect:
            check_published(plan, model_dir, accept_unpinned)  # a wrong file stops the grid before any attack
        return path

    with contextlib.ExitStack() as stack:
        path = group.broadcast(group.first(claim, stack, share=False))
        target = Path(path) / result_folder(exp.name, preset, plan.overrides)
        part = "" if not shard else (
            f" (job {shard[0]}/{shard[1]}: its {len(prefer)} of the grid's units first, then any no other job has "
            "started)" if steal else f" (shard {shard[0]}/{shard[1]}: {len(units)} of the grid's units)")
        log(f"sirobust reproduce {exp.name} --preset {preset}: {exp.title}\n"
            f"{len(plan.cells)} cells, {len(plan.runs)} training runs; results in {target}/"
            + (f" ({group.world} processes)" if group.enabled else "") + part
            + (" (collecting: nothing is computed)" if collect else ""))
        runner = Runner(plan, path, device=device, progress=progress, log=log, group=group,
                        units=set() if collect else units, prefer=prefer)
        runner.model_dir = model_dir
        if ledger is not None:
            if exp.kind == "figure":  # its data is computed from the weights, which a ledger does not hold
                log(f"{exp.name} is a figure: it is computed from its runs' weights, so --ledger is not used")
            else:
                runner.ledger = book
        if exp.kind == "figure":
            from .figures import make_figure
            if beside_others:
                if collect:
                    runner.place_runs()
                else:
                    runner.train_all()
                waiting = [cfg.out for cfg in plan.runs.values() if group.first(_state, cfg) != "finished"]
                if collect and not (target / "figure.json").exists():
                    waiting.append(f"{target / 'figure.json'} (the figure's data: computed by the last shard, or by "
                                   "the same command without --collect)")
                if waiting:
                    return _incomplete(exp, preset, collect, log, "\n".join(f"  {w}" for w in waiting), shard)
                runner.units = set()  # everything is trained: the figure only reads the runs
            with runner.claim(f"figure {target.resolve()}") as claim:  # one process computes it
                if not claim.held:
                    return _incomplete(exp, preset, collect, log, f"  {target} (another process is computing it)",
                                       shard)
                summary = make_figure(runner, target)
        else:
            summary = runner.run(compute=not collect)
            if summary is None:
                return _incomplete(exp, preset, collect, log, runner.missing_text(), shard)
            if group.main:
                write_outputs(summary, target)
        log(f"\n{exp.name} ({preset}) written to {target}/: {count(runner.trained, 'run')} trained, "
            f"{runner.reused_runs} reused; {count(runner.evaluated, 'evaluation')} computed, {runner.reused_evals} reused"
            + (f"; from the ledger {runner.ledger_evals} evaluations ({runner.ledger_runs} runs not trained), "
               f"{runner.filed} filed in it" if runner.ledger is not None else ""))
        return summary


def _state(cfg) -> str:
    from .runner import run_state
    return run_state(cfg)


def _check_parallel(shard, jobs: int, collect: bool, overwrite: bool, device: str) -> None:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs must be an integer >= 1, got {jobs!r}")
    if jobs > 1 and device.startswith("cuda:"):
        raise ConfigError(f"--jobs with --device {device}: each job is given one GPU of its own "
                          "(CUDA_VISIBLE_DEVICES); use --device auto or cuda, and CUDA_VISIBLE_DEVICES to choose "
                          "which GPUs the jobs share")
    if shard is not None:
        if (not isinstance(shard, tuple) or len(shard) != 2 or not all(isinstance(x, int) for x in shard)
                or not 1 <= shard[0] <= shard[1]):
            raise ConfigError(f"shard must be (K, N) with 1 <= K <= N, got {shard!r} (--shard 2/4: the second of four)")
    given = [flag for flag, on in (("--shard", shard is not None), ("--jobs", jobs > 1), ("--collect", collect))
             if on]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} together: give one (--jobs N runs N shards and then collects)")
    if overwrite and (shard is not None or collect):
        raise ConfigError(f"--overwrite with {given[0]}: other processes may be using the folder; move it aside "
                          "once, before the shards start (or use --jobs N --overwrite)")


def _incomplete(exp, preset: str, collect: bool, log: Callable, missing: str, shard) -> None:
    """A shard that finished its part while others still work says what the table waits for; --collect, or a
    whole-grid process that found some of the grid claimed by another process, is an error naming it."""
    text = (f"{exp.name} ({preset}): the table waits for\n{missing}\nRun the shards that compute them (or the "
            "same command again once the other processes have ended), then `sirobust reproduce ... --collect`")
    if collect or shard is None:
        raise IncompleteGrid(text)
    log(f"\nshard {shard[0]}/{shard[1]} finished its part; " + text)
    return None


def _silent(*_a, **_k) -> None:
    pass


def check_published(plan, model_dir: Path, accept_unpinned: bool) -> None:
    """Every published model the plan evaluates: its file present with the config's sha256 (all checked
    before the first is loaded); a model the config does not pin runs only with ``accept_unpinned``."""
    from ..foreign.published import verify
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
