"""The dataset registry: names, static facts, and :func:`load_dataset`.

Statistics (mean/std of training pixels in [0, 1]) are the values commonly
used with each dataset (e.g. in the RobustBench and torchvision examples);
the L∞ budgets are the customary ones of the adversarial-robustness
literature (Madry et al. 2018: MNIST 0.3, CIFAR-10 8/255; Fashion-MNIST
0.1; SVHN and CIFAR-100 8/255).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from ..registry import Registry
from .base import DATA_ENV_VAR, DatasetInfo, ImageDataset, default_data_dir
from .cifar import CIFAR_SOURCES, load_cifar_dataset
from .idx import SPLIT_FILES, load_idx_dataset
from .mini import MINI_SIZES, load_mini_dataset
from .svhn import SVHN_FILES, load_svhn_dataset

__all__ = ["list_datasets", "get_dataset_info", "load_dataset", "dataset_splits"]

Loader = Callable[[str, str, Path, bool], ImageDataset]
_FMNIST_MEAN, _FMNIST_STD = (0.2860,), (0.3530,)


@dataclass(frozen=True)
class _Entry:
    info: DatasetInfo
    loader: Loader
    splits: tuple[str, ...]


def _entry(loader: Loader, splits, **info) -> _Entry:
    return _Entry(DatasetInfo(**info), loader, tuple(splits))


DATASETS: Registry[_Entry] = Registry("dataset", {
    "cifar10": _entry(
        load_cifar_dataset, CIFAR_SOURCES["cifar10"]["splits"], name="cifar10", num_classes=10, in_channels=3,
        image_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616), default_eps=8 / 255,
        augment="crop-flip",
        description="CIFAR-10: 50,000 train / 10,000 test 32x32 colour images, 10 classes (Krizhevsky 2009)."),
    "cifar100": _entry(
        load_cifar_dataset, CIFAR_SOURCES["cifar100"]["splits"], name="cifar100", num_classes=100, in_channels=3,
        image_size=32, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), default_eps=8 / 255,
        augment="crop-flip",
        description="CIFAR-100: 50,000 train / 10,000 test 32x32 colour images, 100 fine classes "
                    "(Krizhevsky 2009)."),
    "fashion-mnist": _entry(
        load_idx_dataset, SPLIT_FILES, name="fashion-mnist", num_classes=10, in_channels=1, image_size=28,
        mean=_FMNIST_MEAN, std=_FMNIST_STD, default_eps=0.1, default_eps_l2=1.5, augment="flip",
        description="Fashion-MNIST: 60,000 train / 10,000 test 28x28 greyscale Zalando article images, "
                    "10 classes (Xiao et al. 2017)."),
    "fashion-mnist-mini": _entry(
        load_mini_dataset, MINI_SIZES, name="fashion-mnist-mini", num_classes=10, in_channels=1, image_size=28,
        mean=_FMNIST_MEAN, std=_FMNIST_STD, default_eps=0.1, default_eps_l2=1.5, augment="flip",
        description="Fashion-MNIST shipped with sirobust: 6,000 train images (600 per class) and the whole "
                    "10,000-image test split, whose first 1,000 are class-balanced (100 per class); needs "
                    "no download."),
    "mnist": _entry(
        load_idx_dataset, SPLIT_FILES, name="mnist", num_classes=10, in_channels=1, image_size=28,
        mean=(0.1307,), std=(0.3081,), default_eps=0.3, default_eps_l2=2.0, augment="crop",
        description="MNIST: 60,000 train / 10,000 test 28x28 greyscale handwritten digits (LeCun et al. 1998)."),
    "svhn": _entry(
        load_svhn_dataset, SVHN_FILES, name="svhn", num_classes=10, in_channels=3, image_size=32,
        mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970), default_eps=8 / 255, augment="crop",
        description="SVHN cropped digits: 73,257 train / 26,032 test (+531,131 extra) 32x32 colour house-number "
                    "digits (Netzer et al. 2011)."),
}, aliases={"cifar-10": "cifar10", "cifar-100": "cifar100", "fashionmnist": "fashion-mnist",  # commonly typed
            "fmnist": "fashion-mnist"}, describe=lambda entry: entry.info.description)


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return DATASETS.names()


def canonical_dataset(name: str) -> str:
    """The registry's spelling of ``name`` (case-insensitive; "did you mean" for a typo)."""
    return DATASETS.canonical(name)


def get_dataset_info(name: str) -> DatasetInfo:
    """Static facts about ``name``; raises ValueError listing valid names if unknown."""
    return DATASETS.get(name).info


def dataset_splits(name: str) -> tuple[str, ...]:
    """The splits ``load_dataset`` accepts for ``name`` (e.g. ("train", "test"))."""
    return DATASETS.get(name).splits


def load_dataset(name: str, split: str = "train", data_dir: Optional[Union[str, os.PathLike]] = None,
                 download: bool = True, accept_checksum_mismatch: bool = False) -> ImageDataset:
    """Load a whole split into memory as an :class:`ImageDataset` (uint8 NCHW).

    ``data_dir`` defaults to ``$SIROBUST_DATA`` or ``~/.cache/sirobust/data``
    (created when needed); a ``data_dir`` given explicitly must exist: a typo is
    an error, never a new empty folder. Each format module documents where it
    looks and what it downloads. Raises ValueError (unknown name or split, a
    missing ``data_dir``), DataNotFoundError (files missing and not
    downloadable), ChecksumError (a file differs from the published one; it is
    left as it is, and ``accept_checksum_mismatch=True`` uses it anyway).
    """
    entry = DATASETS.get(name)
    if split not in entry.splits:
        raise ValueError(f"split={split!r} is not available for {entry.info.name!r}; "
                         f"choose one of {list(entry.splits)}")
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            what = "is a file, not a folder" if root.exists() else "does not exist"
            raise ValueError(f"data_dir (--data-dir) {root} {what}; give the folder that holds the dataset files "
                             f"(or leave it out for ${DATA_ENV_VAR} / {default_data_dir()})")
    else:
        root = default_data_dir()
    return entry.loader(entry.info.name, split, root, bool(download),
                        accept_checksum_mismatch=bool(accept_checksum_mismatch))
