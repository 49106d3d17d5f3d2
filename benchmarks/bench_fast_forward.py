"""One forward of the benchmark model (PGD-AT cnn-small of bench_pgd.py) on 60 and 290 images: the model as
given against the attacks' private copy (BatchNorm folded, channels_last), and against the copy's inference
form for forwards without gradient (traced, frozen, oneDNN: ``fastpath.inference_copy``, Square's queries);
the figures docs/speed.md quotes.

    python benchmarks/bench_fast_forward.py
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from bench_pgd import trained_small_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from sirobust.fastpath import attack_model, inference_copy, resolve_precision


def per_call_ms(fn, x, repeats: int = 300) -> float:
    with torch.no_grad():
        for _ in range(10):
            fn(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(x)
    return (time.perf_counter() - t0) / repeats * 1e3


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

if __name__ == "__main__":
    main()
