"""Writing and reading files so that nothing is ever half-written, lost, or read without bounds.

* :func:`atomic_write` writes a temporary file beside the target (created with the
  user's umask, like any file the user makes), fsyncs it, renames it over the
  target and fsyncs the folder, so a crash or a power cut leaves either the old
  or the new file, never a torn one.
* A write that fails (disk full, permission lost) raises :class:`OutputError`: one
  line naming the file and the reason, and the previous file is untouched.
* :func:`check_output_file` / :func:`check_output_dir` prove an output can be
  written *before* any work is spent on it.
* :func:`read_json` refuses files larger than a bound before reading them.
* Hashes: every sha256 sirobust records (of a file, of weights in memory, the checksum a
  weights file carries) is :func:`digest` over a stream of bytes; the functions below it say
  which bytes.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Optional, Union

import torch

PathLike = Union[str, os.PathLike]

TMP_SUFFIX = ".tmp"
CHUNK = 1 << 20  # bytes read (and copied) at a time
MAX_JSON_BYTES = 64 * 2**20  # no config, report or summary of ours comes near this


class OutputError(OSError):
    """An output could not be written; the message names the file and the reason (``errno`` kept)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (" (is the disk full?)" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "")
    return str(e) or type(e).__name__


def output_error(path: PathLike, e: BaseException, doing: str = "write") -> OutputError:
    err = OutputError(getattr(e, "errno", None) or errno.EIO, f"cannot {doing} {path}: {_reason(e)}")
    err.filename = str(path)
    return err


def fsync_dir(folder: PathLike) -> None:
    """Make a rename in ``folder`` durable (POSIX needs the directory itself synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. some network filesystems): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _RecordingFile:
    """A binary file that remembers the OSError of a failed write.

    torch.save and safetensors turn a failed write into their own errors
    ("unexpected pos", "I/O error"); the recorded OSError says what happened."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):  # flush, tell, seek, fileno, ... of the real file
        return getattr(self._f, name)


def create_temp(path: Path, suffix: str = TMP_SUFFIX) -> Path:
    """An exclusive new file beside ``path`` (``.NAME.RANDOM{suffix}``), created 0o666 & ~umask (the user's
    permissions)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise OutputError(errno.EEXIST, f"cannot create a temporary file beside {path}")


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a binary file object, then atomically replace ``path`` with it.

    On any failure the old ``path`` is intact, the temporary file is removed, and a
    write error is raised as :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = create_temp(path)
    except OutputError:
        raise
    except OSError as e:
        raise output_error(path, e) from None
    try:
        with open(tmp, "wb") as raw:
            f = _RecordingFile(raw)
            try:
                write(f)  # type: ignore[arg-type]
                raw.flush()
                os.fsync(raw.fileno())
            except BaseException as e:
                if f.error is not None:  # the library's own error hides the OSError: report that one
                    raise output_error(path, f.error) from None
                if isinstance(e, OSError) and not isinstance(e, OutputError):
                    raise output_error(path, e) from None
                raise
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise e if isinstance(e, OutputError) else output_error(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_temp_files(folder: PathLike) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` left in ``folder`` (not recursive).

    Only call this while holding the folder (its lock): a live writer's temp file would go too.
    """
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


# --------------------------------------------------------------------------- checking outputs first

def _probe_writable(folder: Path, what: str, shown: Optional[Path] = None) -> None:
    """Create and delete a file: the only test that also holds for root and read-only mounts."""
    try:
        tmp = create_temp(folder / "write-test")
        tmp.unlink(missing_ok=True)  # a concurrent claim of the folder may have cleaned it already
    except OSError as e:
        raise output_error(shown or folder, e, doing=f"write {what} into") from None


def check_output_dir(folder: PathLike, what: str = "results", create: bool = True) -> Path:
    """Make sure ``folder`` is (or can be made) a writable folder, and create it; with ``create=False``
    nothing is created: the nearest existing ancestor must be a writable folder. Raises OutputError."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(errno.ENOTDIR, f"cannot write {what} into {folder}: it is a file, not a folder")
    existing = folder
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(errno.ENOTDIR, f"cannot write {what} into {folder}: {parent} is a file, not a folder")
            existing = parent
            break
    if not create:
        if existing != folder and not os.access(existing, os.W_OK | os.X_OK):
            raise OutputError(errno.EACCES, f"cannot create the folder {folder}: {existing} is not writable")
        _probe_writable(existing, what, shown=folder)
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(folder, e, doing="create the folder") from None
    _probe_writable(folder, what)
    return folder


def check_output_file(path: PathLike, what: str = "the output", create: bool = True) -> Path:
    """Make sure ``path`` can be written: its folder exists (or is made; with ``create=False`` could be
    made), is writable, and ``path`` is no folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(errno.EISDIR, f"cannot write {what} to {path}: it is a folder (give a file name)")
    check_output_dir(path.parent, what, create)
    return path


# --------------------------------------------------------------------------- JSON

def to_jsonable(obj: Any) -> Any:
    """Make ``obj`` strict-JSON-safe: NaN/inf -> None, tensors/arrays -> lists, paths -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return str(obj)
    if hasattr(obj, "tolist"):  # torch.Tensor, numpy array / scalar
        return to_jsonable(obj.tolist())
    return obj


def dumps_json(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"


def write_json(path: PathLike, obj: Any) -> Path:
    """Strict JSON (no NaN), written atomically."""
    return atomic_write_text(path, dumps_json(obj))


def _read_bounded(path: PathLike, max_bytes: int) -> str:
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path} is {size} bytes, more than the {max_bytes} a sirobust JSON file can be; "
                         "it is not one of ours (or is damaged)")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1).decode("utf-8")


def read_json(path: PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file of at most ``max_bytes``; a damaged one is a ValueError naming it."""
    try:
        return json.loads(_read_bounded(path, max_bytes))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is damaged") from None


def append_jsonl(path: PathLike, obj: Any) -> None:
    """Append one strict-JSON line and flush it to disk (a crash loses at most the line being written)."""
    line = json.dumps(to_jsonable(obj), allow_nan=False)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise output_error(path, e) from None


def read_jsonl(path: PathLike, max_bytes: int = MAX_JSON_BYTES) -> list:
    """Read a JSON-lines file. A torn last line (a crash while appending) is ignored; a bad line
    anywhere else means the file is damaged, and is an error naming it."""
    lines = _read_bounded(path, max_bytes).splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path} is damaged: line {i + 1} is not JSON") from None
    return rows


# --------------------------------------------------------------------------- hashes

def digest(chunks: Iterable[bytes], algorithm: str = "sha256") -> str:
    """The hex digest of the bytes ``chunks`` yield, in order: the one way sirobust hashes."""
    h = hashlib.new(algorithm)
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def file_digest(path: PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    with open(path, "rb") as f:
        return digest(iter(lambda: f.read(CHUNK), b""), algorithm)


def file_sha256(path: PathLike) -> str:
    """The sha256 of a file's bytes, as ``sha256sum`` prints it."""
    return file_digest(path, "sha256")


def bytes_sha256(data: bytes) -> str:
    """The sha256 of bytes already read: :func:`file_sha256` of the file they were read from."""
    return digest([data])


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """The sha256 of a state dict saved as safetensors with sorted keys (no metadata): the same weights give
    the same hash, whatever object holds them."""
    import safetensors.torch
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in sorted(state.items())}
    return bytes_sha256(safetensors.torch.save(cpu))


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in sorted key order (the checksum a
    sirobust weights file records, as safetensors has none)."""
    def chunks():
        for k in sorted(state):
            t = state[k].detach().to("cpu").contiguous()
            yield f"{k}|{t.dtype}|{tuple(t.shape)}|".encode()
            yield t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return digest(chunks())
