"""sirobust's AutoAttack side by side with the reference (github.com/fra31/auto-attack, MIT), on the same
model and the same points: robust accuracy of each component run alone and of the standard ensemble,
with the time of each. The reference is a benchmark-only peer, installed outside this project (run from the repository root):

    git clone https://github.com/fra31/auto-attack /tmp/aa-src     # or any copy of it
    PYTHONPATH=/tmp/aa-src python benchmarks/bench_autoattack.py -n 500 --write

The model is the PGD-AT cnn-small of bench_pgd.py (2 epochs on fashion-mnist-mini), cached in
runs/bench-cnn-small-at. Both run with the reference's standard settings (APGD 100 steps, 9 target classes,
FAB-T 100 steps, Square 5,000 queries, p_init 0.8); the reference's time is its whole call, ours the
attack's own seconds from the report and the whole call.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from bench_pgd import publish, trained_small_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

import sirobust
from sirobust.data import load_dataset

COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")


def reference(model, x, y, eps, attacks, bs, device):
    from autoattack import AutoAttack
    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", verbose=False, device=str(device), seed=0)
    aa.attacks_to_run = list(attacks)  # the standard version's settings, these attacks only
    t0 = time.perf_counter()
    x_adv = aa.run_standard_evaluation(x, y, bs=bs)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        robust = torch.cat([model(x_adv[i:i + bs]).argmax(1) == y[i:i + bs] for i in range(0, len(y), bs)])
    return robust.float().mean().item(), seconds


def _isa(device) -> str:
    """The CPU's vector instructions as torch uses them (AVX2, AVX512): the ratios depend on them (the small
    convolutions' kernels are another story on each), so the report names them."""
    return f" {torch.backends.cpu.get_cpu_capability()}" if device.type == "cpu" else ""


def ours(model, x, y, eps, attack, bs, device, precision="auto"):
    t0 = time.perf_counter()
    rep = sirobust.evaluate(model, (x, y), attacks=[attack], eps=eps, batch_size=bs, device=device, progress=False,
                            precision=precision)
    return rep.attacks[attack].robust_acc, rep.attacks[attack].seconds, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--num-examples", "--n", dest="n", type=int, default=500,
                   help="test images attacked (--n: the spelling of older command lines)")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--components", default=",".join(COMPONENTS))
    p.add_argument("--ensembles", default="aa,aa-si")
    p.add_argument("--repeats", type=int, default=1,
                   help="pairs (reference, then ours) per row; the table shows the median times and the range of "
                        "the pairs' ratios (this machine's timings drift by 20 %% or more between runs)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp32-fast", "bf16"),
                   help="sirobust's precision (default auto: fp32-fast on a CPU, bf16 on CUDA); the verdicts are "
                        "always taken in fp32 on the model as given")
    p.add_argument("--write", action="store_true", help="write benchmarks/autoattack.md")
    a = p.parse_args()
    if a.repeats < 1:
        p.error(f"--repeats must be at least 1, got {a.repeats}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = torch.device(a.device)
    model = trained_small_model(Path("runs/bench-cnn-small-at"), device)  # the model bench_pgd.py uses
    test = load_dataset("fashion-mnist-mini", "test")
    x, y = test.float_images()[:a.n].to(device), test.labels[:a.n].to(device)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    rows = []

    def row(name, ours_name, ref_attacks):
        """``repeats`` pairs run back to back (so a drift of the machine's speed hits both sides alike)."""
        pairs = []
        for _ in range(a.repeats):
            ref = reference(model, x, y, a.eps, ref_attacks, a.batch_size, device) if ref_attacks else (None, None)
            pairs.append((*ref, *ours(model, x, y, a.eps, ours_name, a.batch_size, device, a.precision)))
        ref_acc, our_acc = pairs[0][0], pairs[0][2]
        ref_s = None if ref_acc is None else statistics.median(p[1] for p in pairs)
        ratios = [] if ref_acc is None else sorted(p[4] / p[1] for p in pairs)
        rows.append((name, ref_acc, our_acc, ref_s, statistics.median(p[3] for p in pairs),
                     statistics.median(p[4] for p in pairs), ratios))
        print(rows[-1], flush=True)

    for comp in [c for c in a.components.split(",") if c]:
        row(comp, comp, [comp])
    for ens in [e for e in a.ensembles.split(",") if e]:
        row(f"{ens} (ensemble)", ens, list(COMPONENTS) if ens == "aa" else None)

    def pct(v):
        return "–" if v is None else f"{100 * v:.2f}"

    lines = ["# sirobust AutoAttack vs the reference", "",
             f"cnn-small, PGD-AT 2 epochs on fashion-mnist-mini; the first {a.n} test images (clean accuracy "
             f"{100 * clean:.2f}%), L∞ ε = {a.eps:g}, batch {a.batch_size}, device {device.type} "
             f"({platform.machine()}{_isa(device)}, {torch.get_num_threads()} threads), torch {torch.__version__}, sirobust precision "
             f"{a.precision}. Each component "
             "alone on every clean-correct image, then the standard ensemble (each stage on the images still robust). "
             + (f"Each row is {a.repeats} pairs run back to back: median seconds, and the median ratio with its range."
                if a.repeats > 1 else "One run per row."),
             "", "| attack | reference robust acc. (%) | sirobust (%) | sirobust − reference (points) | reference s | "
             "sirobust attack s | sirobust call s | time vs reference |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r, o, rs, oas, os_, ratios in rows:
        diff = "–" if r is None else f"{round(100 * (o - r), 2) + 0.0:+.2f}"  # the reference reports float32: no -0.00
        ratio = ("–" if not ratios else f"{ratios[0]:.2f}×" if len(ratios) == 1
                 else f"{statistics.median(ratios):.2f}× ({ratios[0]:.2f}-{ratios[-1]:.2f})")
        lines.append(f"| {name} | {pct(r)} | {pct(o)} | {diff} | {'–' if rs is None else f'{rs:.1f}'} | {oas:.1f} | "
                     f"{os_:.1f} | {ratio} |")
    lines += ["", "The reference is on PYTHONPATH (`PYTHONPATH=<auto-attack>:benchmarks`)."]
    publish(lines, "bench_autoattack.py", "autoattack.md", a.write)


if __name__ == "__main__":
    main()
