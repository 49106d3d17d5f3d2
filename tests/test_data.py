"""Tests of sirobust.data: every file format, the safety checks, splitting and batching.

All fixtures are tiny files written in the real formats into tmp_path; no
test touches the network (downloads use file:// URLs or a patched urlopen).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

import sirobust.data as D
from sirobust.data import (BatchLoader, ChecksumError, DataNotFoundError, DatasetInfo, ImageDataset,
                           get_dataset_info, list_datasets, load_dataset, train_val_split)
from sirobust.data import cifar, download, mini, svhn
from sirobust.data.idx import read_idx

FMNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
ALL = ["cifar10", "cifar100", "fashion-mnist", "fashion-mnist-mini", "mnist", "svhn"]


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- registry


def test_list_datasets():
    assert list_datasets() == ALL


@pytest.mark.parametrize("name,eps,aug,channels,size", [
    ("cifar10", 8 / 255, "crop-flip", 3, 32), ("cifar100", 8 / 255, "crop-flip", 3, 32),
    ("svhn", 8 / 255, "crop", 3, 32), ("mnist", 0.3, "crop", 1, 28),
    ("fashion-mnist", 0.1, "flip", 1, 28), ("fashion-mnist-mini", 0.1, "flip", 1, 28)])
def test_dataset_info(name, eps, aug, channels, size):
    info = get_dataset_info(name)
    assert isinstance(info, DatasetInfo) and info.name == name
    assert info.default_eps == pytest.approx(eps) and info.augment == aug
    assert info.in_channels == channels == len(info.mean) == len(info.std) and info.image_size == size
    assert info.num_classes == (100 if name == "cifar100" else 10)
    with pytest.raises(Exception):
        info.name = "x"  # frozen


def test_known_statistics():
    assert get_dataset_info("cifar10").mean == (0.4914, 0.4822, 0.4465)
    assert get_dataset_info("mnist").std == (0.3081,)
    assert get_dataset_info("CIFAR_10").name == "cifar10"  # case/underscore-insensitive alias


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get_dataset_info("imagenet")
    for name in ALL:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="cifar10"):
        load_dataset("nope", download=False)


def test_unknown_split_lists_valid_splits(tmp_path):
    with pytest.raises(ValueError, match=r"split='dev'.*\['train', 'test'\]"):
        load_dataset("mnist", "dev", data_dir=tmp_path, download=False)


def test_default_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SIROBUST_DATA", str(tmp_path / "here"))
    assert D.default_data_dir() == tmp_path / "here"
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "here")):
        load_dataset("cifar10", download=False)
    monkeypatch.delenv("SIROBUST_DATA")
    assert D.default_data_dir() == Path.home() / ".cache" / "sirobust" / "data"


# --------------------------------------------------------------------------- ImageDataset


def _toy(n=20, classes=4, c=1, hw=8, seed=0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, hw, hw), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % classes
    return ImageDataset(images, labels, [f"c{i}" for i in range(classes)], "toy", "train")


def test_image_dataset_basics():
    ds = _toy()
    assert len(ds) == 20 and ds.num_classes == 4
    sub = ds.subset(torch.tensor([3, 1]))
    assert torch.equal(sub.images, ds.images[[3, 1]]) and sub.labels.tolist() == [3, 1]
    assert sub.name == "toy" and sub.split == "train"
    assert torch.equal(ds.subset([0, 2]).labels, torch.tensor([0, 2]))
    mask = torch.zeros(20, dtype=torch.bool)
    mask[5] = True
    assert len(ds.subset(mask)) == 1
    f = ds.float_images()
    assert f.dtype == torch.float32 and torch.allclose(f * 255, ds.images.float())
    assert ds.images.dtype == torch.uint8  # float_images does not modify in place


def test_image_dataset_validates():
    with pytest.raises(TypeError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), ["a"], "x", "train")
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), ["a"], "x", "t")
    with pytest.raises(ValueError, match="labels must lie"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]), ["a", "b"], "x", "t")


# --------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def write_idx_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    prefix = "train" if split == "train" else "t10k"
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("in_subdir", [True, False])
def test_idx_roundtrip(tmp_path, name, gz, in_subdir):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 9, 3, 3, 5], dtype=np.uint8)
    folder = tmp_path / name if in_subdir else tmp_path
    write_idx_split(folder, "test", images, labels, gz)
    ds = load_dataset(name, "test", data_dir=tmp_path, download=False)
    assert ds.images.shape == (7, 1, 28, 28) and ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
    assert np.array_equal(ds.images[:, 0].numpy(), images)
    assert ds.name == name and ds.split == "test" and len(ds.classes) == 10
    assert ds.classes[0] == ("T-shirt/top" if name == "fashion-mnist" else "0")


def test_idx_subdir_wins_over_root(tmp_path):
    # MNIST and Fashion-MNIST share file names: data_dir/<name>/ must take precedence.
    z = np.zeros((1, 28, 28), np.uint8)
    write_idx_split(tmp_path, "train", z, np.array([1], np.uint8), gz=True)
    write_idx_split(tmp_path / "mnist", "train", z, np.array([7], np.uint8), gz=False)
    assert load_dataset("mnist", data_dir=tmp_path, download=False).labels.tolist() == [7]


def test_read_idx_other_types(tmp_path):
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    p = tmp_path / "x.idx"
    p.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + arr.tobytes())
    out = read_idx(p)
    assert out.dtype == np.int32 and out.dtype.isnative and out.tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("blob,match", [
    (b"\x00\x00\x08", "too short"),
    (b"\x00\x01\x08\x01" + struct.pack(">I", 2) + b"\x00\x00", "bad magic"),
    (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x00", "bad magic"),
    (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated header"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x00\x00", "implies 11"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00\x00", "implies 9"),
    # mtime=0: the test's id holds these bytes, and pytest-xdist's workers must collect the same ids
    (gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"\x00" * 4, mtime=0)[:-6], "gzip"),
])
def test_read_idx_rejects_malformed(tmp_path, blob, match):
    p = tmp_path / "bad-idx"
    p.write_bytes(blob)
    with pytest.raises(ValueError, match=match) as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_idx_wrong_shape_rejected(tmp_path):
    write_idx_split(tmp_path / "mnist", "test", np.zeros((2, 27, 28), np.uint8), np.zeros(2, np.uint8), gz=False)
    with pytest.raises(ValueError, match=r"expected \(N, 28, 28\)"):
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    write_idx_split(tmp_path / "mnist", "test", np.zeros((2, 28, 28), np.uint8), np.zeros(3, np.uint8), gz=False)
    with pytest.raises(ValueError, match=r"t10k-labels.*expected \(2\)"):
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)


@pytest.mark.parametrize("wanted,found", [("fashion-mnist", "mnist"), ("mnist", "fashion-mnist")])
def test_the_files_of_one_mnist_dataset_are_never_loaded_as_the_other(tmp_path, wanted, found):
    """Both use the same file names and shapes; the published label counts tell them apart."""
    counts = D.idx.KNOWN_LABEL_COUNTS[(found, "test")]
    labels = np.repeat(np.arange(10, dtype=np.uint8), counts)
    write_idx_split(tmp_path, "test", np.zeros((len(labels), 28, 28), np.uint8), labels, gz=False)
    with pytest.raises(ValueError, match=f"the files found for '{wanted}' in {tmp_path} are '{found}'"):
        load_dataset(wanted, "test", data_dir=tmp_path, download=False)
    assert len(load_dataset(found, "test", data_dir=tmp_path, download=False)) == 10_000


@pytest.mark.skipif(not FMNIST_SYSTEM.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_folder(tmp_path):
    ds = load_dataset("fashion-mnist", "test", data_dir=tmp_path, download=False)
    assert ds.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [1000] * 10


# --------------------------------------------------------------------------- CIFAR


class Py2StylePickler(pickle._Pickler):
    """Writes pickles the way Python 2 + numpy 1.x wrote the CIFAR batches:
    protocol 2, every str/bytes as a BINSTRING, numpy globals under ``numpy.core``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_str8(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_str8
    dispatch[str] = _save_str8

    def save_global(self, obj, name=None):
        name = name or obj.__qualname__
        module = pickle.whichmodule(obj, name).replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
        self.memoize(obj)


def dump_cifar(obj, path: Path, style: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if style == "py2":
        buf = io.BytesIO()
        Py2StylePickler(buf, protocol=2).dump(obj)
        path.write_bytes(buf.getvalue())
    else:  # what a Python 3 user would write
        path.write_bytes(pickle.dumps(obj, protocol=int(style)))


def cifar_batch(rng, n, label_key, num_classes, extra=None):
    d = {b"batch_label": b"training batch 1 of 5",
         label_key: [int(v) for v in rng.integers(0, num_classes, n)],
         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    d.update(extra or {})
    return d


def write_cifar10(root: Path, style="py2", n=3, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = cifar_batch(rng, n, b"labels", 10)
        dump_cifar(batches[name], folder / name, style)
    dump_cifar({b"num_cases_per_batch": 10000, b"num_vis": 3072,
                b"label_names": [c.encode() for c in cifar.CIFAR10_CLASSES]}, folder / "batches.meta", style)
    return batches


def write_cifar100(root: Path, style="py2", n=4, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    batches = {}
    for name in ("train", "test"):
        batches[name] = cifar_batch(rng, n, b"fine_labels", 100,
                                    {b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)]})
        dump_cifar(batches[name], folder / name, style)
    dump_cifar({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, folder / "meta", style)
    return batches


def expected_nchw(data: np.ndarray) -> np.ndarray:
    # pixel (c, h, w) is at column c*1024 + h*32 + w (R plane, G plane, B plane, rows in order)
    n = data.shape[0]
    out = np.empty((n, 3, 32, 32), np.uint8)
    for c in range(3):
        for h in range(32):
            out[:, c, h, :] = data[:, c * 1024 + h * 32: c * 1024 + h * 32 + 32]
    return out


@pytest.mark.parametrize("style", ["py2", "2", "4", "5"])
def test_cifar10_roundtrip(tmp_path, style):
    batches = write_cifar10(tmp_path / "cifar10", style)
    train = load_dataset("cifar10", "train", data_dir=tmp_path, download=False)
    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8
    data = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert np.array_equal(train.images.numpy(), expected_nchw(data))
    assert train.labels.tolist() == labels and train.labels.dtype == torch.int64
    assert train.classes == cifar.CIFAR10_CLASSES
    test = load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    assert np.array_equal(test.images.numpy(), expected_nchw(batches["test_batch"][b"data"]))
    assert test.split == "test" and test.name == "cifar10"


def test_cifar100_roundtrip(tmp_path):
    batches = write_cifar100(tmp_path)  # directly in data_dir, not data_dir/cifar100
    for split in ("train", "test"):
        ds = load_dataset("cifar100", split, data_dir=tmp_path, download=False)
        assert ds.images.shape == (4, 3, 32, 32)
        assert np.array_equal(ds.images.numpy(), expected_nchw(batches[split][b"data"]))
        assert ds.labels.tolist() == batches[split][b"fine_labels"]
        assert ds.classes == [f"fine{i}" for i in range(100)]  # names come from the meta file


def test_cifar_without_meta_uses_builtin_names(tmp_path):
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "meta").unlink()
    ds = load_dataset("cifar100", "test", data_dir=tmp_path, download=False)
    assert ds.classes == cifar.CIFAR100_CLASSES
    assert len(set(cifar.CIFAR100_CLASSES)) == 100 and cifar.CIFAR100_CLASSES == sorted(cifar.CIFAR100_CLASSES)


def test_cifar_malformed_batch(tmp_path):
    write_cifar10(tmp_path)
    dump_cifar({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]},
               tmp_path / "cifar-10-batches-py" / "test_batch", "4")
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    dump_cifar({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
               tmp_path / "cifar-10-batches-py" / "test_batch", "4")
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_cifar10(tmp_path)
    bad.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing .*system.*nothing from it was executed"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    assert not marker.exists()
    # the same pickle really is dangerous with the stock unpickler (sanity check of the test itself)
    assert "system" in pickle.dumps(_Evil(marker), protocol=2).decode("latin1")


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("numpy", "load"), ("subprocess", "Popen"),
                                         ("numpy.core.multiarray", "scalar")])
def test_restricted_unpickler_refuses_other_globals(tmp_path, module, name):
    p = tmp_path / "batch"
    p.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x01\x00\x00\x001\x85R.")
    with pytest.raises(pickle.UnpicklingError, match=f"{module}.{name}"):
        cifar.restricted_load(p)


def _tar_gz(src_dir: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src_dir, arcname=src_dir.name)


def test_cifar_from_archive(tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    batches = write_cifar10(staging)
    root = tmp_path / "data"
    (root / "cifar10").mkdir(parents=True)
    archive = root / "cifar10" / "cifar-10-python.tar.gz"
    _tar_gz(staging / "cifar-10-batches-py", archive)
    monkeypatch.setitem(cifar.CIFAR_SOURCES["cifar10"], "md5", md5_of(archive))
    ds = load_dataset("cifar10", "test", data_dir=root, download=False)
    assert np.array_equal(ds.images.numpy(), expected_nchw(batches["test_batch"][b"data"]))
    assert (root / "cifar10" / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_a_users_cifar_archive_with_another_md5_is_kept_and_can_be_accepted(tmp_path):
    staging = tmp_path / "staging"
    batches = write_cifar10(staging)
    archive = tmp_path / "cifar-10-python.tar.gz"
    _tar_gz(staging / "cifar-10-batches-py", archive)
    before = archive.read_bytes()
    with pytest.raises(ChecksumError) as e:
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    msg = str(e.value)
    assert str(archive) in msg and "expected c58f30108f718f92721af3b95e74349a" in msg and f"found {md5_of(archive)}" in msg
    assert "--accept-checksum-mismatch" in msg
    assert archive.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [archive.name, "staging"]
    ds = load_dataset("cifar10", "test", data_dir=tmp_path, download=False, accept_checksum_mismatch=True)
    assert np.array_equal(ds.images.numpy(), expected_nchw(batches["test_batch"][b"data"]))


# --------------------------------------------------------------------------- SVHN


def write_svhn(folder: Path, split: str, n=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = np.array([[10], [1], [9], [10], [5]][:n], dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / svhn.SVHN_FILES[split][0]
    scipy.io.savemat(path, {"X": x, "y": y})
    return path, x, y


@pytest.mark.parametrize("split", ["train", "test"])
def test_svhn_roundtrip(tmp_path, monkeypatch, split):
    path, x, y = write_svhn(tmp_path / "svhn", split)
    monkeypatch.setitem(svhn.SVHN_FILES, split, (path.name, md5_of(path)))
    ds = load_dataset("svhn", split, data_dir=tmp_path, download=False)
    assert ds.images.shape == (5, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert np.array_equal(ds.images.numpy(), x.transpose(3, 2, 0, 1))  # [n, c, h, w] == X[h, w, c, n]
    assert ds.images[1, 2, 3, 4].item() == x[3, 4, 2, 1]
    assert ds.labels.tolist() == [0, 1, 9, 0, 5]  # label 10 means digit 0
    assert ds.classes == [str(i) for i in range(10)]


def test_svhn_file_with_another_checksum_is_left_alone(tmp_path):
    path, _, _ = write_svhn(tmp_path, "test")
    before = path.read_bytes()
    with pytest.raises(ChecksumError, match=r"test_32x32.mat: expected eb5a983be6a315427106f1b164d9cef3, found"):
        load_dataset("svhn", "test", data_dir=tmp_path, download=False)
    assert path.read_bytes() == before
    assert len(load_dataset("svhn", "test", data_dir=tmp_path, download=False, accept_checksum_mismatch=True)) == 5


def test_svhn_published_md5s():
    assert svhn.SVHN_FILES["train"][1] == "e26dedcc434d2e4c54c9b2d4a06d8373"
    assert svhn.SVHN_FILES["test"][1] == "eb5a983be6a315427106f1b164d9cef3"  # torchvision's value


# --------------------------------------------------------------------------- checksums and downloads


def test_verify_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"hello")
    md5, sha = hashlib.md5(b"hello").hexdigest(), hashlib.sha256(b"hello").hexdigest()
    assert download.verify_file(p, md5=md5) == p
    assert download.verify_file(p, sha256=sha.upper(), md5=md5) == p
    p.write_bytes(b"hellO")  # tampered
    with pytest.raises(ChecksumError) as e:
        download.verify_file(p, sha256=sha)
    assert str(p) in str(e.value) and sha in str(e.value)
    assert hashlib.sha256(b"hellO").hexdigest() in str(e.value)
    assert p.read_bytes() == b"hellO"  # the user's file stays where it is
    logs = []
    assert download.verify_file(p, sha256=sha, accept_mismatch=True, log=logs.append) == p
    assert "using it anyway" in logs[0]
    with pytest.raises(ValueError, match="md5"):
        download.verify_file(tmp_path / "x")


def test_download_file_url(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3000))
    dest = tmp_path / "out" / "file.bin"
    url = src.as_uri()  # file:// URL: urllib handles it like any other
    got = download.download_file(url, dest, md5=md5_of(src), sha256=hashlib.sha256(src.read_bytes()).hexdigest())
    assert got == dest and dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == [".sirobust-downloads.json", "file.bin"]  # no temp files
    src.unlink()  # a verified copy on disk is reused, not fetched again
    assert download.download_file(url, dest, md5=md5_of(dest)) == dest


def test_download_file_wrong_checksum(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    out = tmp_path / "out"
    with pytest.raises(ChecksumError, match=r"file\.bin.*expected 0{32}"):
        download.download_file(src.as_uri(), out / "file.bin", md5="0" * 32)
    assert list(out.iterdir()) == []  # neither dest nor the temp file remain


def test_download_file_offline(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError(OSError("Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dest = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    with pytest.raises(DataNotFoundError) as e:
        download.download_file("https://example.invalid/x.gz", dest, md5="0" * 32)
    assert str(dest.parent) in str(e.value) and dest.name in str(e.value)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    # a missing file:// source is a download failure too
    with pytest.raises(DataNotFoundError):
        download.download_file((tmp_path / "missing").as_uri(), tmp_path / "y", md5="0" * 32)


def test_load_dataset_offline_download_message(tmp_path, monkeypatch):
    calls = []

    def offline(req, *a, **k):
        calls.append(req.full_url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("mnist", "train", data_dir=tmp_path, download=True)
    msg = str(e.value)
    assert "Downloading failed" in msg and str(tmp_path / "mnist") in msg
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert len(calls) == 2  # both mirrors tried
    assert not any((tmp_path / "mnist").iterdir())


def test_download_into_dataset_folder(tmp_path, monkeypatch):
    # Simulated mirror: a local folder served through file:// URLs, with md5s patched to the fixtures'.
    mirror = tmp_path / "mirror"
    rng = np.random.default_rng(0)
    write_idx_split(mirror, "test", rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
                    np.array([4, 2, 0], np.uint8), gz=True)
    src = {"mirrors": [mirror.as_uri() + "/"],
           "md5": {p.name: md5_of(p) for p in mirror.iterdir()},
           "system_dirs": (), "classes": [str(i) for i in range(10)]}
    monkeypatch.setitem(D.idx.IDX_SOURCES, "mnist", src)
    (tmp_path / "data").mkdir()
    ds = load_dataset("mnist", "test", data_dir=tmp_path / "data", download=True)
    assert ds.labels.tolist() == [4, 2, 0]
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == \
        [".sirobust-downloads.json", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


@pytest.mark.parametrize("name,files", [
    ("mnist", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]),
    ("cifar10", ["cifar-10-batches-py/data_batch_1", "cifar-10-python.tar.gz"]),
    ("cifar100", ["cifar-100-python/train", "cifar-100-python.tar.gz"]),
    ("svhn", ["train_32x32.mat"]),
])
def test_missing_data_message(tmp_path, name, files):
    if name == "mnist" and Path("/usr/share/datasets/mnist").is_dir():
        pytest.skip("a system MNIST folder exists")
    data_dir = tmp_path / "empty"
    data_dir.mkdir()
    with pytest.raises(DataNotFoundError) as e:
        load_dataset(name, "train", data_dir=data_dir, download=False)
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    assert str(data_dir) in msg and str(data_dir / name) in msg and "download=False" in msg
    for f in files:
        assert f in msg
    assert list(data_dir.iterdir()) == []  # looking must not create folders


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist-mini", "cifar10", "svhn"])
def test_a_mistyped_data_dir_is_an_error_and_is_never_created(tmp_path, name):
    typo = tmp_path / "dtaa"
    with pytest.raises(ValueError, match=r"data_dir \(--data-dir\) .*dtaa does not exist"):
        load_dataset(name, "test", data_dir=typo)
    assert not typo.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        load_dataset(name, "test", data_dir=tmp_path / "file")


# --------------------------------------------------------------------------- safe extraction


def _tar_with(path: Path, members: list[tarfile.TarInfo], payload=b"x") -> Path:
    with tarfile.open(path, "w") as tar:
        for m in members:
            if m.isfile():
                m.size = len(payload)
                tar.addfile(m, io.BytesIO(payload))
            else:
                tar.addfile(m)
    return path


def _member(name, type_=tarfile.REGTYPE, linkname=""):
    m = tarfile.TarInfo(name)
    m.type = type_
    m.linkname = linkname
    return m


@pytest.mark.parametrize("member,match", [
    (_member("../evil"), r"'\.\./evil'.*'\.\.'"),
    (_member("ok/../../evil"), "escapes"),
    (_member("/tmp/evil_abs"), "absolute"),
    (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "link member 'link'"),
    (_member("hard", tarfile.LNKTYPE, "good.txt"), "link member 'hard'"),
    (_member("dev", tarfile.CHRTYPE), "special member 'dev'"),
    (_member("fifo", tarfile.FIFOTYPE), "special member 'fifo'"),
])
def test_safe_extract_refuses_bad_tar(tmp_path, member, match):
    archive = _tar_with(tmp_path / "a.tar", [_member("good.txt"), member])
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match=match):
        download.safe_extract(archive, dest)
    assert list(dest.iterdir()) == []  # validated before anything is written
    assert not (tmp_path / "evil").exists()


def test_safe_extract_refuses_bad_zip(tmp_path):
    dest = tmp_path / "dest"
    for name in ("../evil", "/abs/evil"):
        archive = tmp_path / "a.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("good.txt", "ok")
            zf.writestr(name, "bad")
        with pytest.raises(ValueError, match="evil"):
            download.safe_extract(archive, dest)
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = 0o120777 << 16  # S_IFLNK
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ValueError, match="symlink member 'link'"):
        download.safe_extract(archive, dest)
    assert list(dest.iterdir()) == []


def test_safe_extract_good_archives(tmp_path):
    src = tmp_path / "src" / "pkg"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.bin").write_bytes(b"\x00\x01")
    _tar_gz(src, tmp_path / "good.tar.gz")
    written = download.safe_extract(tmp_path / "good.tar.gz", tmp_path / "t")
    assert (tmp_path / "t" / "pkg" / "sub" / "b.bin").read_bytes() == b"\x00\x01" and len(written) == 2
    with zipfile.ZipFile(tmp_path / "good.zip", "w") as zf:
        zf.writestr("pkg/a.txt", "A")
        zf.writestr("pkg/sub/", "")
    download.safe_extract(tmp_path / "good.zip", tmp_path / "z")
    assert (tmp_path / "z" / "pkg" / "a.txt").read_text() == "A" and (tmp_path / "z" / "pkg" / "sub").is_dir()
    (tmp_path / "plain.txt").write_text("not an archive")
    with pytest.raises(ValueError, match="neither a tar nor a zip"):
        download.safe_extract(tmp_path / "plain.txt", tmp_path / "p")


def test_safe_extract_refuses_archives_that_unpack_too_large(tmp_path):
    src = tmp_path / "src" / "pkg"
    src.mkdir(parents=True)
    (src / "zeros.bin").write_bytes(b"\x00" * 100_000)  # compresses to almost nothing
    _tar_gz(src, tmp_path / "bomb.tar.gz")
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", b"\x00" * 100_000)
    for name in ("bomb.tar.gz", "bomb.zip"):
        dest = tmp_path / f"out-{name}"
        with pytest.raises(ValueError, match="max_bytes=50000"):
            download.safe_extract(tmp_path / name, dest, max_bytes=50_000)
        assert list(dest.iterdir()) == []  # refused before anything was written
        assert download.safe_extract(tmp_path / name, tmp_path / f"ok-{name}", max_bytes=200_000)


# --------------------------------------------------------------------------- fashion-mnist-mini


def test_mini_dataset():
    for split, (n, per_class) in {"train": (6000, 600), "test": (10000, 1000)}.items():
        ds = load_dataset("fashion-mnist-mini", split, download=False)
        assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.uint8
        assert torch.bincount(ds.labels, minlength=10).tolist() == [per_class] * 10
        if split == "test":  # the whole official test split; its first 1000 are class-balanced (the old subset)
            assert torch.bincount(ds.labels[:1000], minlength=10).tolist() == [100] * 10
        assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
        assert ds.name == "fashion-mnist-mini" and ds.split == split
        assert ds.images.float().std() > 50  # real images, not zeros


def test_mini_asset_and_licence_ship():
    asset = Path(str(mini.mini_asset()))
    assert asset.is_file() and asset.stat().st_size <= 10 * 1024 * 1024
    assert hashlib.sha256(asset.read_bytes()).hexdigest() == mini.MINI_SHA256  # rerun script => update constant
    licence = asset.parent / "LICENSE-fashion-mnist.txt"
    text = licence.read_text()
    assert "Zalando SE" in text and "Permission is hereby granted" in text
    with np.load(asset, allow_pickle=False) as z:  # no pickled objects inside
        assert len(np.unique(z["train_indices"])) == 6000
        assert sorted(z["test_indices"].tolist()) == list(range(10000))  # a permutation: the whole test split
        assert (np.diff(z["test_indices"][:1000]) > 0).all()  # the balanced subset keeps the source order


@pytest.mark.skipif(not FMNIST_SYSTEM.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_mini_matches_source(tmp_path):
    full = load_dataset("fashion-mnist", "test", data_dir=tmp_path, download=False)
    small = load_dataset("fashion-mnist-mini", "test")
    with np.load(str(mini.mini_asset()), allow_pickle=False) as z:
        idx = torch.from_numpy(z["test_indices"].astype(np.int64))
    assert torch.equal(small.images, full.images[idx]) and torch.equal(small.labels, full.labels[idx])


# --------------------------------------------------------------------------- train/val split


def test_train_val_split_properties():
    ds = _toy(n=103, classes=4)
    rng_before = torch.get_rng_state()
    tr, va, vidx = train_val_split(ds, val_size=0.2, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert len(va) == 21 and len(tr) == 82 and va.split == "val" and tr.split == "train"
    assert vidx.dtype == torch.int64 and torch.equal(vidx, vidx.sort().values)
    train_idx = torch.tensor(sorted(set(range(103)) - set(vidx.tolist())))
    assert torch.equal(tr.images, ds.images[train_idx]) and torch.equal(va.images, ds.images[vidx])
    assert torch.equal(va.labels, ds.labels[vidx])
    # stratified: every class within one of its proportional share
    sizes, vcounts = torch.bincount(ds.labels), torch.bincount(va.labels, minlength=4)
    assert ((vcounts.float() - sizes.float() * 21 / 103).abs() < 1).all()
    # deterministic, and seed-dependent
    assert torch.equal(train_val_split(ds, 0.2, seed=3)[2], vidx)
    assert not torch.equal(train_val_split(ds, 0.2, seed=4)[2], vidx)


def test_train_val_split_int_and_errors():
    ds = _toy(n=40, classes=4)
    _, va, vidx = train_val_split(ds, val_size=8)
    assert len(va) == 8 and torch.bincount(va.labels).tolist() == [2, 2, 2, 2]
    for bad in (0, 40, 1.0, 0.0, -0.1):
        with pytest.raises(ValueError, match="val_size"):
            train_val_split(ds, val_size=bad)
    with pytest.raises(TypeError, match="val_size"):
        train_val_split(ds, val_size="10%")


def test_stratified_counts_exact_total():
    from sirobust.data.split import stratified_counts
    for sizes, n in (([5, 5, 5], 4), ([1, 1, 98], 3), ([10, 0, 3], 5)):
        c = stratified_counts(torch.tensor(sizes), n)
        assert int(c.sum()) == n and (c <= torch.tensor(sizes)).all()


# --------------------------------------------------------------------------- BatchLoader


def shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., i, j] = img[..., i + dy, j + dx], zero outside (direct, loop-free reference)."""
    h, w = img.shape[-2:]
    out = torch.zeros_like(img)
    out[..., max(0, -dy):min(h, h - dy), max(0, -dx):min(w, w - dx)] = \
        img[..., max(0, dy):min(h, h + dy), max(0, dx):min(w, w + dx)]
    return out


def matching_shifts(out: torch.Tensor, img: torch.Tensor) -> list[tuple[int, int]]:
    return [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) if torch.equal(out, shifted(img, dy, dx))]


def test_shifted_reference():
    img = torch.arange(9.0).view(1, 3, 3)
    assert shifted(img, 1, 0).tolist() == [[[3, 4, 5], [6, 7, 8], [0, 0, 0]]]
    assert shifted(img, 0, -1).tolist() == [[[0, 0, 1], [0, 3, 4], [0, 6, 7]]]


def test_loader_none_is_exact():
    ds = _toy(n=10, c=3)
    loader = BatchLoader.from_dataset(ds, 4)
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and torch.equal(x, ds.images.float() / 255)
    assert torch.equal(torch.cat([b[1] for b in batches]), ds.labels)
    assert batches[0][1].dtype == torch.int64


@pytest.mark.parametrize("augment", ["none", "crop", "flip", "crop-flip"])
def test_loader_augment_shape_dtype_range(augment):
    ds = _toy(n=33, c=3, hw=12)
    for x, y in BatchLoader.from_dataset(ds, 16, augment=augment, shuffle=True):
        assert x.shape[1:] == (3, 12, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert 0.0 <= x.min() and x.max() <= 1.0


def test_loader_crop_is_a_zero_padded_shift():
    ds = _toy(n=64, c=2, hw=10)
    x, _ = next(iter(BatchLoader.from_dataset(ds, 64, augment="crop", seed=5)))
    ref = ds.float_images()
    seen = set()
    for k in range(64):
        shifts = matching_shifts(x[k], ref[k])
        assert shifts, f"example {k} is not a 4-pixel zero-padded shift of the input"
        seen.update(shifts)
    assert len(seen) > 10  # the shifts really are random
    # one example checked against a direct computation of the crop window
    padded = torch.nn.functional.pad(ref[0], (4, 4, 4, 4))
    (dy, dx), = matching_shifts(x[0], ref[0])
    assert torch.equal(x[0], padded[:, dy + 4:dy + 14, dx + 4:dx + 14])


def test_loader_flip_is_an_exact_mirror():
    ds = _toy(n=64, c=3, hw=8)
    x, _ = next(iter(BatchLoader.from_dataset(ds, 64, augment="flip")))
    ref = ds.float_images()
    flipped = [torch.equal(x[k], ref[k].flip(-1)) for k in range(64)]
    kept = [torch.equal(x[k], ref[k]) for k in range(64)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_loader_crop_flip():
    ds = _toy(n=32, c=1, hw=9)
    x, _ = next(iter(BatchLoader.from_dataset(ds, 32, augment="crop-flip", seed=1)))
    ref = ds.float_images()
    n_flipped = 0
    for k in range(32):
        plain, mirrored = matching_shifts(x[k], ref[k]), matching_shifts(x[k], ref[k].flip(-1))
        assert plain or mirrored
        n_flipped += bool(mirrored)
    assert 0 < n_flipped < 32


def _collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_loader_determinism_and_epochs():
    ds = _toy(n=50, c=1, hw=8)
    kw = dict(shuffle=True, augment="crop-flip", seed=7)
    a, b = BatchLoader.from_dataset(ds, 8, **kw), BatchLoader.from_dataset(ds, 8, **kw)
    a.set_epoch(3)
    b.set_epoch(3)
    ea, eb = _collect(a), _collect(b)
    assert _same(ea, eb)
    b.set_epoch(4)
    e4 = _collect(b)
    assert not torch.equal(torch.cat([y for _, y in ea]), torch.cat([y for _, y in e4]))  # new order
    assert not _same(_collect(BatchLoader.from_dataset(ds, 8, shuffle=True, augment="crop-flip", seed=8)),
                     _collect(BatchLoader.from_dataset(ds, 8, **kw)))
    # epochs advance by themselves after a full pass
    c = BatchLoader.from_dataset(ds, 8, **kw)
    first, second = _collect(c), _collect(c)
    assert c.epoch == 2 and not _same(first, second)
    c.set_epoch(0)
    assert _same(_collect(c), first)


def test_loader_leaves_global_rng_alone():
    ds = _toy(n=30)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for _ in BatchLoader.from_dataset(ds, 7, shuffle=True, augment="crop-flip"):
        pass
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("n,bs,drop_last", [(50, 8, False), (48, 8, False), (50, 8, True), (5, 8, False)])
def test_loader_covers_each_example_once(n, bs, drop_last):
    ds = ImageDataset(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous(),
                      torch.zeros(n, dtype=torch.long), ["a"], "toy", "train")
    loader = BatchLoader.from_dataset(ds, bs, shuffle=True, drop_last=drop_last)
    ids = torch.cat([(x[:, 0, 0, 0] * 255).round().long() for x, _ in loader])
    expected_len = n // bs if drop_last else -(-n // bs)
    assert len(loader) == expected_len
    if drop_last:
        assert len(ids) == (n // bs) * bs and len(set(ids.tolist())) == len(ids)
    else:
        assert sorted(ids.tolist()) == list(range(n))


def test_loader_resume_mid_epoch():
    ds = _toy(n=40)
    kw = dict(shuffle=True, augment="crop", seed=11)
    ref = BatchLoader.from_dataset(ds, 6, **kw)
    ref.set_epoch(2)
    full = _collect(ref)
    run = BatchLoader.from_dataset(ds, 6, **kw)
    run.set_epoch(2)
    it = iter(run)
    head = [next(it) for _ in range(3)]
    state = run.state_dict()
    assert state["epoch"] == 2 and state["position"] == 3 and state["seed"] == 11
    resumed = BatchLoader.from_dataset(ds, 6, **kw)
    resumed.load_state_dict(state)
    rest = _collect(resumed)
    assert _same([(x.clone(), y.clone()) for x, y in head] + rest, full)
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["position"] == 0
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader.from_dataset(ds, 5, **kw).load_state_dict(state)


def test_loader_validates_arguments():
    ds = _toy(n=4)
    with pytest.raises(ValueError, match=r"augment='mixup'.*'crop-flip'"):
        BatchLoader.from_dataset(ds, 2, augment="mixup")
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader.from_dataset(ds, 0)
    with pytest.raises(TypeError, match="uint8"):
        BatchLoader(ds.float_images(), ds.labels, 2)
    with pytest.raises(ValueError, match="labels"):
        BatchLoader(ds.images, ds.labels[:3], 2)


def test_loader_device_argument():
    ds = _toy(n=6)
    loader = BatchLoader.from_dataset(ds, 4, device="cpu", augment="crop-flip")
    x, y = next(iter(loader))
    assert x.device.type == "cpu" and y.device.type == "cpu"
    if torch.cuda.is_available():  # pragma: no cover - exercised on GPU machines
        cpu_batches = _collect(BatchLoader.from_dataset(ds, 4, augment="crop-flip", shuffle=True))
        gpu_batches = _collect(BatchLoader.from_dataset(ds, 4, augment="crop-flip", shuffle=True, device="cuda"))
        assert _same(cpu_batches, [(x.cpu(), y.cpu()) for x, y in gpu_batches])
