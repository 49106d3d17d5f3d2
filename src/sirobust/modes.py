"""Set a model's train/eval mode for a while and restore it exactly.

``model.train(flag)`` recurses into every submodule, so restoring with
``model.train(was_training)`` would flatten a mixed state (a wrapper in train
mode around a model in eval mode, or batch-norm layers a user froze). This
guard records every module's flag and puts each one back.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from torch import nn


@contextmanager
def model_mode(model: nn.Module, mode: Optional[str]) -> Iterator[nn.Module]:
    """``with model_mode(model, "eval"):`` ... ; mode in {"eval", "train", None (leave as is)}."""
    if mode not in ("eval", "train", None):
        raise ValueError(f"mode must be 'eval', 'train' or None, got {mode!r}")
    saved = [(m, m.training) for m in model.modules()]
    if mode is not None:
        model.train(mode == "train")
    try:
        yield model
    finally:
        for m, flag in saved:
            m.training = flag
