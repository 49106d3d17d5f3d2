"""A ledger of finished evaluations, kept apart from ``OUT`` so that a grid outlives the machine that ran it.

``sirobust reproduce NAME --ledger DIR`` copies every finished evaluation of a trained run (computed now or
found in ``OUT``) to ``DIR``, one small compressed file each:

    DIR/<dataset>/<model>/<defense>-e<epochs>-<hash>/eval-<key>.json.gz

An entry holds the result exactly as ``OUT`` keeps it (the evaluation's spec, with the sha256 of the weights
that were attacked, and the report, with every example's outcome, which the paired tests need), the run's
``summary.json`` and its training time. Its key is the evaluation's spec with the weights replaced by the
run's resolved configuration (the identity that names the run's folder), which is what another machine knows
before it trains anything.

A table then takes from the ledger the evaluations of any run this machine has not finished: a run whose cells
find all their evaluations there is not trained at all, so a grid grows seed by seed across machines and
sessions, each committing the entries it finished. A run that *is* finished in ``OUT`` is evaluated here, on its
own weights, and its evaluations are added to the ledger where the key is still free; an entry is never
replaced. The table says how many of its cells came from the ledger (``summary["ledger"]``).

Training is not bit-for-bit the same on two machines, so one run must never be represented by two trainings: a
cell whose worst case combined one training's PGD with another's AutoAttack would be a number no model has. The
first machine to file an evaluation of a run records the sha256 of the weights it attacked
(``weights-<which>.json`` in the run's folder); only evaluations of those weights are filed for that run, or
taken from it. A machine whose own training of the run differs files nothing for it (and says so), and uses its
own evaluations, all of them, in its table. A cell's evaluations are filed together, once its last one is done.

Figures attack or perturb the weights themselves, so they never use a ledger. Entries are a results cache,
not a substitute for the weights: the sha256 in each names the file that was attacked, which only the machine
that trained it had.
"""
from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path
from typing import Optional

from ..io import atomic_write_bytes, dumps_json

FORMAT = 1
SUFFIX = ".json.gz"
MAX_BYTES = 64 * 2**20  # an entry of 10,000 examples is tens of KB compressed; refuse a runaway file
# Part of every entry's key: raise it with any change to training that moves the weights a configuration gives
# (a defense's loss, the schedule, the data order), so that the committed evaluations of the old training are not
# taken for runs of the new one. (OUT's evaluations are keyed by the weights' digest and need no such number.)
TRAINING_VERSION = 1
IGNORED = "# temporary files of a write that was stopped\n.*\n!.gitignore\n"


def entry_key(run_key: dict, which: str, attack_spec: dict) -> dict:
    """What an entry is filed under: the evaluation's spec with the run's resolved configuration (and the
    training code's version) where ``OUT`` has the weights' sha256, known only once trained, and which of the
    run's checkpoints was attacked."""
    return {"run": run_key, "training": TRAINING_VERSION, "which": which, **attack_spec}


class Ledger:
    """The entries under one folder (see the module docstring). ``read`` False: entries are filed, never taken
    (``--overwrite``: everything is computed again)."""

    def __init__(self, folder, read: bool = True):
        self.folder = Path(folder).expanduser()
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"--ledger {self.folder}: not a folder")
        self.read = read
        self._cache: dict = {}  # path -> (size, mtime, entry): entries are read again for every cell of a run

    def path(self, run_name: str, key: dict) -> Path:
        from .plan import digest
        return self.folder / run_name / f"eval-{digest(key, 16)}{SUFFIX}"

    def weights_path(self, run_name: str, which: str) -> Path:
        return self.folder / run_name / f"weights-{which}.json"

    def weights(self, run_name: str, which: str) -> Optional[str]:
        """The sha256 of the weights this run is represented by in the ledger, or None before any is filed."""
        path = self.weights_path(run_name, which)
        if not path.is_file():
            return None
        from ..io import read_json
        record = read_json(path, max_bytes=4096)
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise ValueError(f"{path} is not a ledger weights record (a JSON object with a sha256)")
        return record["sha256"]

    def get(self, run_name: str, key: dict) -> Optional[dict]:
        """The entry filed under ``key`` for ``run_name``, or None; one whose stored key differs (a hash
        collision) is not taken, and one whose result was not computed for its key is damaged."""
        path = self.path(run_name, key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        cached = self._cache.get(path)
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            entry = cached[2]
        else:
            entry = read_entry(path)
            self._cache[path] = (st.st_size, st.st_mtime_ns, entry)
        if entry["key"] != json.loads(json.dumps(key)):
            return None
        return {**entry, "path": str(path)}

    def cell(self, run_name: str, which: str, keys: list) -> Optional[list]:
        """The entries of a cell's evaluations when the ledger holds every one, each of the weights the run is
        represented by; else None (also when the ledger is not read)."""
        if not self.read or not keys:
            return None
        sha = self.weights(run_name, which)
        if sha is None:
            return None
        entries = [self.get(run_name, key) for key in keys]
        if any(e is None or e["result"]["spec"]["weights"].get("sha256") != sha for e in entries):
            return None
        return entries

    def file(self, run_name: str, which: str, items: list, summary: dict, train_seconds: float) -> tuple:
        """File a cell's finished evaluations, ``items`` = [(key, result)], where their keys are free; all of them
        attacked the same weights. Returns (how many were filed, the sha256 the run is represented by): when
        that is not these results' weights, nothing is filed."""
        sha = items[0][1]["spec"]["weights"]["sha256"]
        if any(result["spec"]["weights"]["sha256"] != sha for _key, result in items):
            raise ValueError(f"{run_name}: a cell's evaluations attacked different weights; nothing is filed")
        self._ignore_temporary_files()
        owner = self.weights(run_name, which)
        if owner is None:  # the first evaluation of this run: its weights represent the run from now on
            record = {"sha256": sha, "which": which, "filed": _now()}
            _create(self.weights_path(run_name, which), dumps_json(record).encode("utf-8"))
            owner = self.weights(run_name, which)  # another process's, if it was first
        if owner != sha:
            return 0, owner
        filed = 0
        for key, result in items:
            path = self.path(run_name, key)
            if path.exists():
                continue
            entry = {"format": FORMAT, "key": key, "run": {"name": run_name, "summary": summary,
                                                            "train_seconds": float(train_seconds)},
                     "result": {k: v for k, v in result.items() if k != "path"}, "filed": _now()}
            # mtime=0: no date in the gzip header, so an entry is the same bytes wherever it is written
            filed += _create(path, gzip.compress(dumps_json(entry).encode("utf-8"), mtime=0))
        return filed, owner

    def _ignore_temporary_files(self) -> None:
        """A .gitignore in the ledger's root, so that a write killed halfway leaves nothing to commit."""
        ignore = self.folder / ".gitignore"
        if not ignore.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            _create(ignore, IGNORED.encode("utf-8"))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _create(path: Path, data: bytes) -> bool:
    """Write ``path`` whole, unless it exists; False when it did (another process's stays). The file is written
    beside it and linked into place: a link never replaces a file. Where links are not supported, it is moved
    into place after a check, which two processes could race past; a reader never sees half a file either way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = atomic_write_bytes(path.with_name(f".{path.name}.{os.getpid()}.new"), data)
    try:
        os.link(staged, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links
        if path.exists():
            return False
        os.replace(staged, path)
        return True
    finally:
        staged.unlink(missing_ok=True)


def read_entry(path) -> dict:
    """One entry, checked: a damaged or foreign file is a ValueError naming it."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes uncompressed")
        entry = json.loads(data.decode("utf-8"))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path} is not a ledger entry ({type(e).__name__}: {e}); the file is damaged: remove it, "
                         "and the evaluation is computed again") from None
    if not _well_formed(entry):
        raise ValueError(f"{path} is not a ledger entry of format {FORMAT} (or was edited): remove it, and the "
                         "evaluation is computed again")
    return entry


def _well_formed(entry) -> bool:
    """The fields a table reads, of the right types, and a result computed for the entry's own key."""
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        return False
    key, run, result = entry.get("key"), entry.get("run"), entry.get("result")
    if not (isinstance(key, dict) and isinstance(run, dict) and isinstance(result, dict)):
        return False
    spec, report = result.get("spec"), result.get("report")
    if not (isinstance(spec, dict) and isinstance(report, dict) and isinstance(spec.get("weights"), dict)
            and isinstance(run.get("summary"), dict) and isinstance(run.get("train_seconds"), (int, float))):
        return False
    same = {k: v for k, v in spec.items() if k != "weights"} == {k: v for k, v in key.items()
                                                                   if k not in ("run", "training", "which")}
    return same and spec["weights"].get("which") == key.get("which")
