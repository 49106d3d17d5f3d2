"""Collect a TRADES vs TRADES-SI comparison over several seeds into the files the demo and docs cite.

    for s in 0 1; do sirobust compare --defenses trades --with-si both --epochs 30 --seed $s --out runs/cmp30-s$s; done
    python scripts/collect_longer_run.py runs/cmp30-s0 runs/cmp30-s1

writes src/sirobust/experiments/trades_si_30_epochs.json (read by `sirobust demo`) and
benchmarks/trades-si-30-epochs.md (the table, with the command).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = ("pgd", "pgd-cw", "pgd-dlr", "si-pgd")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="compare output folders (one per seed)")
    a = p.parse_args()
    seeds, lines = [], []
    for folder in a.folders:
        result = json.loads((folder / "compare.json").read_text())
        rows = {r["label"]: r for r in result["rows"]}
        # the rows without their report paths (folders of the machine that ran them)
        base, si = ({k: v for k, v in rows[label].items() if k != "report"} for label in ("TRADES", "TRADES-SI"))
        seed = json.loads((folder / "run.json").read_text())["config"]["seed"]
        seeds.append({"seed": seed, "trades": base, "trades_si": si,
                      "si_minus_base_points": round(100 * (si["worst_case"] - base["worst_case"]), 2)})
        for label, r in (("TRADES", base), ("TRADES-SI", si)):
            cells = [r["natural"]] + [r[k] for k in ATTACKS] + [r["worst_case"]]
            lines.append(f"| {seed} | {label} | " + " | ".join(f"{100 * c:.2f}" for c in cells) + f" | {r['best_epoch']} |")
        epochs, eval_n, eps = result["epochs"], result["eval_n"], result["eps"]
        env = result["environment"]
    command = f"sirobust compare --defenses trades --with-si both --epochs {epochs} --seed S"
    out = {"epochs": epochs, "eval_n": eval_n, "eps": eps, "command": command, "seeds": seeds,
           "environment": {k: env[k] for k in ("sirobust", "torch", "git_commit")}}
    (ROOT / "src" / "sirobust" / "experiments" / "trades_si_30_epochs.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [f"# TRADES vs TRADES-SI, {epochs} epochs of cnn-small on fashion-mnist-mini", "",
          f"L∞ ε = {eps:g}, {eval_n} test images, 20 steps of ε/4, best checkpoint by validation PGD accuracy; "
          "accuracy in %.", "",
          "| seed | defense | Natural | PGD | PGD-CW | PGD-DLR | SI-PGD | worst case | best epoch |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|", *lines, "",
          "TRADES-SI minus TRADES, worst case: " + ", ".join(f"{s['si_minus_base_points']:+.2f} points (seed "
                                                              f"{s['seed']})" for s in seeds) + ".", "",
          f"command: `{command}` for S in {', '.join(str(s['seed']) for s in seeds)}, then "
          f"`python scripts/collect_longer_run.py ...`", "",
          f"sirobust {env['sirobust']}, torch {env['torch']}, commit {env['git_commit']}, {env['gpu'] or 'CPU'}", ""]
    (ROOT / "benchmarks" / "trades-si-30-epochs.md").write_text("\n".join(md))
    print("wrote src/sirobust/experiments/trades_si_30_epochs.json and benchmarks/trades-si-30-epochs.md")


if __name__ == "__main__":
    main()
