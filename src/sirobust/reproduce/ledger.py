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


def entry_key(run_key: dict, which: str, attack_spec: dict) -> dict:
    """What an entry is filed under: the evaluation's spec with the run's resolved configuration where ``OUT``
    has the weights' sha256 (known only once trained), and which of its checkpoints was attacked."""
    return {"run": run_key, "which": which, **attack_spec}


class Ledger:
    """The entries under one folder (see the module docstring)."""

    def __init__(self, folder):
        self.folder = Path(folder).expanduser()
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"--ledger {self.folder}: not a folder")

    def path(self, run_name: str, key: dict) -> Path:
        from .plan import digest
        return self.folder / run_name / f"eval-{digest(key, 16)}{SUFFIX}"

    def get(self, run_name: str, key: dict) -> Optional[dict]:
        """The entry filed under ``key`` for ``run_name``, or None; one whose stored key differs (a hash
        collision, a hand-edited file) is not taken."""
        path = self.path(run_name, key)
        if not path.is_file():
            return None
        entry = read_entry(path)
        if entry.get("key") != json.loads(json.dumps(key)):
            return None
        return {**entry, "path": str(path)}

    def add(self, run_name: str, key: dict, result: dict, summary: dict, train_seconds: float) -> Optional[Path]:
        """File a finished evaluation unless its key is taken (the first machine's entry stays); the path
        written, or None."""
        path = self.path(run_name, key)
        if path.exists():
            return None
        entry = {"format": FORMAT, "key": key, "run": {"name": run_name, "summary": summary,
                                                        "train_seconds": float(train_seconds)},
                 "result": {k: v for k, v in result.items() if k != "path"},
                 "filed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        # written whole beside it, then linked into place: a link never replaces a file, so of two processes
        # filing the same evaluation at once the first keeps its entry (mtime=0: no date in the gzip header)
        staged = atomic_write_bytes(path.with_name(f".{path.name}.{os.getpid()}.new"),
                                    gzip.compress(dumps_json(entry).encode("utf-8"), mtime=0))
        try:
            os.link(staged, path)
        except FileExistsError:
            return None
        finally:
            staged.unlink(missing_ok=True)
        return path


def read_entry(path) -> dict:
    """One entry, checked: a damaged or foreign file is a ValueError naming it."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes uncompressed")
        entry = json.loads(data.decode("utf-8"))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not a ledger entry ({e}); the file is damaged: remove it, and the "
                         "evaluation is computed again") from None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or not {"key", "run", "result"} <= set(entry):
        raise ValueError(f"{path} is not a ledger entry of format {FORMAT}")
    return entry
