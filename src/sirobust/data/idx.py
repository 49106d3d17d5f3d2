"""MNIST and Fashion-MNIST from IDX files.

Format (Y. LeCun, http://yann.lecun.com/exdb/mnist/, "FILE FORMATS"): a
big-endian header ``0x00 0x00 <type> <ndim>``, then ``ndim`` uint32 sizes,
then the data in C order.  Type 0x08 is unsigned byte; images are
(N, 28, 28), labels (N,).  Files may be gzipped (as published) or not.

Where files are looked for (first folder holding both files of a split wins):
``data_dir/<name>/``, ``data_dir/``, then the Debian package folder
(``/usr/share/datasets/fashion-mnist`` from ``dataset-fashion-mnist``,
``/usr/share/datasets/mnist``).  Otherwise, with ``download=True``, the
official ``.gz`` files are fetched into ``data_dir/<name>/`` and checked
against their published md5 (Fashion-MNIST: github.com/zalandoresearch/fashion-mnist
README; MNIST: the digests torchvision uses).  Files found on disk are not
md5-checked, because redistributors recompress them (Debian's ``.gz`` files
differ byte-wise from the originals); they are parsed strictly instead.
"""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .base import DataNotFoundError, ImageDataset, as_uint8_images
from .download import download_file, not_found_message, search_dirs

__all__ = ["read_idx", "load_idx_dataset", "IDX_SOURCES", "SPLIT_FILES"]

# type code -> numpy dtype (big-endian where it matters), from the format description.
_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

IDX_SOURCES: dict[str, dict] = {
    "mnist": {
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "http://yann.lecun.com/exdb/mnist/"],
        "md5": {  # of the published .gz files
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        "system_dirs": ("/usr/share/datasets/mnist",),
        "classes": [str(d) for d in range(10)],
    },
    "fashion-mnist": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"],
        "md5": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        "system_dirs": ("/usr/share/datasets/fashion-mnist",),
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    },
}


#: The most examples an IDX file may declare in general, and per split of MNIST / Fashion-MNIST
#: (the published sizes): a header is checked against these before anything is decompressed.
MAX_EXAMPLES = 2_000_000
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
MAX_DIMS = 4

# Label counts per class of the published splits: they tell MNIST and Fashion-MNIST apart (same file
# names, same shapes), so the files of one are never loaded as the other.
KNOWN_LABEL_COUNTS = {
    ("mnist", "train"): (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    ("mnist", "test"): (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
    ("fashion-mnist", "train"): (6000,) * 10,
    ("fashion-mnist", "test"): (1000,) * 10,
}


def _open(path: Path):
    """The file's bytes as a stream, decompressed when it is gzip (decided by content, not by name)."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return (gzip.open(path, "rb"), True) if gz else (open(path, "rb"), False)  # closing it closes the file


def _read_exact(stream, n: int, path: Path, problem: str) -> bytes:
    try:
        data = stream.read(n)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"malformed IDX file {path}: broken gzip stream ({exc})") from None
    if len(data) != n:
        raise ValueError(f"malformed IDX file {path}: {problem} ({len(data)} of the {n} bytes needed)")
    return data


def read_idx(path: Union[str, Path], max_bytes: int = MAX_EXAMPLES * 28 * 28,
             shape: Optional[tuple[Optional[int], ...]] = None) -> np.ndarray:
    """Parse an IDX file (gzipped or not) into a native-endian numpy array.

    The header is read first and checked before anything else is read or
    allocated: the magic number (two zero bytes, a known type code, 1 to 4
    dimensions), the declared size against ``max_bytes`` and, when given,
    against ``shape`` (``None`` entries match any size). Then exactly the
    declared bytes are read (a gzip stream is decompressed only that far) and
    trailing data is refused. Raises ``ValueError`` naming the file.
    """
    path = Path(path)
    stream, gz = _open(path)
    with stream:
        head = _read_exact(stream, 4, path, "too short for the 4-byte magic number")
        magic = int.from_bytes(head, "big")
        code, ndim = head[2], head[3]
        if head[:2] != b"\x00\x00" or code not in _IDX_TYPES or not 1 <= ndim <= MAX_DIMS:
            raise ValueError(
                f"malformed IDX file {path}: bad magic number 0x{magic:08x} (expected 0x0000TTNN with type "
                f"TT in {{{', '.join(f'0x{t:02x}' for t in _IDX_TYPES)}}} and 1 <= NN <= {MAX_DIMS} dimensions)"
            )
        dims = struct.unpack(f">{ndim}I", _read_exact(stream, 4 * ndim, path, "truncated header"))
        dtype = _IDX_TYPES[code]
        nbytes = math.prod(dims) * dtype.itemsize
        if shape is not None and (len(shape) != ndim or any(w is not None and w != d for w, d in zip(shape, dims))):
            want = "(" + ", ".join("N" if w is None else str(w) for w in shape) + ")"
            raise ValueError(f"malformed IDX file {path}: declares shape {list(dims)}, expected {want}")
        if nbytes > max_bytes:
            raise ValueError(f"malformed IDX file {path}: declares {nbytes} bytes of data (dims {list(dims)}), more "
                             f"than the {max_bytes} allowed; refusing to read it")
        if not gz:
            size = path.stat().st_size
            if size != 4 + 4 * ndim + nbytes:
                raise ValueError(f"malformed IDX file {path}: {size} bytes but the header (dims {list(dims)}, "
                                 f"{dtype.itemsize}-byte items) implies {4 + 4 * ndim + nbytes}")
        raw = _read_exact(stream, nbytes, path, f"truncated data: the header (dims {list(dims)}, "
                                                f"{dtype.itemsize}-byte items) implies {4 + 4 * ndim + nbytes} bytes")
        if _read_exact_or_empty(stream, path):
            raise ValueError(f"malformed IDX file {path}: data continues past the {nbytes} bytes its header declares")
    arr = np.frombuffer(raw, dtype=dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # writable, native byte order


def _read_exact_or_empty(stream, path: Path) -> bytes:
    try:
        return stream.read(1)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"malformed IDX file {path}: broken gzip stream ({exc})") from None


def _find(dirname: Path, stem: str) -> Optional[Path]:
    for candidate in (dirname / stem, dirname / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _locate(dirs: list[Path], stems: tuple[str, str]) -> Optional[tuple[Path, Path]]:
    for d in dirs:
        found = [_find(d, s) for s in stems]
        if all(found):
            return found[0], found[1]  # type: ignore[return-value]
    return None


def _download(name: str, stems: tuple[str, str], dest: Path) -> tuple[Path, Path]:
    src = IDX_SOURCES[name]
    paths = []
    for stem in stems:
        fname = f"{stem}.gz"
        last: Optional[BaseException] = None
        for mirror in src["mirrors"]:
            try:
                paths.append(download_file(mirror + fname, dest / fname, md5=src["md5"][fname]))
                break
            except DataNotFoundError as exc:  # try the next mirror
                last = exc
        else:
            assert last is not None
            raise last
    return paths[0], paths[1]


def _identify(name: str, split: str, labels: np.ndarray, img_path: Path) -> None:
    """Refuse the files of the other MNIST-style dataset (same names and shapes; known label counts)."""
    counts = tuple(int(c) for c in np.bincount(labels, minlength=10)[:10])
    for (other, other_split), known in KNOWN_LABEL_COUNTS.items():
        if other != name and other_split == split and counts == known and KNOWN_LABEL_COUNTS[(name, split)] != known:
            raise ValueError(f"the files found for {name!r} in {img_path.parent} are {other!r} (their label counts "
                             f"are exactly {other}'s {split} split): keep each dataset in its own folder, "
                             f"<data-dir>/{name}/ and <data-dir>/{other}/")


def load_idx_dataset(name: str, split: str, data_dir: Path, download: bool,
                     accept_checksum_mismatch: bool = False) -> ImageDataset:
    """Load ``split`` ("train"/"test") of ``name`` ("mnist"/"fashion-mnist")."""
    src = IDX_SOURCES[name]
    if split not in SPLIT_FILES:
        raise ValueError(f"split={split!r} is not available for {name!r}; choose one of {sorted(SPLIT_FILES)}")
    stems = SPLIT_FILES[split]
    dirs = search_dirs(data_dir, name, src["system_dirs"])
    found = _locate(dirs, stems)
    if found is None:
        dest = data_dir / name
        urls = [src["mirrors"][0] + s + ".gz" for s in stems]
        names = [f"{s}[.gz]" for s in stems]
        if not download:
            raise DataNotFoundError(not_found_message(name, split, names, dirs, dest, urls, download))
        try:
            found = _download(name, stems, dest)
        except DataNotFoundError as exc:
            raise DataNotFoundError(
                not_found_message(name, split, names, dirs, dest, urls, download, error=exc)
            ) from exc
    img_path, lbl_path = found
    images = read_idx(img_path, max_bytes=SPLIT_SIZES[split] * 28 * 28, shape=(None, 28, 28))
    labels = read_idx(lbl_path, max_bytes=MAX_EXAMPLES, shape=(images.shape[0],))
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"malformed {name} image file {img_path}: expected uint8 (N, 28, 28), "
                         f"got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"malformed {name} label file {lbl_path}: expected uint8 ({images.shape[0]},), "
                         f"got {labels.dtype} {labels.shape}")
    if labels.size and labels.max() >= len(src["classes"]):
        raise ValueError(f"malformed {name} label file {lbl_path}: label {labels.max()} >= {len(src['classes'])}")
    _identify(name, split, labels, img_path)
    return ImageDataset(
        images=as_uint8_images(images[:, None]),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(src["classes"]),
        name=name,
        split=split,
    )
