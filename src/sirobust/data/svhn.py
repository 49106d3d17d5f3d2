"""SVHN (Street View House Numbers), cropped-digits format 2.

Format (Netzer et al. 2011, http://ufldl.stanford.edu/housenumbers/):
MATLAB v5 files ``train_32x32.mat``, ``test_32x32.mat`` (and
``extra_32x32.mat``) with ``X`` uint8 (32, 32, 3, N) and ``y`` (N, 1) in
1..10, where 10 stands for the digit 0 (mapped to 0 here, as everybody does).
Read with :func:`scipy.io.loadmat` (no pickle involved).

Lookup: ``data_dir/svhn/`` then ``data_dir/``; the file is md5-checked
against the published digest (a mismatch is an error that leaves the file
alone, unless accepted); else, with ``download=True``, it is downloaded to
``data_dir/svhn/``. Variable headers are checked before anything is read.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .base import DataNotFoundError, ImageDataset, as_uint8_images
from .download import download_file, not_found_message, search_dirs, verify_file

__all__ = ["load_svhn_dataset", "SVHN_FILES", "SVHN_CLASSES"]

SVHN_CLASSES = [str(d) for d in range(10)]
_BASE_URL = "http://ufldl.stanford.edu/housenumbers/"

#: split -> number of images in the published file: no file may declare more.
SVHN_SIZES = {"train": 73_257, "test": 26_032, "extra": 531_131}

#: split -> (file name, md5 of the published file); the digests torchvision's SVHN class uses.
SVHN_FILES: dict[str, tuple[str, str]] = {
    "train": ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
    "extra": ("extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7"),
}


def _locate(split: str, data_dir: Path, download: bool, accept_mismatch: bool) -> Path:
    fname, md5 = SVHN_FILES[split]
    dirs = search_dirs(data_dir, "svhn")
    for d in dirs:
        if (d / fname).is_file():
            return verify_file(d / fname, md5=md5, accept_mismatch=accept_mismatch, source=_BASE_URL + fname)
    dest = data_dir / "svhn"
    url = _BASE_URL + fname
    if not download:
        raise DataNotFoundError(not_found_message("svhn", split, [fname], dirs, dest, [url], download))
    try:
        return download_file(url, dest / fname, md5=md5)
    except DataNotFoundError as exc:
        raise DataNotFoundError(
            not_found_message("svhn", split, [fname], dirs, dest, [url], download, error=exc)) from exc


def _scipy_io():
    """scipy.io, imported on first use: ``import sirobust`` needs no scipy (stock GPU images lack it)."""
    try:
        import scipy.io
    except ImportError as exc:
        raise ImportError("reading SVHN's .mat files needs scipy: pip install 'scipy>=1.9'") from exc
    return scipy.io


_NUMERIC_CLASSES = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "double", "single"}


def _check_declared(path: Path, split: str) -> None:
    """Read only the variable headers and refuse sizes no SVHN file has, before loadmat allocates them."""
    mat_io = _scipy_io()
    try:
        found = {name: (shape, cls) for name, shape, cls in mat_io.whosmat(path)}
    except Exception as exc:  # scipy raises a zoo of types
        raise ValueError(f"malformed SVHN file {path}: cannot read it as a MATLAB v5 file ({exc})") from exc
    if "X" not in found or "y" not in found:
        raise ValueError(f"malformed SVHN file {path}: needs variables 'X' and 'y', found {sorted(found)[:5]}")
    (x, x_cls), (y, y_cls) = found["X"], found["y"]
    x, y = tuple(x), tuple(y)
    # the class decides the bytes per element: a double X would be 8x the size its shape suggests
    if x_cls != "uint8" or y_cls not in _NUMERIC_CLASSES:
        raise ValueError(f"malformed SVHN file {path}: 'X' must be uint8 and 'y' numeric, found {x_cls} and {y_cls}")
    limit = SVHN_SIZES[split]
    if len(x) != 4 or x[:3] != (32, 32, 3) or x[3] > limit:
        raise ValueError(f"malformed SVHN file {path}: 'X' declares shape {list(x)}; the {split} split is "
                         f"(32, 32, 3, N) with N <= {limit}")
    if math.prod(y) != x[3] or len(y) != 2:
        raise ValueError(f"malformed SVHN file {path}: 'y' declares shape {list(y)} for {x[3]} images")


def load_svhn_dataset(name: str, split: str, data_dir: Path, download: bool,
                      accept_checksum_mismatch: bool = False) -> ImageDataset:
    """Load ``split`` ("train"/"test"/"extra") of SVHN; ``name`` must be "svhn"."""
    if split not in SVHN_FILES:
        raise ValueError(f"split={split!r} is not available for 'svhn'; choose one of {sorted(SVHN_FILES)}")
    path = _locate(split, data_dir, download, accept_checksum_mismatch)
    _check_declared(path, split)
    mat_io = _scipy_io()
    try:
        mat = mat_io.loadmat(path, variable_names=["X", "y"])
    except Exception as exc:  # scipy raises a zoo of types (ValueError, MatReadError, TypeError...)
        raise ValueError(f"malformed SVHN file {path}: cannot read it as a MATLAB v5 file ({exc})") from exc
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"malformed SVHN file {path}: needs variables 'X' and 'y'")
    x, y = mat["X"], np.asarray(mat["y"])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise ValueError(f"malformed SVHN file {path}: 'X' must be uint8 (32, 32, 3, N), got {x.dtype} {x.shape}")
    n = x.shape[3]
    y = y.reshape(-1)
    if y.shape[0] != n or not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"malformed SVHN file {path}: 'y' must hold {n} labels, got {y.dtype} {y.shape}")
    y = y.astype(np.int64)
    if n and (y.min() < 1 or y.max() > 10):
        raise ValueError(f"malformed SVHN file {path}: labels must lie in 1..10, got [{y.min()}, {y.max()}]")
    y[y == 10] = 0  # the dataset stores digit 0 as class 10
    # (H, W, C, N) -> (N, C, H, W)
    images = x.transpose(3, 2, 0, 1)
    return ImageDataset(images=as_uint8_images(images), labels=torch.from_numpy(y),
                        classes=list(SVHN_CLASSES), name="svhn", split=split)
