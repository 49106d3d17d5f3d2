"""Core data types of :mod:`sirobust.data`: the in-memory dataset, its static
description, the two data errors, and where data lives on disk.

Images are kept as ``uint8`` tensors (N, C, H, W): that is how every source
format stores them, it is 4x smaller than float32, and the conversion to
float pixels in [0, 1] happens per batch on the device (see
:class:`sirobust.data.loader.BatchLoader`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "ImageDataset",
    "DatasetInfo",
    "DataNotFoundError",
    "ChecksumError",
    "default_data_dir",
    "DATA_ENV_VAR",
]

#: Environment variable that overrides the default data folder.
DATA_ENV_VAR = "SIROBUST_DATA"

Indices = Union[torch.Tensor, np.ndarray, Sequence[int]]


class DataNotFoundError(FileNotFoundError):
    """The dataset files are not on disk and could not be downloaded.

    The message lists every place that was searched and how to put the files
    there by hand.
    """


class ChecksumError(RuntimeError):
    """A file's digest differs from the published one (corrupt, tampered, or the user's own copy).

    The message names the file, the expected and found digests and how to accept it;
    a file the user placed is never moved or deleted.
    """


def default_data_dir() -> Path:
    """``$SIROBUST_DATA`` if set, else ``~/.cache/sirobust/data``."""
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sirobust" / "data"


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a registered dataset.

    ``mean``/``std`` are per-channel statistics of the training pixels scaled
    to [0, 1] (the values commonly used with each dataset, e.g. by
    RobustBench); models store them as buffers, so attacks stay in pixel space.
    ``default_eps`` is the customary L∞ budget for the dataset
    (MNIST 0.3, Fashion-MNIST 0.1, CIFAR/SVHN 8/255), ``default_eps_l2`` the L2 one
    (CIFAR/SVHN 0.5 as in RobustBench, MNIST 2.0, Fashion-MNIST 1.5) and ``augment`` the
    standard training augmentation understood by ``BatchLoader``.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_eps: float
    augment: str
    description: str
    default_eps_l2: float = 0.5
    image_width: Optional[int] = None  # a registered dataset's images may be wider than high; None: square
    # a dataset registered in this process (register_dataset): the sha256 of its splits' pixels and labels, so
    # that a run resumed in another process is refused on other data under the same name. None for the
    # built-in ones, whose files are checked against their published checksums when they are read.
    data_sha256: Optional[str] = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return self.in_channels, self.image_size, self.image_width or self.image_size

    def eps_for(self, norm: str) -> float:
        """The customary budget of this dataset for ``norm`` ("Linf" or "L2"), in pixel units."""
        return self.default_eps_l2 if norm == "L2" else self.default_eps


@dataclass
class ImageDataset:
    """A whole dataset split held in memory.

    Attributes:
        images: uint8 tensor (N, C, H, W), contiguous.
        labels: int64 tensor (N,), values in ``[0, len(classes))``.
        classes: class names, index = label.
        name: registry name, e.g. ``"cifar10"``.
        split: ``"train"``, ``"test"``, ``"val"``, ...
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str
    split: str

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise TypeError(
                "ImageDataset.images must be a uint8 tensor of shape (N, C, H, W), got "
                f"{_describe(self.images)}"
            )
        labels = torch.as_tensor(self.labels)
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"ImageDataset.labels must be an integer tensor of shape (N,), got {_describe(labels)}")
        if labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"ImageDataset: {self.images.shape[0]} images but {labels.shape[0]} labels"
            )
        self.classes = list(self.classes)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classes)):
            raise ValueError(
                f"ImageDataset.labels must lie in [0, {len(self.classes)}) for {len(self.classes)} classes, "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )
        self.images = self.images.contiguous()
        self.labels = labels.to(torch.int64).contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={tuple(self.images.shape[1:])}, classes={len(self.classes)})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: Indices) -> "ImageDataset":
        """A new dataset with the examples at ``indices`` (in that order).

        ``indices`` is a LongTensor, an integer array/sequence, or a boolean
        mask of length N.  Data are copied (advanced indexing), never aliased.
        """
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise ValueError(f"subset: boolean mask must have shape ({len(self)},), got {tuple(idx.shape)}")
            idx = idx.nonzero().flatten()
        elif idx.numel() == 0:
            idx = idx.to(torch.int64)
        elif idx.dtype.is_floating_point:
            raise TypeError(f"subset: indices must be integers or a boolean mask, got dtype {idx.dtype}")
        idx = idx.to(torch.int64).flatten().to(self.images.device)
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise IndexError(f"subset: indices out of range for a dataset of {len(self)} examples")
        return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx])

    def float_images(self) -> torch.Tensor:
        """All images as float32 in [0, 1], shape (N, C, H, W) (a new tensor)."""
        return self.images.to(torch.float32).div_(255.0)

    @property
    def info(self) -> DatasetInfo:
        """The registry's :class:`DatasetInfo` for ``self.name``."""
        from .registry import get_dataset_info  # local import: registry imports this module

        return get_dataset_info(self.name)


def _describe(x: object) -> str:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"{type(x).__name__} dtype={x.dtype} shape={tuple(x.shape)}"
    return type(x).__name__


def as_uint8_images(array: np.ndarray) -> torch.Tensor:
    """numpy uint8 array (N, C, H, W) -> contiguous uint8 tensor.

    Shares memory with ``array`` when it is already C-contiguous and
    writable (loaders pass arrays they own), copies otherwise.
    """
    if array.dtype != np.uint8 or array.ndim != 4:
        raise ValueError(f"expected a uint8 array of shape (N, C, H, W), got {_describe(array)}")
    arr = np.ascontiguousarray(array)
    if not arr.flags.writeable:  # torch.from_numpy warns on read-only buffers
        arr = arr.copy()
    return torch.from_numpy(arr)
