"""``sirobust demo``: the paper's story in a few minutes on a CPU, on the bundled data.

1. Train a robust ``cnn-small`` on ``fashion-mnist-mini`` with TRADES and with
   TRADES-SI (the same defense with the SI mechanism).
2. Evaluate each with PGD, PGD-CW, PGD-DLR and SI-PGD (ε = 0.1, 20 steps of ε/4),
   print a Table-6-style comparison, and say how to read it: the worst case, the
   SI columns and rows, the sanity flags, and what SI does (or does not yet do)
   after so few epochs, with the longer measured run that shows its effect.
3. Run the logit-rescaling study (Fig. 1) on the TRADES model: PGD's accuracy
   rises as the logits are multiplied by α while SI-PGD's stays put.

The numbers in the README come from :func:`render_results` applied to the
``demo.json`` a demo run writes (``scripts/update_readme.py``), never retyped.
"""
from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Optional

from .checkpoint import load
from .data import get_dataset_info, load_dataset
from .experiments import rescale
from .io import atomic_write_text, write_json
from .markdown import markdown_table
from .provenance import environment_info
from .report import Report
from .reproduce.plan import make_plan, run_name
from .reproduce.runner import Runner
from .reproduce.schema import Column, Experiment, Preset, Row
from .runfolder import RunFolder, command_line
from .device import pick_device

DATASET = "fashion-mnist-mini"
ATTACKS = ("pgd", "pgd-cw", "pgd-dlr", "si-pgd")
# (label, defense, si): the runs the demo trains
RUNS = (("TRADES", "trades", False), ("TRADES-SI", "trades", True))
DEMO_EPOCHS = 3
LONGER_RUN_FILE = "trades_si_30_epochs.json"  # measured with `sirobust compare` (see that file's "command")

READING_GUIDE = """How to read this table:
- Natural: accuracy on clean test images. Each attack column: accuracy on the images that attack could not
  break (every column is run on every clean-correct image, so each stands alone, as in the paper's tables).
- worst case: an image counts only if no attack broke it (the per-example AND). It is an upper bound on the
  model's true robust accuracy: a stronger attack could only lower it. Report this number, not one column.
- SI-PGD (column): the paper's scale-invariant attack, PGD on CE(s·cos θ), blind to any rescaling of the logits.
  TRADES-SI (row): the same defense trained with SI: SI-PGD examples inside and a β·CosFace term outside."""


def comparison_rows(reports: list[tuple[str, object]]) -> list[dict]:
    return [{"label": label, "natural": rep.clean_acc, **{a: rep.attacks[a].robust_acc for a in ATTACKS},
             "worst_case": rep.worst_case_acc, "n": rep.n} for label, rep in reports]


def comparison_table(rows: list[dict]) -> str:
    """Markdown table, one row per model: Natural and robust accuracy per attack (%)."""
    header = ["defense", "Natural", *(a.upper() for a in ATTACKS), "worst case"]
    cells = ([r["label"], f"{100 * r['natural']:.2f}", *(f"{100 * r[a]:.2f}" for a in ATTACKS),
              f"{100 * r['worst_case']:.2f}"] for r in rows)
    return "\n".join(markdown_table(header, cells, "l" + "r" * (len(ATTACKS) + 2)))


def longer_run() -> Optional[dict]:
    """The measured 30-epoch TRADES vs TRADES-SI comparison shipped with the package, if present."""
    try:
        return json.loads(resources.files("sirobust.experiments").joinpath(LONGER_RUN_FILE).read_text("utf-8"))
    except (FileNotFoundError, OSError, ValueError):
        return None


def si_verdict(reports: list[tuple[str, object]], epochs: int) -> str:
    """What SI did here, from a paired test on the same images (McNemar's exact test on the per-example worst
    case, :mod:`sirobust.reproduce.stats`), and what the longer measured run shows."""
    from .reproduce.stats import ALPHA, mcnemar_exact
    (_, base), (_, si) = reports
    test = mcnemar_exact(base.worst_case_robust, si.worst_case_robust)
    diff = 100 * (si.worst_case_acc - base.worst_case_acc)
    counts = (f"McNemar p = {test['p']:.2g}: {test['other_only']} images kept by TRADES-SI alone, "
              f"{test['base_only']} by TRADES alone, of {test['n']}")
    if test["p"] < ALPHA:  # one seed: these two runs differ; nothing is said of the methods (reproduce/stats.py)
        text = (f"Here, after {epochs} epoch{'s' * (epochs != 1)}, TRADES-SI's run keeps {abs(diff):.1f} points "
                f"{'more' if diff > 0 else 'fewer'} than TRADES' in worst case ({counts}): these two runs differ. "
                "One seed, so no difference between the methods is detected: another seed's runs can differ the "
                "other way. The paper's gains are for 120-epoch CIFAR-10 ResNet-18 runs.")
    else:
        text = (f"Here, after {epochs} epoch{'s' * (epochs != 1)}, TRADES-SI minus TRADES in worst case is {diff:+.1f} points: no "
                f"difference detected ({counts}). Other CPUs, thread counts and torch builds give other digits, and can flip the "
                f"sign of a gap this size; what holds across such runs is that {epochs} epoch{'s' * (epochs != 1)} on this data cannot "
                "tell the two apart. The paper's gains are for 120-epoch CIFAR-10 ResNet-18 runs.")
    measured = longer_run()
    if measured:
        seeds = ", ".join(f"{r['si_minus_base_points']:+.1f} points (seed {r['seed']})" for r in measured["seeds"])
        text += (f" With {measured['epochs']} epochs on this data ({measured['command']}), TRADES-SI minus TRADES "
                 f"in worst case was {seeds} on {measured['eval_n']} test images: one seed, within its noise. "
                 "The multi-seed paired tests are Table 6's, in docs/reproduction.md.")
    return text


def flags_summary(reports: list[tuple[str, object]]) -> str:
    fired = [(label, f) for label, rep in reports for f in rep.flags if f["triggered"]]
    if not fired:
        return ("Sanity flags: none triggered. They check that the outputs are logits (not softmax), that the model "
                "is deterministic, that it was handed over in eval mode, and that CE gradients are neither zero nor "
                "NaN (zero gradients are how rescaled logits fool PGD); see the report files.")
    return "Sanity flags:\n" + "\n".join(f"- {label} [{f['name']}]: {f['message']}" for label, f in fired)


def made_on(summary: dict) -> str:
    """Where these digits were made: floating-point kernels differ between processors, CPU thread counts (the
    order of a sum) and torch builds, and a few epochs of training amplify the difference."""
    env = summary.get("environment") or {}
    where = env.get("gpu") or env.get("cpu") or "an unrecorded processor"
    threads = f" ({env['threads']} CPU thread{'s' * (env['threads'] != 1)})" if env.get("threads") and not env.get("gpu") \
        else ""
    return (f"Made on {where}{threads} with torch {env.get('torch', '(unrecorded)')}. Other processors, thread counts "
            "and torch builds give other numbers, by up to a point or two after three epochs of training: read a "
            "run of yours against this table with that margin.")


def render_results(summary: dict) -> str:
    """The Markdown the README shows, from a demo's demo.json (scripts/update_readme.py)."""
    res = summary["rescale"]
    i1 = res["alphas"].index(1.0)
    pgd, si = res["accuracy"]["pgd"], res["accuracy"]["si-pgd"]
    lines = [f"`sirobust demo` ({summary['epochs']} epoch{'s' * (summary['epochs'] != 1)} of cnn-small on {DATASET}, L∞ ε = {summary['eps']:g}, "
             f"{summary['n_eval']} test images, {summary['steps']} attack steps; {summary['seconds']:.0f} s on "
             f"{summary['device']}):", "", comparison_table(summary["rows"]), "", made_on(summary), "",
             summary["si_verdict"], "",
             f"Rescaling study on the TRADES model ({res['n']} test images): multiplying its logits by "
             f"{res['alphas'][-1]:g} changes no decision but lifts PGD's accuracy from {100 * pgd[i1]:.1f} % to "
             f"{100 * pgd[-1]:.1f} %; SI-PGD's " + (f"stays at {100 * si[0]:.1f} % for every α." if min(si) == max(si)
                                                      else f"stays between {100 * min(si):.1f} % and {100 * max(si):.1f} %.")]
    return "\n".join(lines)


def run_demo(out: str = "runs/demo", quick: bool = False, device: str = "auto", progress: bool = True,
             mode: str = "new", log=print) -> dict:
    """Run the demo into ``out`` (a :class:`~sirobust.runfolder.RunFolder` of kind "demo": ``mode="overwrite"``
    moves an earlier demo aside; ``"new"`` refuses a folder that holds one)."""
    with RunFolder(out, "demo", mode, config={"quick": quick}, log=log) as folder:
        return _run_demo(folder.path, quick, device, progress, log)


def demo_experiment(epochs: int, train_n, val_n: int, n_eval: int, steps: int) -> Experiment:
    """The demo's two runs and their evaluation, as a :mod:`sirobust.reproduce` experiment."""
    columns = [Column("natural", "natural"), *(Column(a, attack=a) for a in ATTACKS),
               Column("worst_case", "worst_case")]
    rows = [Row(label, train={"defense": defense, "si": si}) for label, defense, si in RUNS]
    train = {"dataset": DATASET, "model": "cnn-small", "epochs": epochs, "train_n": train_n, "val_n": val_n}
    return Experiment(name="demo", kind="table", title="Demo comparison (Table 6 style)", source="sirobust demo",
                      train=train, columns=columns, rows=rows, eval={"n": n_eval, "steps": steps, "which": "last"},
                      presets={"demo": Preset(description=f"{epochs} epoch{'s' * (epochs != 1)} of cnn-small on {DATASET}")})


def _run_demo(out_dir: Path, quick: bool, device: str, progress: bool, log) -> dict:
    t_start = time.time()
    info = get_dataset_info(DATASET)
    dev = pick_device(device)
    # quick: a smoke run of every stage (tests use it); the numbers mean little
    epochs, train_n, n_eval, n_rescale, steps = (1, 640, 60, 40, 3) if quick else (DEMO_EPOCHS, None, 500, 300, 20)
    log(f"sirobust demo: {DATASET}, cnn-small, L∞ ε = {info.default_eps}; results in {out_dir}/")
    test = load_dataset(DATASET, "test")
    plan = make_plan(demo_experiment(epochs, train_n, 100 if quick else 500, n_eval, steps), "demo", device=device)
    dirs = {c.row.label: out_dir / c.row.label.lower() for c in plan.cells}
    runner = Runner(plan, out_dir, device=device, progress=progress, log=log, claims=False,
                    run_dirs={run_name(c.train): dirs[c.row.label] for c in plan.cells})
    for label, defense, si in RUNS:
        log(f"[train] {label}: {epochs} epoch{'s' * (epochs != 1)} of {defense.upper()}{' + SI' if si else ''} "
            f"(10-step PGD inside{', SI-PGD examples and the β·CosFace term' if si else ''})")
    runner.train_all()
    reports = []
    for cell in plan.cells:
        log(f"[evaluate] {cell.row.label}: {', '.join(ATTACKS)} on {n_eval} test images, {steps} steps of ε/4")
        (result,) = runner.evaluate_cell(cell)
        rep = Report.from_dict(result["report"])
        rep.save(dirs[cell.row.label] / "report.json")
        reports.append((cell.row.label, rep))
    rows = comparison_rows(reports)
    table = comparison_table(rows)
    verdict = si_verdict(reports, epochs)
    atomic_write_text(out_dir / "comparison.md", "# Demo comparison (Table 6 style)\n\n" + table + "\n\n"
                      + READING_GUIDE + "\n\n" + verdict + "\n")
    log("\n" + table + "\n\n" + READING_GUIDE + "\n\n" + verdict + "\n\n" + flags_summary(reports))

    first_label = RUNS[0][0]
    log(f"\n[rescale] the {first_label} model's logits multiplied by α (paper Fig. 1), {n_rescale} test images")
    model = load(dirs[first_label] / "model.safetensors", device=dev)
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
    env = environment_info()
    summary = {"seconds": time.time() - t_start, "epochs": epochs, "eps": info.default_eps, "n_eval": n_eval,
               "steps": steps, "device": str(dev), "quick": quick, "command": command_line(), "rows": rows,
               "environment": {"cpu": env["cpu"], "gpu": env["gpu"], "torch": env["torch"], "threads": env["threads"]},
               "si_verdict": verdict,
               "rescale": {"alphas": result["alphas"], "accuracy": result["accuracy"], "clean": result["clean"],
                           "n": n_rescale},
               "runs": {k: str(v) for k, v in dirs.items()},
               "comparison": str(out_dir / "comparison.md"), "rescale_json": str(out_dir / "rescale.json"),
               "rescale_plot": str(out_dir / "rescale.png")}
    write_json(out_dir / "demo.json", summary)
    atomic_write_text(out_dir / "results.md", render_results(summary) + "\n")
    log(f"\nfiles: models and reports in {', '.join(str(v) for v in dirs.values())}; "
        f"table {out_dir / 'comparison.md'}; rescaling study {out_dir / 'rescale.json'} and {out_dir / 'rescale.png'}")
    log(f"demo finished in {summary['seconds']:.0f} s")
    return summary
