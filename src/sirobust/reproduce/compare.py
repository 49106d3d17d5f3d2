"""Train several defenses (each with and without SI) and compare them in one table
(the shape of the paper's Tables 6-7: Natural, PGD, PGD-CW, PGD-DLR, SI-PGD, worst case).

Each run lives in its own folder under ``out``; a run whose ``summary.json``
already exists for the same configuration is reused, and an interrupted run is
resumed, so a long comparison survives being stopped. The table is written as
Markdown and JSON, with the command and environment that made it.

Example::

    sirobust compare --dataset fashion-mnist-mini --model cnn-small --defenses at,trades,alp,mart --with-si both --epochs 3
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from ..checks import as_names
from ..data import get_dataset_info
from ..defenses import list_defenses
from ..interrupts import RunInterrupted
from ..io import atomic_write_text, read_json, write_json
from ..runfolder import ConfigMismatch, RunFolder, config_difference
from . import tables
from .plan import make_plan, run_name
from .runner import Runner
from .schema import Column, Experiment, Preset, Row

ATTACKS = ("pgd", "pgd-cw", "pgd-dlr", "si-pgd")
COLUMNS = [Column("Natural", "natural"), Column("PGD", attack="pgd"), Column("PGD-CW", attack="pgd-cw"),
           Column("PGD-DLR", attack="pgd-dlr"), Column("SI-PGD", attack="si-pgd"), Column("worst case", "worst_case")]


def run_label(defense: str, si: bool) -> str:
    return defense.upper() + ("-SI" if si else "")


def compare_defenses(dataset: str, model: str, defenses: Sequence[str], si_modes: Sequence[bool] = (False, True),
                     epochs: Optional[int] = None, out: str = "runs/compare", eval_n: Optional[int] = 1000,
                     steps: int = 20, eps: Optional[float] = None, device: str = "auto", seed: int = 0,
                     progress: bool = True, train_kw: Optional[dict] = None, which: str = "best", mode: str = "new",
                     defense_params: Optional[dict] = None, log=print, seeds: Optional[Sequence[int]] = None) -> dict:
    """Train and evaluate every (defense, si) pair; returns the table as a dict and writes it to ``out``.

    ``out`` is a :class:`~sirobust.runfolder.RunFolder` of kind "compare": ``mode="resume"`` reuses the
    finished runs and evaluations and resumes a stopped run (the comparison's config must match),
    ``"overwrite"`` moves an earlier comparison aside, ``"new"`` (default) refuses a folder that holds one.
    ``defense_params`` maps ``"lam"`` (every defense that takes it) or ``"trades.lam"`` (one defense) to a value.
    ``seeds`` (training seeds, instead of ``seed``): every run once per seed, each cell a mean ± sd, and a
    difference between a defense and its SI version stated only where the paired tests of every seed and a t
    interval across the seeds support it (one seed: the statements are about those two trained models only).

    The comparison is an experiment of :mod:`sirobust.reproduce` built from the flags (rows: the defenses,
    columns: Natural, each attack, the worst case) and run by its runner; every name and setting is checked,
    and every run's config resolved, before the first run trains.
    """
    from ..checks import check_int, resolve_name
    from ..defenses import canonical_defense
    defenses = [canonical_defense(d) for d in as_names(defenses, "defense", list_defenses())]
    which = resolve_name("checkpoint", which, ("best", "last"))
    steps = check_int("steps", steps, min=1)
    eval_n = None if eval_n is None else check_int("eval_n (--num-examples)", eval_n, min=1)
    eps = get_dataset_info(dataset).default_eps if eps is None else eps
    per_defense = _split_defense_params(defenses, defense_params or {})
    if seeds is not None:
        from .schema import check_seeds
        seeds = check_seeds(list(seeds), "seeds (--seeds)")
    config = {"dataset": dataset, "model": model, "defenses": list(defenses), "si_modes": list(si_modes),
              "epochs": epochs, "eval_n": eval_n, "steps": steps, "eps": eps, "seed": seed, "which": which,
              "train_kw": train_kw or {}, "defense_params": defense_params or {},
              **({"seeds": seeds} if seeds is not None else {})}  # (a comparison recorded before --seeds resumes)
    exp = comparison_experiment(dataset, model, defenses, si_modes, epochs, eps, seed, train_kw or {}, per_defense,
                                {"n": eval_n, "steps": steps, "eps": eps, "seed": seed, "which": which}, seeds)
    plan = make_plan(exp, "custom", device=device)  # a bad setting fails here, before any training
    with RunFolder(out, "compare", mode, config=config, log=log) as folder:
        if folder.resumed and folder.record.get("config") is not None:
            diff = config_difference(json.loads(json.dumps(folder.record["config"])), json.loads(json.dumps(config)))
            if diff:
                raise ConfigMismatch(f"--resume: the comparison in {out} was started with a different configuration "
                                     f"(differs in: {', '.join(diff)}); use the same flags, or --overwrite")
        # each run in its own folder beside the table, named by its row (out/trades-si)
        run_dirs = {run_name(c.train): folder.path / (c.row.label.lower() + (f"-seed{c.seed}" if seeds else ""))
                    for c in plan.cells}
        runner = Runner(plan, folder.path, device=device, progress=progress, log=log, run_dirs=run_dirs,
                        claims=False)  # compare's folder is its own (held for the whole call)
        try:
            summary = runner.run()
        except RunInterrupted as e:  # the run's own message names `sirobust train`; the user ran compare
            raise RunInterrupted(f"stopped by a signal during the comparison in {out}; every finished run and the "
                                 "progress of the one in flight are saved. Continue with the same `sirobust compare` "
                                 "command and --resume", e.signum) from None
        result = {**summary, "dataset": dataset, "model": model, "eps": eps, "steps": steps, "epochs": epochs,
                  "checkpoint": which, "rows": _rows(summary, plan), "eval_n": summary["rows"][0]["n"]}
        text = tables.to_markdown(summary) + (ONE_SEED if not seeds or len(seeds) < 2 else "")
        write_json(folder.path / "compare.json", result)  # inside the folder's lock, as every write of the run
        atomic_write_text(folder.path / "compare.md", text)
    log("\n" + text)
    return result


# what one training seed can say (reproduce/stats.py): the runs, not the defenses
ONE_SEED = ("\nOne training seed: no difference between a defense and its SI version is stated from it, only whether "
            "these runs differ. `--seeds 0,1,2` (seeds=[0, 1, 2]) trains every run once per seed and tests the "
            "difference across them.\n")


def comparison_experiment(dataset, model, defenses, si_modes, epochs, eps, seed, train_kw, per_defense,
                          evaluation, seeds=None) -> Experiment:
    """The comparison as a :mod:`sirobust.reproduce` experiment with one preset, "custom"."""
    pairs = [("standard", False)] if "standard" in defenses else []
    pairs += [(d, s) for d in defenses if d != "standard" for s in si_modes if not (d == "he" and s)]
    rows = [Row(run_label(d, si), train={"defense": d, "si": si, "defense_params": per_defense.get(d, {})})
            for d, si in pairs]
    train = {"dataset": dataset, "model": model, "epochs": epochs, "eps": eps, "seed": seed, **train_kw}
    which = "best checkpoint (by validation PGD accuracy)" if evaluation["which"] == "best" else "last epoch"
    return Experiment(name="compare", kind="table", title=f"{model} on {dataset}", source="sirobust compare",
                      train=train, columns=COLUMNS, rows=rows,
                      presets={"custom": Preset(description=f"the flags of sirobust compare; {which}")},
                      eval=evaluation, seeds=list(seeds) if seeds else None)


def _rows(summary: dict, plan) -> list:
    """One dict per defense: its label, accuracies as fractions, the best epoch and its report (written into
    the run's folder as report.json, with a Markdown copy)."""
    from ..report import Report
    cell_of = {c.row.label: c for c in plan.cells}
    out = []
    for row in summary["rows"]:
        cell, v = cell_of[row["row"]], row["values"]
        runs = [s["run"] for s in row["per_seed"]] if row.get("per_seed") else [row["run"]]
        assert len(row["reports"]) == len(runs)  # one evaluation per run
        per_seed = []
        for run, report in zip(runs, row["reports"]):
            Report.from_dict(read_json(report)["report"]).save(Path(run) / "report.json")
            per_seed.append({"run": run, "best_epoch": read_json(Path(run) / "summary.json")["best"]["epoch"],
                             "report": str(Path(run) / "report.json")})
        out.append({"label": row["row"], "defense": cell.train.defense, "si": cell.train.si, "natural": v["Natural"],
                    **{a: v[c.label] for a, c in zip(ATTACKS, COLUMNS[1:5])}, "worst_case": v["worst case"],
                    # one seed: its run's; several: the mean over them, each seed's run below
                    "best_epoch": per_seed[0]["best_epoch"], "report": per_seed[0]["report"],
                    **({"seeds": row["seeds"], "sd": row["sd"], "per_seed": per_seed} if len(runs) > 1 else {})})
    return out


def _split_defense_params(defenses: list, params: dict) -> dict:
    """{defense: its own parameters} from "key" (every defense that takes it) and "defense.key" entries."""
    import inspect

    from ..defenses import DEFENSES, canonical_defense
    out = {d: {} for d in defenses}
    for key, value in params.items():
        target, _, name = key.rpartition(".")
        if target:
            target = canonical_defense(target)
            if target not in out:
                raise ValueError(f"--defense-param {key}: {target!r} is not among the defenses compared "
                                 f"({', '.join(defenses)})")
            out[target][name] = value
            continue
        takers = [d for d in defenses if name in inspect.signature(DEFENSES[d].__init__).parameters]
        if not takers:
            raise ValueError(f"--defense-param {key}: none of {', '.join(defenses)} has a parameter {name!r}")
        for d in takers:
            out[d][name] = value
    return out
