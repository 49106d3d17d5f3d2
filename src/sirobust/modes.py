"""Set a model's train/eval mode for a while and restore it exactly.

``model.train(flag)`` recurses into every submodule, so restoring with
``model.train(was_training)`` would flatten a mixed state (a wrapper in train
mode around a model in eval mode, or batch-norm layers a user froze). This
guard records every module's flag and puts each one back.
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
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


def modules_in_train_mode(model: nn.Module) -> list[str]:
    """The names of the modules in train mode whose output depends on it: batch norm and instance norm that
    keep running statistics, dropout, attention with dropout, and any module of the user's own whose code
    names ``training`` (a method of its class that reads ``self.training``). A container in train mode around such modules in
    eval mode (``nn.Sequential(Normalize(), net.eval())``: a new module starts in train mode) is not one."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.dropout import _DropoutNd
    from torch.nn.modules.instancenorm import _InstanceNorm

    def depends(m: nn.Module) -> bool:
        if isinstance(m, (_BatchNorm, _InstanceNorm)):
            return bool(m.track_running_stats)  # without running statistics both modes use the batch's
        if isinstance(m, (_DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout)):
            return m.p > 0
        if isinstance(m, nn.RReLU):  # a random slope in train mode, the mean slope in eval mode
            return True
        if isinstance(m, torch.jit.ScriptModule):  # its compiled code, where a script module keeps it
            try:
                return "training" in m.code
            except Exception:  # noqa: BLE001 (a module without code of its own: unknown, so it may)
                return not any(True for _ in m.children())
        if type(m).__module__.startswith("torch."):  # torch's other layers: those with a dropout rate
            return isinstance(getattr(m, "dropout", None), float) and m.dropout > 0
        return any(_reads_training(f) for cls in type(m).__mro__ if not cls.__module__.startswith(("torch.", "builtins"))
                   for f in vars(cls).values())

    return [name or type(model).__name__ for name, m in model.named_modules() if m.training and depends(m)]


def _reads_training(obj) -> bool:
    """Does this function (or a function nested in it) name an attribute ``training``? Read from the compiled
    code, so it works where the source is not at hand (a notebook, ``python -c``)."""
    try:
        obj = getattr(obj, "__func__", obj)  # classmethod / staticmethod
        wrapped = getattr(obj, "__wrapped__", None)  # a decorated method (@torch.no_grad()): its own code
        if callable(wrapped) and wrapped is not obj and _reads_training(wrapped):
            return True
        code = obj if isinstance(obj, types.CodeType) else getattr(obj, "__code__", None)
        if not isinstance(code, types.CodeType):
            return isinstance(obj, property) and any(_reads_training(f) for f in (obj.fget, obj.fset) if f)
    except Exception:  # noqa: BLE001 (an attribute whose __getattr__ answers anything: not code)
        return False
    return "training" in code.co_names or any(_reads_training(c) for c in code.co_consts
                                               if isinstance(c, types.CodeType))
