"""GPU suite: PGD-20 and one epoch of PGD-10 AT / TRADES, sirobust fp32 vs its fast path, against the FLOP floor.

Rows, each timed after one warm-up batch, with ``torch.cuda.synchronize`` around the clock and
``cudnn.benchmark`` on:

- PGD-20 (L∞ ε = 8/255, α = ε/4, random start, model in eval mode) on ResNet-18 and WRN-34-10 over 10,000
  random 32×32 images labelled by the (random-init) model: torchattacks' PGD, sirobust ``PGD(precision="fp32")``
  and sirobust ``PGD(precision="auto")`` (the fast path: bf16 autocast + channels_last + BN folding on CUDA).
  sirobust runs with ``early_stop=False`` (every example takes every step, like torchattacks) so that all rows
  do the same work; ``--early-stop`` adds sirobust's evaluation mode, which does less.
- one epoch of PGD-10 AT and of TRADES on ResNet-18 (50,000 random images, random labels) with sirobust's
  ``fit`` at ``precision="fp32"`` and at the fast path (``--plain`` adds the plain PyTorch loop of
  bench_train.py).

FLOPs: one forward, one forward+backward to the input (attacks: weights get no gradient) and one
forward+backward of a training update (train mode, weight gradients) are counted per image with
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls, 2 FLOPs per multiply-add), then
multiplied by the passes the task needs: PGD-k = k input-gradient passes + 1 forward (the accuracy check);
AT = k input-gradient passes + 1 update; TRADES = 1 forward (f(x) for the attack) + k input-gradient passes +
2 updates (f(x) and f(x') both carry gradient). Achieved TFLOP/s = those FLOPs / seconds; the floor = those
FLOPs / the stated peak; "× floor" = seconds / floor.

    python benchmarks/bench_gpu.py --write                    # on the GPU: writes benchmarks/gpu-bench.md
                                                              # (gpu.md is the GPU check's: gpu_check.sh)
    python benchmarks/bench_gpu.py --device cpu --quick       # smoke test: tiny sizes, 2 steps

torchattacks is a benchmark dependency only: ``pip install --no-deps torchattacks``.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench_pgd import import_torchattacks, publish  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from bench_train import (VAL_N, device_name, plain_epoch, random_cifar_like, sirobust_epoch, sync,  # noqa: E402
                         train_config, train_precision_api, training_images)

import sirobust
from sirobust.models import build_model

# H100/H200 SXM (same Hopper tensor cores, H200 only has more and faster memory), dense, no sparsity
PEAKS = {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0}
# the other Hopper boards run slower clocks or fewer SMs (NVIDIA's data sheets, dense): the floor follows the board
PEAKS_BY_BOARD = {"PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
                  "NVL": {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}}


def peaks_for(device_name: str) -> tuple[dict, str]:
    """(the peaks, which board they are for) for a CUDA device's name: SXM unless the name says PCIe or NVL."""
    for board, peaks in PEAKS_BY_BOARD.items():
        if board.lower() in device_name.lower():
            return peaks, f"Hopper {board}"
    return PEAKS, "H100/H200 SXM"


def pgd_precision_api() -> bool:
    """Whether ``sirobust.PGD(..., precision=...)`` is taken and kept (built on a toy model, never run)."""
    if "precision" not in inspect.signature(sirobust.PGD.__init__).parameters:
        return False
    try:
        attack = sirobust.PGD(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)), eps=0.1, steps=1,
                              precision="fp32")
    except (TypeError, ValueError):
        return False
    return getattr(attack, "precision", None) == "fp32"


# ----------------------------------------------------------------------------- FLOPs
def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def flops_per_image(model: torch.nn.Module, shape, device, batch: int = 2) -> dict:
    """FLOPs per image of: a forward (``fwd``), a forward+backward to the input only (``attack``), and a
    training update, forward+backward in train mode with weight gradients (``update``). Counted on copies of
    ``model`` (fp32, no BN folding: the floor is the model's own arithmetic)."""
    x = torch.rand(batch, *shape, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    m = copy.deepcopy(model).float().eval()

    def forward():
        with torch.no_grad():
            m(x)

    def attack_pass():
        # what torch.autograd.grad(loss, x_adv) runs (convolution_backward computes the input gradient only);
        # FlopCounterMode cannot follow autograd.grad itself, so weights are frozen and backward() is used
        for p in m.parameters():
            p.requires_grad_(False)
        xa = x.clone().requires_grad_(True)
        F.cross_entropy(m(xa), y).backward()
        for p in m.parameters():
            p.requires_grad_(True)

    def update():
        m.train()
        F.cross_entropy(m(x), y).backward()
        m.zero_grad(set_to_none=True)
        m.eval()

    return {name: count_flops(fn) / batch for name, fn in
            (("fwd", forward), ("attack", attack_pass), ("update", update))}


# ----------------------------------------------------------------------------- rows
class Row:
    def __init__(self, task, model, impl, precision, seconds, n, flops, peak, extra):
        self.task, self.model, self.impl, self.precision = task, model, impl, precision
        self.seconds, self.n, self.flops, self.peak, self.extra = seconds, n, flops, peak, extra

    def cells(self) -> list:
        achieved = self.flops / self.seconds / 1e12
        if self.peak:
            floor = self.flops / (self.peak * 1e12)
            floor_cells = [f"{self.peak:g}", f"{floor:.3g}", f"{self.seconds / floor:.1f}×"]
        else:
            floor_cells = ["–", "–", "–"]
        return [self.task, self.model, self.impl, self.precision, f"{self.seconds:.2f}", num(self.n / self.seconds),
                num(self.flops / 1e12), num(achieved), *floor_cells, self.extra]


def num(v: float) -> str:
    """Three significant digits, no exponent for the sizes a table shows."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def peak_for(precision: str, device: torch.device, a) -> float | None:
    """The peak a row is held to: bf16 for the fast path on CUDA, TF32 for fp32 when cuDNN may use it
    (PyTorch's default), else FP32. None on a CPU unless --peak-cpu."""
    if device.type != "cuda":
        return a.peak_cpu
    if precision in ("auto", "bf16"):
        return a.peak_bf16
    return a.peak_tf32 if torch.backends.cudnn.allow_tf32 else a.peak_fp32


def timed(fn, device, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def pgd_rows(name: str, a, device, has_api: bool, notes: list) -> tuple[list, dict]:
    """The PGD rows (and the model's FLOPs per image); without torchattacks, sirobust's rows alone."""
    try:
        torchattacks = import_torchattacks(notes)
    except Exception as e:  # noqa: BLE001 — the GPU check still times sirobust and says the peer is missing
        torchattacks = None
        notes.append(f"torchattacks is not importable ({type(e).__name__}: {e}): no torchattacks row "
                     "(docs/speed.md says how to fetch it)")

    torch.manual_seed(a.seed)
    model = build_model(name, num_classes=10, in_channels=3).to(device).eval()
    g = torch.Generator().manual_seed(a.seed)
    x_all = torch.rand(a.pgd_n, 3, 32, 32, generator=g).to(device)
    with torch.no_grad():
        y_all = torch.cat([model(x_all[i:i + a.pgd_batch_size]).argmax(1)
                           for i in range(0, a.pgd_n, a.pgd_batch_size)])
    per_image = flops_per_image(model, (3, 32, 32), device)
    eps, alpha, steps = 8 / 255, 2 / 255, a.pgd_steps
    work = a.pgd_n * (steps * per_image["attack"] + per_image["fwd"])

    contenders = [] if torchattacks is None else [
        ("torchattacks PGD", "fp32", lambda m: torchattacks.PGD(m, eps=eps, alpha=alpha, steps=steps, random_start=True))]
    modes = [(False, "all steps")] + ([(True, "early stop")] if a.early_stop else [])
    for early, how in modes:
        if has_api:
            for prec in ("fp32", a.fast_precision):
                contenders.append((f"sirobust PGD ({how})", prec,
                                   lambda m, p=prec, e=early: sirobust.PGD(m, eps=eps, alpha=alpha, steps=steps,
                                                                           early_stop=e, precision=p)))
        else:  # the label is replaced by what the attack reports it ran as (ran_as), where it does
            contenders.append((f"sirobust PGD ({how})", "default (no precision keyword)",
                               lambda m, e=early: sirobust.PGD(m, eps=eps, alpha=alpha, steps=steps, early_stop=e)))

    def run(attack):
        correct = torch.zeros((), device=device, dtype=torch.long)
        for s in range(0, a.pgd_n, a.pgd_batch_size):
            x, y = x_all[s:s + a.pgd_batch_size], y_all[s:s + a.pgd_batch_size]
            x_adv = attack(x, y)
            with torch.no_grad():  # the accuracy check: on the untouched fp32 model, the same for every row
                correct += (model(x_adv).argmax(1) == y).sum()
        return correct.item() / a.pgd_n

    rows = []
    for impl, prec, make in contenders:
        try:
            attack = make(copy.deepcopy(model))  # its own copy: a fast path may fold BN or change memory format
            attack(x_all[:a.pgd_batch_size], y_all[:a.pgd_batch_size])  # warm-up (cuDNN autotuning, allocator)
            sec, acc = timed(lambda: run(attack), device, a.repeats)
        except Exception as e:  # noqa: BLE001 — a peer that fails leaves a note; sirobust's rows are still timed
            if impl.startswith("sirobust"):
                raise
            notes.append(f"{impl} raised {type(e).__name__}: {str(e)[:300]} (no row)")
            continue
        ran_as = getattr(attack, "ran_as", None)
        if not has_api and impl.startswith("sirobust"):
            prec = f"{ran_as['precision']} (default; no precision keyword)" if ran_as else "fp32 (no precision API)"
        if ran_as:  # what sirobust says it did: a fast path that fell back, or an fp32 row that did not run fp32
            notes.append(f"{name}, {impl} at precision {prec.split()[0]} ran as {ran_as}")
        mark = " †" if "early stop" in impl else ""
        rows.append(Row(f"PGD-{steps}", name, impl + mark, prec, sec, a.pgd_n, work,
                        peak_for(prec.split()[0], device, a), f"{100 * acc:.2f}"))
        print(f"  {name} {impl} {prec}: {sec:.2f} s, robust accuracy {100 * acc:.2f}%", file=sys.stderr, flush=True)
    return rows, per_image  # the model, its copies and the inputs are freed here


def train_rows(defense: str, a, device, has_api: bool, per_image: dict) -> list:
    dataset = random_cifar_like(a.train_n + VAL_N, a.seed)
    k = a.train_steps
    passes = k * per_image["attack"] + per_image["update"] if defense == "at" else \
        per_image["fwd"] + k * per_image["attack"] + 2 * per_image["update"]
    work = a.train_n * passes
    task = f"{'PGD-AT' if defense == 'at' else 'TRADES'} epoch (PGD-{k})"
    rows = []

    def config(prec):
        return train_config("cifar10", a.train_model, defense, a.train_n, a.train_batch_size, a.device, a.seed,
                            precision=prec, attack_steps=k)

    if a.plain:
        base = config(None).resolved()
        out = plain_epoch(training_images(dataset, base), base, device)
        rows.append(Row(task, a.train_model, "plain PyTorch loop", "fp32", out["train_seconds"], a.train_n, work,
                        peak_for("fp32", device, a), f"{out['loss']:.4f}"))
        print(f"  {task} plain: {out['train_seconds']:.2f} s", file=sys.stderr, flush=True)
    for prec in (("fp32", a.fast_precision) if has_api else (None,)):
        out = sirobust_epoch(dataset, config(prec))
        label = prec or "fp32 (no precision API)"
        rows.append(Row(task, a.train_model, "sirobust fit()", label, out["train_seconds"], a.train_n, work,
                        peak_for(label.split()[0], device, a), f"{out['loss']:.4f}"))
        print(f"  {task} sirobust {label}: {out['train_seconds']:.2f} s", file=sys.stderr, flush=True)
    return rows


def table(rows: list, last: str) -> list:
    head = ["task", "model", "implementation", "precision", "seconds", "images/s", "work (TFLOP)",
            "achieved TFLOP/s", "peak (TFLOP/s)", "floor (s)", "time / floor", last]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * 8) + "|"]
    return lines + ["| " + " | ".join(r.cells()) + " |" for r in rows]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and 2 attack steps everywhere (a smoke test, also on a CPU)")
    p.add_argument("--parts", default="pgd,at,trades", help="comma-separated: pgd, at, trades")
    p.add_argument("--models", default="resnet18,wrn-34-10", help="models of the PGD rows")
    p.add_argument("--train-model", default="resnet18")
    p.add_argument("--pgd-n", type=int, default=None, help="PGD inputs (default 10000; quick 2)")
    p.add_argument("--pgd-batch-size", type=int, default=None, help="default 500; quick 2")
    p.add_argument("--pgd-steps", type=int, default=None, help="default 20; quick 2")
    p.add_argument("--train-n", type=int, default=None, help="training images (default 50000; quick 16)")
    p.add_argument("--train-batch-size", type=int, default=None, help="default 128; quick 8")
    p.add_argument("--train-steps", type=int, default=None, help="PGD steps of the training attack (default 10; quick 2)")
    p.add_argument("--fast-precision", default="auto", choices=["auto", "bf16", "fp32-fast"], help="sirobust's fast path")
    p.add_argument("--early-stop", action="store_true", help="also time sirobust PGD in evaluation mode (early stop)")
    p.add_argument("--plain", action="store_true", help="also time bench_train.py's plain loop for the epochs")
    p.add_argument("--no-tf32", action="store_true", help="fp32 means FP32: TF32 off for cuDNN and matmuls")
    p.add_argument("--peak-bf16", type=float, default=PEAKS["bf16"], help="dense bf16 peak, TFLOP/s (H200 SXM: 989)")
    p.add_argument("--peak-tf32", type=float, default=PEAKS["tf32"], help="dense TF32 peak, TFLOP/s (H200 SXM: 495)")
    p.add_argument("--peak-fp32", type=float, default=PEAKS["fp32"], help="FP32 peak, TFLOP/s (H200 SXM: 67)")
    p.add_argument("--peak-cpu", type=float, default=None, help="the peak to use on a CPU (default: no floor)")
    p.add_argument("--repeats", type=int, default=1, help="PGD rows: best of this many runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="write benchmarks/gpu-bench.md (benchmarks/gpu.md is gpu_check.sh's)")
    a = p.parse_args()
    sizes = dict(pgd_n=(10000, 2), pgd_batch_size=(500, 2), pgd_steps=(20, 2), train_n=(50000, 16),
                 train_batch_size=(128, 8), train_steps=(10, 2))
    for key, (full, quick) in sizes.items():
        if getattr(a, key) is None:
            setattr(a, key, quick if a.quick else full)
    parts = [s.strip() for s in a.parts.split(",") if s.strip()]
    unknown = set(parts) - {"pgd", "at", "trades"}
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from pgd, at, trades")
    device = torch.device(a.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda but CUDA is not available (use --device cpu --quick for a smoke test)")
        torch.backends.cudnn.benchmark = True
    if a.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    notes = []
    torchattacks = import_torchattacks(notes)

    pgd_api, train_api = pgd_precision_api(), train_precision_api()
    for ok, where in ((pgd_api, "sirobust.PGD"), (train_api, "TrainConfig")):
        if not ok:
            notes.append(f"this sirobust ({sirobust.__version__}) has no `precision` keyword on {where} yet: its "
                         "only path is timed, as fp32, and its fast-path rows are missing. Rerun once the "
                         "precision API has landed.")
            print("note: " + notes[-1], file=sys.stderr)

    pgd, train, per_image_of = [], [], {}
    if "pgd" in parts:
        for name in [m.strip() for m in a.models.split(",") if m.strip()]:
            print(f"PGD-{a.pgd_steps} on {name} ...", file=sys.stderr, flush=True)
            rows, per_image_of[name] = pgd_rows(name, a, device, pgd_api, notes)
            pgd += rows
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for defense in ("at", "trades"):
        if defense in parts:
            print(f"{defense} epoch on {a.train_model} ...", file=sys.stderr, flush=True)
            if a.train_model not in per_image_of:
                torch.manual_seed(a.seed)
                per_image_of[a.train_model] = flops_per_image(
                    build_model(a.train_model, num_classes=10, in_channels=3).to(device), (3, 32, 32), device)
            train += train_rows(defense, a, device, train_api, per_image_of[a.train_model])

    tf32 = (f"cuDNN TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'}, matmul TF32 "
            f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}")
    peaks = (f"peaks (dense, H100/H200 SXM datasheet): bf16 {a.peak_bf16:g}, TF32 {a.peak_tf32:g}, FP32 "
             f"{a.peak_fp32:g} TFLOP/s; the fast path is held to the bf16 peak, fp32 rows to the TF32 peak while "
             "cuDNN may use TF32 (PyTorch's default; `--no-tf32` turns it off and uses the FP32 peak)"
             if device.type == "cuda" else
             f"no peak on a CPU{'' if a.peak_cpu is None else f': {a.peak_cpu:g} TFLOP/s as given'}")
    lines = [f"# GPU suite{' (quick smoke test)' if a.quick else ''}: sirobust fp32 vs its fast path "
             f"({a.fast_precision}), with the FLOP floor", "",
             f"Device {device_name(device)}, torch {torch.__version__}, sirobust {sirobust.__version__}, torchattacks "
             f"{torchattacks.__version__}; cudnn.benchmark {'on' if torch.backends.cudnn.benchmark else 'off'}, "
             f"{tf32}; {peaks}. Each row after one warm-up batch, synchronised timing"
             f"{'' if a.repeats == 1 else f', best of {a.repeats} (PGD)'}.", "",
             "FLOPs per image (FlopCounterMode: convolutions and matmuls, 2 per multiply-add; GFLOP): "
             + "; ".join(f"{m}: forward {f['fwd'] / 1e9:.2f}, forward+input-gradient {f['attack'] / 1e9:.2f}, "
                         f"training update {f['update'] / 1e9:.2f}" for m, f in per_image_of.items()) + "."]
    if pgd:
        lines += ["", f"## PGD-{a.pgd_steps}: {a.pgd_n} random 32×32 images labelled by the random-init model, batch "
                      f"{a.pgd_batch_size}, L∞ ε = 8/255, α = 2/255, random start, eval mode", "",
                  f"Work = {a.pgd_steps} forward+input-gradient passes + 1 forward (the accuracy check) per image. "
                  "sirobust also runs 2 forwards per image that the floor leaves out (its clean-prediction check "
                  "before the attack and its fooled check after it); torchattacks runs none.", "",
                  *table(pgd, "robust acc (%)")]
        if a.early_stop:
            lines += ["", "† early stop (sirobust's evaluation mode): examples stop at the first iterate that fools "
                          "the model, so these rows do less than the full work; their TFLOP/s and floor are for the "
                          "full work, i.e. an effective rate, not what the GPU executed."]
    if train:
        lines += ["", f"## One training epoch of {a.train_model}: {a.train_n} random 32×32 images with random labels, "
                      f"batch {a.train_batch_size}, PGD-{a.train_steps} of ε/4 (ε = 8/255) from a random start in "
                      "eval mode, update in train mode, SGD, no augmentation", "",
                  f"Work per image: PGD-AT = {a.train_steps} forward+input-gradient passes + 1 training update; "
                  f"TRADES = 1 forward (f(x) for the attack) + {a.train_steps} forward+input-gradient passes + 2 "
                  "training updates. Time: `train_seconds` of fit's epoch (validation and checkpoints excluded)"
                  + (" and the plain loop's epoch" if a.plain else "") + ".", "",
                  *table(train, "mean training loss")]
    if notes:
        lines += ["", *[f"- {n}" for n in dict.fromkeys(notes)]]
    publish(lines, "bench_gpu.py", "gpu-bench.md", a.write)


if __name__ == "__main__":
    main()
