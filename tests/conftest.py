"""Shared fixtures: tiny models and one quickly trained cnn-small on the bundled data."""
from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (`make test` runs one worker per core) each worker and every process it starts gets
    # one thread: two workers of two OpenMP threads each on two cores spin against each other and run many
    # times slower. Set before torch is imported, so that its thread pool is sized by it.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))


class LinearModel(nn.Module):
    """logits = W · flatten(x) + b, with a penultimate 'feature' = the flat input."""

    def __init__(self, in_shape=(1, 4, 4), num_classes=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = int(torch.tensor(in_shape).prod())
        self.fc = nn.Linear(d, num_classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(num_classes, d, generator=g))
            self.fc.bias.copy_(torch.randn(num_classes, generator=g))

    def forward(self, x):
        return self.fc(x.flatten(1))


class TinyNet(nn.Module):
    """A foreign (non-zoo) model: conv -> relu -> pool -> linear -> relu -> linear."""

    def __init__(self, channels=1, num_classes=10, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(8 * 16, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        z = torch.relu(self.fc1(self.pool(torch.relu(self.conv(x))).flatten(1)))
        return self.fc2(z)


@pytest.fixture
def linear_model():
    return LinearModel()


@pytest.fixture
def tiny_net():
    return TinyNet().eval()


@pytest.fixture
def image_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 12, 12, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    return x, y


@pytest.fixture(scope="session")
def fmnist_test():
    from sirobust.data import load_dataset
    ds = load_dataset("fashion-mnist-mini", "test")
    return ds.float_images()[:300], ds.labels[:300]


@pytest.fixture(scope="session")
def trained_cnn(tmp_path_factory):
    """A standard cnn-small trained 2 epochs on fashion-mnist-mini (shared by the whole session)."""
    from sirobust import load
    from sirobust.train import TrainConfig, fit
    out = tmp_path_factory.mktemp("std")
    fit(TrainConfig(dataset="fashion-mnist-mini", model="cnn-small", defense="standard", epochs=2,
                    out=str(out), val_n=200, progress=False), log=lambda *_: None)
    return load(out / "model.safetensors")


class _FullDisk:
    """A binary file that takes ``room`` bytes, then fails every write as a full disk does."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data) -> int:
        import errno
        import os
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.fixture
def disk_full(monkeypatch):
    """``disk_full(room=0)``: from now on every file sirobust writes atomically runs out of space
    after ``room`` bytes (the real write path, torch's and safetensors' serialisers included)."""
    import builtins

    import sirobust.io as sio

    def install(room: int = 0):
        def fake_open(path, mode="r", *a, **k):
            f = builtins.open(path, mode, *a, **k)
            return _FullDisk(f, room) if "w" in mode else f
        monkeypatch.setattr(sio, "open", fake_open, raising=False)
    return install
