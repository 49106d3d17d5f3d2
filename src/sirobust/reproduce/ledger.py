"""A ledger of finished evaluations, kept apart from ``OUT`` so that a grid outlives the machine that ran it.

``sirobust reproduce NAME --ledger DIR`` copies every finished evaluation of a trained run (computed now or
found in ``OUT``) to ``DIR``, one compressed file each (about 50 KB for a run of Table 3's mini preset), under
the training that produced the weights it attacked:

    DIR/<dataset>/<model>/<defense>[-si]-e<epochs>-<hash>/<training>/eval-<key>.json.gz

``<training>`` is the first 16 hex digits of the attacked weights' sha256. An entry holds the result exactly as
``OUT`` keeps it (the evaluation's spec, with that sha256, and the report, with every example's outcome, which
the paired tests need), the run's ``summary.json`` and its training time. Its key is the evaluation's spec with
the run's resolved configuration in place of the weights' digest (the identity that names the run's folder):
what another machine knows before it trains anything.

Training is not bit-for-bit the same on two machines, and a cell whose worst case combined one training's PGD
with another's AutoAttack would be a number no model has. So a machine files under its own training, never
blocked by another's, and a table takes a run from the ledger only whole: one training that holds every
evaluation of every cell the table needs of the run (the first such in sorted order), for all of them. A run
that no training covers is trained here, and all its cells are evaluated here. The runner checks, when it writes
a table, that all the cells of each run attacked one set of weights.

An entry is never replaced (a damaged one of this machine's own training is filed again from OUT), and an
evaluation filed again from the same result is the same bytes. Different trainings never share a path, so
ledgers from several machines merge in git without conflicts, unless two machines trained a run bit for bit
alike and each evaluated it (their timings differ; keep either). Figures attack or perturb the weights
themselves, so they never use a ledger. Entries are a results cache, not a substitute for the weights: the
sha256 in each names the file that was attacked, which only the machine that trained it had.
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Optional

from ..io import create_temp, dumps_json

FORMAT = 1
SUFFIX = ".json.gz"
MAX_BYTES = 64 * 2**20  # an entry of 10,000 examples is about 0.5 MB of JSON; refuse a runaway file
# Part of every entry's key: raise it with any change to training that moves the weights a configuration gives
# (a defense's loss, the schedule, the data order; scripts/fingerprint.py before and after a change shows it), so
# that the committed evaluations of the old training are not taken for runs of the new one. OUT's evaluations are
# keyed by the weights' digest and need no such number.
TRAINING_VERSION = 1
IGNORED = "# temporary files of a write that was stopped\n.*\n!.gitignore\n"


def entry_key(run_key: dict, which: str, attack_spec: dict) -> dict:
    """What an entry is filed under: the evaluation's spec with the run's resolved configuration (and the
    training code's version) where ``OUT`` has the weights' sha256, known only once trained, and which of the
    run's checkpoints was attacked."""
    return {"run": run_key, "training": TRAINING_VERSION, "which": which, **attack_spec}


def training_of(sha256: str) -> str:
    """The folder of a training in the ledger: its weights' sha256, shortened."""
    return sha256[:16]


class Ledger:
    """The entries under one folder (see the module docstring). ``read`` False: entries are filed, never taken
    (``--overwrite``: everything is computed again)."""

    def __init__(self, folder, read: bool = True, log=print):
        self.folder = Path(folder).expanduser()
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"--ledger {self.folder}: not a folder")
        self.read = read
        self.log = log  # says which damaged file kept a training from being used

    def path(self, run_name: str, training: str, key: dict) -> Path:
        from .plan import digest
        return self.folder / run_name / training / f"eval-{digest(key, 16)}{SUFFIX}"

    def trainings(self, run_name: str) -> list[str]:
        """The trainings of a run that have entries, in sorted order."""
        folder = self.folder / run_name
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if folder.is_dir() else []

    def get(self, run_name: str, training: str, key: dict) -> Optional[dict]:
        """The entry of ``training`` filed under ``key``, or None; one whose stored key differs (a hash collision)
        is not taken, and one whose result was not computed for its key, or on other weights, is damaged."""
        path = self.path(run_name, training, key)
        if not path.is_file():
            return None
        entry = read_entry(path)
        if training_of(entry["result"]["spec"]["weights"].get("sha256") or "") != training:
            raise ValueError(f"{path} holds an evaluation of other weights than its folder names; remove it")
        if entry["key"] != json.loads(json.dumps(key)):
            return None
        return {**entry, "path": str(path)}

    def covering(self, run_name: str, keys: list) -> Optional[list]:
        """The entries under ``keys`` of the first training of the run that holds every one of them (one training
        for all: never a mixture), or None (also when the ledger is not read, or no key is asked for)."""
        if not self.read or not keys:
            return None
        for training in self.trainings(run_name):
            entries = []
            try:
                for key in keys:
                    entry = self.get(run_name, training, key)
                    if entry is None:
                        break
                    entries.append(entry)
                else:
                    return entries
            except ValueError as e:  # one bad file (a merge gone wrong, a copied folder) spoils its training alone
                self.log(f"[ledger] {e}; training {training} of {run_name} is not used")
        return None

    def file(self, run_name: str, items: list, summary: dict, train_seconds: float) -> int:
        """File finished evaluations of one training of a run, ``items`` = [(key, result)], where their keys are
        free; how many were filed."""
        shas = {result["spec"]["weights"]["sha256"] for _key, result in items}
        if len(shas) != 1:
            raise ValueError(f"{run_name}: these evaluations attacked different weights; nothing is filed")
        training = training_of(shas.pop())
        self._ignore_temporary_files()
        filed = 0
        for key, result in items:
            path = self.path(run_name, training, key)
            if path.exists():
                if self.intact(path):
                    continue
                path.unlink(missing_ok=True)  # damaged (a file is linked whole: not one being written); this
                # training's own result, from OUT, takes its place
            # no date in it, nor in the gzip header (mtime=0): the same result is the same bytes wherever it is
            # filed, so a ledger re-filed from OUT (or merged with a copy of itself) changes nothing
            entry = {"format": FORMAT, "key": key, "run": {"name": run_name, "summary": summary,
                                                            "train_seconds": float(train_seconds)},
                     "result": {k: v for k, v in result.items() if k != "path"}}
            filed += _create(path, gzip.compress(dumps_json(entry).encode("utf-8"), mtime=0))
        return filed

    @staticmethod
    def intact(path: Path) -> bool:
        """Whether an entry is there and reads as one."""
        if not path.exists():
            return False
        try:
            read_entry(path)
            return True
        except ValueError:
            return False

    def _ignore_temporary_files(self) -> None:
        """A .gitignore in the ledger's root, so that a write killed halfway leaves nothing to commit."""
        ignore = self.folder / ".gitignore"
        if not ignore.exists():
            _create(ignore, IGNORED.encode("utf-8"))


def _create(path: Path, data: bytes) -> bool:
    """Write ``path`` whole unless it exists; False when it did (the file there stays). The bytes go to an
    exclusive temporary file beside it, which is then linked into place: a link never replaces a file. Where
    links are not supported, the file is moved into place after a check (two writers could race past it, and the
    second's file, equal in content for an entry, would stay); a reader never sees half a file either way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = create_temp(path)
    try:
        with open(staged, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
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
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError, ValueError,
            RecursionError) as e:
        raise ValueError(f"{path} is not a ledger entry ({type(e).__name__}: {e}); the file is damaged (or holds a "
                         "merge conflict): remove it, and the evaluation is computed again") from None
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
    spec, report, summary = result.get("spec"), result.get("report"), run.get("summary")
    if not (isinstance(spec, dict) and isinstance(report, dict) and isinstance(spec.get("weights"), dict)
            and isinstance(spec["weights"].get("sha256"), str) and isinstance(report.get("n"), int)
            and isinstance(report.get("attacks", {}), dict) and isinstance(summary, dict)
            and isinstance(run.get("train_seconds"), (int, float))):
        return False
    last = summary.get("last")
    if not (isinstance(last, dict) and isinstance(last.get("epoch"), int)):
        return False
    same = {k: v for k, v in spec.items() if k != "weights"} == {k: v for k, v in key.items()
                                                                   if k not in ("run", "training", "which")}
    return same and spec["weights"].get("which") == key.get("which")
