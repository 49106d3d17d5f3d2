"""CIFAR-10 and CIFAR-100 from the official "python version" pickle batches.

Format (A. Krizhevsky, https://www.cs.toronto.edu/~kriz/cifar.html): each
batch file is a pickled dict with byte-string keys; ``b'data'`` is a
(N, 3072) uint8 numpy array, one row per image, 1024 red then 1024 green then
1024 blue values in row-major order (so ``reshape(N, 3, 32, 32)`` is NCHW);
``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` (CIFAR-100) is a list of ints.
Class names are in ``batches.meta`` (``b'label_names'``) / ``meta``
(``b'fine_label_names'``).

Pickle can run arbitrary code, so batches are read with
:class:`RestrictedUnpickler`, which resolves only the handful of globals a
genuine batch needs (numpy's array/dtype reconstruction) and refuses
everything else *before* calling it.  The archives are also md5-checked.

Lookup order: an extracted ``cifar-10-batches-py/`` (``cifar-100-python/``)
folder in ``data_dir/<name>/`` or ``data_dir/``; else the ``.tar.gz``
archive there (md5-checked, safely extracted next to it); else, with
``download=True``, the archive is downloaded to ``data_dir/<name>/``.
"""
from __future__ import annotations

import codecs
import math
import pickle
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
import torch

from .base import DataNotFoundError, ImageDataset, as_uint8_images
from .download import download_file, not_found_message, safe_extract, search_dirs, verify_file

__all__ = ["RestrictedUnpickler", "restricted_load", "load_cifar_batch", "load_cifar_dataset",
           "CIFAR_SOURCES", "CIFAR10_CLASSES", "CIFAR100_CLASSES"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]

# The 100 fine labels, in label order (alphabetical), as in cifar-100-python/meta.
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]

CIFAR_SOURCES: dict[str, dict] = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
        "splits": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "meta": "batches.meta",
        "label_key": "labels",
        "names_key": "label_names",
        "classes": CIFAR10_CLASSES,
    },
    "cifar100": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
        "splits": {"train": ["train"], "test": ["test"]},
        "meta": "meta",
        "label_key": "fine_labels",
        "names_key": "fine_label_names",
        "classes": CIFAR100_CLASSES,
    },
}


# --------------------------------------------------------------------------- restricted unpickling


_NUMERIC_KINDS = "biuf"  # bool, int, uint, float: what a genuine batch holds


class _Budget:
    """Bytes a load may still materialise. A pickle can call an allowed constructor many times on one
    memoised argument (a tiny file, gigabytes of copies); every constructor charges what it builds."""

    def __init__(self, limit: int, source: str):
        self.left, self.source = limit, source

    def charge(self, nbytes: int, what: str) -> None:
        self.left -= int(nbytes)
        if self.left < 0:
            raise pickle.UnpicklingError(f"refusing to load {self.source}: its {what} would make it build more data "
                                         "than the file holds; the file is malformed or hostile")


def _numeric_dtype(dtype, source: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"refusing to load {source}: it builds an array of dtype {dtype}, which a "
                                     "genuine CIFAR batch never holds")
    return dtype


def _allowed_globals(budget: _Budget) -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR batch may reference, each a guarded stand-in for the real one.

    The batches were written by Python 2 with numpy arrays (``numpy.core``
    paths); numpy >= 2 renamed the package to ``numpy._core`` and writes that
    path, so both spellings are accepted. ``_frombuffer`` is what numpy uses
    with pickle protocol 5 and ``_codecs.encode`` is how Python 3 writes
    ``bytes`` with protocol <= 2. Every stand-in refuses non-numeric dtypes
    (an object array of a declared size is allocated, not read) and charges
    what it builds to ``budget``; ``numpy.ndarray`` itself cannot be called.
    """
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    source = budget.source

    class CountedArray(np.ndarray):
        """An ndarray whose pickled state (shape, dtype, raw bytes) is checked and charged before it is set."""

        def __setstate__(self, state):
            if not isinstance(state, tuple) or len(state) < 5:
                raise pickle.UnpicklingError(f"refusing to load {source}: malformed array state")
            shape, dtype = state[1], _numeric_dtype(state[2], source)
            if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise pickle.UnpicklingError(f"refusing to load {source}: malformed array shape")
            budget.charge(math.prod(shape) * dtype.itemsize, "array")
            super().__setstate__(state)

    class NdarrayName:
        """Stands for ``numpy.ndarray`` as the first argument of ``_reconstruct``; calling it is refused."""

        def __call__(self, *args, **kwargs):
            raise pickle.UnpicklingError(f"refusing to load {source}: it calls numpy.ndarray directly, which a "
                                         "genuine CIFAR batch never does")

    ndarray_name = NdarrayName()

    def reconstruct(subtype, shape, dtype):
        if subtype is not ndarray_name or math.prod(shape) > 1:
            raise pickle.UnpicklingError(f"refusing to load {source}: an unexpected array construction")
        return multiarray._reconstruct(CountedArray, shape, dtype if isinstance(dtype, bytes) else
                                       _numeric_dtype(dtype, source))

    def frombuffer(buf, dtype, shape, order):
        return numeric._frombuffer(buf, _numeric_dtype(dtype, source), shape, order)  # a view: nothing copied

    def encode(obj, encoding="utf-8", errors="strict"):
        budget.charge(len(obj) if isinstance(obj, str) else 1 << 40, "byte string")
        return codecs.encode(obj, encoding, errors)

    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): ndarray_name,  # only ever an argument of reconstruct
        ("numpy", "dtype"): lambda *a: _numeric_dtype(np.dtype(*a), source),
        ("_codecs", "encode"): encode,
    }
    for pkg in ("numpy.core", "numpy._core"):
        table[(f"{pkg}.multiarray", "_reconstruct")] = reconstruct
        if hasattr(numeric, "_frombuffer"):
            table[(f"{pkg}.numeric", "_frombuffer")] = frombuffer
    return table


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals listed in :func:`_allowed_globals`.

    ``find_class`` is the single gate through which a pickle reaches any
    callable (os.system, eval, subprocess...), so refusing there stops an
    attack before anything runs (see the warning in the :mod:`pickle` docs,
    "Restricting Globals"); the guarded constructors bound what the file can
    make us allocate to twice its size.
    """

    def __init__(self, file: BinaryIO, *, source: str = "<pickle>", max_bytes: int = 1 << 30):
        # encoding="bytes": Python 2 ``str`` objects come back as bytes, as in
        # the loader snippet on the CIFAR web page.
        super().__init__(file, encoding="bytes")
        self._source = source
        self._allowed = _allowed_globals(_Budget(max_bytes, source))

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            allowed = ", ".join(sorted({f"{m}.{n}" for m, n in self._allowed}))
            raise pickle.UnpicklingError(
                f"refusing to load {self._source}: it references the global '{module}.{name}', which a "
                f"genuine CIFAR batch never does (allowed: {allowed}). The file may be malicious; "
                "nothing from it was executed."
            ) from None


#: The largest genuine file is CIFAR-100's ``train`` (about 155 MB); a batch holds at most 50,000 images.
MAX_FILE_BYTES = 256 * 2**20
MAX_IMAGES = 50_000


def restricted_load(path: Union[str, Path], max_bytes: int = MAX_FILE_BYTES) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`, refusing files larger than ``max_bytes``."""
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise ValueError(f"malformed CIFAR file {path}: {size} bytes, more than the {max_bytes} any CIFAR file has")
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, source=str(path), max_bytes=2 * size + (16 << 20)).load()


def _str_keys(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"malformed CIFAR file {path}: expected a pickled dict, got {type(obj).__name__}")
    if not all(isinstance(k, (bytes, str)) for k in obj):
        raise ValueError(f"malformed CIFAR file {path}: its keys must be strings")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _flat_ints(values: Any, n: int, path: Path, key: str) -> np.ndarray:
    """``values`` as an int64 array, checked to be exactly ``n`` plain integers *before* numpy walks it:
    a pickle can share one object many times (a list holding itself, nested), which a naive
    ``np.asarray`` would expand without bound."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.shape[0] != n or not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"malformed CIFAR batch {path}: b'{key}' must be {n} integers, "
                             f"got {values.dtype} {values.shape}")
        return values.astype(np.int64)
    if not isinstance(values, list) or len(values) != n or not all(type(v) is int for v in values):
        kind = type(values).__name__ + (f" of {len(values)}" if isinstance(values, list) else "")
        raise ValueError(f"malformed CIFAR batch {path}: b'{key}' must be a list of {n} integers, got a {kind}"
                         + ("" if not isinstance(values, list) or len(values) != n else " with non-integer items"))
    return np.array(values, dtype=np.int64)


def load_cifar_batch(path: Union[str, Path], label_key: str = "labels",
                     num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (images uint8 (N, 3, 32, 32), labels int64 (N,))."""
    path = Path(path)
    d = _str_keys(restricted_load(path), path)
    if "data" not in d or label_key not in d:
        raise ValueError(f"malformed CIFAR batch {path}: needs keys b'data' and b'{label_key}', "
                         f"found {sorted(d)}")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"malformed CIFAR batch {path}: b'data' must be a uint8 array (N, 3072), got "
                         f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}")
    if data.shape[0] > MAX_IMAGES:
        raise ValueError(f"malformed CIFAR batch {path}: {data.shape[0]} images, more than the {MAX_IMAGES} a batch has")
    labels = _flat_ints(d[label_key], data.shape[0], path, label_key)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"malformed CIFAR batch {path}: labels must lie in [0, {num_classes}), "
                         f"got [{labels.min()}, {labels.max()}]")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _class_names(folder: Path, src: dict) -> list[str]:
    meta = folder / src["meta"]
    if not meta.is_file():
        return list(src["classes"])  # the meta file only carries names; ours are identical
    d = _str_keys(restricted_load(meta), meta)
    names = d.get(src["names_key"])
    if (not isinstance(names, list) or len(names) != len(src["classes"])
            or not all(isinstance(n, (bytes, str)) and len(n) <= 100 for n in names)):
        raise ValueError(f"malformed CIFAR meta file {meta}: b'{src['names_key']}' must list "
                         f"{len(src['classes'])} names")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _locate(name: str, split: str, data_dir: Path, download: bool, accept_mismatch: bool) -> Path:
    src = CIFAR_SOURCES[name]
    files = src["splits"][split]
    dirs = search_dirs(data_dir, name)
    for d in dirs:
        if all((d / src["folder"] / f).is_file() for f in files):
            return d / src["folder"]
    archive_name = Path(src["url"]).name
    for d in dirs:
        archive = d / archive_name
        if archive.is_file():
            verify_file(archive, md5=src["md5"], accept_mismatch=accept_mismatch, source=src["url"])
            safe_extract(archive, d)
            return d / src["folder"]
    dest = data_dir / name
    wanted = [f"{src['folder']}/{f}" for f in files] + [archive_name]
    if not download:
        raise DataNotFoundError(not_found_message(name, split, wanted, dirs, dest, [src["url"]], download))
    try:
        archive = download_file(src["url"], dest / archive_name, md5=src["md5"])
    except DataNotFoundError as exc:
        raise DataNotFoundError(
            not_found_message(name, split, wanted, dirs, dest, [src["url"]], download, error=exc)) from exc
    safe_extract(archive, dest)
    return dest / src["folder"]


def load_cifar_dataset(name: str, split: str, data_dir: Path, download: bool,
                       accept_checksum_mismatch: bool = False) -> ImageDataset:
    """Load ``split`` ("train"/"test") of ``name`` ("cifar10"/"cifar100")."""
    src = CIFAR_SOURCES[name]
    if split not in src["splits"]:
        raise ValueError(f"split={split!r} is not available for {name!r}; choose one of {sorted(src['splits'])}")
    folder = _locate(name, split, data_dir, download, accept_checksum_mismatch)
    missing = [f for f in src["splits"][split] if not (folder / f).is_file()]
    if missing:  # only possible when an archive lacked them
        raise ValueError(f"{folder} is missing {missing}: the {name} archive is incomplete")
    parts = [load_cifar_batch(folder / f, src["label_key"], len(src["classes"])) for f in src["splits"][split]]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return ImageDataset(images=as_uint8_images(images), labels=torch.from_numpy(labels),
                        classes=_class_names(folder, src), name=name, split=split)
