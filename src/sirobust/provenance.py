"""Where a number came from: the weights' hash, the command, versions, git commit, device, time."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ._version import __version__
from .io import state_dict_sha256, tensors_digest


def git_commit() -> str | None:
    """The commit of the sirobust checkout, or None when not in a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment_info() -> dict:
    import numpy
    return {
        "sirobust": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
        "python": sys.version.split()[0], "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # a CPU's floating-point sums depend on the processor and the thread count, so the same run on
        # another machine, or with another number of threads, gives other weights (docs/reproduction.md)
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "git_commit": git_commit(),
    }


def cpu_name() -> str:
    """The processor's model name (floating-point kernels, so the last digits of a result, depend on it)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _loaded_from_file(model: nn.Module) -> Optional[tuple[nn.Module, dict]]:
    """The module sirobust.load built and its metadata: ``model`` itself, or the ``.model`` of a wrapper
    that adds no parameters or buffers of its own (the rescaling study's α·model)."""
    inner = getattr(model, "model", None)
    for m in (model, inner):
        meta = getattr(m, "sirobust_metadata", None)
        if isinstance(meta, dict) and meta.get("file_sha256"):
            if m is inner and set(model.state_dict()) != {f"model.{k}" for k in inner.state_dict()}:
                return None
            return m, meta
    return None


def weights_identity(model: nn.Module) -> dict:
    """``weights_sha256`` of the file the model was loaded from (sirobust.load records it) when its weights
    still equal the file's (checked against the tensor checksum the file records), else of its state dict;
    ``weights_sha256_of`` says which."""
    found = _loaded_from_file(model)
    if found is not None:
        m, meta = found
        if "tensors_sha256" not in meta:
            return {"weights_sha256": meta["file_sha256"], "weights_file": meta.get("file"),
                    "weights_sha256_of": "file (not re-verified: the file records no tensor checksum)"}
        if tensors_digest(m.state_dict()) == meta["tensors_sha256"]:
            return {"weights_sha256": meta["file_sha256"], "weights_sha256_of": "file", "weights_file": meta.get("file")}
    return {"weights_sha256": state_dict_sha256(model.state_dict()), "weights_sha256_of": "state dict (safetensors, sorted keys)",
            "weights_file": None}


def precision_of(model: nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).replace("torch.", "")
    return "float32"


def model_description(model: nn.Module) -> Optional[str]:
    meta = getattr(model, "sirobust_metadata", None)
    if isinstance(meta, dict) and meta.get("model"):
        return f"sirobust zoo model {meta['model']}" + (f" ({meta['head']} head)" if meta.get("head") == "cosine" else "")
    return f"{type(model).__module__}.{type(model).__qualname__}"
