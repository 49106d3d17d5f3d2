"""The progress of a long evaluation on disk, so that a stopped one resumes without redoing or losing work.

An evaluation (``sirobust evaluate --out r.json``) owns a run folder beside its report
(``r.evaluation/``, a :class:`~sirobust.runfolder.RunFolder` of kind "evaluate"). Its ``run.json``
records everything that decides the results (the weights' hash, the examples, the threat model,
every attack's settings, the batch size); the clean pass and every finished batch of every attack
are written there atomically as they finish. ``--resume`` checks the record and skips what is done;
since random starts are keyed per example, a resumed evaluation reports exactly what an
uninterrupted one would.

Example::

    with RunFolder("r.evaluation", "evaluate", "new", config=signature) as folder:
        progress = EvaluationProgress(folder.path)
        evaluate(model, data, ..., progress=progress)
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from .io import read_json, write_json


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class EvaluationProgress:
    """Finished work of one evaluation, one small JSON file per batch (written atomically)."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def _path(self, attack: str, start: int) -> Path:
        return self.folder / _slug(attack) / f"batch-{start:09d}.json"

    def clean(self) -> Optional[list]:
        path = self.folder / "clean.json"
        return read_json(path)["correct"] if path.exists() else None

    def save_clean(self, correct: list) -> None:
        write_json(self.folder / "clean.json", {"correct": correct})

    def batch(self, attack: str, start: int) -> Optional[dict]:
        path = self._path(attack, start)
        return read_json(path) if path.exists() else None

    def save_batch(self, attack: str, start: int, result: dict) -> None:
        write_json(self._path(attack, start), result)

    def done_batches(self, attack: str) -> int:
        folder = self.folder / _slug(attack)
        return len(list(folder.glob("batch-*.json"))) if folder.is_dir() else 0
