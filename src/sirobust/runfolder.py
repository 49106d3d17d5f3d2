"""A run folder is owned by one run: the one place that decides who may write where.

Training runs, comparisons, rescaling studies and the demo all write into a
folder of results. :class:`RunFolder` gives each of them the same guarantees
(DESIGN: "one owner for state on disk"):

* **No clobbering.** A folder that holds a run is refused unless the caller
  resumes it (``mode="resume"``) or replaces it (``mode="overwrite"``, which
  moves the old run aside to a dated sibling folder: nothing is deleted). A
  non-empty folder that holds no sirobust run is always refused.
* **One writer.** A lock file (pid, host, command, start time) is created
  atomically and held with ``flock`` while the run lives; a second process is
  refused with a message naming the holder. A lock whose holder is gone (its
  process died without cleaning up) is taken over, with a message.
* **A recorded config.** ``run.json`` records the kind of run, its id, the
  command and its config when the folder is claimed, before any work, so a run
  killed at any moment can be resumed with the config it started with.
* **No debris.** Temporary files of a killed write are removed on the next claim.

Example::

    with RunFolder("runs/at", kind="train", mode="new", config=cfg_dict) as folder:
        ...  # write into folder.path
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import socket
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from ._version import __version__
from .io import OutputError, PathLike, check_output_dir, fsync_dir, read_json, remove_temp_files, write_json

try:
    import fcntl
except ImportError:  # not POSIX: fall back to pid checks alone
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".sirobust.lock"
RUN_FILE = "run.json"
MODES = ("new", "resume", "overwrite")


class RunFolderError(ValueError):
    """The folder cannot be used as asked (holds another run, nothing to resume, not a run folder)."""


class FolderBusy(RunFolderError):
    """Another live process holds the folder's lock."""


class ConfigMismatch(RunFolderError):
    """A run was asked to resume with a configuration other than the one it started with."""


def config_difference(saved: dict, current: dict) -> list[str]:
    """The keys whose values differ between two flat config dicts, sorted."""
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def command_line() -> str:
    """The command that started this process, as a user could paste it again."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("sirobust", "cli.py", "__main__.py")):
        argv[0] = "sirobust"
    return shlex.join(argv)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FolderLock:
    """An exclusive lock on a folder: ``flock`` on a lock file that is never renamed or deleted.

    The kernel releases an flock when its holder dies, however it dies, so there is no stale lock
    to detect or remove, on this machine or another one sharing the folder. The holder writes its
    pid, host, command and start time into the file once it holds the lock (for the messages) and
    empties it on release; finding it non-empty means the last holder was killed.
    """

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    @staticmethod
    def _read(fd: int) -> Optional[dict]:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
            return info if isinstance(info, dict) and "pid" in info else None
        except (OSError, ValueError):
            return None

    def acquire(self, log: Callable[[str], None] = print, what: str = "folder") -> None:
        """Take the lock or raise :class:`FolderBusy` naming the holder."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputError(e.errno, f"cannot create the lock file {self.path}: {e.strerror}") from None
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise FolderBusy(self._busy_message(self._read(fd), what)) from None
                    log(f"warning: {self.path.parent} is on a filesystem without file locks ({e.strerror}): "
                        "nothing keeps a second process out of it")
            previous = self._read(fd)
            if previous is not None:
                log(f"taking over {self.folder}: its last holder, process {previous.get('pid')} on "
                    f"{previous.get('host')} ({previous.get('command', '?')}), ended without releasing it")
            info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": utc_now(),
                               "command": command_line()}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _busy_message(self, info: Optional[dict], what: str) -> str:
        if info is None:
            return (f"{what} {self.folder} is in use: another process holds its lock {self.path}; wait for it "
                    "to finish, or choose another folder")
        return (f"{what} {self.folder} is in use by process {info.get('pid')} on {info.get('host')} since "
                f"{info.get('started')} ({info.get('command', '?')}); wait for it to finish or choose another "
                "folder")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # empty: released cleanly
        except OSError:
            pass
        finally:
            os.close(self._fd)  # releases the flock
            self._fd = None


def _legacy_kind(folder: Path, names: set) -> Optional[str]:
    """The kind of a run written before run.json existed (0.1.0), recognised by the content of its
    files, not their names alone: a folder of someone else's config.json and weights is no run of ours."""
    if "train_state.pt" in names or "train_state.prev.pt" in names:
        return "train"
    shapes = {"config.json": ("train", ("config", "defense", "val_indices")),
              "compare.json": ("compare", ("rows", "checkpoint")),
              "rescale.json": ("rescale", ("alphas", "accuracy")), "demo.json": ("demo", ("runs", "comparison"))}
    for name, (kind, keys) in shapes.items():
        if name in names:
            try:
                content = read_json(folder / name, max_bytes=64 * 2**20)
            except (OSError, ValueError):
                continue
            if isinstance(content, dict) and all(k in content for k in keys):
                return kind
    return None


def _describe(folder: Path) -> Optional[dict]:
    """What run the folder holds: run.json's record, a legacy record, or None (empty / no folder).

    Raises RunFolderError for a non-empty folder that holds no sirobust run."""
    if not folder.is_dir():
        return None
    record = folder / RUN_FILE
    if record.is_file():
        try:
            info = read_json(record, max_bytes=16 * 2**20)
        except ValueError as e:
            raise RunFolderError(f"{record} is damaged ({e}); move the folder aside or choose another --out") from None
        if not isinstance(info, dict) or "kind" not in info:
            raise RunFolderError(f"{record} is not a sirobust run record; choose another folder")
        return info
    names = {p.name for p in folder.iterdir() if p.name != LOCK_NAME}
    names = {n for n in names if not (n.startswith(".") and n.endswith(".tmp"))}
    if not names:
        return None
    kind = _legacy_kind(folder, names)
    if kind is not None:
        return {"kind": kind, "legacy": True}
    raise RunFolderError(f"{folder} is not empty and holds no sirobust run ({', '.join(sorted(names)[:5])}"
                         f"{', ...' if len(names) > 5 else ''}); refusing to write there: choose a new or empty folder")


def aside_name(path: Path) -> Path:
    """A dated sibling name that does not exist yet: runs/at -> runs/at.old-20261128-142501."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.name}.old-{stamp}")
    i = 2
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.old-{stamp}-{i}")
        i += 1
    return candidate


def fresh_name(path: PathLike, companions: tuple = ()) -> Path:
    """``path`` if it is free, else the first free ``path-2``, ``path-3``, ... (suffix kept for files).
    ``companions`` are suffixes of files written beside it (``.md`` beside a report): they must be free too."""
    path = Path(path)

    def free(p: Path) -> bool:
        return not p.exists() and not any(p.with_suffix(c).exists() for c in companions)

    if free(path):
        return path
    stem, suffix = (path.stem, path.suffix) if path.suffix and not path.is_dir() else (path.name, "")
    i = 2
    while not free(path.with_name(f"{stem}-{i}{suffix}")):
        i += 1
    return path.with_name(f"{stem}-{i}{suffix}")


class RunFolder:
    """Claim ``path`` for a run of ``kind`` (see the module docstring).

    ``mode``: ``"new"`` (the folder must be empty or absent), ``"resume"`` (it must
    hold a run of this kind) or ``"overwrite"`` (a run there is moved aside first).
    ``config`` is recorded in ``run.json`` for a new run. After :meth:`claim`,
    ``resumed`` says which case it was and ``record`` holds run.json's content.
    A new run that fails before writing anything leaves no trace, and a run it
    moved aside is put back.
    """

    def __init__(self, path: PathLike, kind: str, mode: str = "new", config: Optional[dict] = None,
                 log: Callable[[str], None] = print, what: str = "run folder"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.path = Path(path)
        self.kind = kind
        self.mode = mode
        self.config = config
        self.log = log
        self.what = what
        self.lock = FolderLock(self.path)
        self.resumed = False
        self._created = False
        self.moved_to: Optional[Path] = None
        self.record: dict = {}

    def __enter__(self) -> "RunFolder":
        self.claim()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self.resumed:
            self._abandon_if_empty()
        self.release()

    def _abandon_if_empty(self) -> None:
        """A new run that failed before writing anything leaves no trace (no run to --resume or --overwrite);
        the run --overwrite moved aside for it is put back."""
        try:
            left = {p.name for p in self.path.iterdir()} - {LOCK_NAME, RUN_FILE}
        except OSError:
            return
        if left:
            return
        (self.path / RUN_FILE).unlink(missing_ok=True)
        if not self._created:
            return
        self.release()
        (self.path / LOCK_NAME).unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            return
        if self.moved_to is not None:
            try:
                os.rename(self.moved_to, self.path)
                self.log(f"put the previous run back in {self.path}")
            except OSError:
                self.log(f"the previous run stays in {self.moved_to}")

    def claim(self) -> "RunFolder":
        if self.mode == "resume" and not self.path.is_dir():  # a typo must not create a folder
            raise RunFolderError(f"nothing to resume: {self.path} does not exist; start without --resume")
        self._created = not self.path.exists()
        check_output_dir(self.path, f"the {self.kind} results")
        had_lock = (self.path / LOCK_NAME).exists()
        self.lock.acquire(self.log, self.what)
        try:
            self._settle()
        except BaseException:
            if not had_lock:  # a refused folder is left as it was found: no lock file of ours, no folder
                (self.path / LOCK_NAME).unlink(missing_ok=True)
            self.lock.release()
            if self._created and self.moved_to is None:
                with contextlib.suppress(OSError):
                    self.path.rmdir()
            raise
        return self

    def _settle(self) -> None:
        existing = _describe(self.path)
        flag_hint = "pass --resume to continue it or --overwrite to move it aside and start again"
        if existing is not None and existing["kind"] != self.kind:
            raise RunFolderError(f"{self.path} holds a {existing['kind']} run, not a {self.kind} run; "
                                 "choose another folder")
        if self.mode == "new" and existing is not None:
            started = f" started {existing['created']}" if existing.get("created") else ""
            raise RunFolderError(f"{self.path} already holds a {self.kind} run{started}; {flag_hint}")
        if self.mode == "resume" and existing is None:
            raise RunFolderError(f"nothing to resume: {self.path} holds no {self.kind} run; start without --resume")
        if self.mode == "overwrite" and existing is not None:
            self._move_aside()
            existing = None
        remove_temp_files(self.path)
        if existing is not None:  # resume
            self.resumed = True
            self.record = existing
            return
        self.record = {"kind": self.kind, "run_id": uuid.uuid4().hex, "created": utc_now(),
                       "host": socket.gethostname(), "command": command_line(), "config": self.config}
        self.record["sirobust"] = __version__
        write_json(self.path / RUN_FILE, self.record)

    def _move_aside(self) -> None:
        old = self.lock
        target = aside_name(self.path)
        try:
            os.rename(self.path, target)  # the held lock file moves with it
        except OSError as e:
            raise OutputError(e.errno, f"cannot move the previous run {self.path} aside to {target}: "
                              f"{e.strerror}") from None
        fsync_dir(self.path.parent)
        self.moved_to = target
        self._created = True
        old.path = target / LOCK_NAME
        old.folder = target
        self.lock = FolderLock(self.path)
        try:
            check_output_dir(self.path, f"the {self.kind} results")
            self.lock.acquire(self.log, self.what)
        finally:
            old.release()
        self.log(f"moved the previous run in {self.path} to {target}")

    def release(self) -> None:
        self.lock.release()
