"""Tabulate single-step defenses ± SI beside PGD-10 AT, with each defense's training time per epoch
relative to AT's, from `sirobust compare` folders:

    sirobust compare --defenses at,fgsm-rs,gat,gradalign --with-si both --epochs 5 --out runs/compare-single-step
    sirobust compare --defenses free --with-si both --epochs 1 --out runs/compare-free
    python scripts/collect_single_step.py runs/compare-single-step runs/compare-free

writes benchmarks/defenses-single-step.md. Time per epoch is the training part of each epoch
(`train_seconds` in metrics.jsonl, validation excluded), averaged over the run's epochs; FreeAT's epoch
replays every minibatch m times, so its row also gives the time per m-th of an epoch.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = ("pgd", "pgd-cw", "pgd-dlr", "si-pgd")


def epoch_seconds(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r.get("train_seconds", r["seconds"]) for r in rows]
    return sum(times) / len(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="compare output folders")
    a = p.parse_args()
    rows, commands, at_seconds, eval_n = [], [], None, set()
    for folder in a.folders:
        result = json.loads((folder / "compare.json").read_text())
        commands.append(result["command"])
        eval_n.add(result["eval_n"])
        for r in result["rows"]:
            run = Path(r["report"]).parent
            seconds = epoch_seconds(run)
            if r["label"] == "AT":
                at_seconds = seconds
            collapses = sum(1 for line in (run / "metrics.jsonl").read_text().splitlines()
                            if line.strip() and json.loads(line).get("overfit_collapse"))
            rows.append((r, seconds, result["epochs"], collapses))
    lines = ["# Single-step defenses ± SI on fashion-mnist-mini (paper Table 8, small scale)", "",
             "cnn-small, L∞ ε = 0.1, each defense's preset (inner attack, learning-rate schedule; docs/single-step.md), "
             f"evaluated on the first {'/'.join(str(n) for n in sorted(eval_n))} test images with 20-step attacks of "
             "ε/4, best checkpoint by validation PGD accuracy. Accuracy in %; time: training seconds per epoch "
             "(validation excluded) and its ratio to PGD-10 AT's, measured one run after another on the same CPU. "
             "Standard training reaches 3.8 % PGD accuracy on the same data (defenses-fashion-mnist-mini.md).", "",
             "| defense | epochs | Natural | PGD | PGD-CW | PGD-DLR | SI-PGD | worst case | s / epoch | vs AT | "
             "collapses |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r, seconds, epochs, collapses in rows:
        cells = [r["natural"], *(r[k] for k in ATTACKS), r["worst_case"]]
        ratio = "–" if not at_seconds else f"{seconds / at_seconds:.2f}×"
        lines.append(f"| {r['label']} | {epochs} | " + " | ".join(f"{100 * c:.2f}" for c in cells)
                     + f" | {seconds:.1f} | {ratio} | {collapses} |")
    base = {r["label"]: r["worst_case"] for r, *_ in rows}
    diffs = [f"{label}: {100 * (base[label] - base[label[:-3]]):+.2f}" for label in base
             if label.endswith("-SI") and label[:-3] in base]
    lines += ["", "SI minus its base defense, worst case (points): " + ", ".join(diffs) + ". Runs this short "
              f"on {'/'.join(str(n) for n in sorted(eval_n))} test images: differences of a point or two are noise, "
              "in either direction.", "",
              "commands:", "", *[f"    {c}" for c in commands],
              "    python scripts/collect_single_step.py " + " ".join(str(f) for f in a.folders), ""]
    (ROOT / "benchmarks" / "defenses-single-step.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
