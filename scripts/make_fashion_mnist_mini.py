#!/usr/bin/env python3
"""Build ``src/sirobust/data/assets/fashion_mnist_mini.npz``, the embedded
``fashion-mnist-mini`` dataset: 6000 train Fashion-MNIST images (exactly 600
per class) and the whole official test split (10,000 images, 1000 per class),
ordered so that its first 1000 are a class-balanced subset (100 per class).

Source: the Fashion-MNIST IDX files (Xiao, Rasul & Vollgraf 2017,
https://github.com/zalandoresearch/fashion-mnist, MIT licence; the notice
ships as ``assets/LICENSE-fashion-mnist.txt``) as installed by Debian's
``dataset-fashion-mnist`` package in ``/usr/share/datasets/fashion-mnist``
(``apt-get install dataset-fashion-mnist``), or any folder holding the four
official files.

Selection: for each split and class, ``numpy.random.default_rng([SEED, split])``
draws the examples without replacement; the chosen source indices are sorted
(so the subset keeps the original class interleaving). The test split is that
subset followed by the other 9000 test images in their original order, so the
first 1000 test images are the same as in earlier versions of the asset (which
held those 1000 alone) and evaluations on ``n <= 1000`` are unchanged. The
source indices are stored in the file (``train_indices``/``test_indices``,
the latter a permutation of 0..9999) together with the sha256 of each
decompressed source file, so the subset can be audited against the source.

The npz has the layout ``np.savez_compressed`` writes (one deflated ``.npy``
per key), but every zip entry gets a fixed timestamp, so rerunning the script
on the same source with the same numpy reproduces the file byte for byte.

Rerun (from the repository root)::

    .venv/bin/python scripts/make_fashion_mnist_mini.py \
        [--source /usr/share/datasets/fashion-mnist] \
        [--out src/sirobust/data/assets/fashion_mnist_mini.npz]

It prints the size and sha256 of the result; if the sha256 changed, update
``MINI_SHA256`` in ``src/sirobust/data/mini.py`` (a test checks they agree).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))  # use the package's strict IDX parser without installing

from sirobust.data.idx import read_idx  # noqa: E402

SEED = 20240607
PER_CLASS = {"train": 600, "test": 100}
SOURCE_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SOURCE_SIZES = {"train": 60000, "test": 10000}
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = REPO / "src" / "sirobust" / "data" / "assets" / "fashion_mnist_mini.npz"
MAX_BYTES = 10 * 1024 * 1024
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # earliest zip date: no build time leaks into the file


def _find(source: Path, stem: str) -> Path:
    for p in (source / stem, source / f"{stem}.gz"):
        if p.is_file():
            return p
    raise SystemExit(f"error: {stem}[.gz] not found in {source} (install dataset-fashion-mnist or pass --source)")


def _content_sha256(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return hashlib.sha256(raw).hexdigest()


def select(labels: np.ndarray, per_class: int, split_id: int) -> np.ndarray:
    """Sorted source indices: ``per_class`` examples of each class, drawn with a fixed seed."""
    rng = np.random.default_rng([SEED, split_id])
    picks = []
    for c in range(10):
        pool = np.flatnonzero(labels == c)
        if pool.size < per_class:
            raise SystemExit(f"error: class {c} has only {pool.size} examples, need {per_class}")
        picks.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(picks))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps (byte-reproducible)."""
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_FIXED_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                        help=f"folder with the Fashion-MNIST IDX files (default: {DEFAULT_SOURCE})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output npz (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    arrays: dict[str, np.ndarray] = {}
    names, digests = [], []
    for split_id, split in enumerate(("train", "test")):
        img_path, lbl_path = (_find(args.source, s) for s in SOURCE_FILES[split])
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.shape != (SOURCE_SIZES[split], 28, 28) or labels.shape != (SOURCE_SIZES[split],):
            raise SystemExit(f"error: {img_path} / {lbl_path} do not look like Fashion-MNIST {split} "
                             f"(shapes {images.shape}, {labels.shape})")
        idx = select(labels, PER_CLASS[split], split_id)
        if split == "test":  # the balanced subset first, then every other test image (the whole split)
            idx = np.concatenate([idx, np.setdiff1d(np.arange(SOURCE_SIZES[split]), idx)])
        arrays[f"x_{split}"] = images[idx]
        arrays[f"y_{split}"] = labels[idx].astype(np.uint8)
        arrays[f"{split}_indices"] = idx.astype(np.int32)
        for p in (img_path, lbl_path):
            names.append(p.name)
            digests.append(_content_sha256(p))
    arrays["seed"] = np.array(SEED, dtype=np.int64)
    arrays["source_files"] = np.array(names)            # unicode arrays load without pickle
    arrays["source_sha256"] = np.array(digests)         # of the *decompressed* files

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_npz(args.out, arrays)
    size = args.out.stat().st_size
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out}: {size} bytes ({size / 2**20:.2f} MiB), sha256 {digest}")
    for split in ("train", "test"):
        counts = np.bincount(arrays[f"y_{split}"], minlength=10)
        print(f"  {split}: {len(arrays[f'y_{split}'])} images, per class {counts.tolist()}")
    if size > MAX_BYTES:
        print(f"error: {size} bytes exceeds the {MAX_BYTES}-byte budget for package assets", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
