"""Published defenses (paper Table 5): a config entry -> a checked, loaded model.

A reproduction config lists each published model as a table of plain values;
:meth:`PublishedModel.from_dict` checks one, :func:`verify` checks every listed
file against its sha256 before anything is loaded or attacked, and
:func:`load_published` loads one (sha256 first, then the definition, then the
weights, read weights-only through :mod:`sirobust.foreign`).

Files follow RobustBench's layout: ``MODEL_DIR/{dataset}/{threat_model}/{name}.pt``.
A model given only by its RobustBench name is built from the ``robustbench``
package's model zoo; a missing file is downloaded through that package (to a
temporary name, checked, then moved into place). RobustBench's own
``load_model`` is never called: it unpickles with whatever ``torch.load``
defaults to (``weights_only=False`` before torch 2.6 or with
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) and without sirobust's container checks,
so sirobust reads the file itself and applies RobustBench's key fix-ups.

Example::

    specs = [PublishedModel.from_dict(d, where=f"table5.toml models[{i}]") for i, d in enumerate(cfg["models"])]
    verify(specs, "models")                      # raises, listing every bad file, before any attack
    model, prov = load_published(specs[0], "models", device="cuda")
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Optional, Union

from torch import nn

from ..io import file_sha256
from . import ModelLoadError, build_user_model, identify, load_torchscript, load_weights

PathLike = Union[str, os.PathLike]

INSTALL_HINT = "pip install git+https://github.com/RobustBench/robustbench"
DEFAULT_MODEL_DIR = "models"  # RobustBench's default (./models)

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
# Buffers some RobustBench definitions set in __init__ that their checkpoints do not hold (RobustBench loads those
# models with strict=False for this reason); anything else missing or unexpected is refused.
_CONSTRUCTOR_BUFFERS = frozenset({"mu", "sigma", "normalize.mean", "normalize.std"})

class PublishedModelError(ValueError):
    """A published-model entry, file or download that cannot be used; the message says which and what to do."""


@dataclass(frozen=True)
class PublishedModel:
    """One published model, as a reproduction config lists it (see the module docstring)."""

    name: str                          # RobustBench's name, e.g. "Carmon2019Unlabeled"
    definition: Optional[str] = None   # "FILE.py:FACTORY"; a relative FILE resolves against model_dir
    sha256: Optional[str] = None       # of the weights file; required for a file-based model
    dataset: str = "cifar10"
    threat_model: str = "Linf"
    weights: Optional[str] = None      # relative to model_dir; default "{dataset}/{threat_model}/{name}.pt"
    args: dict = field(default_factory=dict)   # keyword arguments of the factory
    mean: Optional[tuple] = None       # normalisation sirobust adds in front (None: the definition has its own)
    std: Optional[tuple] = None
    torchscript: bool = False          # weights is a TorchScript archive (no definition)
    robustbench: Optional[str] = None  # RobustBench name to fetch through the robustbench package when no file
    label: str = ""                    # the paper's row label, e.g. "RST [27] †"
    architecture: str = ""             # e.g. "W-28-10"
    extra_data: bool = False           # † in the paper
    definition_sha256: Optional[str] = None  # of the definition's .py file: it is code, run when the model loads

    def __post_init__(self):
        for key in ("mean", "std"):  # TOML and JSON give lists
            if isinstance(getattr(self, key), list):
                object.__setattr__(self, key, tuple(getattr(self, key)))
        try:
            _check_fields(self)
        except PublishedModelError as e:
            err = PublishedModelError(f"published model {self.name!r}: {e}")
            err.detail = str(e)
            raise err from None

    @classmethod
    def from_dict(cls, d: dict, where: str = "published model") -> "PublishedModel":
        """A checked entry from plain values (a TOML/JSON table); every message names ``where`` and the key."""
        if not isinstance(d, dict):
            raise PublishedModelError(f"{where}: expected a table of keys (name, sha256, ...), got "
                                      f"{type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(str(k), known, 1))
                                 else "") for k in unknown]
            raise PublishedModelError(f"{where}: unknown key {', '.join(hints)}; the keys are {', '.join(known)}")
        if "name" not in d:
            raise PublishedModelError(f"{where}: key 'name' is required (RobustBench's name, e.g. "
                                      "'Carmon2019Unlabeled')")
        try:
            return cls(**d)
        except PublishedModelError as e:
            raise PublishedModelError(f"{where}: {getattr(e, 'detail', e)}") from None

    @property
    def file_based(self) -> bool:
        """Whether sirobust reads a local file through a definition or TorchScript (sha256 required)."""
        return self.definition is not None or self.torchscript

    def describe(self) -> str:
        return self.name + (f" ({self.label})" if self.label else "")


_TYPES = {"name": str, "definition": str, "sha256": str, "dataset": str, "threat_model": str, "weights": str,
          "args": dict, "mean": tuple, "std": tuple, "torchscript": bool, "robustbench": str, "label": str,
          "architecture": str, "extra_data": bool, "definition_sha256": str}
_OPTIONAL = {"definition", "sha256", "weights", "mean", "std", "robustbench", "definition_sha256"}


def _check_fields(m: PublishedModel) -> None:
    for key, kind in _TYPES.items():
        value = getattr(m, key)
        if value is None and key in _OPTIONAL:
            continue
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            want = {str: "a string", dict: "a table", tuple: "a list of numbers", bool: "true or false"}[kind]
            raise PublishedModelError(f"key {key!r} must be {want}, got {type(value).__name__} {value!r}")
    for key in ("name", "dataset", "threat_model", "robustbench"):
        value = getattr(m, key)
        if value is not None and (not _SAFE_NAME.fullmatch(value) or ".." in value):
            raise PublishedModelError(f"key {key!r} must be a plain name (letters, digits, _ . + -; it becomes part "
                                      f"of a file path), got {value!r}")
    for key in ("sha256", "definition_sha256"):
        value = getattr(m, key)
        if value is not None:
            if not _SHA256.fullmatch(value):
                raise PublishedModelError(f"key {key!r} must be 64 hexadecimal digits (as sha256sum prints it), got "
                                          f"{value!r}")
            object.__setattr__(m, key, value.lower())
    if m.definition_sha256 is not None and m.definition is None:
        raise PublishedModelError("key 'definition_sha256' pins the file of 'definition'; there is none")
    for key in ("mean", "std"):
        value = getattr(m, key)
        if value is not None and (not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       for v in value)):
            raise PublishedModelError(f"key {key!r} must be a non-empty list of numbers, one per channel, got "
                                      f"{list(value)!r}")
    if (m.mean is None) != (m.std is None):
        raise PublishedModelError("keys 'mean' and 'std' go together: give both (one value per channel) or neither")
    if m.mean is not None and len(m.mean) != len(m.std):
        raise PublishedModelError(f"key 'mean' has {len(m.mean)} values but 'std' has {len(m.std)}")
    if m.mean is not None and any(v <= 0 for v in m.std):
        raise PublishedModelError(f"key 'std' must be positive, got {list(m.std)}")
    if m.definition is not None and m.torchscript:
        raise PublishedModelError("key 'definition' and 'torchscript = true' exclude each other: a TorchScript "
                                  "archive carries its own code")
    if m.definition is not None:
        file, sep, factory = m.definition.rpartition(":")
        if not sep or not file or not factory:
            raise PublishedModelError(f"key 'definition' must be FILE.py:FACTORY, got {m.definition!r}")
    if m.torchscript and m.robustbench is not None:
        raise PublishedModelError("key 'robustbench' names a state-dict checkpoint; it cannot go with "
                                  "'torchscript = true'")
    if not m.file_based and m.robustbench is None:
        raise PublishedModelError("give 'definition' (FILE.py:FACTORY, with the weights file), 'torchscript = true', "
                                  "or 'robustbench' (a RobustBench model name)")
    if m.file_based and m.sha256 is None:
        raise PublishedModelError("key 'sha256' is required for a model read from a file (its definition or "
                                  "TorchScript archive): the sha256 of the published weights file")
    if m.args and m.definition is None:
        raise PublishedModelError("key 'args' holds the arguments of the factory in 'definition'; there is none")
    if m.mean is not None and not m.file_based:
        raise PublishedModelError("keys 'mean'/'std' apply to a model with a 'definition' or a TorchScript archive; "
                                  "RobustBench's models normalise their inputs themselves")


def weights_path(spec: PublishedModel, model_dir: PathLike) -> Path:
    """Where the weights file is: ``spec.weights`` under ``model_dir``, or RobustBench's
    ``model_dir/{dataset}/{threat_model}/{robustbench or name}.pt``."""
    if spec.weights is not None:
        return Path(model_dir) / spec.weights
    return Path(model_dir) / spec.dataset / spec.threat_model / f"{spec.robustbench or spec.name}.pt"


def definition_path(spec: PublishedModel, model_dir: PathLike) -> Optional[str]:
    """``spec.definition`` with a relative FILE resolved against ``model_dir`` (None without a definition)."""
    if spec.definition is None:
        return None
    file, _, factory = spec.definition.rpartition(":")
    return f"{Path(model_dir) / file}:{factory}"  # an absolute FILE stays as it is


def check_sha256(path: PathLike, expected: Optional[str], what: str, hint: str = "") -> str:
    """The sha256 of ``path``; raises :class:`PublishedModelError` when it is missing or differs from ``expected``
    (``None``: nothing to compare). ``hint`` says what to download and where, for a missing file."""
    path = Path(path)
    if not path.is_file():
        where = f"{path} is a folder, not a file" if path.is_dir() else f"no file at {path}"
        raise PublishedModelError(f"{what}: the weights file is missing ({where}). " +
                                  (hint or f"Download it and put it at {path}") +
                                  (f"; its sha256 must be {expected}" if expected else ""))
    found = file_sha256(path)
    if expected is not None and found != expected.lower():
        raise PublishedModelError(f"{what}: {path} has sha256 {found}, expected {expected.lower()}: not the published "
                                  "file (a partial download, another checkpoint, or a wrong sha256 in the config); "
                                  "replace the file or correct the entry")
    return found


def _missing_hint(spec: PublishedModel, path: Path) -> str:
    if spec.robustbench is not None:
        return (f"It is RobustBench's {spec.robustbench} ({spec.dataset}, {spec.threat_model}): install the "
                f"robustbench package ({INSTALL_HINT}) to have it downloaded there, or download it yourself and put "
                f"it at {path}")
    kind = "TorchScript archive" if spec.torchscript else "weights file"
    return f"Download the published {kind} of {spec.name} and put it at {path}"


def verify(specs: Iterable[PublishedModel], model_dir: PathLike, raise_errors: bool = True,
           download: bool = False) -> list[str]:
    """Check every listed model before any is loaded: its definition file exists, its weights file exists and has
    the listed sha256. A RobustBench model whose file is missing is fetched first with ``download=True`` (and then
    checked); without it, it counts as a problem unless the robustbench package can fetch it later.

    Returns the problems (one line each, every model's); with ``raise_errors`` (default) raises
    :class:`PublishedModelError` listing all of them instead.
    """
    problems: list[str] = []
    seen: dict[str, int] = {}
    specs = list(specs)
    for i, spec in enumerate(specs):
        what = f"model {i} ({spec.describe()})"
        if spec.name in seen:
            problems.append(f"{what}: the name {spec.name!r} is listed twice (also model {seen[spec.name]})")
        seen.setdefault(spec.name, i)
        try:
            definition = definition_path(spec, model_dir)
            if definition is not None and not Path(definition.rpartition(":")[0]).is_file():
                raise PublishedModelError(f"{what}: no definition file at {definition.rpartition(':')[0]}")
            if definition is not None and spec.definition_sha256 is not None:
                check_sha256(definition.rpartition(":")[0], spec.definition_sha256, f"{what} (definition)")
            path = weights_path(spec, model_dir)
            if not path.is_file() and spec.robustbench is not None:
                if download:
                    fetch_robustbench_file(spec, model_dir)
                    continue  # fetched, and its sha256 (when listed) checked before it was moved into place
                _zoo_entry(spec, what, f"{what}: no file at {path}, and it cannot be downloaded because")
                continue  # the package is there: load_published downloads and checks it
            check_sha256(path, spec.sha256, what, _missing_hint(spec, path))
            if not spec.file_based:  # the architecture comes from RobustBench's model zoo
                _zoo_entry(spec, what, f"{what}: RobustBench's architecture is needed, but")
        except PublishedModelError as e:
            problems.append(str(e))
    if problems and raise_errors:
        raise PublishedModelError(f"{len(problems)} of {len(specs)} published models cannot be used (nothing was "
                                  "loaded or attacked):\n  " + "\n  ".join(problems))
    return problems


def load_published(spec: PublishedModel, model_dir: PathLike = DEFAULT_MODEL_DIR, device=None):
    """(model in eval mode on ``device``, provenance) for one published model.

    The weights file's sha256 is checked before the definition is imported or anything is unpickled. A RobustBench
    model without a local file is downloaded through the robustbench package first (its sha256 checked when the
    entry lists one).
    """
    what = f"published model {spec.describe()}"
    path = weights_path(spec, model_dir)
    if not path.is_file() and spec.robustbench is not None:
        fetch_robustbench_file(spec, model_dir)
    digest = check_sha256(path, spec.sha256, what, _missing_hint(spec, path))
    definition = definition_path(spec, model_dir)
    if definition is not None and spec.definition_sha256 is not None:  # before its code runs
        check_sha256(definition.rpartition(":")[0], spec.definition_sha256, f"{what} (definition)")
    try:
        if spec.torchscript:
            model, prov = load_torchscript(path, spec.mean, spec.std, device=device)
        elif definition is not None:
            model, prov = build_user_model(definition, str(path), dict(spec.args), spec.mean, spec.std)
        else:
            model, prov = _load_robustbench_zoo(spec, path)
    except ModelLoadError as e:
        raise PublishedModelError(f"{what}: {e}") from None
    if prov.get("weights_sha256") != digest:  # the file changed between the check and the load
        raise PublishedModelError(f"{what}: {path} changed while it was loaded (sha256 {digest} when checked, "
                                  f"{prov.get('weights_sha256')} when read); load it again")
    # keys of their own: a report's provenance already has "model", "dataset" and "threat_model"
    prov.update(published_model=spec.name, label=spec.label, architecture=spec.architecture,
                extra_data=spec.extra_data, sha256_checked=spec.sha256 is not None,
                definition=prov.get("definition") or definition or ("TorchScript" if spec.torchscript else None),
                published_dataset=spec.dataset, published_threat_model=spec.threat_model)
    if spec.robustbench is not None:
        prov["robustbench"] = spec.robustbench
    if device is not None:
        model = model.to(device)
    return model.eval(), prov


# --- RobustBench -----------------------------------------------------------------------------------------------

def _import_robustbench(why: str = "robustbench:"):
    """(robustbench.utils, the model zoo's (dataset, threat model) -> entries lookup) or a clear error."""
    try:
        import robustbench.utils as rb_utils
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    except ImportError as e:
        if (e.name or "robustbench").split(".")[0] == "robustbench":
            raise PublishedModelError(f"{why} the robustbench package is not installed (it builds RobustBench's "
                                      f"models and downloads their weights): {INSTALL_HINT}; or put the weights file "
                                      "at the expected path, with the expected sha256") from None
        raise PublishedModelError(f"{why} the robustbench package is installed but cannot be imported: {e} (install "
                                  f"its dependencies, or reinstall it: {INSTALL_HINT})") from None
    except Exception as e:  # a robustbench release that does not work with this environment
        raise PublishedModelError(f"{why} the robustbench package cannot be imported ({type(e).__name__}: {e}); "
                                  f"reinstall it ({INSTALL_HINT})") from None
    return rb_utils, model_dicts, BenchmarkDataset, ThreatModel


def _zoo_entry(spec: PublishedModel, what: str, why: str = "") -> dict:
    """RobustBench's model-zoo entry of ``spec`` ({"model": factory, "gdrive_id": ...}) or a clear error."""
    name = spec.robustbench or spec.name
    _, model_dicts, BenchmarkDataset, ThreatModel = _import_robustbench(why or f"{what}:")
    try:
        dataset, threat = BenchmarkDataset(spec.dataset), ThreatModel(spec.threat_model)
    except ValueError:
        raise PublishedModelError(f"{what}: RobustBench has no dataset {spec.dataset!r} with threat model "
                                  f"{spec.threat_model!r} (datasets: {', '.join(d.value for d in BenchmarkDataset)}; "
                                  f"threat models: {', '.join(t.value for t in ThreatModel)})") from None
    zoo = model_dicts.get(dataset, {}).get(threat, {})
    if name not in zoo:
        close = difflib.get_close_matches(name, list(zoo), 3)
        raise PublishedModelError(f"{what}: RobustBench's model zoo has no {name!r} for {spec.dataset} "
                                  f"{spec.threat_model}" + (f" (close: {', '.join(close)})" if close else ""))
    entry = zoo[name]
    gdrive = entry.get("gdrive_id")
    if gdrive is None or isinstance(gdrive, (list, tuple)):
        kind = "a timm model" if gdrive is None else "an ensemble of several checkpoint files"
        raise PublishedModelError(f"{what}: RobustBench's {name} is {kind}; sirobust loads single-checkpoint "
                                  "RobustBench models only (give it a 'definition' and a weights file instead)")
    return entry


def fetch_robustbench_file(spec: PublishedModel, model_dir: PathLike) -> Path:
    """Download RobustBench's checkpoint of ``spec`` to :func:`weights_path` through the robustbench package:
    to a temporary name first, checked to be a weights file with the listed sha256, then moved into place.
    Nothing is unpickled."""
    what = f"published model {spec.describe()}"
    path = weights_path(spec, model_dir)
    if path.is_file():
        return path
    sha = f" (sha256 {spec.sha256})" if spec.sha256 else ""
    entry = _zoo_entry(spec, what, f"{what}: no file at {path}{sha}, and it cannot be downloaded because")
    rb_utils = _import_robustbench()[0]
    download = getattr(rb_utils, "download_gdrive_new", None) or getattr(rb_utils, "download_gdrive", None)
    if download is None:
        raise PublishedModelError(f"{what}: this robustbench version has no download function sirobust knows "
                                  f"(download_gdrive_new, download_gdrive); download RobustBench's "
                                  f"{spec.robustbench or spec.name} yourself and put it at {path}")
    tmp = path.with_name(f".{path.name}.download")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        download(entry["gdrive_id"], tmp)
    except Exception as e:  # no internet, a quota page, a full disk: whatever the downloader raised
        tmp.unlink(missing_ok=True)
        raise PublishedModelError(f"{what}: downloading RobustBench's checkpoint failed ({type(e).__name__}: {e}); "
                                  f"download it yourself and put it at {path}"
                                  + (f" (sha256 {spec.sha256})" if spec.sha256 else "")) from None
    try:
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise PublishedModelError(f"{what}: the download gave no file (no internet?); download RobustBench's "
                                      f"{spec.robustbench or spec.name} yourself and put it at {path}")
        kind = identify(tmp)
        if kind not in ("torch-zip", "safetensors", "torch-legacy"):
            with open(tmp, "rb") as f:
                head = f.read(16)
            raise PublishedModelError(f"{what}: the download is not a weights file (it starts with {head!r}: an "
                                      f"error page?); download it yourself and put it at {path}")
        check_sha256(tmp, spec.sha256, f"{what} (downloaded)")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _load_robustbench_zoo(spec: PublishedModel, path: Path):
    """RobustBench's architecture for ``spec`` with the weights in ``path``, read weights-only by sirobust and fixed
    up as RobustBench does (``module.``/``model.`` prefixes; constructor-set normalisation buffers kept)."""
    what = f"published model {spec.describe()}"
    entry = _zoo_entry(spec, what)
    model = entry["model"]()
    if not isinstance(model, nn.Module):
        raise PublishedModelError(f"{what}: RobustBench's model zoo returned a {type(model).__name__}, not a module")
    state = load_weights(path)  # unwraps {"state_dict": ...}, removes "module."
    want = model.state_dict()
    if not set(state) & set(want):
        for prefix in ("model.",):  # RobustBench removes it too (Chen2020Efficient)
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    buffers = {n for n, _ in model.named_buffers()}
    kept = [k for k in missing if k in _CONSTRUCTOR_BUFFERS and k in buffers]
    missing = [k for k in missing if k not in kept]
    if missing or unexpected:
        raise PublishedModelError(f"{what}: {path} does not fit RobustBench's {spec.robustbench or spec.name}: missing "
                                  f"{missing[:5]}, unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(state, strict=not kept)
    except RuntimeError as e:  # a shape that differs
        lines = str(e).strip().splitlines()
        raise PublishedModelError(f"{what}: {path} does not fit RobustBench's {spec.robustbench or spec.name}: "
                             f"{' '.join(lines[1:3]) or lines[0]}") from None
    name = spec.robustbench or spec.name
    prov = {"model": f"RobustBench {name} ({spec.dataset}, {spec.threat_model})",
            "definition": f"robustbench.model_zoo[{spec.dataset}][{spec.threat_model}][{name}]",
            "weights_file": str(path), "weights_sha256": file_sha256(path), "weights_sha256_of": "file",
            "normalisation": "inside the model (RobustBench's models take pixels in [0, 1])"}
    if kept:
        prov["kept_from_definition"] = kept
    try:
        import robustbench
        prov["robustbench_version"] = getattr(robustbench, "__version__", None)
    except Exception:
        pass
    return model.eval(), prov
