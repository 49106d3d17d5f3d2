"""Downloading and unpacking dataset files safely.

* :func:`download_file` streams a URL (``urllib`` only; ``file://`` works too)
  into a temporary file *in the destination folder*, checks its md5/sha256 and
  only then renames it into place with :func:`os.replace` (atomic on POSIX),
  so a crash or a bad mirror never leaves a half-written or wrong file behind.
* :func:`verify_file` checks a file already on disk. A mismatch moves and
  deletes nothing: the file may be the user's own (a re-compressed copy, a
  patched one); the error names it, the expected and found digests, and the
  way to accept it. Only a file sirobust downloaded itself (recorded in the
  folder's ``.sirobust-downloads.json``) is fetched again over a bad copy.
* :func:`safe_extract` unpacks tar/zip archives after checking *every* member:
  no absolute paths, no ``..`` escapes, no links, no devices (the classic
  "tar slip" attacks, CVE-2007-4559; see also Python's tarfile extraction
  filters, PEP 706).

md5 is used only because it is what dataset authors publish (CIFAR, SVHN,
MNIST); prefer sha256 when you have it.
"""
from __future__ import annotations

import http.client
import os
import shutil
import socket
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Optional, Union

from ..io import CHUNK, create_temp, file_digest, fsync_dir
from .base import DATA_ENV_VAR, ChecksumError, DataNotFoundError

__all__ = ["download_file", "verify_file", "safe_extract", "NETWORK_ERRORS",
           "search_dirs", "not_found_message"]

PathLike = Union[str, os.PathLike]
_TIMEOUT_S = 60.0
_USER_AGENT = "sirobust-data/0.1 (+https://pypi.org/project/sirobust)"

#: Exceptions that mean "could not fetch" (offline, DNS, HTTP error, reset, timeout);
#: disk errors are deliberately not in this list and propagate unchanged.
NETWORK_ERRORS = (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError,
                  http.client.HTTPException)


def _expected(md5: Optional[str], sha256: Optional[str]) -> list[tuple[str, str]]:
    checks = []
    if sha256:
        checks.append(("sha256", sha256.lower()))
    if md5:
        checks.append(("md5", md5.lower()))
    return checks


ACCEPT_HINT = ("If it is the file you mean to use, pass --accept-checksum-mismatch (accept_checksum_mismatch=True "
               "in Python); otherwise replace it with the published file")
_MANIFEST = ".sirobust-downloads.json"


def _mismatch(path: Path, checks: list[tuple[str, str]]) -> Optional[str]:
    """A description of the first digest that differs, or None when all match."""
    for algorithm, want in checks:
        got = file_digest(path, algorithm)
        if got != want:
            return f"{algorithm} mismatch for {path}: expected {want}, found {got}"
    return None


def _manifest(folder: Path) -> dict:
    from ..io import read_json
    try:
        known = read_json(folder / _MANIFEST, max_bytes=1 << 20)
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _downloaded_by_us(path: Path) -> bool:
    return path.name in _manifest(path.parent)


def _record_download(path: Path, sha256: str) -> None:
    import json
    manifest = path.parent / _MANIFEST
    known = _manifest(path.parent)
    known[path.name] = sha256
    from ..io import atomic_write_text
    atomic_write_text(manifest, json.dumps(known, indent=1) + "\n")


def verify_file(path: PathLike, md5: Optional[str] = None, sha256: Optional[str] = None,
                accept_mismatch: bool = False, log=print, source: str = "") -> Path:
    """Check ``path`` against the given digest(s); returns the path.

    A mismatch raises :class:`ChecksumError` naming the file, the expected and the
    found digest and how to proceed, and leaves the file where it is; with
    ``accept_mismatch`` it is logged and the file used. Raises ``ValueError`` if
    neither ``md5`` nor ``sha256`` is given and ``FileNotFoundError`` if the file
    does not exist.
    """
    checks = _expected(md5, sha256)
    if not checks:
        raise ValueError("verify_file: pass md5= and/or sha256=")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verify_file: no such file: {path}")
    problem = _mismatch(path, checks)
    if problem is None:
        return path
    if accept_mismatch:
        log(f"warning: {problem}; using it anyway (--accept-checksum-mismatch)")
        return path
    where = f" ({source})" if source else ""
    raise ChecksumError(f"{problem}{where}. The file was left as it is. {ACCEPT_HINT}.")


def download_file(url: str, dest: PathLike, md5: Optional[str] = None,
                  sha256: Optional[str] = None) -> Path:
    """Download ``url`` to ``dest`` and verify it; returns ``dest``.

    If ``dest`` already exists and matches the digest, nothing is downloaded. If it
    does not match, it is fetched again only when sirobust downloaded it (the
    folder's manifest says so); a file the user placed there is never replaced
    (:class:`ChecksumError`). The data go to a temporary file next to ``dest``,
    which is verified and then atomically renamed; on any failure it is removed.

    Raises:
        ChecksumError: the bytes do not match (nothing new is left on disk).
        DataNotFoundError: the URL could not be fetched (offline, HTTP error...);
            the message says where to put the file by hand.
    """
    dest = Path(dest)
    checks = _expected(md5, sha256)
    if dest.is_file() and checks:
        problem = _mismatch(dest, checks)
        if problem is None:
            return dest
        if not _downloaded_by_us(dest):
            raise ChecksumError(f"{problem}. It was not downloaded by sirobust, so it was left as it is. "
                                f"{ACCEPT_HINT} ({url}).")
    dest.parent.mkdir(parents=True, exist_ok=True)
    day_ago = time.time() - 86400
    for stale in dest.parent.glob(f".{dest.name}.*.part"):  # left by a download killed long ago, not a live one
        try:
            if stale.stat().st_mtime < day_ago:
                stale.unlink()
        except OSError:
            pass
    tmp = _new_part_file(dest)
    try:
        with open(tmp, "wb") as out:
            try:
                _stream(url, out, dest.name)
            except NETWORK_ERRORS as exc:
                raise DataNotFoundError(
                    f"could not download {url} ({_reason(exc)}). If this machine is offline, download "
                    f"that file elsewhere and place it at {dest} (exact name '{dest.name}' in folder "
                    f"{dest.parent})."
                ) from exc
            out.flush()
            os.fsync(out.fileno())
        problem = _mismatch(tmp, checks)
        if problem is not None:
            raise ChecksumError(f"{problem.replace(str(tmp), dest.name)} (downloaded from {url}): the download is "
                                "corrupt or the mirror serves another file; nothing was kept")
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)
    _record_download(dest, file_digest(dest, "sha256"))
    return dest


def _new_part_file(dest: Path) -> Path:
    """An exclusive temporary file beside ``dest`` (``.NAME.RANDOM.part``), created with the user's umask."""
    return create_temp(dest, ".part")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"{type(exc.reason).__name__}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def _stream(url: str, out, label: str) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:  # noqa: S310 (scheme is ours)
        total = response.headers.get("Content-Length")
        progress = _progress(int(total) if total and total.isdigit() else None, label)
        try:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                out.write(chunk)
                if progress is not None:
                    progress.update(len(chunk))
        finally:
            if progress is not None:
                progress.close()


def _progress(total: Optional[int], label: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a progress bar is never essential
        return None
    # disable=None: tqdm turns itself off when stderr is not a terminal (CI logs).
    return tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=None, leave=False)


# --------------------------------------------------------------------------- lookup helpers


def search_dirs(data_dir: Path, name: str, extra: tuple[str, ...] = ()) -> list[Path]:
    """Folders searched for dataset ``name``, in order.

    ``data_dir/<name>/`` comes first: MNIST and Fashion-MNIST use identical
    file names, so the per-dataset folder is the unambiguous place (and where
    downloads go); the bare ``data_dir`` is accepted for convenience.
    """
    dirs = [data_dir / name, data_dir] + [Path(e) for e in extra]
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def not_found_message(name: str, split: str, filenames: list[str], looked: list[Path],
                      dest: Path, urls: list[str], download: bool,
                      error: Optional[BaseException] = None) -> str:
    """The text of a DataNotFoundError: what, where we looked, how to fix it."""
    lines = [f"dataset {name!r} (split {split!r}) not found.",
             "Looked for: " + ", ".join(filenames),
             "in:"]
    lines += [f"  - {d}" for d in looked]
    if not download:
        lines.append("download=False, so nothing was fetched.")
    elif error is not None:
        lines.append(f"Downloading failed: {error}")
    lines.append(
        f"To fix: run load_dataset({name!r}, download=True) on a machine with internet access, "
        f"or fetch {', '.join(urls)} by hand and put the file(s) in {dest}/ with exactly these names: "
        + ", ".join(Path(u).name for u in urls)
        + f". Set ${DATA_ENV_VAR} or pass data_dir= to use another folder."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- extraction


def _check_member_name(name: str, archive: Path) -> PurePosixPath:
    """Reject absolute and escaping member names; return the relative path."""
    norm = name.replace("\\", "/")  # a Windows-made archive may use backslashes
    p = PurePosixPath(norm)
    if not norm or p.is_absolute() or norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise ValueError(f"safe_extract: refusing absolute path member {name!r} in {archive}")
    if ".." in p.parts:
        raise ValueError(f"safe_extract: refusing member {name!r} in {archive}: '..' escapes the destination")
    return p


def _target(dest: Path, rel: PurePosixPath, name: str, archive: Path) -> Path:
    target = (dest / Path(*rel.parts)).resolve() if rel.parts else dest
    # Belt and braces: also catches escapes through symlinks that already exist in dest.
    if target != dest and dest not in target.parents:
        raise ValueError(f"safe_extract: refusing member {name!r} in {archive}: it resolves outside {dest}")
    return target


MAX_EXTRACT_BYTES = 4 * 2**30  # the largest archive here (CIFAR-100, ~180 MB unpacked) is far below


def safe_extract(archive: PathLike, dest: PathLike, max_bytes: int = MAX_EXTRACT_BYTES) -> list[Path]:
    """Extract a tar (any compression) or zip archive into ``dest``.

    Every member is checked before anything is written; only regular files
    and directories are allowed.  Raises ``ValueError`` naming the first bad
    member (absolute path, ``..``, symlink/hardlink, device, fifo), an
    unsupported archive type, or members that unpack to more than
    ``max_bytes`` in total (a decompression bomb).  File modes are not copied
    (no setuid surprises).  Returns the extracted file paths.

    Everything is first unpacked into a hidden folder inside ``dest`` and moved into
    place at the end, so a kill mid-way leaves no half-extracted folder behind, and
    an entry that already exists in ``dest`` (a folder the user may have edited) is
    never overwritten: that is an error naming it.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    if zipfile.is_zipfile(archive):
        extract = _extract_zip
    elif tarfile.is_tarfile(archive):
        extract = _extract_tar
    else:
        raise ValueError(f"safe_extract: {archive} is neither a tar nor a zip archive")
    import secrets
    for old in dest.glob(".extract-*"):  # debris of an extraction killed earlier
        if old.is_dir() and old.stat().st_mtime < time.time() - 3600:
            shutil.rmtree(old, ignore_errors=True)
    staging = dest / f".extract-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        written = extract(archive, staging, max_bytes)
        entries = sorted(staging.iterdir())
        taken = [e.name for e in entries if (dest / e.name).exists()]
        if taken:
            raise ValueError(f"safe_extract: {', '.join(str(dest / t) for t in taken)} already exists (incomplete?); "
                             f"move it away so that {archive.name} can be extracted there")
        for e in entries:
            os.replace(e, dest / e.name)
        fsync_dir(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [dest / p.relative_to(staging) for p in written]


def _check_tar_member(m: tarfile.TarInfo, archive: Path, dest: Path) -> Optional[Path]:
    rel = _check_member_name(m.name, archive)
    if m.issym() or m.islnk():
        raise ValueError(f"safe_extract: refusing link member {m.name!r} -> {m.linkname!r} in {archive}")
    if not (m.isfile() or m.isdir()):
        raise ValueError(f"safe_extract: refusing special member {m.name!r} (device/fifo) in {archive}")
    return _target(dest, rel, m.name, archive)


def _check_total(total: int, max_bytes: int, archive: Path) -> None:
    if total > max_bytes:
        raise ValueError(f"safe_extract: {archive} would unpack to {total} bytes, more than max_bytes={max_bytes}; "
                         "refusing (decompression bomb?)")


def _extract_tar(archive: Path, dest: Path, max_bytes: int) -> list[Path]:
    # Pass 1 validates everything; pass 2 streams ('r|*') so a .tar.gz is
    # decompressed once instead of once per backwards seek.
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            _check_tar_member(m, archive, dest)
        _check_total(sum(m.size for m in members if m.isfile()), max_bytes, archive)
    written = []
    with tarfile.open(archive, "r|*") as tar:
        for m in tar:
            target = _check_tar_member(m, archive, dest)
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None  # regular file
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            written.append(target)
    return written


def _extract_zip(archive: Path, dest: Path, max_bytes: int) -> list[Path]:
    written = []
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        targets = []
        for info in infos:
            rel = _check_member_name(info.filename, archive)
            # Unix mode in the high 16 bits; the file-type bits are often absent
            # (zipfile.writestr records only permissions), which means "regular".
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind == stat.S_IFLNK:
                raise ValueError(f"safe_extract: refusing symlink member {info.filename!r} in {archive}")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ValueError(f"safe_extract: refusing special member {info.filename!r} in {archive}")
            targets.append(_target(dest, rel, info.filename, archive))
        # declared sizes; zipfile stops reading a member at its declared size
        _check_total(sum(i.file_size for i in infos), max_bytes, archive)
        for info, target in zip(infos, targets):
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            written.append(target)
    return written
