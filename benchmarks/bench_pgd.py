"""PGD-20 speed and strength: sirobust vs torchattacks, side by side in one run.

Same model, same data, same settings (L∞, ε, 20 steps of ε/4, random start,
model in eval mode). Each attack is timed over the whole evaluation set, best of
``--repeats`` runs, and its robust accuracy reported. sirobust runs twice: in its
evaluation mode (early stop: examples already fooled get no more steps) and
with ``early_stop=False`` (every example takes every step, like torchattacks),
which isolates the loop's own overhead.

    python benchmarks/bench_pgd.py                 # CPU: cnn-small on fashion-mnist-mini
    python benchmarks/bench_pgd.py --model resnet18 --device cuda   # GPU: resnet18, CIFAR-shaped data

torchattacks is a benchmark dependency only: ``pip install --no-deps torchattacks``.
Results are appended as Markdown to ``benchmarks/results.md`` with ``--write``.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch

import sirobust
from sirobust.data import load_dataset
from sirobust.models import build_model
from sirobust.train import TrainConfig, fit


def trained_small_model(cache: Path, device):
    if not (cache / "model.safetensors").exists():
        fit(TrainConfig(dataset="fashion-mnist-mini", model="cnn-small", defense="at", epochs=2, out=str(cache),
                        progress=False), overwrite=True, log=lambda *_: None)
    return sirobust.load(cache / "model.safetensors").to(device).eval()


def import_torchattacks(notes: Optional[list] = None):
    """torchattacks, the benchmarks' peer. Its package imports scipy at the top (for TIFGSM's kernel and
    OnePixel's optimiser), and its PGD, APGD, FAB and Square use none of it; a GPU image without scipy (the
    device's) would otherwise lose the torchattacks rows. There, scipy's modules are stand-ins while torchattacks
    imports (any use of them raises), removed from ``sys.modules`` right after, and ``notes`` says so. A scipy
    that is installed but broken is not replaced: its error is raised."""
    import importlib
    import types
    try:
        importlib.import_module("scipy")
    except ModuleNotFoundError as e:
        if e.name != "scipy":
            raise
    else:
        return importlib.import_module("torchattacks")

    class Unavailable:
        """Whatever is taken from a stand-in: calling it, or anything taken from it, raises."""

        def __init__(self, name: str):
            self._name = name

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Unavailable(f"{self._name}.{name}")

        def __call__(self, *args, **kwargs):
            raise RuntimeError(f"scipy is not installed: {self._name} is a stand-in (benchmarks/bench_pgd.py "
                               "import_torchattacks); this torchattacks attack needs scipy")

    class StandIn(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Unavailable(f"{self.__name__}.{name}")
    names = ("scipy", "scipy.stats", "scipy.optimize", "scipy._lib", "scipy._lib._util")
    stand_ins = {name: StandIn(name) for name in names}
    for name, module in stand_ins.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(stand_ins[parent], child, module)
    sys.modules.update(stand_ins)
    try:
        torchattacks = importlib.import_module("torchattacks")
    except BaseException:  # no half-imported torchattacks left behind either
        for name in [m for m in sys.modules if m == "torchattacks" or m.startswith("torchattacks.")]:
            del sys.modules[name]
        raise
    finally:  # nothing else in the process may take them for scipy (torch looks for it, optionally)
        for name in names:
            if sys.modules.get(name) is stand_ins[name]:
                del sys.modules[name]
    if notes is not None:
        notes.append("scipy is not installed: torchattacks was imported with stand-ins for the scipy modules its "
                     "package imports (its PGD uses none of them)")
    return torchattacks


def publish(lines: list, script: str, md_name: str, write: bool) -> None:
    """Print a benchmark's Markdown with the command that made it; with ``write``, save it as benchmarks/<md_name>."""
    text = "\n".join([*lines, "", f"command: `python benchmarks/{script} {' '.join(sys.argv[1:])}`", ""])
    print(text)
    if write:  # atomically (here, not sirobust.io: these scripts also time older sirobust versions)
        path = Path(__file__).with_name(md_name)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)  # a benchmark killed while writing leaves the last table whole


def timed(fn, device, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bf16_check(model, x_all, y_all, eps, alpha, a):
    """The fast path never weakens an attack: robust accuracy with bf16 autocast against fp32, per example."""
    keys = torch.arange(len(y_all), device=x_all.device)
    lines = [f"### bf16 autocast against fp32: PGD-{a.steps}, {len(y_all)} examples, L∞ ε = {eps:.4g}, "
             f"device {a.device}", "",
             "| attack | fp32 robust (%) | bf16 robust (%) | bf16 − fp32 (points) | examples that differ |",
             "|---|---:|---:|---:|---:|"]
    for name, cls in (("PGD", sirobust.PGD), ("SI-PGD", sirobust.SIPGD)):
        robust = {}
        for precision in ("fp32", "bf16"):
            ok = []
            for s in range(0, len(y_all), a.batch_size):
                atk = cls(model, eps=eps, alpha=alpha, steps=a.steps, precision=precision)
                x_adv = atk(x_all[s:s + a.batch_size], y_all[s:s + a.batch_size], keys=keys[s:s + a.batch_size])
                with torch.no_grad():
                    ok.append(model(x_adv).argmax(1) == y_all[s:s + a.batch_size])
            robust[precision] = torch.cat(ok)
        f, b = robust["fp32"].float().mean().item(), robust["bf16"].float().mean().item()
        lines.append(f"| {name} | {100 * f:.2f} | {100 * b:.2f} | {100 * (b - f):+.2f} | "
                     f"{int((robust['fp32'] != robust['bf16']).sum())} |")
    lines += ["", f"command: `python benchmarks/bench_pgd.py --model {a.model} --device {a.device} -n {a.n} "
                  f"--batch-size {a.batch_size} --steps {a.steps} --bf16-check`", ""]
    text = "\n".join(lines)
    print(text)
    if a.write:
        path = Path(__file__).with_name("results.md")
        path.write_text(path.read_text() + "\n" + text)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="cnn-small", help="cnn-small (trained, fashion-mnist-mini) or a zoo name (random weights, CIFAR-shaped data)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-n", "--num-examples", "--n", dest="n", type=int, default=1000,
                   help="test images attacked (--n: the spelling of older command lines)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--eps", type=float, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write", action="store_true", help="append the result table to benchmarks/results.md")
    p.add_argument("--fast-only", action="store_true", help="skip the fp32 rows")
    p.add_argument("--bf16-check", action="store_true",
                   help="only compare robust accuracy of fp32 and bf16 (the CUDA default) on this device")
    p.add_argument("--autoattack", type=int, default=0, metavar="N",
                   help="also run standard AutoAttack, torchattacks' and ours, on the first N examples")
    a = p.parse_args()
    torchattacks = import_torchattacks()

    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if a.model == "cnn-small":
        model = trained_small_model(Path("runs/bench-cnn-small-at"), device)
        ds = load_dataset("fashion-mnist-mini", "test")
        x_all, y_all = ds.float_images()[:a.n], ds.labels[:a.n]
        eps = 0.1 if a.eps is None else a.eps
        what = "cnn-small, PGD-AT 2 epochs on fashion-mnist-mini, test images"
    else:
        model = build_model(a.model, num_classes=10, in_channels=3).to(device).eval()
        g = torch.Generator().manual_seed(0)
        x_all = torch.rand(a.n, 3, 32, 32, generator=g)
        with torch.no_grad():
            y_all = torch.cat([model(x_all[i:i + 500].to(device)).argmax(1).cpu() for i in range(0, a.n, 500)])
        eps = 8 / 255 if a.eps is None else a.eps
        what = f"{a.model}, random init, random 32×32 images labelled by the model"
    x_all, y_all = x_all.to(device), y_all.to(device)
    alpha = eps / 4

    def run(attack):
        correct = 0
        for s in range(0, len(y_all), a.batch_size):
            x, y = x_all[s:s + a.batch_size], y_all[s:s + a.batch_size]
            x_adv = attack(x, y)
            with torch.no_grad():
                correct += (model(x_adv).argmax(1) == y).sum().item()
        return correct / len(y_all)

    fast = "bf16" if device.type == "cuda" else "fp32-fast"  # what precision="auto" resolves to here
    contenders = {
        "torchattacks PGD": torchattacks.PGD(model, eps=eps, alpha=alpha, steps=a.steps, random_start=True),
        f"sirobust PGD, early stop, {fast} (default)": sirobust.PGD(model, eps=eps, alpha=alpha, steps=a.steps),
        f"sirobust PGD, all steps, {fast}": sirobust.PGD(model, eps=eps, alpha=alpha, steps=a.steps,
                                                         early_stop=False),
        "sirobust PGD, early stop, fp32": sirobust.PGD(model, eps=eps, alpha=alpha, steps=a.steps, precision="fp32"),
        "sirobust PGD, all steps, fp32": sirobust.PGD(model, eps=eps, alpha=alpha, steps=a.steps, early_stop=False,
                                                      precision="fp32"),
        f"sirobust SI-PGD, early stop, {fast} (default)": sirobust.SIPGD(model, eps=eps, alpha=alpha, steps=a.steps),
        "sirobust SI-PGD, early stop, fp32": sirobust.SIPGD(model, eps=eps, alpha=alpha, steps=a.steps,
                                                            precision="fp32"),
    }
    if a.fast_only:
        contenders = {k: v for k, v in contenders.items() if "fp32," not in k or "torchattacks" in k}
    with torch.no_grad():
        clean = (model(x_all).argmax(1) == y_all).float().mean().item()
    if a.bf16_check:
        bf16_check(model, x_all, y_all, eps, alpha, a)
        return
    rows = []
    # the first sirobust call on a model builds its private folded copy (once per model and weights);
    # timed() keeps the best of --repeats, so that one-off cost shows only with --repeats 1
    for name, atk in contenders.items():
        sec, acc = timed(lambda: run(atk), device, a.repeats)
        rows.append((name, sec, acc))
    ref = rows[0][1]
    aa_lines = []
    if a.autoattack:
        m = a.autoattack
        xs, ys = x_all[:m], y_all[:m]

        def run_on(attack):
            correct = 0
            for s in range(0, m, a.batch_size):
                x_adv = attack(xs[s:s + a.batch_size], ys[s:s + a.batch_size])
                with torch.no_grad():
                    correct += (model(x_adv).argmax(1) == ys[s:s + a.batch_size]).sum().item()
            return correct / m
        ta_aa = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
        # torchattacks' "standard" builds APGD, APGDT and FAB with their own default steps=10 (torchattacks 3.5.1,
        # attacks/autoattack.py), where the reference AutoAttack runs 100: the third row gives ours that budget
        ta_steps = {k: getattr(atk, "steps", None) for k, atk in
                    zip(("apgd-ce", "apgd-t", "fab-t"), ta_aa._autoattack.attacks[:3])}
        ours_aa = sirobust.AutoAttack(model, eps=eps, version="standard")
        ours_ta_budget = sirobust.AutoAttack(model, eps=eps, version="standard",
                                             stage_params={k: {"steps": v} for k, v in ta_steps.items() if v})
        t_ref, acc_ref = timed(lambda: run_on(ta_aa), device, 1)
        t_ours, acc_ours = timed(lambda: run_on(ours_aa), device, 1)
        t_same, acc_same = timed(lambda: run_on(ours_ta_budget), device, 1)
        budget = ", ".join(f"{k} {v}" for k, v in ta_steps.items())
        aa_lines = ["", f"Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square 5000 queries) on the first {m} "
                        f"examples, one run each. torchattacks' `version=\"standard\"` runs its gradient stages "
                        f"at {budget} steps; the reference (and sirobust's `aa`) at 100. The last row is sirobust's "
                        "ensemble at torchattacks' budget:", "",
                    "| attack | seconds | time vs torchattacks | robust accuracy (%) |", "|---|---:|---:|---:|",
                    f"| torchattacks AutoAttack ({budget} steps) | {t_ref:.1f} | 1.00× | {100 * acc_ref:.2f} |",
                    f"| sirobust AutoAttack (`aa`, 100 steps) | {t_ours:.1f} | {t_ours / t_ref:.2f}× | {100 * acc_ours:.2f} |",
                    f"| sirobust AutoAttack (`aa`, {budget} steps) | {t_same:.1f} | {t_same / t_ref:.2f}× | "
                    f"{100 * acc_same:.2f} |"]
    dev = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [f"### PGD-{a.steps}: {what}", "",
             f"{len(y_all)} examples, batch {a.batch_size}, L∞ ε = {eps:.4g}, α = ε/4, device {dev}, "
             f"torch {torch.__version__}, torchattacks {torchattacks.__version__}, best of {a.repeats}; clean accuracy {100 * clean:.2f}%", "",
             "| attack | seconds | time vs torchattacks | robust accuracy (%) |", "|---|---:|---:|---:|"]
    for name, sec, acc in rows:
        lines.append(f"| {name} | {sec:.2f} | {sec / ref:.2f}× | {100 * acc:.2f} |")
    lines += aa_lines
    lines += ["", f"command: `python benchmarks/bench_pgd.py --model {a.model} --device {a.device} -n {a.n} "
                  f"--batch-size {a.batch_size} --steps {a.steps} --repeats {a.repeats}"
                  + (f" --autoattack {a.autoattack}" if a.autoattack else "") + "`", ""]
    text = "\n".join(lines)
    print(text)
    if a.write:
        path = Path(__file__).with_name("results.md")
        prev = path.read_text() if path.exists() else "# Benchmark results\n\n"
        path.write_text(prev + text + "\n")


if __name__ == "__main__":
    main()
