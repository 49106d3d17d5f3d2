"""The GPU check: every CUDA path of sirobust exercised and timed in one command, under 8 minutes on one H100/H200.

    bash benchmarks/gpu_check.sh              # on the device, from the repository root: writes benchmarks/gpu.md
    bash benchmarks/gpu_check.sh --quick      # tiny sizes, on a CPU too (tests/test_gpu_check.py runs it)
    bash benchmarks/gpu_check.sh --steps compile-evaluate,compile-fit --out rest.md   # some steps only

It needs no install: ``PYTHONPATH=src`` (gpu_check.sh sets it), torch ≥ 2.10, safetensors, tqdm, numpy. The
peers are optional and found on the path: torchattacks (a wheel under ``benchmarks/peers/``, see
docs/speed.md) and the reference AutoAttack (a copy of github.com/fra31/auto-attack under
``benchmarks/peers/auto-attack``). A missing peer is a row that says so, not a failure.

Steps, each timed with ``torch.cuda.synchronize`` around the clock, each recorded even when it fails:

1. PGD-20 on ResNet-18 over 10,000 random 32×32 images (labelled by the model): torchattacks, sirobust fp32
   and sirobust's fast path (bf16 autocast), every example taking every step; FLOP floor per row
   (bench_gpu.py's counting).
2. One PGD-10 AT epoch of ResNet-18 on 10,000 random 32×32 images: sirobust ``fit`` fp32 and fast path.
3. A ResNet-18 trained by ``fit`` with PGD-AT on the bundled Fashion-MNIST (resident data on the GPU,
   bf16), then on its 10,000 test images PGD-20 robust accuracy with the attack run in fp32 and in bf16
   (verdicts are always fp32), and the standard AutoAttack on the first 1,000: sirobust, and the reference
   when importable, with the same model and points.
4. The CUDA-only branches, each a step of its own (one that fails does not stop the others): PGD's, APGD-CE's,
   FAB-T's and Square's host sync every ``SYNC_EVERY`` steps (early-stop verdicts no weaker than the every-step
   ones; the syncs counted with CUDA's sync debug mode); ``deterministic`` (two fits give bit-identical weights);
   ``torchrun --nproc_per_node 1 -m sirobust evaluate`` giving the single-process verdicts, and sirobust's
   collectives over a torchrun process group of one (NCCL on CUDA, gloo on a CPU); ``torch.compile`` in evaluate
   and in fit, on cnn-small (the same code path; a ResNet-18's first compile takes minutes), skipped with the
   reason when the image cannot compile (no C compiler or Python headers for Triton).
5. Last, a peer's own timing: the reference AutoAttack on step 3's points (its failure is a line, not a failure).

The window is short, so ``--budget`` (default 450 s on a GPU) leaves out a step that would end past it (by
``ESTIMATES``); the report lists what was left out or not finished and the ``--steps`` command that runs it.
gpu.md is written before the first step and after each.

``cudnn.benchmark`` is on for steps 1 and 2 only (as bench_gpu.py times and ``fit`` trains); the evaluations
run with PyTorch's default, as a user's do.

Exit status: 0 when every step ran, 1 when any raised (the traceback is in gpu.md and on stderr), 2 for
bad arguments or no CUDA without ``--quick`` (gpu.md then says so), 3 when the budget left steps out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sirobust  # noqa: E402
from sirobust.data import load_dataset  # noqa: E402
from sirobust.train import TrainConfig, fit  # noqa: E402

# the steps, in the order they run (--steps picks some): the issue's targets first, the peers' own timings last
STEP_NAMES = ["pgd", "train", "bf16", "autoattack", "sync", "deterministic", "torchrun", "compile-evaluate",
              "compile-fit", "aa-reference"]
# rough seconds of each step at full size on one H100 (the first call of each compiles kernels, inductor's
# steps most): a step that would end past --budget is not started, and the report says how to run it later
ESTIMATES = {"pgd": 45, "train": 45, "bf16": 60, "autoattack": 120, "sync": 30, "deterministic": 30,
             "torchrun": 60, "compile-evaluate": 75, "compile-fit": 75, "aa-reference": 120}

# full size (the device) and --quick (a CPU smoke test) of every step
SIZES = {
    "pgd_n": (10000, 8), "pgd_batch_size": (500, 4), "pgd_steps": (20, 2),
    "train_n": (10000, 16), "train_batch_size": (128, 8), "train_steps": (10, 2),
    "fm_epochs": (5, 1), "fm_train_n": (6000, 64), "fm_eval_n": (10000, 32), "aa_n": (1000, 8),
    "branch_n": (1000, 16), "eval_steps": (20, 2), "model": ("resnet18", "cnn-small"),
}


class Check:
    """Runs the steps, keeps their Markdown sections, their failures and the seconds each took."""

    def __init__(self, device: torch.device):
        self.device, self.sections, self.failures, self.t0 = device, [], [], time.perf_counter()
        self.not_run: list[str] = []  # steps left out by the time budget (their names, for --steps)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def skip(self, name: str, title: str, why: str) -> None:
        self.not_run.append(name)
        self.sections += ["", f"## {title}: not run", "", why]

    def step(self, title: str, fn) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {title} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            lines = fn()
        except Exception:  # noqa: BLE001 — every failure is recorded, the other steps still run
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            self.failures.append(title)
            lines = ["**FAILED**:", "", "```", tb.strip()[-3000:], "```"]
        self.sections += ["", f"## {title} ({time.perf_counter() - t0:.1f} s)", "", *lines]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def have_torchattacks() -> bool:
    """Importable, with scipy's stand-ins where scipy is missing (bench_pgd.import_torchattacks), as step 1 does."""
    from bench_pgd import import_torchattacks
    try:
        import_torchattacks()
        return True
    except Exception:  # noqa: BLE001 — a peer that fails to import is absent, it must not stop the report
        return False


def have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


# ----------------------------------------------------------------------------- 1, 2: speed against the floor
def device_peaks(device) -> tuple[dict, str]:
    """The FLOP peaks of this board (bench_gpu.peaks_for) and their name."""
    from bench_gpu import PEAKS, peaks_for
    return peaks_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else (PEAKS, "no floor on a CPU")


def bench_args(a) -> SimpleNamespace:
    peaks, _ = device_peaks(a.device)
    return SimpleNamespace(seed=0, pgd_n=a.pgd_n, pgd_batch_size=a.pgd_batch_size, pgd_steps=a.pgd_steps,
                           early_stop=False, fast_precision="auto", repeats=1, peak_bf16=peaks["bf16"],
                           peak_tf32=peaks["tf32"], peak_fp32=peaks["fp32"], peak_cpu=None, train_n=a.train_n,
                           train_batch_size=a.train_batch_size, train_steps=a.train_steps, train_model=a.model,
                           device=str(a.device), plain=False)


class cudnn_benchmark:
    """``cudnn.benchmark`` on for a block, as bench_gpu.py times (and ``fit`` trains), then as it was: the
    evaluation steps run with PyTorch's default, as a user's ``evaluate`` does, instead of autotuning every
    batch shape that early stopping and the fp32 verdict checks produce."""

    def __enter__(self):
        self.saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True

    def __exit__(self, *exc):
        torch.backends.cudnn.benchmark = self.saved


def pgd_speed(a, device, state) -> list:
    from bench_gpu import pgd_rows, table
    notes = []
    with cudnn_benchmark():
        rows, state["per_image"] = pgd_rows(a.model, bench_args(a), device, True, notes)
    by = {(r.impl, r.precision): r.seconds for r in rows}
    fp32, fast = by[("sirobust PGD (all steps)", "fp32")], by[("sirobust PGD (all steps)", "auto")]
    ta = by.get(("torchattacks PGD", "fp32"))
    if ta is None:
        verdict = f"sirobust fast path: {fp32 / fast:.2f}× sirobust fp32; no torchattacks row to compare with."
    else:
        state["pgd_speedup"] = ta / fast
        verdict = f"sirobust fast path: **{ta / fast:.2f}×** torchattacks' speed ({fp32 / fast:.2f}× sirobust fp32)."
    return [f"{a.pgd_n} images, batch {a.pgd_batch_size}, L∞ ε = 8/255, α = 2/255, random start, every example "
            "every step (sirobust `early_stop=False`), cudnn.benchmark on.", "", *table(rows, "robust acc (%)"), "",
            verdict, *[f"- {n}" for n in notes]]


def train_speed(a, device, state) -> list:
    from bench_gpu import flops_per_image, table, train_rows
    from sirobust.models import build_model
    per_image = state.get("per_image") or flops_per_image(
        build_model(a.model, num_classes=10, in_channels=3).to(device), (3, 32, 32), device)
    with cudnn_benchmark():
        rows = train_rows("at", bench_args(a), device, True, per_image)
    return [f"{a.train_n} random 32×32 images with random labels, batch {a.train_batch_size}, PGD-{a.train_steps} "
            "(ε = 8/255, α = ε/4) in eval mode, update in train mode; time = fit's `train_seconds`.", "",
            *table(rows, "mean training loss")]


# ----------------------------------------------------------------------------- 3: accuracy on a trained model
def trained_model(a, device, state, work: Path):
    if "model" not in state:
        out = work / f"fm-{a.model}-at"
        cfg = TrainConfig(dataset="fashion-mnist-mini", model=a.model, defense="at", epochs=a.fm_epochs,
                          train_n=a.fm_train_n, val_size=0, batch_size=128, attack_steps=a.train_steps,
                          out=str(out), device=str(device), progress=False, seed=0)
        seconds, _ = clock(lambda: fit(cfg, overwrite=True, log=lambda *_: None), device)
        state.update(model=sirobust.load(out / "model.safetensors", device=str(device)).eval(),
                     weights=out / "model.safetensors", train_seconds=seconds)
    return state["model"]


def bf16_accuracy(a, device, state, work: Path) -> list:
    model = trained_model(a, device, state, work)
    test = load_dataset("fashion-mnist-mini", "test")
    reports = {}
    for precision in ("fp32", "bf16" if device.type == "cuda" else "fp32-fast"):
        seconds, rep = clock(lambda p=precision: sirobust.evaluate(
            model, test, attacks=["pgd"], steps=a.eval_steps, n=a.fm_eval_n, batch_size=500, device=device,
            precision=p, progress=False), device)
        reports[precision] = (seconds, rep)
    (s32, r32), (s16, r16) = reports.values()
    ran = (r16.attacks["pgd"].params.get("ran_as") or {}).get("precision")
    if device.type == "cuda" and ran != "bf16":  # a fast path that fell back would make the gap meaningless
        raise AssertionError(f"the bf16 evaluation ran as {ran!r}, not bf16")
    a32, a16 = r32.attacks["pgd"].robust_acc, r16.attacks["pgd"].robust_acc
    state["bf16_gap"] = abs(a16 - a32) * 100
    flips = sum(u != v for u, v in zip(r32.attacks["pgd"].robust, r16.attacks["pgd"].robust))
    return [f"{a.model}, PGD-AT (PGD-{a.train_steps}, ε = 0.1) for {a.fm_epochs} epochs on {a.fm_train_n} bundled "
            f"Fashion-MNIST images, resident on the device ({state['train_seconds']:.1f} s); PGD-{a.eval_steps} on "
            f"{a.fm_eval_n} test images, clean accuracy {100 * r32.clean_acc:.2f} %.", "",
            "| attack precision | robust accuracy (%) | seconds |", "|---|---:|---:|",
            *[f"| {p} | {100 * r.attacks['pgd'].robust_acc:.2f} | {s:.2f} |" for p, (s, r) in reports.items()], "",
            f"Difference: **{state['bf16_gap']:.2f} points** ({flips} of {a.fm_eval_n} verdicts differ; "
            "every verdict is taken on the fp32 model)."]


def autoattack(a, device, state, work: Path) -> list:
    model = trained_model(a, device, state, work)
    test = load_dataset("fashion-mnist-mini", "test")
    x, y = test.float_images()[:a.aa_n].to(device), test.labels[:a.aa_n].to(device)
    params = {"attack_params": {"aa": {"stage_params": {
        "apgd-ce": {"steps": 5}, "apgd-t": {"steps": 5, "n_targets": 2}, "fab-t": {"steps": 5, "n_targets": 2},
        "square": {"queries": 20}}}}} if a.quick else {}
    ours_s, rep = clock(lambda: sirobust.evaluate(model, (x, y), attacks=["aa"], eps=0.1, batch_size=500,
                                                  device=device, progress=False, **params), device)
    state["aa_ours"] = (ours_s, rep.attacks["aa"].robust_acc)
    return [f"Standard AutoAttack (L∞ ε = 0.1) on the first {a.aa_n} test images of the model above"
            f"{' (quick: tiny budgets)' if a.quick else ''}; whole call, synchronised: robust accuracy "
            f"{100 * rep.attacks['aa'].robust_acc:.2f} %, {ours_s:.1f} s (the reference's time on the same points is "
            "the last step's)."]


def aa_reference(a, device, state, work: Path) -> list:
    """The reference AutoAttack (fra31/auto-attack) on the same model and points as step ``autoattack``. A peer:
    its absence or its failure is a line of the report, never a failure of the check."""
    if a.quick:
        return ["Skipped with --quick (the reference has no tiny budgets)."]
    if not have("autoattack"):
        return ["Not importable (benchmarks/peers/auto-attack absent): no reference row."]
    model = trained_model(a, device, state, work)
    test = load_dataset("fashion-mnist-mini", "test")
    x, y = test.float_images()[:a.aa_n].to(device), test.labels[:a.aa_n].to(device)
    try:
        from autoattack import AutoAttack
        ref = AutoAttack(model, norm="Linf", eps=0.1, version="standard", verbose=False, device=str(device), seed=0)
        ref_s, x_adv = clock(lambda: ref.run_standard_evaluation(x, y, bs=500), device)
        with torch.no_grad():
            acc = torch.cat([model(x_adv[i:i + 500]).argmax(1) == y[i:i + 500] for i in range(0, len(y), 500)])
    except Exception as e:  # noqa: BLE001 — a peer's failure is reported, it does not fail sirobust's check
        return [f"The reference raised {type(e).__name__}: {e} (no reference row)."]
    rows = [f"| reference (fra31/auto-attack) | {100 * acc.float().mean().item():.2f} | {ref_s:.1f} | 1.00× |"]
    if "aa_ours" in state:
        ours_s, ours_acc = state["aa_ours"]
        rows.insert(0, f"| sirobust | {100 * ours_acc:.2f} | {ours_s:.1f} | {ref_s / ours_s:.2f}× |")
        state["aa_ratio"] = ours_s / ref_s
    return [f"Standard AutoAttack (L∞ ε = 0.1) on the first {a.aa_n} test images of step 3's model; whole call, "
            "synchronised.", "", "| implementation | robust accuracy (%) | seconds | reference time / this |",
            "|---|---:|---:|---:|", *rows]


# ----------------------------------------------------------------------------- 4: CUDA-only branches
# Each branch is a step of its own: one that fails is recorded and the others still run (a device window is
# too short to learn of a second failure from a second run). The compile steps come last: they are the slowest.
def branch_data(a, device, state, work: Path):
    model = trained_model(a, device, state, work)
    test = load_dataset("fashion-mnist-mini", "test")
    return model, test.float_images()[:a.branch_n].to(device), test.labels[:a.branch_n].to(device)


def host_sync_branch(a, device, state, work: Path) -> list:
    """PGD's early stop with a host sync every k steps gives the every-step verdicts; APGD-CE's, FAB-T's and
    Square's loops likewise (:func:`sync_rows`)."""
    from sirobust.attacks.loop import sync_every
    model, x, y = branch_data(a, device, state, work)
    k = sync_every(device)
    torch.manual_seed(0)
    x_stop = sirobust.PGD(model, eps=0.1, steps=a.eval_steps, early_stop=True, precision="fp32")(x, y)
    torch.manual_seed(0)
    x_all = sirobust.PGD(model, eps=0.1, steps=a.eval_steps, early_stop=False, precision="fp32")(x, y)
    with torch.no_grad():
        fooled_stop = (model(x_stop).argmax(1) != y).sum().item()
        fooled_all = (model(x_all).argmax(1) != y).sum().item()
    lines = ["| branch | result |", "|---|---|",
             f"| PGD early stop, host sync every {k} steps | fooled {fooled_stop} / {len(y)} (every step to the "
             f"end: {fooled_all}) |"]
    if fooled_stop < fooled_all - max(2, len(y) // 200):
        raise AssertionError(f"early stop fooled {fooled_stop}, far fewer than the full run's {fooled_all}")
    return lines + sync_rows(model, x, y, a, device)


def deterministic_branch(a, device, state, work: Path) -> list:
    """Two ``fit(deterministic=True)`` runs give bit-identical weights."""
    if device.type != "cuda":
        return ["CUDA only: not run on this device."]
    digests = []
    for run in ("a", "b"):
        cfg = TrainConfig(dataset="fashion-mnist-mini", model=a.model, defense="at", epochs=1, train_n=512,
                          val_size=0, batch_size=128, attack_steps=3, out=str(work / f"det-{run}"),
                          device=str(device), progress=False, deterministic=True)
        fit(cfg, overwrite=True, log=lambda *_: None)
        digests.append(tensors_digest(work / f"det-{run}" / "model.safetensors"))
    if digests[0] != digests[1]:
        raise AssertionError("two deterministic fits gave different weights")
    return ["fit(deterministic=True) twice, 512 images, 1 epoch: weights bit-identical."]


# The compile steps use cnn-small: the code path is the same as ResNet-18's, and inductor's first compile of a
# ResNet-18 forward and backward (in bf16 and fp32, train and eval graphs) would take minutes of the window.
COMPILE_MODEL = "cnn-small"


def compile_blocker(device, state) -> str | None:
    """Why ``torch.compile`` cannot run on this image (None when it can), found once: Triton builds its launcher
    with a C compiler and Python's headers, which a runtime image may lack. Then the compile steps say so
    instead of failing the check for the image's sake."""
    if "compile_blocker" not in state:
        import shutil
        import sysconfig
        why = None
        if not any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang")):
            why = "no C compiler (cc, gcc or clang) on this image: Triton cannot build its kernels' launcher"
        elif not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
            why = f"no Python.h under {sysconfig.get_paths()['include']} (Python's headers): Triton cannot build"
        else:
            try:
                probe = torch.compile(lambda t: t * 2 + 1)
                probe(torch.ones(4, device=device))
                sync(device)
            except Exception as e:  # noqa: BLE001 — the reason is reported, the other steps still run
                why = f"torch.compile failed on a one-line function: {type(e).__name__}: {str(e)[:300]}"
        state["compile_blocker"] = why
    return state["compile_blocker"]


def small_model(a, device, state, work: Path):
    """A cnn-small trained by ``fit`` (PGD-AT, 1 epoch on 2,048 bundled images): the compile steps' model."""
    if "small_model" not in state:
        out = work / "fm-cnn-small-at"
        cfg = TrainConfig(dataset="fashion-mnist-mini", model=COMPILE_MODEL, defense="at", epochs=1,
                          train_n=min(2048, a.fm_train_n), val_size=0, batch_size=128, attack_steps=3, out=str(out),
                          device=str(device), progress=False, seed=0)
        fit(cfg, overwrite=True, log=lambda *_: None)
        state["small_model"] = sirobust.load(out / "model.safetensors", device=str(device)).eval()
    return state["small_model"]


def compile_evaluate_branch(a, device, state, work: Path) -> list:
    """``evaluate(compile=True)`` (the attack's private copy compiled, dynamic shapes) agrees with eager, and it
    did run compiled (the report's ``ran_as``)."""
    if device.type != "cuda":
        return ["CUDA only: not run on this device."]
    blocker = compile_blocker(device, state)
    if blocker:
        return [f"**SKIPPED**: {blocker}."]
    model = small_model(a, device, state, work)
    test = load_dataset("fashion-mnist-mini", "test")
    x, y = test.float_images()[:a.branch_n].to(device), test.labels[:a.branch_n].to(device)
    plain = sirobust.evaluate(model, (x, y), attacks=["pgd"], eps=0.1, steps=10, device=device, progress=False)
    s, compiled = clock(lambda: sirobust.evaluate(model, (x, y), attacks=["pgd"], eps=0.1, steps=10,
                                                  device=device, progress=False, compile=True), device)
    ran_as = compiled.attacks["pgd"].params.get("ran_as") or {}
    if "compiled" not in str(ran_as.get("model")):
        raise AssertionError(f"evaluate(compile=True) did not run a compiled copy: ran as {ran_as}")
    gap = abs(compiled.attacks["pgd"].robust_acc - plain.attacks["pgd"].robust_acc) * 100
    if gap > 1.0:
        raise AssertionError(f"compiled evaluation differs by {gap:.2f} points")
    return [f"evaluate(compile=True), {COMPILE_MODEL}, PGD-10 on {len(y)} images: "
            f"{100 * compiled.attacks['pgd'].robust_acc:.2f} % robust against "
            f"{100 * plain.attacks['pgd'].robust_acc:.2f} % uncompiled ({s:.1f} s with compilation); ran as "
            f"{ran_as.get('model')}, {ran_as.get('precision')}."]


def compile_fit_branch(a, device, state, work: Path) -> list:
    """``fit(compile=True)`` trains an epoch."""
    if device.type != "cuda":
        return ["CUDA only: not run on this device."]
    blocker = compile_blocker(device, state)
    if blocker:
        return [f"**SKIPPED**: {blocker}."]
    cfg = TrainConfig(dataset="fashion-mnist-mini", model=COMPILE_MODEL, defense="at", epochs=1, train_n=512,
                      val_size=0, batch_size=128, attack_steps=3, out=str(work / "compiled"),
                      device=str(device), progress=False, compile=True)
    s, _ = clock(lambda: fit(cfg, overwrite=True, log=lambda *_: None), device)
    return [f"fit(compile=True), {COMPILE_MODEL}, 512 images, 1 epoch: ran ({s:.1f} s with compilation)."]


def torchrun_branch(a, device, state, work: Path) -> list:
    trained_model(a, device, state, work)
    return [torchrun_row(a, device, state, work), collectives_row(a, device, work)]


def count_syncs(fn, device):
    """(host synchronisations ``fn`` made, its result): CUDA's sync debug mode warns at each one. None on a CPU."""
    if device.type != "cuda":
        return None, fn()
    import warnings
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught), out


def sync_rows(model, x, y, a, device) -> list:
    """APGD-CE's, FAB-T's and Square's loops with the host sync every ``SYNC_EVERY`` steps (queries, for Square)
    against every step: the syncs counted, and the examples broken (equal up to the GPU's batch-dependent
    rounding). Square's row also shows what its fp32 margin check costs under bf16: it still syncs at any query
    where a margin is within bf16's error of 0 (docs/speed.md)."""
    import sirobust.attacks.loop as loop
    rows, kind = [], device.type
    for name, extra in (("apgd-ce", {"steps": a.eval_steps}), ("fab-t", {"steps": a.eval_steps, "n_targets": 2}),
                        ("square", {"queries": 5 * a.eval_steps})):
        broken, syncs = {}, {}
        for every in (1, loop.sync_every(device) if kind != "cpu" else 4):
            saved = loop.SYNC_EVERY.get(kind)
            loop.SYNC_EVERY[kind] = every
            try:
                atk = sirobust.attacks.build_attack(name, model, eps=0.1, **extra)
                syncs[every], x_adv = count_syncs(lambda: atk(x, y), device)
            finally:
                if saved is None:
                    loop.SYNC_EVERY.pop(kind)
                else:
                    loop.SYNC_EVERY[kind] = saved
            with torch.no_grad():
                broken[every] = (model(x_adv).argmax(1) != y).sum().item()
        (one, k) = sorted(broken)
        told = "" if syncs[one] is None else f", host syncs {syncs[k]} (every step: {syncs[one]})"
        budget = f"{extra['queries']} queries" if "queries" in extra else f"{extra['steps']} steps"
        rows.append(f"| {name} {budget}, host sync every {k} steps | broken {broken[k]} / {len(y)} "
                    f"(sync every step: {broken[one]}){told} |")
        # one-sided: deferring the sync must not make the attack weaker. On a GPU the two runs see other batch
        # shapes (the working set shrinks at other steps), so bf16 kernels round differently and borderline
        # examples go either way: a few, about the square root of those broken
        tol = max(2, len(y) // 200, 3 * math.isqrt(broken[one] + 1))
        if broken[k] < broken[one] - tol:
            raise AssertionError(f"{name}: syncing every {k} steps broke {broken[k]}, every step {broken[one]} "
                                 f"(allowed: {tol} fewer)")
    return rows


def tensors_digest(path: Path) -> str:
    from sirobust.io import tensors_digest as digest
    from safetensors.torch import load_file
    return digest(load_file(str(path)))


# torchrun on one node with no network: the rendezvous advertises 127.0.0.1, not the host's name (which an
# offline machine may not resolve: the worker would retry until the timeout)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            "--local-addr", "127.0.0.1"]


def run_group(cmd: list, env: dict, timeout: float = 150) -> subprocess.CompletedProcess:
    """``cmd`` in a session of its own; on timeout the whole group is killed (torchrun and its worker, which
    would otherwise keep the GPU), and the timeout is raised."""
    import signal
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise RuntimeError(f"{' '.join(cmd[:8])} ... did not finish in {timeout:.0f} s (killed):\n{stdout[-1500:]}\n"
                           f"{stderr[-1500:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def torchrun_row(a, device, state, work: Path) -> str:
    """``torchrun --nproc_per_node 1 -m sirobust evaluate`` gives the single process's verdicts. One process
    joins no process group (sirobust joins one for two or more): this checks the launcher and the command under
    it; :func:`collectives_row` checks the collectives."""
    n = min(a.branch_n, 256)
    out = work / "torchrun.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [*TORCHRUN, "-m", "sirobust",
           "evaluate", "--weights", str(state["weights"]), "-n", str(n), "--attacks", "pgd", "--steps", "5",
           "--batch-size", "64", "--no-progress", "--precision", "fp32", "--out", str(out)]
    done = run_group(cmd, env)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    two = json.loads(out.read_text())
    one = sirobust.evaluate(state["model"], load_dataset("fashion-mnist-mini", "test"), attacks=["pgd"], steps=5,
                            n=n, batch_size=64, device=device, precision="fp32", progress=False).to_dict()
    differ = sum(u != v for u, v in zip(two["attacks"]["pgd"]["robust"], one["attacks"]["pgd"]["robust"]))
    # on a GPU two processes may pick different convolution kernels (TF32 rounds differently): a borderline
    # verdict may flip; on a CPU they must be equal
    allowed = max(1, n // 100) if device.type == "cuda" else 0
    if differ > allowed:
        raise AssertionError(f"torchrun's verdicts differ from the single process's on {differ} of {n} images")
    return (f"torchrun --nproc_per_node 1 -m sirobust evaluate, {n} images (one process: no process group): "
            f"verdicts differ from the single process's on {differ} of {n}.")


def collectives_row(a, device, work: Path) -> str:
    """sirobust's collectives (:class:`sirobust.distributed.Group`: gather, broadcast, any, sum, barrier,
    broadcast_buffers) over a real process group started by torchrun: NCCL on CUDA, gloo on a CPU. One GPU
    allows one NCCL rank, so the group has one process, and the Group is told to use it anyway."""
    out = work / "collectives.json"
    cmd = [*TORCHRUN, str(Path(__file__).resolve()), "--collectives-probe", str(out), "--device", str(device)]
    done = run_group(cmd, {**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"the collectives probe exited {done.returncode}:\n{done.stdout[-2000:]}\n"
                           f"{done.stderr[-2000:]}")
    got = json.loads(out.read_text())
    calls = sum(len(v) for v in got["calls"].values())
    return (f"torchrun, a {got['backend']} process group of 1: Group's {', '.join(got['checked'])} returned what "
            f"they should, through {calls} calls of the backend's collectives.")


def collectives_probe(path: str, device: torch.device) -> int:
    """Run under torchrun by :func:`collectives_row`: each collective of a forced-on Group, checked."""
    import torch.distributed as dist
    from sirobust.distributed import Group

    class OneProcessGroup(Group):
        enabled = True  # a group of one still runs every collective through the backend

    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    from datetime import timedelta
    # a short timeout and the device named up front: NCCL connects at once, and a broken setup fails in a minute
    extra = {"device_id": torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))} if use_cuda else {}
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=60), **extra)
    calls = []  # the backend's collectives each Group method ran: a method that ran none checked nothing
    for fn in ("all_gather_object", "broadcast_object_list", "all_reduce", "broadcast", "barrier"):
        def counted(*args, _fn=getattr(dist, fn), _name=fn, **kw):
            calls.append(_name)
            return _fn(*args, **kw)
        setattr(dist, fn, counted)
    try:
        g = OneProcessGroup(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        bn = torch.nn.BatchNorm2d(3).to(device)
        bn.running_mean.fill_(0.5)
        checks = {
            "gather": lambda: g.gather({"a": 1}) == [{"a": 1}],
            "broadcast": lambda: g.broadcast([1, 2]) == [1, 2],
            "any": lambda: g.any(True) and not g.any(False),
            "sum": lambda: g.sum({"n": 2.0}) == {"n": 2.0},
            "barrier": lambda: g.barrier() is None,
            "broadcast_buffers": lambda: g.broadcast_buffers(bn) is None and bool((bn.running_mean == 0.5).all()),
            "first": lambda: g.first(lambda: 7) == 7,
        }
        ran = {}
        for name, check in checks.items():
            calls.clear()
            if not check():
                raise AssertionError(f"Group.{name} returned the wrong value over {dist.get_backend()}")
            if not calls:
                raise AssertionError(f"Group.{name} ran no collective of the backend")
            ran[name] = list(calls)
        if use_cuda:
            torch.cuda.synchronize()
        Path(path).write_text(json.dumps({"backend": dist.get_backend(), "checked": list(ran), "calls": ran}))
    finally:
        dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and cnn-small instead of ResNet-18 (a smoke test that also runs on a CPU)")
    p.add_argument("--device", default=None, help="default: cuda when available, else (with --quick) cpu")
    p.add_argument("--out", default=None, help="the Markdown written (default benchmarks/gpu.md; --quick: none)")
    p.add_argument("--steps", default=None, metavar="NAMES",
                   help=f"comma-separated: run these steps only (default all: {', '.join(STEP_NAMES)}); after a "
                        "device window cut a check short, the steps it did not finish, written to another --out")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="do not start a step that would end past this many seconds (each step's estimate: "
                        "ESTIMATES); the report lists the steps left out and the command that runs them (default: "
                        "450 on a GPU, none with --quick)")
    p.add_argument("--collectives-probe", default=None, metavar="JSON", help=argparse.SUPPRESS)  # torchrun's child
    a = p.parse_args(argv)
    wanted = STEP_NAMES if a.steps is None else [name.strip() for name in a.steps.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in STEP_NAMES]
    if unknown or not wanted:
        p.error(f"--steps: unknown step {', '.join(unknown) or '(none given)'} (allowed: {', '.join(STEP_NAMES)})")
    a.device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.collectives_probe:
        return collectives_probe(a.collectives_probe, a.device)
    if a.device.type != "cuda" and not a.quick:
        if a.out:  # a caller that only reads the file learns why there is nothing else in it
            write_atomically(Path(a.out), "# GPU check: not run\n\nNo CUDA device (torch.cuda.is_available() is "
                             f"{torch.cuda.is_available()}, torch {torch.__version__}): the full check needs one.\n")
        p.error("no CUDA device: the full check needs one (use --quick for the CPU smoke test)")
    if a.budget is not None and a.budget <= 0:
        p.error(f"--budget: expected a positive number of seconds, got {a.budget}")
    budget = a.budget if a.budget is not None else (None if a.quick else 450.0)
    for key, (full, quick) in SIZES.items():
        setattr(a, key, quick if a.quick else full)
    device = a.device
    check, state = Check(device), {}
    out = a.out or (None if a.quick else str(HERE / "gpu.md"))
    command = f"bash benchmarks/gpu_check.sh {' '.join(argv if argv is not None else sys.argv[1:])}"
    steps = [
        ("pgd", f"PGD-{a.pgd_steps}, {a.model}, {a.pgd_n:,} images: sirobust fp32, bf16 and torchattacks",
         lambda: pgd_speed(a, device, state)),
        ("train", f"One PGD-{a.train_steps} AT epoch, {a.model}, {a.train_n:,} images",
         lambda: train_speed(a, device, state)),
        ("bf16", f"bf16 against fp32 robust accuracy on a trained {a.model}",
         lambda: bf16_accuracy(a, device, state, work)),
        ("autoattack", f"Standard AutoAttack, {a.aa_n:,} images", lambda: autoattack(a, device, state, work)),
        ("sync", "Host sync every k steps: PGD, APGD-CE, FAB-T, Square",
         lambda: host_sync_branch(a, device, state, work)),
        ("deterministic", "Deterministic training (CUDA)", lambda: deterministic_branch(a, device, state, work)),
        ("torchrun", "torchrun and the process group's collectives", lambda: torchrun_branch(a, device, state, work)),
        ("compile-evaluate", "torch.compile in evaluate (CUDA)", lambda: compile_evaluate_branch(a, device, state, work)),
        ("compile-fit", "torch.compile in fit (CUDA)", lambda: compile_fit_branch(a, device, state, work)),
        ("aa-reference", f"The reference AutoAttack on the same {a.aa_n:,} images",
         lambda: aa_reference(a, device, state, work)),
    ]
    assert [name for name, _, _ in steps] == STEP_NAMES
    steps = [(name, title, fn) for name, title, fn in steps if name in wanted]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if out:  # before the first step: a driver hang in step 1 still leaves the device and the versions
            write_atomically(Path(out), render(a, check, state, command, left=[n for n, _, _ in steps]))
        for i, (name, title, fn) in enumerate(steps):
            if budget is not None and check.elapsed() + ESTIMATES[name] * (0.1 if a.quick else 1) > budget:
                check.skip(name, title, f"Not started at {check.elapsed():.0f} s: its estimate ({ESTIMATES[name]} s) "
                                        f"would end past the budget ({budget:.0f} s).")
            else:
                check.step(title, fn)
            if out:  # after every step: a check stopped by a time limit still leaves the steps it finished
                write_atomically(Path(out), render(a, check, state, command, left=[n for n, _, _ in steps[i + 1:]]))
    text = render(a, check, state, command, left=[])
    print(text)
    if out:
        write_atomically(Path(out), text)
    return 1 if check.failures else 3 if check.not_run else 0


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def render(a, check: Check, state: dict, command: str, left: list) -> str:
    """gpu.md: the verdicts, then every step's section; the ``left`` steps (names) not run yet, and those the
    budget left out, say so in the title, with the command that runs them."""
    device = a.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    verdicts = []
    if "pgd_speedup" in state:
        verdicts.append(f"PGD-20 bf16 vs torchattacks: {state['pgd_speedup']:.2f}× (target ≥ 4×)")
    if "bf16_gap" in state:
        verdicts.append(f"bf16 vs fp32 robust accuracy: {state['bf16_gap']:.2f} points (target ≤ 0.5)")
    if "aa_ratio" in state:
        verdicts.append(f"AutoAttack time vs the reference: {state['aa_ratio']:.2f}× (target ≤ 0.5×)")
    only = "" if a.steps is None else f" (--steps {a.steps} only)"
    status = f"every step ran{only}" if not check.failures else f"FAILED: {', '.join(check.failures)}{only}"
    if check.not_run:
        status = f"{len(check.not_run)} step(s) left out by the time budget; " + status.replace("every step ran",
                                                                                               "the others ran")
    if left:
        status = f"stopped or still running, {len(left)} step(s) not finished; {status}"
    if "compile_blocker" in state and state["compile_blocker"]:
        verdicts.append(f"torch.compile SKIPPED on this image: {state['compile_blocker']}")
    todo = [*check.not_run, *left]
    peaks, board = device_peaks(device)
    peaks_text = (f"{board}, " + ", ".join(f"{k} {v:g} TFLOP/s" for k, v in peaks.items()) if device.type == "cuda"
                  else board)
    resume = ([f"To run what is missing: `bash benchmarks/gpu_check.sh --steps {','.join(todo)} --out rest.md`", ""]
              if todo else [])
    lines = [f"# GPU check{' (quick smoke test)' if a.quick else ''}: {status}", "", *resume,
             f"Device {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), sirobust {sirobust.__version__}, "
             f"torchattacks {'present' if have_torchattacks() else 'absent'}, reference AutoAttack "
             f"{'present' if have('autoattack') else 'absent'}; {time.perf_counter() - check.t0:.0f} s in all. FLOP "
             f"floor: {peaks_text}.", "",
             *[f"- {v}" for v in verdicts], *check.sections, "", f"command: `{command}`", ""]
    return "\n".join(lines)

if __name__ == "__main__":
    raise SystemExit(main())
