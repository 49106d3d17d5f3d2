"""Scaling of PGD-10 adversarial training: batch size × processes, and the cost of bigger models.

Table 1 times one epoch of PGD-10 AT (``sirobust train --defense at``) of cnn-small on
fashion-mnist-mini for every global batch size and number of processes asked for. One process runs
``python -m sirobust train`` with all the machine's cores; N > 1 processes run under
``python -m torch.distributed.run --standalone --nproc-per-node N`` (DistributedDataParallel, gloo on
CPUs) with ``OMP_NUM_THREADS = cores // N``, so that processes × threads = cores in every row. The
time is the run's own ``train_seconds`` (the training part of the epoch: no start-up, no validation),
read from each run's metrics.jsonl, best over epochs and ``--repeats``. Speed-up is against one
process at the same global batch.

Table 2 is the note on how the cost grows with model size: FLOPs per image of one forward (counted by
torch.utils.flop_counter.FlopCounterMode: convolutions and matrix products, one image, model in eval
mode, on the meta device so nothing is computed), of one PGD step (forward + input-gradient backward
≈ 2F) and of one PGD-10 AT training image (10 attack steps + the training forward/backward ≈
10·2F + 3F = 23F). Where the hardware is compute-bound, epoch time ≈ FLOPs per image × images.

    python benchmarks/bench_scaling.py                                  # 64,128,256 × 1,2 processes
    python benchmarks/bench_scaling.py --train-n 256 --batch-sizes 64 --procs 1,2   # a quick check

With ``--write`` the Markdown is saved as benchmarks/scaling.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# the house helper (prints the Markdown with the command beside it; --write saves it)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pgd import publish  # noqa: E402

FLOP_MODELS = [("cnn-small", 1, 28), ("resnet18", 3, 32), ("preact-resnet18", 3, 32),
               ("wrn-28-10", 3, 32), ("wrn-34-10", 3, 32), ("resnet50", 3, 32)]
AT_FACTOR = 10 * 2 + 3  # PGD-10 AT: 10 attack steps (2F each) + the training forward/backward (3F)


def int_list(text: str) -> list:
    return [int(v) for v in text.split(",") if v.strip()]


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train_command(a, procs: int, batch: int, out: Path) -> list:
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
                                   if procs > 1 else [])
    return launcher + ["-m", "sirobust", "train", "--dataset", a.dataset, "--model", a.model, "--defense", "at",
                       "--steps", "10", "--train-n", str(a.train_n), "--epochs", str(a.epochs),
                       "--batch-size", str(batch), "--val-n", str(a.val_n), "--precision", a.precision,
                       "--device", "cpu", "--no-overfit-check", "--no-progress", "--out", str(out), "--overwrite"]


def run_once(a, procs: int, batch: int, threads: int, out: Path) -> dict:
    """One training run; returns its best epoch's train_seconds, or the failure."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = train_command(a, procs, batch, out)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired as e:
        log = e.stderr or ""
        return {"error": f"timed out after {a.timeout:g} s", "cmd": cmd,
                "log": (log.decode(errors="replace") if isinstance(log, bytes) else log)[-3000:]}
    wall = time.perf_counter() - t0
    metrics = out / "metrics.jsonl"
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()] if metrics.exists() else []
    if proc.returncode != 0 or not rows:
        return {"error": f"exit status {proc.returncode}" + ("" if rows else ", no metrics.jsonl rows"),
                "log": (proc.stderr + proc.stdout)[-3000:], "cmd": cmd}
    if a.show_log:
        print(f"$ OMP_NUM_THREADS={threads} {' '.join(cmd)}\n{(proc.stderr + proc.stdout)[-3000:]}", file=sys.stderr)
    return {"train_seconds": min(r["train_seconds"] for r in rows), "seconds": min(r["seconds"] for r in rows),
            "wall": wall, "row": rows[-1]}


def images_per_epoch(a, batch: int, procs: int) -> int:
    """Training images one epoch sees: the run drops a last batch too small to split across the processes."""
    n = a.train_n
    tail = n % batch
    if procs > 1 and 0 < tail < 2 * procs:
        n -= tail
    return n


def count_flops(name: str, channels: int, size: int):
    from torch.utils.flop_counter import FlopCounterMode

    from sirobust.models import build_model

    def count(device):
        with torch.device(device):
            model = build_model(name, num_classes=10, in_channels=channels).eval()
            x = torch.zeros(1, channels, size, size)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
        return counter.get_total_flops(), sum(p.numel() for p in model.parameters())

    try:
        return count("meta")  # shapes only: nothing allocated, nothing computed
    except Exception:  # noqa: BLE001 (an op without a meta kernel: count on the CPU instead)
        return count("cpu")


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g} {suffix}{unit}"
    return f"{n:.3g} {unit}".rstrip()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", type=int_list, default=[64, 128, 256], help="global batch sizes (default 64,128,256)")
    p.add_argument("--procs", type=int_list, default=[1, 2], help="numbers of processes (default 1,2)")
    p.add_argument("--train-n", type=int, default=2048, help="training images per epoch (default 2048)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="runs per cell, the best is kept (default 1)")
    p.add_argument("--val-n", type=int, default=64, help="validation images per epoch (not timed; default 64)")
    p.add_argument("--cores", type=int, default=None, help="cores to share among the processes (default: the machine's)")
    p.add_argument("--precision", default="auto", help="sirobust train --precision (default auto)")
    p.add_argument("--model", default="cnn-small")
    p.add_argument("--dataset", default="fashion-mnist-mini")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed to one training run")
    p.add_argument("--show-log", action="store_true", help="print the tail of every run's output to stderr")
    p.add_argument("--write", action="store_true", help="save the Markdown as benchmarks/scaling.md")
    a = p.parse_args()
    cores = a.cores or machine_cores()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    results, failures = {}, []
    with tempfile.TemporaryDirectory(prefix="sirobust-scaling-") as tmp:
        for batch in a.batch_sizes:
            for procs in a.procs:
                threads = max(1, cores // procs)
                best = None
                for rep in range(a.repeats):
                    out = Path(tmp) / f"b{batch}-p{procs}-r{rep}"
                    r = run_once(a, procs, batch, threads, out)
                    if "error" in r:
                        failures.append((batch, procs, r))
                        best = best or r
                        break
                    if best is None or "error" in best or r["train_seconds"] < best["train_seconds"]:
                        best = r
                print(f"batch {batch}, {procs} process(es) × {threads} threads: "
                      + (f"FAILED ({best['error']})" if "error" in best
                         else f"{best['train_seconds']:.2f} s train, {best['seconds']:.2f} s epoch, "
                              f"{best['wall']:.1f} s wall"), file=sys.stderr, flush=True)
                results[batch, procs] = (threads, best)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    flops_per_image = count_flops(a.model, *{m: (c, s) for m, c, s in FLOP_MODELS}.get(a.model, (1, 28)))[0] \
        * AT_FACTOR
    lines = [f"### PGD-10 AT epoch time: {a.model} on {a.dataset}, batch size × processes", "",
             f"torch {torch.__version__}, Python {platform.python_version()}, CPU {cpu_name()}, {cores} cores "
             f"(os.cpu_count() {os.cpu_count()}); 1 process: `python -m sirobust train` with {cores} threads; "
             f"N processes: `torch.distributed.run --nproc-per-node N` (DDP, gloo) with OMP_NUM_THREADS = {cores}//N, "
             "so processes × threads = cores."
             + (f" 1-minute load average {load_before:.2f} before the runs, {load_after:.2f} after (anything else "
                "running competes for the cores; the rows with several threads per process suffer most)."
                if load_before is not None else ""), "",
             f"{a.train_n} training images, {a.epochs} epoch(s), PGD-10 (ε/4 steps), --precision {a.precision}, "
             f"global batch = --batch-size (each process trains on its slice); time = the run's `train_seconds` "
             f"(training only: no start-up, no validation of {a.val_n} images), best of {a.repeats} run(s)"
             + (" and of the epochs" if a.epochs > 1 else "") + ".", "",
             "| global batch | processes | threads each | per-process batch | s / epoch | images / s "
             "| speed-up vs 1 process | ≈ GFLOP/s (23F) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for batch in a.batch_sizes:
        base = results.get((batch, 1), (None, {"error": "not run"}))[1]
        for procs in a.procs:
            threads, r = results[batch, procs]
            per = f"{batch // procs}" if batch % procs == 0 else f"{batch // procs}–{-(-batch // procs)}"
            if "error" in r:
                lines.append(f"| {batch} | {procs} | {threads} | {per} | failed | – | – | – |")
                continue
            images = images_per_epoch(a, batch, procs)
            ips = images / r["train_seconds"]
            speedup = f"{base['train_seconds'] / r['train_seconds']:.2f}×" if "error" not in base else "–"
            lines.append(f"| {batch} | {procs} | {threads} | {per} | {r['train_seconds']:.2f} | {ips:.0f} | {speedup} "
                         f"| {ips * flops_per_image / 1e9:.1f} |")
    for batch, procs, r in failures:
        lines += ["", f"batch {batch}, {procs} process(es) failed: {r['error']}", "",
                  f"    {' '.join(r['cmd'])}", "", "```", r["log"].rstrip(), "```"]

    lines += ["", "### How the cost grows with model size", "",
              "FLOPs per image, counted by torch.utils.flop_counter.FlopCounterMode on one forward (batch of 1, eval mode; "
              "convolutions and matrix products, the elementwise ops are not counted). One PGD step = forward + "
              "input-gradient backward ≈ 2F; one PGD-10 AT training image ≈ 10·2F + 3F = 23F. On compute-bound "
              "hardware an epoch's time grows as FLOPs per image × images, so the last column is roughly how much "
              "longer than cnn-small an AT epoch of as many images takes (small models like cnn-small are rarely "
              "compute-bound on a CPU or GPU, so the real ratio there is smaller).", "",
              "| model | input | parameters | forward F | PGD step ≈ 2F | PGD-10 AT image ≈ 23F | × cnn-small |",
              "|---|---|---:|---:|---:|---:|---:|"]
    ref = None
    for name, c, s in FLOP_MODELS:
        f, params = count_flops(name, c, s)
        ref = ref or f
        lines.append(f"| {name} | {c}×{s}×{s} | {params / 1e6:.2f} M | {human(f, 'FLOP')} | {human(2 * f, 'FLOP')} "
                     f"| {human(AT_FACTOR * f, 'FLOP')} | {f / ref:,.0f}× |")
    publish(lines, "bench_scaling.py", "scaling.md", a.write)
    if load_before is not None and max(load_before, load_after) > 0.5:
        print(f"warning: the machine was not idle (load average {load_before:.2f} → {load_after:.2f} on {cores} cores); "
              "the times are not trustworthy, rerun on an idle machine", file=sys.stderr)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
