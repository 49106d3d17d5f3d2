"""Datasets for sirobust: loading, splitting and on-device batching.

Example::

    from sirobust.data import load_dataset, get_dataset_info, train_val_split, BatchLoader

    ds = load_dataset("fashion-mnist-mini", "train")      # no download needed
    train, val, val_idx = train_val_split(ds, val_size=0.1, seed=0)
    info = get_dataset_info(ds.name)
    loader = BatchLoader.from_dataset(train, 128, shuffle=True, augment=info.augment, device="cuda")
    for x, y in loader:   # float32 [0, 1] NCHW on the device, int64 labels
        ...

Supported: cifar10, cifar100, fashion-mnist, fashion-mnist-mini (embedded),
mnist, svhn, and any images of your own (:func:`register_dataset`).  Files are looked for in ``data_dir`` (default ``$SIROBUST_DATA``
or ``~/.cache/sirobust/data``) and downloaded with checksum verification.
"""
from .base import ChecksumError, DataNotFoundError, DatasetInfo, ImageDataset, default_data_dir
from .loader import BatchLoader
from .own import register_dataset
from .registry import dataset_splits, get_dataset_info, list_datasets, load_dataset
from .split import train_val_split

__all__ = [
    "register_dataset",
    "ImageDataset",
    "DatasetInfo",
    "load_dataset",
    "get_dataset_info",
    "list_datasets",
    "dataset_splits",
    "train_val_split",
    "BatchLoader",
    "DataNotFoundError",
    "ChecksumError",
    "default_data_dir",
]
