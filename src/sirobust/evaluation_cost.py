"""How long an evaluation can take, said before it starts: a line for the log.

Each attack says at most how many forward passes one example costs (:meth:`Attack.forward_passes`, a backward
counted as two): every restart takes every step, every stage of an ensemble runs on every example. The time
of one forward pass is measured here, on this model, device and batch size, so the bound needs no assumed
throughput. It is an upper bound: early stopping (the default in evaluation) stops an example at the first
point that fools the model, and an ensemble's later stages attack only what the earlier ones left, so a weak
model costs far less. Users of AutoAttack learn its cost after the fact; this says it before.
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch

from .checks import logits_of


def forward_seconds(model, probe: torch.Tensor, device: torch.device, fast=None) -> float:
    """Seconds of one forward pass per example, on a batch like ``probe`` (the second of two timed calls), in the
    attacks' precision (``fast``, a :class:`.fastpath.FastPath`: bf16 autocast on a GPU is several times faster
    than the fp32 pass a bound timed without it would assume)."""
    autocast = fast.autocast_context(device) if fast is not None else contextlib.nullcontext()
    inputs = fast.inputs(probe) if fast is not None else probe

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            logits_of(model(inputs))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0
    # a randomised model draws from the global generators: the timing must not move what the attacks then draw
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        once()  # the first call pays for allocation and kernel selection
        return once() / probe.shape[0]


def cost_line(model, runners: list, probe: torch.Tensor, examples: int, num_classes: int,
              device: torch.device, processes: int = 1, fast=None) -> Optional[str]:
    """"cost: at most about 2.1 h ..." for ``examples`` attacked examples shared by ``processes`` (torchrun deals
    the batches out), timed in the attacks' precision ``fast``; None when there is nothing to attack or the model
    cannot be timed on ``probe``."""
    if examples == 0 or not runners:
        return None
    counts = {atk.name: getattr(atk, "forward_passes", lambda _k: None)(num_classes) for atk in runners}
    passes = {name: p for name, p in counts.items() if p is not None}
    unknown = [name for name, p in counts.items() if p is None]
    try:
        per_example = forward_seconds(model, probe, device, fast)
    except Exception:  # noqa: BLE001 - a log line must never end an evaluation; the attacks will say what is wrong
        return None
    seconds = examples * sum(passes.values()) * per_example / processes
    each = ", ".join(f"{name} {p:,.0f}" for name, p in passes.items())
    shared = f", shared by {processes} processes" if processes > 1 else ""
    return (f"cost: at most about {_duration(seconds)} for the attacks on {examples:,} example"
            f"{'s' if examples != 1 else ''}{shared} (forward passes per example at most: {each or 'none known'}"
            + (f"; not counted: {', '.join(unknown)}" if unknown else "")
            + f"; one forward pass took {1000 * per_example:.3g} ms an example here). Early stopping makes it "
              "less on examples that break early; fewer examples, steps or queries lower the bound.")


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "1 s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"
