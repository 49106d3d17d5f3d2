"""Loading other people's models: your own (a definition file, a weights file, or a TorchScript archive) here,
the published defenses of the paper's Table 5 in :mod:`.published`.

``sirobust evaluate --model-def net.py:make_net --weights net.pt`` imports
``make_net`` from ``net.py`` (your code, run as you would run it), calls it with
``--model-arg`` values, and loads the weights into it. Weights files are
identified by content, never by name:

* safetensors: tensors only, nothing can run;
* a PyTorch file (``torch.save``): loaded with ``weights_only=True`` on torch >= 2.10,
  after the same container checks as sirobust's own state files;
* anything else (a TorchScript archive, a full pickled model, an unknown
  format) is refused with a message that says what the file is.

A checkpoint that wraps its state dict (``{"state_dict": ...}``, ``{"model": ...}``)
is unwrapped, and the ``module.`` prefix of DataParallel/DDP and the
``_orig_mod.`` prefix of ``torch.compile`` are removed. The normalisation a
model expects comes from its definition or from ``--mean/--std``; it is never
guessed.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..io import file_sha256
from ..models.base import Normalize
from ..statefile import StateFileError, read_state

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "weights", "params")
_PREFIXES = ("module.", "_orig_mod.")


class ModelLoadError(ValueError):
    """A model definition, weights file or TorchScript archive that cannot be used; the message says why."""


def identify(path: Path) -> str:
    """What a file is, by its first bytes: safetensors, torch-zip, torchscript, torch-legacy, or unknown."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        size = int.from_bytes(head[:8], "little")
        if 0 < size < 100 * 2**20 and size + 8 <= path.stat().st_size:
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return "unknown"
        if any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-zip"
        return "zip"
    if head[:1] == b"\x80":
        return "torch-legacy"  # a bare pickle: torch.save's pre-1.6 format or pickle.dump
    return "unknown"


def _describe(kind: str, path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    return {"torchscript": "a TorchScript archive (pass it with --model, not --weights)",
            "zip": "a zip archive that is not a PyTorch file",
            "unknown": f"neither a safetensors file nor a PyTorch weights file (it starts with {head!r})"}.get(kind, kind)


def unwrap_state_dict(obj, path: Path) -> dict:
    """The tensor dict inside a checkpoint, with DataParallel/compile prefixes removed."""
    for _ in range(3):  # {"model": {"state_dict": ...}} happens
        if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise ModelLoadError(f"{path} holds no state dict of tensors (found {keys}); save model.state_dict()")
    for _ in range(4):  # DataParallel(compile(model)) and the like: strip a prefix only when every key has it
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in obj)), None)
        if prefix is None:
            break
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


def load_weights(path) -> dict:
    """The state dict in a safetensors or weights-only PyTorch file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no weights file at {path}")
    kind = identify(path)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return unwrap_state_dict(load_file(str(path)), path)
        except SafetensorError as e:
            raise ModelLoadError(f"{path} is a damaged safetensors file ({e})") from None
    if kind == "torch-zip":
        try:
            return unwrap_state_dict(read_state(path), path)
        except StateFileError as e:
            raise ModelLoadError(str(e).replace("sirobust state", "weights-only PyTorch file")) from None
    if kind == "torch-legacy":
        raise ModelLoadError(f"{path} is a bare pickle (torch.save before 1.6, or pickle.dump), which can run code "
                             "when loaded; sirobust does not load it. Re-save the weights with torch.save(model."
                             "state_dict(), path) on a current torch, or as safetensors")
    raise ModelLoadError(f"{path} is {_describe(kind, path)}")


@contextlib.contextmanager
def _no_exit(doing: str):
    """The user's code may not end sirobust: a ``sys.exit()`` in it (status 0 included, which would end the
    command silently with no report) is an error naming that code."""
    try:
        yield
    except SystemExit as e:
        raise ModelLoadError(f"{doing} called sys.exit({e.code!r}); a model definition must return a model, "
                             "not end the program") from None


def import_factory(spec: str):
    """``"path/to/file.py:factory"`` -> the callable (the file is imported as a module: it is your code)."""
    file, sep, name = spec.rpartition(":")
    if not sep or not file or not name:
        raise ModelLoadError(f"--model-def must be FILE.py:FACTORY (e.g. models/net.py:make_net), got {spec!r}")
    path = Path(file)
    if not path.is_file():
        raise ModelLoadError(f"--model-def: no file {path}")
    module_name = f"sirobust_user_model_{abs(hash(str(path.resolve())))}"
    spec_obj = importlib.util.spec_from_file_location(module_name, path)
    if spec_obj is None or spec_obj.loader is None:
        raise ModelLoadError(f"--model-def: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec_obj)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    with _no_exit(f"--model-def: importing {path}"):
        spec_obj.loader.exec_module(module)
    factory = getattr(module, name, None)
    if not callable(factory):
        names = [n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n])]
        raise ModelLoadError(f"--model-def: {path} defines no callable {name!r}; it has {', '.join(names) or 'none'}")
    return factory


class Normalized(nn.Module):
    """``model(Normalize(mean, std)(x))``: a model that expects normalised inputs, taking [0, 1] pixels."""

    wraps_model = True  # the model inside keeps its own head (sirobust.features finds it through this)

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped model's features, where it exports them (needed for TorchScript models)."""
        fn = getattr(self.model, "forward_features", None) or getattr(self.model, "features", None)
        if fn is None:
            from ..features import FeatureAccessError
            raise FeatureAccessError("the wrapped model exports no forward_features(x) method")
        return fn(self.normalize(x))


def build_user_model(definition: str, weights: Optional[str] = None, model_args: Optional[dict] = None,
                     mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
    """(model in eval mode, provenance fields) from a definition file, optional weights and normalisation."""
    factory = import_factory(definition)
    try:
        with _no_exit(f"--model-def {definition}"):
            model = factory(**(model_args or {}))
    except TypeError as e:
        raise ModelLoadError(f"--model-def {definition}: calling it with {model_args or 'no arguments'} failed ({e}); "
                             "pass its arguments with --model-arg KEY=VALUE") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"--model-def {definition} returned a {type(model).__name__}, not a torch.nn.Module")
    prov = {"model": f"{definition}({json.dumps(model_args or {})})"}
    if weights is not None:
        state = load_weights(weights)
        missing, unexpected = _key_mismatch(model, state)
        if missing or unexpected:
            raise ModelLoadError(f"weights {weights} do not fit {definition}: missing {missing[:5]}, unexpected "
                                 f"{unexpected[:5]}")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise ModelLoadError(f"weights {weights} do not fit {definition}: {' '.join(first[1:3]) or first[0]}") \
                from None
        prov.update(weights_file=str(weights), weights_sha256=file_sha256(weights), weights_sha256_of="file")
    model = _with_normalisation(model, mean, std, prov)
    return model.eval(), prov


def _key_mismatch(model: nn.Module, state: dict) -> tuple[list, list]:
    want = set(model.state_dict())
    return sorted(want - set(state)), sorted(set(state) - want)


def _with_normalisation(model: nn.Module, mean, std, prov: dict) -> nn.Module:
    if (mean is None) != (std is None):
        raise ModelLoadError("--mean and --std go together: give both (one value per channel) or neither")
    if mean is None:
        prov["normalisation"] = ("none added: the model is given pixels in [0, 1] (a normalisation it needs must be "
                                 "part of its definition)")
        return model
    if len(mean) != len(std):
        raise ModelLoadError(f"--mean has {len(mean)} values but --std has {len(std)}")
    prov["normalisation"] = f"(x - mean) / std before the model, mean {list(mean)}, std {list(std)}"
    return Normalized(model, mean, std)


def load_torchscript(path, mean=None, std=None, device=None):
    """(model, provenance) from a TorchScript archive (torch.jit.save); it runs in TorchScript's interpreter."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"--model: no file {path}")
    kind = identify(path)
    if kind != "torchscript":
        raise ModelLoadError(f"--model {path} is not a TorchScript archive but {_describe(kind, path)}; use "
                             "--model-def with --weights for a state dict")
    try:
        model = torch.jit.load(str(path), map_location=device or "cpu")
    except RuntimeError as e:
        raise ModelLoadError(f"--model {path} is a damaged TorchScript archive ({str(e).splitlines()[0]})") from None
    prov = {"model": f"TorchScript {path.name}", "weights_file": str(path), "weights_sha256": file_sha256(path),
            "weights_sha256_of": "file"}
    return _with_normalisation(model, mean, std, prov).eval(), prov
