"""Where does our SPSA's gap to torchattacks' on the standard model come from? (issue 10's open question)

Ours starts from a uniform point of the ε-ball (cleverhans) and stops an example early; torchattacks'
starts from the clean image and never stops. Same settings otherwise (128 samples, 100 iterations,
δ = 0.001, lr 0.01, ε = 0.1) on the standard cnn-small of bench_blackbox.py, first N test images.

    python benchmarks/bench_spsa_start.py -n 40
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchattacks

import sirobust
from sirobust.data import load_dataset


def main():
    p = argparse.ArgumentParser()
    p.add_argument("-n", "--num-examples", dest="n", type=int, default=40)
    a = p.parse_args()
    model = sirobust.load(Path("runs/bench-cnn-small-std/model.safetensors")).eval()  # bench_blackbox.py trains it
    ds = load_dataset("fashion-mnist-mini", "test")
    x, y = ds.float_images()[:a.n], ds.labels[:a.n]
    keys = torch.arange(a.n)
    rows = [("sirobust SPSA, random start, early stop (default)", lambda: sirobust.SPSA(model, eps=0.1)(x, y, keys=keys)),
            ("sirobust SPSA, clean start, early stop",
             lambda: sirobust.SPSA(model, eps=0.1, random_start=False)(x, y, keys=keys)),
            ("sirobust SPSA, clean start, every iteration",
             lambda: sirobust.SPSA(model, eps=0.1, random_start=False, early_stop=False)(x, y, keys=keys)),
            ("torchattacks SPSA (clean start, every iteration)",
             lambda: torchattacks.SPSA(model, eps=0.1, delta=0.001, lr=0.01, nb_iter=100, nb_sample=128,
                                       max_batch_size=1024)(x, y))]
    print(f"| SPSA on the standard cnn-small, first {a.n} test images, ε = 0.1 | robust | seconds |")
    print("|---|---:|---:|")
    for name, run in rows:
        t0 = time.time()
        x_adv = run()
        with torch.no_grad():
            robust = int((model(x_adv).argmax(1) == y).sum())
        print(f"| {name} | {robust} of {a.n} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
