"""Deterministic, class-stratified train/validation split.

Each class contributes to the validation set in proportion to its size
(largest-remainder rounding, so the total is exactly ``val_size``); the
examples within a class are drawn with a private ``torch.Generator`` seeded
with ``seed``, so the split depends only on (labels, val_size, seed) and the
global RNG is left alone.
"""
from __future__ import annotations

import dataclasses
from typing import Union

import torch

from ..rng import generator
from .base import ImageDataset

__all__ = ["train_val_split", "stratified_counts"]


def stratified_counts(class_sizes: torch.Tensor, n_val: int) -> torch.Tensor:
    """Per-class validation counts summing to ``n_val``, proportional to ``class_sizes``.

    Hamilton / largest-remainder apportionment; ties in the remainder go to
    the lower class index, so the result is deterministic.
    """
    sizes = class_sizes.to(torch.int64)
    total = int(sizes.sum())
    quota = sizes * n_val  # exact integer arithmetic: quota / total is the ideal share
    counts = quota // total
    remainder = quota - counts * total
    short = n_val - int(counts.sum())
    if short:
        # stable sort on -remainder: larger remainders first, ties by class index
        order = torch.sort(-remainder, stable=True).indices
        order = order[counts[order] < sizes[order]]
        counts[order[:short]] += 1
    return counts


def train_val_split(ds: ImageDataset, val_size: Union[int, float] = 0.1,
                    seed: int = 0) -> tuple[ImageDataset, ImageDataset, torch.Tensor]:
    """Split ``ds`` into (train_part, val_part, val_indices).

    Args:
        ds: the dataset to split (usually the "train" split).
        val_size: number of validation examples (int, 0 < n < len(ds)) or a
            fraction (float, 0 < f < 1; rounded to the nearest count, at least 1).
        seed: seed of the private generator.

    Returns:
        ``train_part`` (split name kept, e.g. "train"), ``val_part``
        (``split == "val"``) and ``val_indices``, a sorted int64 tensor of
        positions in ``ds``.  Both parts keep the original order of ``ds``.
    """
    n = len(ds)
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise TypeError(f"val_size must be an int count or a float fraction, got {type(val_size).__name__}")
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise ValueError(f"val_size as a fraction must lie in (0, 1), got {val_size}")
        n_val = min(max(1, round(val_size * n)), n - 1)
    else:
        n_val = int(val_size)
    if not 0 < n_val < n:
        raise ValueError(f"val_size={val_size!r} gives {n_val} validation examples; need 0 < n_val < {n} "
                         f"(the dataset size)")

    labels = ds.labels.cpu()
    gen = generator(seed)
    num_classes = max(len(ds.classes), int(labels.max()) + 1)
    sizes = torch.bincount(labels, minlength=num_classes)
    counts = stratified_counts(sizes, n_val)
    picked = []
    for c in range(num_classes):  # fixed class order keeps the generator stream deterministic
        k = int(counts[c])
        if k == 0:
            continue
        members = (labels == c).nonzero().flatten()
        picked.append(members[torch.randperm(members.numel(), generator=gen)[:k]])
    val_idx = torch.sort(torch.cat(picked)).values
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[val_idx] = True
    train_idx = (~is_val).nonzero().flatten()
    train_part = ds.subset(train_idx)
    val_part = dataclasses.replace(ds.subset(val_idx), split="val")
    return train_part, val_part, val_idx
