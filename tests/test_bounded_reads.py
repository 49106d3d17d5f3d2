"""Bounded reads: hostile files are refused before they can make sirobust allocate.

Each hostile input declares far more data than it holds (or nests shared objects
that a naive reader would expand). The loads run in a fresh subprocess that
reports its peak resident memory, so the test measures allocation, not time.
"""
import gzip
import json
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from safetensors.torch import save_file

from sirobust.checkpoint import save_model
from sirobust.models import build_model

# Peak memory a refused input may add on top of the process after its imports. The inputs below would
# need from 160 MB (the evaluate case) to many GB if they were read naively.
BUDGET_MB = 120


def _idx_gz_bomb(path: Path, n: int) -> None:
    """A gzip of a consistent header and n zero images: 200 MB for n = 255,102, in about 200 KB."""
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">III", n, 28, 28))
        chunk = b"\x00" * (28 * 28 * 1000)
        for _ in range(n // 1000):
            f.write(chunk)
        f.write(b"\x00" * (28 * 28 * (n % 1000)))


def _nested_cifar_batch(path: Path) -> None:
    row = list(range(1000))
    table = [row] * 1000          # one list, shared a thousand times: tiny in the pickle
    labels = [table] * 10000      # np.asarray would expand it to 10^10 integers (80 GB)
    with open(path, "wb") as f:  # one real image, so the data check passes and the labels are reached
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [labels]}, f, protocol=2)
    assert path.stat().st_size < 64_000  # the "3.5 KB file that wants 3.4 GB" of the probe, in kind


class _ObjectArray:
    """Pickles as numpy.ndarray((n,), dtype=object): numpy fills it with None pointers, touching all of it."""

    def __init__(self, n: int):
        self.n = n

    def __reduce__(self):
        return (np.ndarray, ((self.n,), np.dtype(object)))


class _CopyOf:
    """Pickles as an array rebuilt from a shared (memoised) raw-bytes state: each one copies it again."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct
        return (_reconstruct, (np.ndarray, (0,), b"b"), self.state)


def _cifar_batch(path: Path, extra: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], **extra}, f, protocol=2)


def _svhn_declaring(path: Path, n: int, dtype=np.uint8) -> None:
    """A compressed .mat whose X declares (32, 32, 3, n): the dims patched inside the zlib stream."""
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 1), dtype), "y": np.ones((1, 1), np.uint8)},
                     do_compression=True)
    raw = bytearray(path.read_bytes())
    pos, out = 128, bytearray(raw[:128])
    while pos < len(raw):
        kind, size = struct.unpack("<II", raw[pos:pos + 8])
        body = bytes(raw[pos + 8:pos + 8 + size])
        if kind == 15:  # miCOMPRESSED
            inner = bytearray(zlib.decompress(body))
            dims = struct.pack("<iiii", 32, 32, 3, 1)
            at = inner.find(dims)
            if at >= 0 and b"X" in inner[at:at + 40]:
                inner[at:at + 16] = struct.pack("<iiii", 32, 32, 3, n)
            body = zlib.compress(bytes(inner))
        out += struct.pack("<II", kind, len(body)) + body
        pos += 8 + size
    path.write_bytes(bytes(out))


def _huge_record_state(path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("s/data.pkl", "w") as f:
            for _ in range(64):
                f.write(b"\x00" * (1 << 20))  # 64 MB that deflate to ~64 KB


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    (d / "fashion-mnist").mkdir()
    _idx_gz_bomb(d / "fashion-mnist" / "t10k-images-idx3-ubyte.gz", 255_102)
    assert (d / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").stat().st_size < 1_000_000
    (d / "fashion-mnist" / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 10))
    (d / "cifar10" / "cifar-10-batches-py").mkdir(parents=True)
    _nested_cifar_batch(d / "cifar10" / "cifar-10-batches-py" / "test_batch")
    _cifar_batch(d / "objects" / "cifar10" / "cifar-10-batches-py" / "test_batch",
                 {b"x": _ObjectArray(2 ** 27)})
    raw = (1, (1 << 20,), np.dtype(np.uint8), False, b"\x00" * (1 << 20))  # 1 MB, stored once
    _cifar_batch(d / "copies" / "cifar10" / "cifar-10-batches-py" / "test_batch",
                 {b"x": [_CopyOf(raw) for _ in range(2000)]})  # 2 GB if each copy were made
    assert (d / "copies" / "cifar10" / "cifar-10-batches-py" / "test_batch").stat().st_size < 2 << 20
    (d / "svhn").mkdir()
    _svhn_declaring(d / "svhn" / "test_32x32.mat", 10_000_000)
    (d / "double" / "svhn").mkdir(parents=True)
    _svhn_declaring(d / "double" / "svhn" / "test_32x32.mat", 26_032, np.float64)  # a legal count, 8 bytes each
    model = build_model("cnn-small")
    path = save_model(model, d / "classes.safetensors", model_name="cnn-small")
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(path)), str(d / "classes.safetensors"), metadata={**meta, "num_classes": str(10 ** 12)})
    state = {k: (v * 100).to(torch.int8) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(state, str(d / "int8.safetensors"), metadata=meta)
    _huge_record_state(d / "train_state.pt")
    with open(d / "big.json", "wb") as f:
        f.truncate(200 * 2**20)  # sparse: 200 MB declared, nothing on disk
    return d


PROBE = textwrap.dedent("""
    import json, resource, sys, torch
    from pathlib import Path
    import sirobust
    from sirobust.data import load_dataset, ImageDataset
    from sirobust.io import read_json
    from sirobust.statefile import read_state
    d = Path(sys.argv[1])
    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cases = {
        "idx": lambda: load_dataset("fashion-mnist", "test", data_dir=d),
        "cifar": lambda: load_dataset("cifar10", "test", data_dir=d),
        "cifar-objects": lambda: load_dataset("cifar10", "test", data_dir=d / "objects"),
        "cifar-copies": lambda: load_dataset("cifar10", "test", data_dir=d / "copies"),
        "svhn": lambda: load_dataset("svhn", "test", data_dir=d, accept_checksum_mismatch=True),
        "svhn-double": lambda: load_dataset("svhn", "test", data_dir=d / "double", accept_checksum_mismatch=True),
        "classes": lambda: sirobust.load(d / "classes.safetensors"),
        "int8": lambda: sirobust.load(d / "int8.safetensors"),
        "state": lambda: read_state(d / "train_state.pt"),
        "json": lambda: read_json(d / "big.json"),
    }
    base = peak_mb()
    out = {}
    for name, fn in cases.items():
        try:
            fn()
            out[name] = {"error": None}
        except Exception as e:
            out[name] = {"error": type(e).__name__, "message": str(e)}
        out[name]["extra_mb"] = peak_mb() - base
    # evaluate -n converts only the examples it evaluates: 160 MB of uint8 images would be 640 MB as floats
    n = 200_000
    ds = ImageDataset(images=torch.zeros(n, 1, 28, 28, dtype=torch.uint8), labels=torch.zeros(n, dtype=torch.long),
                      classes=[str(i) for i in range(10)], name="fashion-mnist-mini", split="test")
    before = peak_mb()
    model = sirobust.build_model("cnn-small", in_channels=1)
    sirobust.evaluate(model, ds, attacks=["fgsm"], eps=0.1, n=16, progress=False)
    out["evaluate"] = {"error": None, "extra_mb": peak_mb() - before}
    print(json.dumps(out))
""")


def test_hostile_inputs_are_refused_with_bounded_memory(hostile):
    r = subprocess.run([sys.executable, "-c", PROBE, str(hostile)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    expect = {
        "idx": ("ValueError", "declares 199999968 bytes of data (dims [255102, 28, 28]), more than the 7840000"),
        "cifar": ("ValueError", "b'labels' must be a list of 1 integers"),
        "cifar-objects": ("UnpicklingError", "builds an array of dtype object"),
        "cifar-copies": ("UnpicklingError", "more data than the file holds"),
        "svhn": ("ValueError", "'X' declares shape [32, 32, 3, 10000000]"),
        "svhn-double": ("ValueError", "'X' must be uint8 and 'y' numeric, found double"),
        "classes": ("CheckpointError", "num_classes=1000000000000 is outside [2, 100000]"),
        "int8": ("CheckpointError", "is I8, but the model needs floating point"),
        "state": ("StateFileError", "compressed record"),
        "json": ("ValueError", "more than the"),
    }
    for name, (kind, text) in expect.items():
        assert out[name]["error"] == kind and text in out[name]["message"], (name, out[name])
    for name, result in out.items():
        assert result["extra_mb"] < BUDGET_MB, (name, result)


def test_a_damaged_weights_file_is_refused(tmp_path):
    import sirobust
    from sirobust.checkpoint import CheckpointError
    path = save_model(build_model("cnn-small"), tmp_path / "m.safetensors", model_name="cnn-small")
    data = bytearray(path.read_bytes())
    data[-100:-90] = b"\x7f" * 10  # inside the tensor data: still a valid file, wrong numbers
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is damaged"):
        sirobust.load(path)


def test_a_state_file_with_a_flipped_byte_is_refused(tmp_path):
    from sirobust.statefile import StateFileError, read_state
    torch.save({"w": torch.zeros(1000)}, tmp_path / "s.pt")
    data = bytearray((tmp_path / "s.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "s.pt").write_bytes(bytes(data))
    with pytest.raises(StateFileError, match="fails its CRC check"):
        read_state(tmp_path / "s.pt")


def test_the_torch_floor_is_declared_and_enforced(monkeypatch):
    import tomllib
    from sirobust import statefile
    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch>=2.10" in deps
    monkeypatch.setattr(statefile.torch, "__version__", "2.9.1+cu121")
    with pytest.raises(statefile.StateFileError, match=r"torch 2.9.1.*CVE-2025-32434.*CVE-2026-24747.*torch>=2.10"):
        statefile.read_state(Path("whatever.pt"))
    monkeypatch.setattr(statefile.torch, "__version__", "2.10.0")
    statefile.require_safe_torch()
