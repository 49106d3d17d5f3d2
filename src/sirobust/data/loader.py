"""On-device mini-batching with batched augmentation.

The whole dataset stays on the target device as uint8 (CIFAR-10 train is
150 MiB), so an epoch costs no host->device image traffic and no worker
processes.  Each batch is gathered by index, augmented with one batched
gather (no per-image Python loop) while still uint8, then converted to
float32 in [0, 1].

Augmentations (the standard ones for these datasets, e.g. He et al. 2016 for
CIFAR; Madry et al. 2018 adversarial training uses the same):

* ``"crop"``: zero-pad 4 pixels on every side and take a random HxW window,
  i.e. shift the image by (dy, dx) in [-4, 4]^2 and fill with zeros
  (what ``torchvision.transforms.RandomCrop(size, padding=4)`` does);
* ``"flip"``: mirror left-right with probability 1/2;
* ``"crop-flip"``: both; ``"none"``: neither.

Randomness comes from private CPU ``torch.Generator`` objects whose seeds are
derived from (seed, epoch, purpose, batch index) with numpy's SeedSequence,
so: the global RNG is never touched; a given (seed, epoch) gives the same
batches on every run and device; and a run can resume mid-epoch exactly
(``state_dict``/``load_state_dict``).  The epoch advances by one after each
complete pass, or is set with :meth:`BatchLoader.set_epoch`.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..rng import generator, seed_from_words
from .base import ImageDataset

__all__ = ["BatchLoader", "AUGMENTATIONS", "CROP_PADDING"]

AUGMENTATIONS = ("none", "crop", "flip", "crop-flip")
CROP_PADDING = 4
_PERM, _AUG = 0, 1  # SeedSequence "purpose" words: independent streams for order and augmentation


class BatchLoader:
    """Iterate (x, y) mini-batches of an in-memory uint8 image tensor on ``device``.

    Args:
        images: uint8 tensor (N, C, H, W); moved to ``device`` once.
        labels: integer tensor/sequence (N,).
        batch_size: examples per batch (>= 1).
        shuffle: draw a new permutation every epoch.
        augment: one of ``"none"``, ``"crop"``, ``"flip"``, ``"crop-flip"``.
        drop_last: drop the final incomplete batch.
        device: where batches live (default: where ``images`` already are).
        seed: base seed of the private generators.

    Yields ``(x, y)``: x float32 (B, C, H, W) in [0, 1], y int64 (B,), both on ``device``.
    """

    def __init__(self, images: torch.Tensor, labels: Any, batch_size: int, *, shuffle: bool = False,
                 augment: str = "none", drop_last: bool = False,
                 device: Optional[Union[str, torch.device]] = None, seed: int = 0):
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise TypeError(f"images must be a uint8 tensor of shape (N, C, H, W), got {got}")
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.dtype.is_floating_point:
            raise ValueError(f"labels must be integers of shape ({images.shape[0]},), "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment={augment!r} is not one of {list(AUGMENTATIONS)}")
        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(device=self.device, dtype=torch.int64)
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.augment = augment
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.epoch = 0
        self._position = 0     # batches yielded so far in the epoch being iterated
        self._resume_from = 0  # first batch of the next iteration (set by load_state_dict)

    @classmethod
    def from_dataset(cls, ds: ImageDataset, batch_size: int, **kw: Any) -> "BatchLoader":
        """``BatchLoader(ds.images, ds.labels, batch_size, **kw)``."""
        return cls(ds.images, ds.labels, batch_size, **kw)

    @property
    def num_examples(self) -> int:
        return int(self.images.shape[0])

    def __len__(self) -> int:
        n = self.num_examples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use ``epoch``'s order and augmentation, from its first batch."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch
        self._position = 0
        self._resume_from = 0

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where iteration stands now."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self._position,
                "batch_size": self.batch_size, "shuffle": self.shuffle, "augment": self.augment,
                "drop_last": self.drop_last, "num_examples": self.num_examples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next iteration resumes at the saved batch."""
        for key in ("batch_size", "shuffle", "augment", "drop_last", "num_examples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"load_state_dict: saved {key}={state[key]!r} but this loader has "
                                 f"{key}={getattr(self, key)!r}; the saved position would not mean the same batches")
        self.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]))
        self._resume_from = self._position = int(state.get("position", 0))

    # ------------------------------------------------------------------ iteration

    def _generator(self, epoch: int, purpose: int, batch: int = 0) -> torch.Generator:
        return generator(seed_from_words(self.seed % 2**64, epoch, purpose, batch))  # SeedSequence: ints >= 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self._resume_from
        self._resume_from, self._position = 0, start
        n, bs = self.num_examples, self.batch_size
        if self.shuffle:
            order = torch.randperm(n, generator=self._generator(epoch, _PERM)).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        for b in range(start, len(self)):
            idx = order[b * bs:(b + 1) * bs]
            x = self.images[idx]
            if self.augment != "none":
                x = self._augment(x, self._generator(epoch, _AUG, b))
            self._position = b + 1
            yield x.to(torch.float32).div_(255.0), self.labels[idx]
        self.epoch, self._position = epoch + 1, 0

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Crop and/or flip a uint8 batch with a single advanced-indexing gather.

        out[b, c, i, j] = padded[b, c, dy_b + i, dx_b + (W-1-j if flip_b else j)]
        """
        b, c, h, w = x.shape
        crop, flip = "crop" in self.augment, "flip" in self.augment
        # Parameters are drawn on the CPU generator (device-independent results), then moved once.
        shifts = (torch.randint(0, 2 * CROP_PADDING + 1, (b, 2), generator=gen) if crop
                  else torch.zeros(b, 2, dtype=torch.int64))
        flips = (torch.randint(0, 2, (b, 1), generator=gen) if flip
                 else torch.zeros(b, 1, dtype=torch.int64))
        params = torch.cat([shifts, flips], dim=1).to(self.device)
        if crop:
            x = F.pad(x, (CROP_PADDING,) * 4)  # zeros
        rows = params[:, 0:1] + torch.arange(h, device=self.device)             # (B, H)
        j = torch.arange(w, device=self.device)
        cols = params[:, 1:2] + torch.where(params[:, 2:3].bool(), w - 1 - j, j)  # (B, W)
        bi = torch.arange(b, device=self.device).view(b, 1, 1, 1)
        ci = torch.arange(c, device=self.device).view(1, c, 1, 1)
        return x[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]
