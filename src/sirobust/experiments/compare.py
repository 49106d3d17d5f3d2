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

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

from ..checkpoint import load
from ..checks import as_names
from ..defenses import list_defenses
from ..data import get_dataset_info, load_dataset
from ..evaluate import evaluate
from ..interrupts import RunInterrupted
from ..io import atomic_write_text, read_json, write_json
from ..provenance import environment_info
from ..runfolder import ConfigMismatch, RunFolder, command_line, config_difference
from ..train import STATE_NAME, TrainConfig, fit, pick_device, recorded_config

ATTACKS = ("pgd", "pgd-cw", "pgd-dlr", "si-pgd")


def run_label(defense: str, si: bool) -> str:
    return defense.upper() + ("-SI" if si else "")


def _train_or_reuse(cfg: TrainConfig, log) -> None:
    """Reuse a finished run with the same configuration, resume a stopped one, or train a new one."""
    out = Path(cfg.out)
    want = json.loads(json.dumps(cfg.resolved().identity()))
    summary = out / "summary.json"  # written only when a run completes
    if summary.exists():
        done = read_json(summary)
        if done.get("identity") == want and done.get("epochs") == cfg.resolved().epochs:
            log(f"[reuse] {out} (finished with the same configuration)")
            return
    holds_run = recorded_config(out) is not None or (out / STATE_NAME).exists()
    fit(cfg, resume=holds_run, log=log)  # a run with another configuration is refused by name, never replaced


def compare_defenses(dataset: str, model: str, defenses: Sequence[str], si_modes: Sequence[bool] = (False, True),
                     epochs: Optional[int] = None, out: str = "runs/compare", eval_n: Optional[int] = 1000,
                     steps: int = 20, eps: Optional[float] = None, device: str = "auto", seed: int = 0,
                     progress: bool = True, train_kw: Optional[dict] = None, which: str = "best", mode: str = "new",
                     defense_params: Optional[dict] = None, log=print) -> dict:
    """Train and evaluate every (defense, si) pair; returns the table as a dict and writes it to ``out``.

    ``out`` is a :class:`~sirobust.runfolder.RunFolder` of kind "compare": ``mode="resume"`` reuses the
    finished runs and resumes a stopped one (the comparison's config must match), ``"overwrite"`` moves
    an earlier comparison aside, ``"new"`` (default) refuses a folder that holds one. ``defense_params``
    maps ``"lam"`` (every defense that takes it) or ``"trades.lam"`` (one defense) to a value.

    Every name and setting is checked, and every run's config resolved, before the first run trains.
    """
    from ..checks import check_int, resolve_name
    from ..defenses import canonical_defense
    defenses = [canonical_defense(d) for d in as_names(defenses, "defense", list_defenses())]
    which = resolve_name("checkpoint", which, ("best", "last"))
    steps = check_int("steps", steps, min=1)
    eval_n = None if eval_n is None else check_int("eval_n (--num-examples)", eval_n, min=1)
    eps = get_dataset_info(dataset).default_eps if eps is None else eps
    per_defense = _split_defense_params(defenses, defense_params or {})
    config = {"dataset": dataset, "model": model, "defenses": list(defenses), "si_modes": list(si_modes),
              "epochs": epochs, "eval_n": eval_n, "steps": steps, "eps": eps, "seed": seed, "which": which,
              "train_kw": train_kw or {}, "defense_params": defense_params or {}}
    runs = _plan(dataset, model, defenses, si_modes, epochs, eps, seed, device, progress, train_kw, per_defense)
    for _label, cfg in runs:
        cfg.resolved()  # a bad setting fails here, before any training
    with RunFolder(out, "compare", mode, config=config, log=log) as folder:
        if folder.resumed and folder.record.get("config") is not None:
            diff = config_difference(json.loads(json.dumps(folder.record["config"])), json.loads(json.dumps(config)))
            if diff:
                raise ConfigMismatch(f"--resume: the comparison in {out} was started with a different configuration "
                                     f"(differs in: {', '.join(diff)}); use the same flags, or --overwrite")
        try:
            return _compare(folder.path, runs, dataset, model, epochs, eval_n, steps, eps, device, seed, progress,
                            train_kw or {}, which, log)
        except RunInterrupted as e:  # the run's own message names `sirobust train`; the user ran compare
            raise RunInterrupted(f"stopped by a signal during the comparison in {out}; every finished run and the "
                                 "progress of the one in flight are saved. Continue with the same `sirobust compare` "
                                 "command and --resume", e.signum) from None


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


def _plan(dataset, model, defenses, si_modes, epochs, eps, seed, device, progress, train_kw, per_defense) -> list:
    """(label, TrainConfig) of every run of the comparison, in order."""
    runs = [("standard", False)] if "standard" in defenses else []
    runs += [(d, s) for d in defenses if d != "standard" for s in si_modes if not (d == "he" and s)]
    return [(run_label(d, si), TrainConfig(dataset=dataset, model=model, defense=d, si=si, epochs=epochs, eps=eps,
                                           seed=seed, device=device, progress=progress, out="",
                                           defense_params=per_defense.get(d, {}), **(train_kw or {})))
            for d, si in runs]


def _compare(out: Path, runs, dataset, model, epochs, eval_n, steps, eps, device, seed, progress, train_kw, which,
             log) -> dict:
    test = load_dataset(dataset, "test", data_dir=train_kw.get("data_dir"),
                        accept_checksum_mismatch=train_kw.get("accept_checksum_mismatch", False))
    rows = []
    for label, cfg in runs:
        run_dir = out / label.lower()
        cfg = dataclasses.replace(cfg, out=str(run_dir))
        defense, si = cfg.defense, cfg.si
        log(f"\n[train] {label} -> {run_dir}")
        _train_or_reuse(cfg, log)
        weights = run_dir / ("best.safetensors" if which == "best" else "model.safetensors")
        net = load(weights, device=pick_device(device))
        log(f"[evaluate] {label} ({which} checkpoint): {', '.join(ATTACKS)}, ε = {eps:.4g}, {steps} steps")
        rep = evaluate(net, test, attacks=ATTACKS, eps=eps, steps=steps, n=eval_n, seed=seed, progress=progress,
                       config={"weights": str(weights), "dataset": dataset, "split": "test",
                               "model_description": f"{model} {label}"})
        rep.save(run_dir / "report.json")
        summary = read_json(run_dir / "summary.json")
        rows.append({"label": label, "defense": defense, "si": si, "natural": rep.clean_acc,
                     **{a: rep.attacks[a].robust_acc for a in ATTACKS}, "worst_case": rep.worst_case_acc,
                     "best_epoch": summary["best"]["epoch"], "report": str(run_dir / "report.json")})
    result = {"dataset": dataset, "model": model, "eps": eps, "steps": steps, "eval_n": len(rep.clean_correct),
              "epochs": epochs, "checkpoint": which, "rows": rows, "command": command_line(),
              "environment": environment_info()}
    write_json(out / "compare.json", result)
    atomic_write_text(out / "compare.md", to_markdown(result))
    log("\n" + to_markdown(result))
    return result


def to_markdown(result: dict) -> str:
    head = "| defense | Natural | PGD | PGD-CW | PGD-DLR | SI-PGD | worst case | best epoch |"
    lines = [f"## {result['model']} on {result['dataset']}", "",
             f"L∞ ε = {result['eps']:.4g}, {result['steps']} steps of ε/4, {result['eval_n']} test images, "
             f"{result['checkpoint']} checkpoint (by validation PGD accuracy); accuracy in %.", "",
             head, "|---|" + "---:|" * 7]
    for r in result["rows"]:
        cells = [r["natural"]] + [r[a] for a in ATTACKS] + [r["worst_case"]]
        lines.append(f"| {r['label']} | " + " | ".join(f"{100 * c:.2f}" for c in cells) + f" | {r['best_epoch']} |")
    env = result["environment"]
    lines += ["", f"command: `{result['command']}`", "",
              f"sirobust {env['sirobust']}, torch {env['torch']}, commit {env['git_commit']}, "
              f"{env['gpu'] or 'CPU'}", ""]
    return "\n".join(lines)
