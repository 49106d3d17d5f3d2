"""One epoch of PGD-10 adversarial training: sirobust's training loop vs a plain PyTorch loop, in one run.

The plain loop is written here in the style of Madry et al.'s and TRADES' reference code (model.eval()
for the attack, PGD-10 of ε/4 from a random start, model.train() for the SGD update). Both sides get
the same model architecture and initialisation (``torch.manual_seed(seed)`` then ``build_model``, as
``fit`` does), the same training images (the ones ``fit`` trains on, picked by the same
``train_val_split`` call), SGD with the same lr / momentum / weight decay, the same batch size and so
the same number of batches, and the same attack (steps, ε, α, random start, eval mode); no augmentation
on either side. sirobust's time is ``train_seconds`` of the epoch from ``OUT/metrics.jsonl`` (the
training part only: no validation, no checkpoint). Each side first runs one warm-up batch (for
sirobust a one-batch ``fit``), so the first timed batch pays no allocator or cuDNN autotuning cost.

    python benchmarks/bench_train.py                                   # CPU: cnn-small, fashion-mnist-mini, 2000 images
    python benchmarks/bench_train.py --defense trades
    python benchmarks/bench_train.py --model resnet18 --device cuda --n 50000 --compare-precision

With a zoo model other than cnn-small the data are random CIFAR-shaped uint8 images with random labels
(timing only). ``--precision`` goes to ``TrainConfig(precision=...)`` (default auto); ``--compare-precision``
adds a second sirobust row with ``precision="fp32"``. With ``--write`` the table is saved as
``benchmarks/train.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_pgd import publish  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

import sirobust
import sirobust.train as sirobust_train
from sirobust.data import ImageDataset, get_dataset_info, load_dataset, train_val_split
from sirobust.models import build_model
from sirobust.train import TrainConfig, fit

PRECISIONS = ("auto", "fp32", "fp32-fast", "bf16")  # sirobust.fastpath.PRECISIONS
VAL_N = 32  # fit validates after the epoch (not timed); keep it cheap


# ----------------------------------------------------------------------------- the precision API (being added)
def train_precision_api() -> bool:
    """Whether this sirobust's TrainConfig takes ``precision``."""
    return "precision" in {f.name for f in dataclasses.fields(TrainConfig)}


def missing_api_message(where: str) -> str:
    return (f"note: this sirobust ({sirobust.__version__}, {Path(sirobust.__file__).parent}) has no `precision` "
            f"keyword on {where} yet; its only path (plain fp32) is timed, and rows that need another precision "
            "are skipped. Rerun once the precision API has landed.")


# ----------------------------------------------------------------------------- data
def random_cifar_like(n: int, seed: int = 0) -> ImageDataset:
    """``n`` random 3×32×32 uint8 images with random labels out of 10, named cifar10 (its mean/std/ε)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ImageDataset(images, labels, [str(k) for k in range(10)], name="cifar10", split="train")


def benchmark_data(model: str, n: int, val_k: int = VAL_N, seed: int = 0):
    """(dataset for fit, registry name): n training images plus val_k that fit holds out for validation."""
    if model == "cnn-small":
        full = load_dataset("fashion-mnist-mini", "train")
        if n + val_k > len(full):
            raise SystemExit(f"--train-n {n} too large: fashion-mnist-mini has {len(full)} training images "
                             f"({val_k} are held out for fit's validation)")
        return full.subset(torch.arange(n + val_k)), "fashion-mnist-mini"
    return random_cifar_like(n + val_k, seed), "cifar10"


@contextlib.contextmanager
def fit_reads(dataset: ImageDataset):
    """Make ``fit`` train on ``dataset`` (in memory) instead of loading its split by name.

    ``fit`` takes a dataset name only; this swaps the ``load_dataset`` that sirobust.train calls."""
    if not hasattr(sirobust_train, "load_dataset"):
        raise SystemExit("sirobust.train no longer calls load_dataset: update fit_reads() in benchmarks/bench_train.py")
    original = sirobust_train.load_dataset
    sirobust_train.load_dataset = lambda *args, **kw: dataset
    try:
        yield
    finally:
        sirobust_train.load_dataset = original


def train_config(dataset_name: str, model: str, defense: str, n: int, batch_size: int, device: str, seed: int = 0,
                 precision=None, out: str = "unused", attack_steps=None) -> TrainConfig:
    """One epoch, no augmentation, the smallest validation fit allows (it is not timed)."""
    kw = dict(dataset=dataset_name, model=model, defense=defense, out=out, epochs=1, batch_size=batch_size,
              augment="none", val_size=VAL_N, train_n=n, val_n=VAL_N, val_steps=1, overfit_check=False, seed=seed,
              device=device, progress=False, attack_steps=attack_steps)
    if precision is not None:
        kw["precision"] = precision
    return TrainConfig(**kw)


def training_images(dataset: ImageDataset, cfg: TrainConfig) -> ImageDataset:
    """The images fit trains on: the same calls as sirobust.train._data (val_size 0: the whole set)."""
    train_ds = dataset if cfg.val_size == 0 else train_val_split(dataset, cfg.val_size, seed=cfg.seed)[0]
    if cfg.train_n is not None:
        train_ds = train_ds.subset(torch.arange(min(cfg.train_n, len(train_ds))))
    return train_ds


def warmup_size(n: int, batch_size: int) -> int:
    """Images for a warm-up that meets every batch shape of an epoch over ``n`` images: one full batch, and the
    last, partial one when there is one (on a GPU with ``cudnn.benchmark``, a shape met for the first time
    inside the timed epoch is autotuned there)."""
    return min(n, batch_size + n % batch_size)


# ----------------------------------------------------------------------------- sirobust
def sirobust_epoch(dataset: ImageDataset, cfg: TrainConfig, warmup: bool = True) -> dict:
    """One epoch with ``fit``; returns its metrics row (``train_seconds``, ``loss``, ...)."""
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp, fit_reads(dataset):
        if warmup:  # a full batch and, when the epoch ends with one, a partial batch of the same size
            fit(dataclasses.replace(cfg, out=str(Path(tmp) / "warmup"),
                                    train_n=warmup_size(len(training_images(dataset, cfg)), cfg.batch_size)),
                overwrite=True, log=lambda *_: None)
        summary = fit(dataclasses.replace(cfg, out=str(Path(tmp) / "run")), overwrite=True, log=lambda *_: None)
    return summary["last"]


# ----------------------------------------------------------------------------- the plain loop
def pgd_linf(model, x, y, eps, alpha, steps, loss_fn, x_start):
    """Madry et al.'s PGD (their/TRADES' reference code): sign steps, projection, clamp to [0, 1]."""
    x_adv = x_start.detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = loss_fn(model(x_adv))
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + alpha * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv.detach()


def plain_step(model, opt, x, y, defense: str, eps: float, alpha: float, steps: int, beta: float = 6.0):
    """One batch of Madry AT or TRADES as their reference code does it; returns the (detached) loss."""
    model.eval()
    if defense == "at":
        x0 = torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0.0, 1.0)
        x_adv = pgd_linf(model, x, y, eps, alpha, steps, lambda out: F.cross_entropy(out, y), x0)
        model.train()
        opt.zero_grad()
        loss = F.cross_entropy(model(x_adv), y)
    else:  # TRADES (Zhang et al. 2019), trades.py's trades_loss
        kl = torch.nn.KLDivLoss(reduction="sum")
        # the reference recomputes softmax(model(x_natural)) inside every step; it is constant there, so it is
        # computed once here, as sirobust does: both sides do 1 clean forward + 10 forward/backward per batch
        with torch.no_grad():
            p_nat = F.softmax(model(x), dim=1)
        x0 = torch.clamp(x + 0.001 * torch.randn_like(x), 0.0, 1.0)
        x_adv = pgd_linf(model, x, y, eps, alpha, steps, lambda out: kl(F.log_softmax(out, dim=1), p_nat), x0)
        model.train()
        opt.zero_grad()
        logits = model(x)
        loss_natural = F.cross_entropy(logits, y)
        loss_robust = (1.0 / len(x)) * kl(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1))
        loss = loss_natural + beta * loss_robust
    loss.backward()
    opt.step()
    return loss.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_epoch(train_ds: ImageDataset, cfg: TrainConfig, device: torch.device, warmup: bool = True) -> dict:
    """One epoch of the plain loop over the same images and batches; returns seconds and the mean loss."""
    info = get_dataset_info(cfg.dataset)
    torch.manual_seed(cfg.seed)  # the model's initialisation, as fit does
    model = build_model(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels,
                        mean=info.mean, std=info.std).to(device)
    images, labels = train_ds.images.to(device), train_ds.labels.to(device)  # uint8 in memory, as BatchLoader
    n, bs = len(labels), cfg.batch_size

    def make_opt(m):
        return torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def batch(idx):
        return images[idx].to(torch.float32).div_(255.0), labels[idx]

    args = (cfg.defense, cfg.eps, cfg.attack_alpha, cfg.attack_steps)
    if warmup:  # on a copy: the timed epoch starts from the same initialisation as fit's; the same shapes
        spare = copy.deepcopy(model)
        opt_spare, m = make_opt(spare), warmup_size(n, bs)
        for start in range(0, m, bs):
            plain_step(spare, opt_spare, *batch(torch.arange(start, min(start + bs, m), device=device)), *args)
        del spare
    opt = make_opt(model)
    sync(device)
    t0 = time.perf_counter()
    order = torch.randperm(n, device=device)
    total, batches = torch.zeros((), device=device), 0
    for start in range(0, n, bs):
        x, y = batch(order[start:start + bs])
        total += plain_step(model, opt, x, y, *args) * len(y)
        batches += 1
    sync(device)
    return {"train_seconds": time.perf_counter() - t0, "loss": total.item() / n, "batches": batches}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn-small",
                   help="cnn-small (fashion-mnist-mini) or a zoo name (random CIFAR-shaped images, random labels)")
    p.add_argument("--defense", default="at", choices=["at", "trades"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--train-n", "--n", dest="train_n", type=int, default=None,
                   help="training images (default 2000 for cnn-small, 50000 otherwise)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="sirobust's TrainConfig(precision=...)")
    p.add_argument("--compare-precision", action="store_true", help="add a sirobust row with precision fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="write benchmarks/train.md")
    p.add_argument("--repeats", type=int, default=3,
                   help="run every row this many times, rows interleaved, and keep each row's fastest epoch")
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fit sets it too; the plain loop gets the same
    n = a.train_n or (2000 if a.model == "cnn-small" else 50000)
    dataset, data_name = benchmark_data(a.model, n, seed=a.seed)
    has_api = train_precision_api()
    notes = []
    if not has_api:
        notes.append(missing_api_message("TrainConfig"))
        print(notes[-1], file=sys.stderr)

    wanted = [a.precision] + (["fp32"] if a.compare_precision and a.precision != "fp32" else [])
    base = train_config(data_name, a.model, a.defense, n, a.batch_size, a.device, a.seed).resolved()
    train_ds = training_images(dataset, base)
    assert len(train_ds) == n, (len(train_ds), n)

    rows = []
    if not has_api:  # one path only: time it once, say what was asked for
        if a.precision != "fp32":
            notes.append(f"the sirobust row was asked for precision {a.precision} but ran its only path, fp32")
        if a.compare_precision:
            notes.append("--compare-precision: no second sirobust row (there is only one path)")
        wanted = [None]
    best: dict = {}  # row -> (seconds, loss): the fastest of --repeats, rows interleaved so drift hits all alike
    for _ in range(max(1, a.repeats)):
        plain = plain_epoch(train_ds, base, device)
        key = ("plain PyTorch (Madry/TRADES style)", "fp32")
        best[key] = min(best.get(key, (float("inf"), 0.0)), (plain["train_seconds"], plain["loss"]))
        print(f"plain: {plain['train_seconds']:.2f} s, {plain['batches']} batches", file=sys.stderr, flush=True)
        for prec in wanted:
            cfg = train_config(data_name, a.model, a.defense, n, a.batch_size, a.device, a.seed, precision=prec)
            label = prec or "fp32 (no precision API)"
            row = sirobust_epoch(dataset, cfg)
            key = ("sirobust fit()", label)
            best[key] = min(best.get(key, (float("inf"), 0.0)), (row["train_seconds"], row["loss"]))
            print(f"sirobust {label}: {row['train_seconds']:.2f} s", file=sys.stderr, flush=True)
    rows = [(name, prec, sec, loss) for (name, prec), (sec, loss) in best.items()]

    batches = -(-n // a.batch_size)
    ref = rows[0][2]
    what = (f"{a.model} on the first {n + VAL_N} fashion-mnist-mini training images ({VAL_N} held out by fit)"
            if a.model == "cnn-small" else f"{a.model} on {n} random 3×32×32 uint8 images with random labels")
    attack = (f"PGD-{base.attack_steps}, L∞ ε = {base.eps:.4g}, α = {base.attack_alpha:.4g}, random start, "
              "model in eval mode for the attack and in train mode for the update")
    lines = [f"### One epoch of {'PGD-AT' if a.defense == 'at' else 'TRADES (λ = 6)'}: sirobust vs a plain PyTorch loop",
             "", f"{what}; {n} images in {batches} batches of {a.batch_size} (last one {n - (batches - 1) * a.batch_size}), "
             f"no augmentation; {attack}; SGD lr {base.lr:g}, momentum {base.momentum:g}, weight decay "
             f"{base.weight_decay:g}; same architecture and initialisation (seed {a.seed}). Device "
             f"{device_name(device)}, torch {torch.__version__}, sirobust {sirobust.__version__}. Time: training "
             "only (sirobust: `train_seconds` of the epoch; validation and checkpoints excluded), after one "
             f"warm-up batch each; the fastest of {max(1, a.repeats)} runs of each row, rows interleaved.", "",
             "| loop | precision | seconds | images/s | time vs plain | mean training loss |",
             "|---|---|---:|---:|---:|---:|"]
    for name, prec, sec, loss in rows:
        lines.append(f"| {name} | {prec} | {sec:.2f} | {n / sec:.1f} | {sec / ref:.2f}× | {loss:.4f} |")
    lines += ["", "- The plain loop calls `.item()` nowhere inside the epoch; sirobust's reads a few per batch "
                  "(loss, accuracy statistics), which syncs the device once per batch."]
    if a.defense == "trades":
        lines.append("- TRADES' reference code recomputes softmax(f(x)) at every attack step; the plain loop computes "
                     "it once per batch, as sirobust does, so both do the same passes.")
    lines += [f"- {note}" for note in notes]
    publish(lines, "bench_train.py", "train.md", a.write)


if __name__ == "__main__":
    main()
