"""Train several defenses (each with and without SI) and compare them in one table
(the shape of the paper's Tables 6-7: Natural, PGD, PGD-CW, PGD-DLR, SI-PGD, worst case).

Each run lives in its own folder under ``out``; a run whose ``summary.json``
already exists for the same configuration is reused, and an interrupted run is
resumed, so a long comparison survives being stopped. The table is written as
Markdown and JSON, with the command and environment that made it.

Example::

    sirobust compare --dataset fashion-mnist-mini --model cnn-small --defenses at,trades,alp,mart --si both --epochs 3
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..checkpoint import load
from ..data import get_dataset_info, load_dataset
from ..evaluate import evaluate
from ..io import atomic_write_text, write_json
from ..provenance import environment_info
from ..train import STATE_NAME, TrainConfig, fit

ATTACKS = ("pgd", "pgd-cw", "pgd-dlr", "si-pgd")


def run_label(defense: str, si: bool) -> str:
    return defense.upper() + ("-SI" if si else "")


def _train_or_reuse(cfg: TrainConfig, log) -> None:
    out = Path(cfg.out)
    want = cfg.resolved()
    summary = out / "summary.json"  # written only when a run completes (a fresh run deletes it first)
    if summary.exists():
        done = json.loads(summary.read_text())
        if done.get("identity") == json.loads(json.dumps(want.identity())) and done.get("epochs") == want.epochs:
            log(f"[reuse] {out} (finished with the same configuration)")
            return
    resumable = False
    if (out / STATE_NAME).exists() and not summary.exists():
        import torch
        state = torch.load(out / STATE_NAME, map_location="cpu", weights_only=True)
        resumable = json.loads(state["identity"]) == json.loads(json.dumps(want.identity()))
    fit(cfg, resume=resumable, log=log)


def compare_defenses(dataset: str, model: str, defenses: Sequence[str], si_modes: Sequence[bool] = (False, True),
                     epochs: Optional[int] = None, out: str = "runs/compare", eval_n: Optional[int] = 1000,
                     steps: int = 20, eps: Optional[float] = None, device: str = "auto", seed: int = 0,
                     progress: bool = True, train_kw: Optional[dict] = None, which: str = "best", log=print) -> dict:
    """Train and evaluate every (defense, si) pair; returns the table as a dict and writes it to ``out``."""
    info = get_dataset_info(dataset)
    eps = info.default_eps if eps is None else eps
    test = load_dataset(dataset, "test")
    rows = []
    runs = [("standard", False)] if "standard" in defenses else []
    runs += [(d, s) for d in defenses if d != "standard" for s in si_modes if not (d == "he" and s)]
    for defense, si in runs:
        label = run_label(defense, si)
        run_dir = Path(out) / label.lower()
        cfg = TrainConfig(dataset=dataset, model=model, defense=defense, si=si, epochs=epochs, out=str(run_dir),
                          eps=eps, seed=seed, device=device, progress=progress, **(train_kw or {}))
        log(f"\n[train] {label} -> {run_dir}")
        _train_or_reuse(cfg, log)
        weights = run_dir / ("best.safetensors" if which == "best" else "model.safetensors")
        net = load(weights)
        from ..train import pick_device
        net = net.to(pick_device(device))
        log(f"[evaluate] {label} ({which} checkpoint): {', '.join(ATTACKS)}, ε = {eps:.4g}, {steps} steps")
        rep = evaluate(net, test, attacks=ATTACKS, eps=eps, steps=steps, n=eval_n, seed=seed, progress=progress,
                       config={"weights": str(weights), "dataset": dataset, "split": "test",
                               "model_description": f"{model} {label}"})
        rep.save(run_dir / "report.json")
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({"label": label, "defense": defense, "si": si, "natural": rep.clean_acc,
                     **{a: rep.attacks[a].robust_acc for a in ATTACKS}, "worst_case": rep.worst_case_acc,
                     "best_epoch": summary["best"]["epoch"], "report": str(run_dir / "report.json")})
    result = {"dataset": dataset, "model": model, "eps": eps, "steps": steps, "eval_n": len(rep.clean_correct),
              "epochs": epochs, "checkpoint": which, "rows": rows, "command": " ".join(sys.argv),
              "environment": environment_info()}
    write_json(Path(out) / "compare.json", result)
    atomic_write_text(Path(out) / "compare.md", to_markdown(result))
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
