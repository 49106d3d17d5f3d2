"""Small helpers shared by the test modules (imported as ``helpers``; pytest puts tests/ on sys.path)."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from sirobust.train import TrainConfig


def small_config(out, **kw) -> TrainConfig:
    """A training run that takes a second or two on a CPU: AT on 384 bundled images."""
    base = dict(dataset="fashion-mnist-mini", model="cnn-small", defense="at", epochs=2, train_n=384, val_n=64,
                val_steps=2, attack_steps=2, batch_size=64, out=str(out), progress=False)
    return TrainConfig(**{**base, **kw})


def tensors(path) -> dict:
    return load_file(str(path))


def assert_same_weights(a, b) -> None:
    """Two weights files hold the same tensors, bit for bit."""
    wa, wb = tensors(a), tensors(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
