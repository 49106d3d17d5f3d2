"""``fashion-mnist-mini``: a class-balanced Fashion-MNIST subset shipped inside
the package, so tests, examples and CI run with nothing downloaded.

6000 train images (600 per class), drawn with a fixed seed, and the whole
official test split (10,000 images, 1000 per class) ordered so that its first
1000 are a class-balanced subset (100 per class): ``n <= 1000`` evaluates the
same images as earlier versions, which shipped those 1000 alone, and the mini
presets of ``sirobust reproduce`` evaluate all 10,000 (one standard error of an
accuracy near 70 % is then 0.45 points instead of 1.4). uint8 28x28, built by
``scripts/make_fashion_mnist_mini.py``
from the official Fashion-MNIST files (Xiao, Rasul & Vollgraf 2017,
arXiv:1708.07747; MIT licence, see ``assets/LICENSE-fashion-mnist.txt``).
The asset also stores the source indices and the sha256 of the source files.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .base import ImageDataset, as_uint8_images
from .idx import IDX_SOURCES

__all__ = ["load_mini_dataset", "MINI_FILE", "MINI_SHA256", "MINI_SIZES", "mini_asset"]

MINI_FILE = "fashion_mnist_mini.npz"
#: sha256 of the committed asset, as printed by scripts/make_fashion_mnist_mini.py.
MINI_SHA256 = "75e52ea369b93152d180d781dee1ec394370948873055e905c50c403f55c5bfa"
#: split -> (number of images, images per class)
MINI_SIZES = {"train": (6000, 600), "test": (10000, 1000)}


def mini_asset():
    """The packaged npz as an importlib.resources Traversable (works from wheels too)."""
    return resources.files(__package__).joinpath("assets", MINI_FILE)


def load_mini_dataset(name: str, split: str, data_dir: Path, download: bool,
                      accept_checksum_mismatch: bool = False) -> ImageDataset:
    """Load ``split`` ("train"/"test") of the embedded subset; the other arguments are unused."""
    del data_dir, download, accept_checksum_mismatch  # nothing to find or fetch: the data ship with the package
    if split not in MINI_SIZES:
        raise ValueError(f"split={split!r} is not available for {name!r}; choose one of {sorted(MINI_SIZES)}")
    asset = mini_asset()
    with asset.open("rb") as f, np.load(f, allow_pickle=False) as npz:
        x, y = npz[f"x_{split}"], npz[f"y_{split}"]
    n, per_class = MINI_SIZES[split]
    classes = IDX_SOURCES["fashion-mnist"]["classes"]
    # A broken asset means a broken installation: say so instead of training on garbage.
    if x.dtype != np.uint8 or x.shape != (n, 28, 28) or y.shape != (n,):
        raise ValueError(f"corrupt package asset {asset}: x_{split} {x.dtype} {x.shape}, y_{split} {y.shape}; "
                         "reinstall sirobust or rerun scripts/make_fashion_mnist_mini.py")
    if not np.array_equal(np.bincount(y, minlength=len(classes)), np.full(len(classes), per_class)):
        raise ValueError(f"corrupt package asset {asset}: y_{split} is not {per_class} per class")
    return ImageDataset(images=as_uint8_images(x[:, None]), labels=torch.from_numpy(y.astype(np.int64)),
                        classes=list(classes), name=name, split=split)
