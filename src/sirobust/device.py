"""The device: one function that turns ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a ``torch.device``.

It sits below both the training loop and :mod:`sirobust.distributed` (which picks a process's GPU from
it), so that every command resolves ``--device`` the same way and no module imports the trainer for it.
"""
from __future__ import annotations

import torch


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when there is a GPU, else the CPU; otherwise the named device, refused when absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    return dev
