"""Resume state on disk: written in two generations, read with every guard we have.

A training state (weights, optimiser, scheduler, RNG streams, position) is a
torch pickle, the only pickle sirobust reads. It is loaded with
``weights_only=True``, which refuses arbitrary objects, but that guard can be
bypassed in torch before 2.10 (CVE-2025-32434, CVE-2026-24747), so loading
refuses older torch versions. Before unpickling, the zip container is checked:
torch writes its records uncompressed, so no record may declare more bytes than
the file holds (a small file cannot make us allocate gigabytes), and every
record's CRC is verified (torch does not: a damaged file would load as wrong weights).

:func:`save_state` keeps the previous generation as ``<name>.prev.pt``; a damaged
or missing current file falls back to it, so a kill at any moment, even between
the two renames, leaves a usable checkpoint.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Callable, Optional

import torch

from .io import PathLike, atomic_write, fsync_dir, output_error

# The first torch release whose weights_only loading is not known to be bypassable.
MIN_TORCH_FOR_PICKLES = (2, 10)
_KNOWN_BYPASSES = "CVE-2025-32434 (before 2.6) and CVE-2026-24747 (before 2.10)"


class StateFileError(ValueError):
    """A state file that is damaged, hostile, or unusable; the message names it."""


def torch_version_tuple(version: Optional[str] = None) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", torch.__version__ if version is None else version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def require_safe_torch(what: str = "a pickled state file") -> None:
    """Refuse to unpickle anything with a torch whose ``weights_only`` guard is known to be bypassable."""
    if torch_version_tuple() < MIN_TORCH_FOR_PICKLES:
        need = ".".join(map(str, MIN_TORCH_FOR_PICKLES))
        raise StateFileError(f"refusing to load {what} with torch {torch.__version__}: its weights_only loading can be "
                             f"bypassed ({_KNOWN_BYPASSES}); install torch>={need}")


def prev_path(path: PathLike) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_state(path: PathLike, state: dict) -> Path:
    """Write ``state`` atomically to ``path``; the file it replaces becomes ``<name>.prev.pt``."""
    path = Path(path)
    tmp_done = path.with_name(f".{path.name}.new.tmp")  # removed with the other debris on the next claim
    atomic_write(tmp_done, lambda f: torch.save(state, f))
    try:
        if path.exists():
            os.replace(path, prev_path(path))  # a kill here leaves .prev and .new: load_state uses .prev
        os.replace(tmp_done, path)
    except OSError as e:
        raise output_error(path, e) from None
    fsync_dir(path.parent)
    return path


def _check_container(path: Path) -> None:
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise StateFileError(f"{path} is not a torch state file ({e})") from None
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED:
            raise StateFileError(f"{path} has a compressed record {i.filename!r}; torch never writes one (refused)")
        if i.file_size > size:
            raise StateFileError(f"{path} declares a record {i.filename!r} of {i.file_size} bytes in a file of "
                                 f"{size} (refused)")
    if sum(i.file_size for i in infos) > size:
        raise StateFileError(f"{path} declares more bytes than it holds (refused)")
    try:  # torch does not check the records' CRC32: a flipped byte would load as silently wrong weights
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise StateFileError(f"{path} is damaged ({e})") from None
    if bad is not None:
        raise StateFileError(f"{path} is damaged: record {bad!r} fails its CRC check")


def _why_unreadable(e: BaseException) -> str:
    """The reason torch.load gave, in one sentence of ours: a weights_only refusal names the object the file
    would build, without torch's advice to load it with weights_only=False (sirobust never does)."""
    text = str(e).strip()
    if "Weights only load failed" in text:
        found = re.search(r"(?:unsupported|Unsupported) (?:global: )?GLOBAL ([\w.]+)", text)
        what = f"it would build {found.group(1)}" if found else "it holds objects other than tensors and plain data"
        return f"{what}, which a safe load refuses; sirobust never unpickles arbitrary objects"
    first = text.splitlines()[0] if text else type(e).__name__
    return first if len(first) <= 300 else first[:first.rfind(" ", 0, 300)] + " …"


def read_state(path: PathLike, device: Optional[torch.device | str] = "cpu") -> dict:
    """Load one state file with every check; raises :class:`StateFileError` naming it."""
    path = Path(path)
    require_safe_torch(str(path))
    _check_container(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # weights_only refusals, truncation, bad records: all "not usable"
        raise StateFileError(f"{path} is not a readable sirobust state ({_why_unreadable(e)})") from None
    if not isinstance(state, dict):
        raise StateFileError(f"{path} does not hold a sirobust state (a {type(state).__name__})")
    return state


def load_state(path: PathLike, device=None, log: Callable[[str], None] = print,
               check: Optional[Callable[[dict, Path], None]] = None) -> Optional[tuple[dict, Path]]:
    """The newest usable generation of the state at ``path``: (state, the file it came from).

    ``None`` when neither ``path`` nor its previous generation exists. A damaged
    current file (or one ``check`` rejects with StateFileError) is reported in
    one line and the previous generation is used; if no generation is usable,
    the first error is raised.
    """
    path = Path(path)
    errors = []
    candidates = [p for p in (path, prev_path(path)) if p.exists()]
    if not candidates:
        return None
    for p in candidates:
        try:
            state = read_state(p, device)
            if check is not None:
                check(state, p)
        except StateFileError as e:
            errors.append(e)
            continue
        if errors:
            log(f"warning: {errors[0]}; using the previous checkpoint {p.name} instead")
        elif p != path:
            log(f"warning: {path.name} is missing (a kill between two renames); using {p.name}")
        return state, p
    if len(errors) > 1:  # say that no generation is left, and what is not lost
        raise StateFileError(f"{errors[0]}; its previous generation too: {errors[1]}. No saved state of this run can "
                             "be resumed (the weights files beside it are separate and checked when read); "
                             "--overwrite starts the run again")
    raise errors[0]
