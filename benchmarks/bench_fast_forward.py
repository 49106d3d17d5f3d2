"""One forward of the benchmark model (PGD-AT cnn-small of bench_pgd.py) on 60 and 290 images: the model as
given against the attacks' private copy (BatchNorm folded, channels_last), and against the copy's inference
form for forwards without gradient (traced, frozen, oneDNN: ``fastpath.inference_copy``, Square's queries);
and one forward and backward pass to the input (APGD's and FAB's step), the model as given against the copy,
and the copy against the copy without its graph passes (max-pool before ReLU, the identity adaptive pool
skipped: ``fastpath._pool_before_relu``, ``fastpath._skip_identity_pools``), timed in turns; the figures
docs/speed.md quotes. It also prints each forward's rate in GFLOP/s (FLOPs counted by
``torch.utils.flop_counter``) beside a large matrix product's, the practical ceiling of this CPU in fp32.

    python benchmarks/bench_fast_forward.py
"""
from __future__ import annotations

from copy import deepcopy
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_pgd import trained_small_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

import sirobust.fastpath as fastpath
from sirobust.fastpath import attack_model, inference_copy, resolve_precision


def per_call_ms(fn, x, repeats: int = 300) -> float:
    with torch.no_grad():
        for _ in range(10):
            fn(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(x)
    return (time.perf_counter() - t0) / repeats * 1e3


def grad_pass_ms(fn, x, repeats: int = 40) -> float:
    """A forward and a backward pass to the input only, as an attack step makes them."""
    for i in range(repeats + 5):
        if i == 5:
            t0 = time.perf_counter()
        xa = x.detach().requires_grad_(True)
        torch.autograd.grad(fn(xa)[:, 0].sum(), xa)
    return (time.perf_counter() - t0) / repeats * 1e3


def sgemm_gflops(n: int = 2048, repeats: int = 10) -> float:
    """fp32 GFLOP/s of an n×n matrix product: what this CPU's BLAS reaches on the easiest dense work."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e9


def forward_flops(model, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def without_graph_passes(model, fast):
    """The private copy as it was before its graph passes: batch norm folded, channels_last, nothing else."""
    passes = fastpath._pool_before_relu, fastpath._skip_identity_pools
    fastpath._pool_before_relu = fastpath._skip_identity_pools = lambda *a: None
    try:
        old = deepcopy(fast)
        old.body = fastpath._fold(model.body).requires_grad_(False).to(memory_format=torch.channels_last)
    finally:
        fastpath._pool_before_relu, fastpath._skip_identity_pools = passes
    return old


def main():
    model = trained_small_model(Path("runs/bench-cnn-small-at"), torch.device("cpu")).eval()
    fast, note = attack_model(model, resolve_precision("auto", "cpu"), probe=torch.rand(8, 1, 28, 28))
    frozen = inference_copy(fast, torch.rand(8, 1, 28, 28))
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; fast copy: {note}; inference form: "
          f"{type(frozen).__name__}")
    for batch in (60, 290):
        x = torch.rand(batch, 1, 28, 28)
        given, copy, inference = per_call_ms(model, x), per_call_ms(fast, x), per_call_ms(frozen, x)
        print(f"batch {batch}: model as given {given:.2f} ms, private copy {copy:.2f} ms ({given / copy:.1f}×), "
              f"inference form {inference:.2f} ms ({copy / inference:.2f}× the copy)")
        if batch == 290:
            flops, ceiling = forward_flops(model, x), sgemm_gflops()
            rates = ", ".join(f"{name} {flops / ms / 1e6:.0f}" for name, ms in
                              (("as given", given), ("copy", copy), ("inference form", inference)))
            print(f"batch 290: {flops / batch / 1e6:.2f} MFLOP per image; GFLOP/s: {rates}; a 2048² fp32 "
                  f"matrix product: {ceiling:.0f} (inference form at {flops / inference / 1e6 / ceiling:.0%} of it)")
    x = torch.rand(290, 1, 28, 28)
    given, copy = grad_pass_ms(model, x), grad_pass_ms(fast, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # --precision bf16 (fast only where the CPU has native bf16)
        bf16 = grad_pass_ms(fast, x)
    print(f"batch 290, forward and backward to the input: model as given {given:.1f} ms, private copy "
          f"{copy:.1f} ms ({given / copy:.2f}×), the copy under bf16 autocast {bf16:.1f} ms ({copy / bf16:.2f}× "
          "the copy in fp32)")
    old = without_graph_passes(model, fast)
    for batch in (150, 290):
        x = torch.rand(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        turns = [(grad_pass_ms(fast, x, 20), grad_pass_ms(old, x, 20)) for _ in range(6)]
        new_ms, old_ms = statistics.median(t[0] for t in turns), statistics.median(t[1] for t in turns)
        ratios = sorted(t[0] / t[1] for t in turns)
        print(f"batch {batch}, forward and backward to the input, 6 turns: the copy {new_ms:.1f} ms, without its graph "
              f"passes {old_ms:.1f} ms (median ratio {statistics.median(ratios):.2f}, range {ratios[0]:.2f}-"
              f"{ratios[-1]:.2f})")

if __name__ == "__main__":
    main()
