"""A dataset of your own, by name: :func:`register_dataset` puts images held in memory into the registry, so that
every function that takes a dataset name (``fit``, ``compare_defenses``, ``evaluate``'s ε default, a reproduce
config run in the same process) takes it like a built-in one.

Example::

    from sirobust.data import register_dataset
    register_dataset("parts", train=(x_train, y_train), test=(x_test, y_test), eps=8 / 255)
    fit(TrainConfig(dataset="parts", model="resnet18", defense="trades", si=True, out="runs/parts"))

The registration lasts for the process: a run trained on it is resumed, in another process, after the same
``register_dataset`` call (the run records the name, and the sha256 of the data: other data under the same name
is refused).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .base import DatasetInfo, ImageDataset
from .loader import AUGMENTATIONS

Split = Union[ImageDataset, tuple]


def register_dataset(name: str, train: Split, test: Optional[Split] = None, *, eps: float,
                     eps_l2: Optional[float] = None, classes: Optional[Sequence[str]] = None, augment: str = "none",
                     description: str = "") -> DatasetInfo:
    """Register ``train`` (and ``test``) under ``name`` for this process; returns its :class:`DatasetInfo`.

    Each split is an :class:`ImageDataset` or ``(images, labels)``: images (N, C, H, W), any H and W, uint8, or
    floats in [0, 1] that are whole multiples of 1/255 (sirobust holds datasets as 8-bit pixels, as the
    datasets the field evaluates on are); labels integers in ``[0, classes)``. ``eps`` (and ``eps_l2``) are the
    budgets used when none is given; ``augment`` one of none, crop, flip, crop-flip. The per-channel mean and
    std (for sirobust's own models, which normalise inside) are the training images'. A name that is taken is
    refused."""
    from ..checks import check_eps
    from .registry import DATASETS, _entry
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if DATASETS.get(name, None) is not None:
        raise ValueError(f"dataset {name!r} is already registered; choose another name")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    splits = {"train": _as_split(train, name, "train", classes)}
    if test is not None:
        splits["test"] = _as_split(test, name, "test", classes)
    first = splits["train"].images
    for split, ds in splits.items():
        if ds.images.shape[1:] != first.shape[1:]:
            raise ValueError(f"{split} images are {tuple(ds.images.shape[1:])}, the training images "
                             f"{tuple(first.shape[1:])}: every split must have one shape")
    num_classes = len(classes) if classes is not None else int(max(int(d.labels.max()) for d in splits.values())) + 1
    for ds in splits.values():  # one list of class names for every split (a test split may lack the last class)
        ds.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
    pixels = first.float().div_(255).transpose(0, 1).flatten(1)
    info = dict(name=name, num_classes=num_classes, in_channels=int(first.shape[1]), image_size=int(first.shape[2]),
                image_width=int(first.shape[3]) if first.shape[3] != first.shape[2] else None,
                mean=tuple(pixels.mean(1).tolist()), std=tuple(pixels.std(1).clamp_min(1e-6).tolist()),
                default_eps=check_eps(eps, "Linf", "eps"), augment=augment,
                description=description or f"{name}: a dataset registered in this process ("
                                           + ", ".join(f"{len(d.labels)} {s}" for s, d in splits.items()) + ")")
    if eps_l2 is not None:
        info["default_eps_l2"] = check_eps(eps_l2, "L2", "eps_l2")
    info["data_sha256"] = splits_sha256(splits)

    def loader(_name, split, _root, _download, **_kw) -> ImageDataset:
        return splits[split]

    DATASETS.register(name, _entry(loader, tuple(splits), **info))
    return DATASETS.get(name).info


def splits_sha256(splits: dict) -> str:
    """One sha256 of every split's name, 8-bit pixels (with their shape) and labels, in a fixed order."""
    import hashlib
    digest = hashlib.sha256()
    for which in sorted(splits):
        ds = splits[which]
        digest.update(f"{which}:{tuple(ds.images.shape)}:{len(ds.labels)}".encode())
        digest.update(ds.images.contiguous().numpy().tobytes())
        digest.update(ds.labels.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _as_split(split: Split, name: str, which: str, classes) -> ImageDataset:
    if isinstance(split, ImageDataset):
        images, labels = split.images, split.labels
    elif isinstance(split, (tuple, list)) and len(split) == 2:
        images, labels = split
    else:
        raise TypeError(f"{which} must be an ImageDataset or an (images, labels) pair, got {type(split).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or min(images.shape[2:]) < 1:
        raise ValueError(f"{which} images must be a (N, C, H, W) tensor, got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise TypeError(f"{which} images must be uint8 or floats in [0, 1], got {images.dtype}")
        scaled = images.detach().double() * 255
        whole = scaled.round()
        if images.min() < 0 or images.max() > 1 or (scaled - whole).abs().max() > 1e-3:
            raise ValueError(f"{which} images must be uint8, or floats in [0, 1] that are whole multiples of 1/255 "
                             "(8-bit pixels); these are not: convert them to 8 bits yourself first")
        images = whole.to(torch.uint8)
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool or len(labels) == 0:
        raise TypeError(f"{which} labels must be a non-empty 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    if int(labels.min()) < 0 or (classes is not None and int(labels.max()) >= len(classes)):
        raise ValueError(f"{which} labels must be in [0, {len(classes) if classes is not None else 'classes'}), "
                         f"got {int(labels.min())}..{int(labels.max())}")
    names = list(classes) if classes is not None else [str(i) for i in range(int(labels.max()) + 1)]
    return ImageDataset(images.cpu().contiguous(), labels.cpu().long(), names, name, which)
