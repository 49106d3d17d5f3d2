"""``sirobust demo``: the paper's story in a few minutes on a CPU, on the bundled data.

1. Train a robust ``cnn-small`` on ``fashion-mnist-mini`` with each defense of
   the demo (with and without the SI mechanism).
2. Evaluate each with PGD, PGD-CW, PGD-DLR and SI-PGD (ε = 0.1, 20 steps of ε/4)
   and print a Table-6-style comparison.
3. Run the logit-rescaling study (Fig. 1) on the first model: PGD's accuracy
   rises as the logits are multiplied by α while SI-PGD's stays put.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .checkpoint import load
from .data import get_dataset_info, load_dataset
from .evaluate import evaluate
from .experiments import rescale
from .io import atomic_write_text, write_json
from .runfolder import RunFolder
from .train import TrainConfig, fit

DATASET = "fashion-mnist-mini"
ATTACKS = ("pgd", "pgd-cw", "pgd-dlr", "si-pgd")
# (label, defense, si): the runs the demo trains
RUNS = (("TRADES", "trades", False), ("TRADES-SI", "trades", True))


def comparison_table(rows: list[tuple[str, object]]) -> str:
    """Markdown table, one row per model: Natural and robust accuracy per attack (%)."""
    head = "| defense | Natural | " + " | ".join(a.upper() for a in ATTACKS) + " | worst case |"
    sep = "|---|" + "---:|" * (len(ATTACKS) + 2)
    lines = [head, sep]
    for label, rep in rows:
        cells = [f"{100 * rep.clean_acc:.2f}"] + [f"{100 * rep.attacks[a].robust_acc:.2f}" for a in ATTACKS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * rep.worst_case_acc:.2f} |")
    return "\n".join(lines)


def run_demo(out: str = "runs/demo", quick: bool = False, device: str = "auto", progress: bool = True,
             mode: str = "new", log=print) -> dict:
    """Run the demo into ``out`` (a :class:`~sirobust.runfolder.RunFolder` of kind "demo": ``mode="overwrite"``
    moves an earlier demo aside; ``"new"`` refuses a folder that holds one)."""
    with RunFolder(out, "demo", mode, config={"quick": quick}, log=log) as folder:
        return _run_demo(folder.path, quick, device, progress, log)


def _run_demo(out_dir: Path, quick: bool, device: str, progress: bool, log) -> dict:
    t_start = time.time()
    info = get_dataset_info(DATASET)
    # quick: a smoke run of every stage (tests use it); the numbers mean little
    epochs, train_n, n_eval, n_rescale, steps = (1, 640, 60, 40, 3) if quick else (DEMO_EPOCHS, None, 500, 300, 20)
    log(f"sirobust demo: {DATASET}, cnn-small, L∞ ε = {info.default_eps}; results in {out_dir}/")
    test = load_dataset(DATASET, "test")
    rows, dirs = [], {}
    for label, defense, si in RUNS:
        run_dir = out_dir / label.lower()
        log(f"\n[train] {label}: {epochs} epochs of {defense.upper()}{' + SI' if si else ''} "
            f"(10-step PGD inside{', SI-PGD examples and the β·CosFace term' if si else ''})")
        fit(TrainConfig(dataset=DATASET, model="cnn-small", defense=defense, si=si, epochs=epochs, out=str(run_dir),
                        train_n=train_n, val_n=100 if quick else 500, device=device, progress=progress), log=log)
        dirs[label] = run_dir
        model = load(run_dir / "model.safetensors", device=None if device == "auto" else device)
        if device == "auto" and torch.cuda.is_available():
            model = model.cuda()
        log(f"[evaluate] {label}: {', '.join(ATTACKS)} on {n_eval} test images, {steps} steps of ε/4")
        rep = evaluate(model, test, attacks=ATTACKS, eps=info.default_eps, steps=steps, n=n_eval, progress=progress,
                       config={"weights": str(run_dir / 'model.safetensors'), "dataset": DATASET, "split": "test",
                               "model_description": f"cnn-small {label}"})
        rep.save(run_dir / "report.json")
        rows.append((label, rep))
    table = comparison_table(rows)
    atomic_write_text(out_dir / "comparison.md", "# Demo comparison (Table 6 style)\n\n" + table + "\n")
    log("\n" + table)

    first_label = RUNS[0][0]
    log(f"\n[rescale] the {first_label} model's logits multiplied by α (paper Fig. 1), {n_rescale} test images")
    model = load(dirs[first_label] / "model.safetensors")
    if device == "auto" and torch.cuda.is_available():
        model = model.cuda()
    result = rescale.rescale_study(model, test, rescale.log_grid(1e-3, 1e3, 7), attacks=("pgd", "si-pgd"),
                                   eps=info.default_eps, steps=steps, n=n_rescale, progress=progress)
    rescale.save(result, out_dir / "rescale.json", out_dir / "rescale.png")
    log(rescale.format_table(result))
    i1 = result["alphas"].index(1.0)
    pgd, si = result["accuracy"]["pgd"], result["accuracy"]["si-pgd"]
    si_range = f"{100 * min(si):.1f}%" if min(si) == max(si) else f"{100 * min(si):.1f}-{100 * max(si):.1f}%"
    log(f"\nPGD's accuracy moves from {100 * pgd[i1]:.1f}% (α = 1) to {100 * pgd[-1]:.1f}% (α = {result['alphas'][-1]:g}) "
        f"although no decision changed: saturated softmax, zero CE gradients. SI-PGD stays at {si_range} "
        f"for every α: trust it and the worst case, not PGD alone.")
    summary = {"seconds": time.time() - t_start, "runs": {k: str(v) for k, v in dirs.items()},
               "comparison": str(out_dir / "comparison.md"), "rescale_json": str(out_dir / "rescale.json"),
               "rescale_plot": str(out_dir / "rescale.png")}
    write_json(out_dir / "demo.json", summary)
    log(f"\nfiles: models and reports in {', '.join(str(v) for v in dirs.values())}; "
        f"table {out_dir / 'comparison.md'}; rescaling study {out_dir / 'rescale.json'} and {out_dir / 'rescale.png'}")
    log(f"demo finished in {summary['seconds']:.0f} s")
    return summary


DEMO_EPOCHS = 3
