"""Model weights as ``.safetensors`` with everything needed to rebuild the model.

The metadata holds the architecture name, class and channel counts, the
normalisation and the dataset, so ``sirobust.load(path)`` needs no other
argument. safetensors stores tensors only: loading never runs code from the file.

Example::

    save_model(model, "run/model.safetensors", model_name="resnet18", dataset="cifar10")
    model = sirobust.load("run/model.safetensors")      # or the run folder: its best weights, checkpoint="last"
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import safetensors.torch
import torch
from torch import nn
from safetensors import SafetensorError
from safetensors.torch import safe_open

from .io import PathLike, atomic_write_bytes, bytes_sha256, tensors_digest
from .models import ImageClassifier, build_model

FORMAT_VERSION = "1"
WEIGHTS_NAME = "model.safetensors"   # the last epoch's weights
BEST_NAME = "best.safetensors"       # best validation robust accuracy
BEST_NAME_ALIASES = {"last": WEIGHTS_NAME, "best": BEST_NAME}


class CheckpointError(ValueError):
    """A weights file that is missing, corrupt, or not a sirobust checkpoint."""


# Bounds on what a metadata header may ask us to build (checked before anything is allocated).
MAX_CLASSES = 100_000
MAX_CHANNELS = 64
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_FLOAT_CODES = {"F32", "F16", "BF16", "F64"}


def save_model(model: ImageClassifier, path: PathLike, *, model_name: str, dataset: Optional[str] = None,
               extra: Optional[dict[str, Any]] = None) -> Path:
    """Write ``model``'s weights and rebuild metadata to ``path`` atomically."""
    if not isinstance(model, ImageClassifier):
        raise TypeError("save_model takes a sirobust zoo model (ImageClassifier); "
                        "for other models use safetensors.torch.save_file on their state_dict")
    meta = {
        "sirobust_format": FORMAT_VERSION,
        "model": model_name,
        "dataset": dataset or "",
        "num_classes": str(model.num_classes),
        "in_channels": str(int(model.normalize.mean.shape[1])),
        "mean": json.dumps(model.normalize.mean.flatten().tolist()),
        "std": json.dumps(model.normalize.std.flatten().tolist()),
        "extra": json.dumps(extra or {}, sort_keys=True),
        "head": model.head_type,
        "head_scale": str(getattr(model.head, "scale", "")),
    }
    # clone+contiguous: safetensors refuses shared or strided storage
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta["tensors_sha256"] = tensors_digest(state)  # safetensors has no checksum: a damaged file must not load
    # serialised in memory, written by us: a failed write is then a plain OSError naming the file
    data = safetensors.torch.save(state, metadata=meta)
    return atomic_write_bytes(path, canonical_safetensors(data))


USER_MODEL_PREFIX = "user:"  # the model name a run records for a model of the user's own (user:ClassName)


def save_user_model(model: nn.Module, path: PathLike, *, model_name: str, dataset: Optional[str] = None,
                    extra: Optional[dict[str, Any]] = None) -> Path:
    """Write the weights of a model of the user's own (trained by :func:`sirobust.train.fit`) to ``path``
    atomically: its state dict as safetensors, with the run's metadata and a checksum. sirobust cannot rebuild
    such a model; its own code does: ``model.load_state_dict(safetensors.torch.load_file(path))``, or
    ``sirobust evaluate --model-def FILE.py:FACTORY --weights path``."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"sirobust_format": FORMAT_VERSION, "model": model_name, "dataset": dataset or "",
            "extra": json.dumps(extra or {}, sort_keys=True), "tensors_sha256": tensors_digest(state)}
    return atomic_write_bytes(path, canonical_safetensors(safetensors.torch.save(state, metadata=meta)))


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted: its bytes a function of the tensors and
    the metadata alone. (safetensors writes the metadata from a hash map, in an order that changes from one
    process to the next, so two saves of the same weights had different sha256s: the hash that reports'
    provenance records.) The header is padded with spaces to 8 bytes, as the format allows."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def read_metadata(path: PathLike, checkpoint: str = "best") -> dict[str, str]:
    path = resolve_weights_path(path, checkpoint)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file: {e}") from None
    if meta.get("sirobust_format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has no sirobust metadata (format {meta.get('sirobust_format')!r}); "
                              "it was not written by sirobust.save_model")
    return meta


def resolve_weights_path(path: PathLike, checkpoint: str = "best") -> Path:
    """A weights file, or a run folder's: its best weights (by validation robust accuracy, ``best.safetensors``)
    with ``checkpoint="best"``, falling back to the last epoch's where the run kept no best (no validation);
    with ``checkpoint="last"``, the last epoch's (``model.safetensors``). The CLI's ``--model-dir`` and
    ``--checkpoint`` resolve a folder through this, so Python and the CLI score the same weights."""
    if checkpoint not in BEST_NAME_ALIASES:
        raise ValueError(f"checkpoint must be one of {', '.join(map(repr, BEST_NAME_ALIASES))}, got {checkpoint!r}")
    path = Path(path)
    if path.is_dir():
        best = path / BEST_NAME_ALIASES[checkpoint]
        path = best if best.is_file() else path / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path} (expected a .safetensors file or a run folder containing "
                              f"{WEIGHTS_NAME})")
    return path


def _build_args(meta: dict[str, str], path: Path) -> dict[str, Any]:
    """The model's constructor arguments from the metadata, each checked against its bounds."""
    from .models import list_models

    def field(key: str) -> str:
        if key not in meta:
            raise CheckpointError(f"{path}: the sirobust metadata lacks {key!r}; the file is damaged or was edited")
        return meta[key]

    name = field("model")
    if name.startswith(USER_MODEL_PREFIX):
        raise CheckpointError(f"{path} holds the weights of a model of your own ({name[len(USER_MODEL_PREFIX):]}), "
                              "which sirobust cannot build: build it with your code and load them with "
                              "model.load_state_dict(safetensors.torch.load_file(path)), or evaluate it with "
                              "sirobust evaluate --model-def FILE.py:FACTORY --weights " + str(path))
    if name not in list_models():
        raise CheckpointError(f"{path}: metadata names model {name!r}, not one of {', '.join(list_models())}")
    def parsed(key: str, parse, allowed: str):
        try:
            return parse(field(key))
        except ValueError:
            raise CheckpointError(f"{path}: metadata {key}={field(key)[:40]!r} is not {allowed}; the file is damaged "
                                  "or was edited") from None

    num_classes = parsed("num_classes", int, "a whole number")
    in_channels = parsed("in_channels", int, "a whole number")
    mean = parsed("mean", json.loads, "a JSON list of numbers")
    std = parsed("std", json.loads, "a JSON list of numbers")
    if not 2 <= num_classes <= MAX_CLASSES:
        raise CheckpointError(f"{path}: metadata num_classes={num_classes} is outside [2, {MAX_CLASSES}]")
    if not 1 <= in_channels <= MAX_CHANNELS:
        raise CheckpointError(f"{path}: metadata in_channels={in_channels} is outside [1, {MAX_CHANNELS}]")
    for key, values in (("mean", mean), ("std", std)):
        if (not isinstance(values, list) or len(values) != in_channels
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            raise CheckpointError(f"{path}: metadata {key} must list {in_channels} finite numbers, got {str(values)[:80]}")
    if any(v <= 0 for v in std):
        raise CheckpointError(f"{path}: metadata std must be positive, got {std}")
    head = meta.get("head", "linear")
    if head not in ("linear", "cosine"):
        raise CheckpointError(f"{path}: metadata head={head!r} is not 'linear' or 'cosine'")
    scale = None
    if head == "cosine":
        try:
            scale = float(field("head_scale"))
        except ValueError:
            scale = float("nan")
        if not (math.isfinite(scale) and scale > 0):
            raise CheckpointError(f"{path}: metadata head_scale={meta.get('head_scale')!r} must be a number > 0")
    return dict(name=name, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, scale=scale)


def _build(args: dict[str, Any]) -> ImageClassifier:
    model = build_model(args["name"], num_classes=args["num_classes"], in_channels=args["in_channels"],
                        mean=args["mean"], std=args["std"])
    if args["scale"] is not None:  # HE-trained models predict with s · cos θ
        model.use_cosine_head(args["scale"])
    return model


def _header(data: bytes, path: Path) -> tuple[dict, dict]:
    """(metadata, tensor entries) from a safetensors file's bytes; the header length is checked first."""
    if len(data) < 8:
        raise CheckpointError(f"{path} is not a readable .safetensors file: {len(data)} bytes")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, 100 * 2**20):
        raise CheckpointError(f"{path} is not a readable .safetensors file: its header declares {n} bytes")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a readable .safetensors file: a header that is not a table")
    meta = header.pop("__metadata__", None) or {}
    return meta, header


def _check_tensors(path: Path, found: dict, expected: dict[str, torch.Tensor], name: str) -> None:
    """Every tensor the model needs is in the file with its shape and dtype, and nothing else is."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"weights in {path} do not match model {name!r} (named in its metadata): "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, t in expected.items():
        entry = found[k] if isinstance(found[k], dict) else {}
        shape, code = tuple(entry.get("shape", ())), entry.get("dtype")
        want = _ST_DTYPES.get(t.dtype, str(t.dtype))
        if t.is_floating_point() and code not in _FLOAT_CODES:
            raise CheckpointError(f"{path}: tensor {k!r} is {code}, but the model needs floating point ({want})")
        if not t.is_floating_point() and code != want:
            raise CheckpointError(f"{path}: tensor {k!r} is {code}, but the model needs {want}")
        if shape != tuple(t.shape):
            raise CheckpointError(f"{path}: tensor {k!r} has shape {list(shape)}, the model needs {list(t.shape)}")


def _device(device) -> torch.device:
    """``device`` checked before any work: a name torch knows, and CUDA only where there is CUDA."""
    try:
        target = torch.device(device or "cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but this torch ({torch.__version__}) sees no CUDA device; "
                         "use device='cpu'")
    return target


def load(path: PathLike, device: Optional[str | torch.device] = None, checkpoint: str = "best") -> ImageClassifier:
    """Rebuild a zoo model from a sirobust ``.safetensors`` file or run folder (in eval mode).

    From a run folder, ``checkpoint`` picks the weights as ``sirobust evaluate --model-dir --checkpoint`` does:
    ``"best"`` (default) the best by validation robust accuracy, or the last epoch's where the run kept no
    best; ``"last"`` the last epoch's (:func:`resolve_weights_path`). It is ignored for a file.

    The file is read once: its sha256, header and tensors all come from the same bytes (a save in
    progress cannot mix two versions). The metadata and every tensor's shape and dtype are checked
    against the architecture (built on the meta device, which allocates nothing) before the weights
    are materialised, and the tensors against the checksum recorded when they were saved.
    """
    target = _device(device)
    path = resolve_weights_path(path, checkpoint)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    meta, entries = _header(data, path)
    if meta.get("sirobust_format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has no sirobust metadata (format {meta.get('sirobust_format')!r}); "
                              "it was not written by sirobust.save_model")
    args = _build_args(meta, path)
    with torch.device("meta"):
        skeleton = _build(args)
    _check_tensors(path, entries, skeleton.state_dict(), args["name"])
    model = _build(args)
    try:
        state = safetensors.torch.load(data)
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"weights in {path} do not match model {meta['model']!r}: {e}") from None
    if "tensors_sha256" in meta and tensors_digest(state) != meta["tensors_sha256"]:
        raise CheckpointError(f"{path} is damaged: its tensors do not match the checksum recorded when it was saved")
    # provenance for reports: what the file says, where it was and the sha256 of its bytes
    model.sirobust_metadata = {**meta, "file": str(path), "file_sha256": bytes_sha256(data)}
    del data
    return model.to(target).eval()
