"""Black-box attacks (paper Table 9) on a standard and an adversarially trained cnn-small: SPSA and RayS
against white-box PGD, with torchattacks' SPSA (advertorch's code) on the same model and points as the
reference for SPSA's accuracy and time. Run from the repository root:

    python benchmarks/bench_blackbox.py -n 100 --write

What should hold: a black-box attack never finds a lower accuracy than PGD (else gradients are masked),
and RayS's ADBD, the average L∞ distance to the decision boundary, is larger on the AT model. The models
are cached in runs/bench-cnn-small-std (standard, 2 epochs) and runs/bench-cnn-small-at (PGD-AT, 2
epochs, the model of bench_pgd.py).
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from bench_pgd import publish, trained_small_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

import sirobust
from sirobust.data import load_dataset
from sirobust.train import TrainConfig, fit


def standard_model(cache: Path, device):
    if not (cache / "model.safetensors").exists():
        fit(TrainConfig(dataset="fashion-mnist-mini", model="cnn-small", defense="standard", epochs=2,
                        out=str(cache), progress=False), overwrite=True, log=lambda *_: None)
    return sirobust.load(cache / "model.safetensors").to(device).eval()


def torchattacks_spsa(model, x, y, eps, samples, iterations, bs):
    import torchattacks
    atk = torchattacks.SPSA(model, eps=eps, delta=0.001, lr=0.01, nb_iter=iterations, nb_sample=samples,
                            max_batch_size=bs)
    t0 = time.perf_counter()
    x_adv = atk(x, y)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item(), seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--num-examples", "--n", dest="n", type=int, default=100,
                   help="test images attacked (--n: the spelling of older command lines)")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--samples", type=int, default=128, help="SPSA probes per iteration (paper: 128, 256, 512)")
    p.add_argument("--iterations", type=int, default=100, help="SPSA iterations (paper: 100)")
    p.add_argument("--queries", type=int, default=10000, help="RayS query budget (paper: 10,000)")
    p.add_argument("--chunk", type=int, default=2048, help="images per model call for the SPSA probes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-reference", action="store_true", help="skip torchattacks' SPSA")
    p.add_argument("--write", action="store_true", help="write benchmarks/blackbox.md")
    a = p.parse_args()
    device = torch.device(a.device)
    test = load_dataset("fashion-mnist-mini", "test")
    x, y = test.float_images()[:a.n].to(device), test.labels[:a.n].to(device)
    models = {"standard": standard_model(Path("runs/bench-cnn-small-std"), device),
              "PGD-AT": trained_small_model(Path("runs/bench-cnn-small-at"), device)}
    params = {"spsa": {"samples": a.samples, "iterations": a.iterations, "chunk": a.chunk},
              "rays": {"queries": a.queries}}
    rows = []
    for label, model in models.items():
        rep = sirobust.evaluate(model, (x, y), attacks=["pgd", "spsa", "rays"], eps=a.eps, steps=20,
                                batch_size=a.n, device=device, progress=False, attack_params=params)
        ref = (None, None) if a.no_reference else torchattacks_spsa(model, x, y, a.eps, a.samples, a.iterations,
                                                                      a.chunk)
        rows.append((label, rep, ref))
        print(label, rep.table(), ref, flush=True)

    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"

    lines = ["# Black-box attacks vs white-box PGD (paper Table 9, small scale)", "",
             f"cnn-small on fashion-mnist-mini, standard training and PGD-AT (2 epochs each); the first {a.n} test "
             f"images, L∞ ε = {a.eps:g}. PGD: 20 steps of ε/4. SPSA: {a.samples} probes × {a.iterations} "
             f"iterations, δ = 0.001, Adam lr 0.01, early stop per example. RayS: {a.queries} queries per example. "
             f"torchattacks' SPSA (advertorch's code, no early stop, no random start) with the same settings. "
             f"Device {device.type} ({platform.machine()}, {torch.get_num_threads()} threads), torch "
             f"{torch.__version__}. Accuracy in %, time in seconds.", "",
             "| model | clean | PGD-20 | SPSA | SPSA s | SPSA queries (mean / max) | torchattacks SPSA | its s | "
             "RayS | RayS s | RayS queries (mean) | ADBD (median) | worst case |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, rep, (ref_acc, ref_s) in rows:
        pgd, spsa, rays = rep.attacks["pgd"], rep.attacks["spsa"], rep.attacks["rays"]
        sq, rq, adbd = spsa.stats.get("queries", {}), rays.stats.get("queries", {}), rays.stats.get("adbd", {})
        adbd_text = "–" if not adbd.get("found") else f"{adbd['mean']:.4f} ({adbd['median']:.4f})"
        lines.append(f"| {label} | {pct(rep.clean_acc)} | {pct(pgd.robust_acc)} | {pct(spsa.robust_acc)} | "
                     f"{spsa.seconds:.0f} | {sq.get('mean', 0):.0f} / {sq.get('max', 0):.0f} | {pct(ref_acc)} | "
                     f"{'–' if ref_s is None else f'{ref_s:.0f}'} | {pct(rays.robust_acc)} | {rays.seconds:.0f} | "
                     f"{rq.get('mean', 0):.0f} | {adbd_text} | {pct(rep.worst_case_acc)} |")
    checks = []
    for label, rep, _ in rows:
        pgd = rep.attacks["pgd"].robust_acc
        for name in ("spsa", "rays"):
            acc = rep.attacks[name].robust_acc
            checks.append(f"- {label}: {name} {pct(acc)} % {'≥' if acc >= pgd else '<'} PGD {pct(pgd)} %"
                          + ("" if acc >= pgd else " (a black-box attack beat PGD: gradient masking?)"))
    adbds = [r.attacks["rays"].stats.get("adbd", {}).get("mean") for _, r, _ in rows]
    if all(v is not None for v in adbds):
        checks.append(f"- ADBD: standard {adbds[0]:.4f}, PGD-AT {adbds[1]:.4f} "
                      f"({'larger' if adbds[1] > adbds[0] else 'NOT larger'} on the AT model)")
    publish([*lines, "", *checks], "bench_blackbox.py", "blackbox.md", a.write)


if __name__ == "__main__":
    main()
