"""The progress of a long evaluation on disk, verified when read back, so that a stopped one resumes without
redoing, losing or trusting the wrong work.

An evaluation (``sirobust evaluate --out r.json``) owns a run folder beside its report
(``r.evaluation/``, a :class:`~sirobust.runfolder.RunFolder` of kind "evaluate"); a reproduce grid keeps one
beside each result-to-be. The clean pass and every finished batch of every attack are written there
atomically as they finish; since random starts are keyed per example, a resumed evaluation reports exactly
what an uninterrupted one would.

Every saved batch is read back as the training state is: it carries the key of the evaluation it belongs to
(the model's weights, the examples, the threat model, the attack and its parameters, the batch size and the
precision: :func:`evaluation_key`) and a sha256 of its content. A batch whose key or checksum does not match,
that is not a regular file (a symlink, a FIFO, a device), or that is malformed, is refused by name: the
error says to delete that file or to start afresh with ``--overwrite``. A batch written by a sirobust from
before these checks carries neither and cannot be verified: it is attacked again, never trusted.

Example::

    with RunFolder("r.evaluation", "evaluate", "new", config=signature) as folder:
        progress = EvaluationProgress(folder.path)
        evaluate(model, data, ..., saved=progress)   # evaluate() binds the key before reading anything
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Optional

from .io import read_json, tensors_digest, to_jsonable, write_json

FORMAT = "sirobust-evaluation-batch/1"
MAX_BATCH_BYTES = 16 * 2**20  # a batch of 100,000 examples is a few MB
# what _run_attack reads from every batch, with the JSON types it must have
_FIELDS = {"robust": list, "max_delta": (int, float), "outside": int, "broken": str, "seconds": (int, float)}


class ProgressError(ValueError):
    """A saved batch that cannot be trusted; the message names the file and what to do."""


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _digest(obj) -> str:
    text = json.dumps(to_jsonable(obj), sort_keys=True, allow_nan=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def evaluation_key(model, x, y, indices, batch_size: int, precision: str, threat: dict, attacks: dict) -> dict:
    """What decides an evaluation's saved results: the model's tensors, the examples (pixels, labels and
    their indices, which key the random starts), the threat model, the batch size (batches are cut by it),
    the precision the attacks ran at, and each attack's parameters (``attacks``: name -> params)."""
    data = hashlib.sha256()
    data.update(x.detach().cpu().contiguous().numpy().tobytes())
    data.update(y.detach().cpu().contiguous().numpy().tobytes())
    return {"weights": tensors_digest(model.state_dict()), "data": data.hexdigest(), "indices": _digest(indices),
            "batch_size": batch_size, "precision": precision, "threat": threat,
            # a foreign attack's params are its repr: without the object's address, which no rerun repeats
            "attacks": json.loads(re.sub(r" at 0x[0-9a-fA-F]+", "", json.dumps(to_jsonable(attacks))))}


class EvaluationProgress:
    """Finished work of one evaluation, one small verified JSON file per batch (written atomically)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self._key: Optional[dict] = None

    def bind(self, key: dict) -> None:
        """Tie this progress to one evaluation (:func:`evaluation_key`); nothing is read or written before."""
        self._key = key

    def _key_of(self, attack: str) -> str:
        if self._key is None:
            raise RuntimeError("EvaluationProgress.bind(evaluation_key(...)) must come before any read or write")
        base = {k: v for k, v in self._key.items() if k != "attacks"}
        return _digest({**base, "attack": attack, "params": self._key["attacks"].get(attack)})

    def _path(self, attack: str, start: int) -> Path:
        return self.folder / _slug(attack) / f"batch-{start:09d}.json"

    # ------------------------------------------------------------------ the clean pass
    def clean(self) -> Optional[list]:
        found = self._read(self.folder / "clean.json", "clean", 0)
        if found is None:
            return None
        if not isinstance(found.get("correct"), list) or not all(isinstance(v, bool) for v in found["correct"]):
            raise self._refuse(self.folder / "clean.json", "its 'correct' is not a list of true/false")
        return found["correct"]

    def save_clean(self, correct: list) -> None:
        self._write(self.folder / "clean.json", "clean", 0, {"correct": correct})

    # ------------------------------------------------------------------ attack batches
    def batch(self, attack: str, start: int) -> Optional[dict]:
        path = self._path(attack, start)
        found = self._read(path, attack, start)
        if found is None:
            return None
        for name, kind in _FIELDS.items():
            value = found.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):  # bool is an int to Python, not to us
                raise self._refuse(path, f"its field {name!r} is missing or not a {getattr(kind, '__name__', 'number')}")
        if not all(isinstance(v, bool) for v in found["robust"]):
            raise self._refuse(path, "its 'robust' is not a list of true/false")
        return found

    def save_batch(self, attack: str, start: int, result: dict) -> None:
        self._write(self._path(attack, start), attack, start, result)

    def done_batches(self, attack: str) -> int:
        folder = self.folder / _slug(attack)
        return len(list(folder.glob("batch-*.json"))) if folder.is_dir() else 0

    # ------------------------------------------------------------------ verified files
    def _write(self, path: Path, attack: str, start: int, result: dict) -> None:
        write_json(path, {"format": FORMAT, "key": self._key_of(attack), "attack": attack, "start": start,
                          "sha256": _digest(result), "result": result})

    def _refuse(self, path: Path, why: str) -> ProgressError:
        return ProgressError(f"saved evaluation progress {path}: {why}. It cannot be trusted: delete that file "
                             "(its examples are attacked again when the evaluation resumes), or start the "
                             "evaluation afresh with --overwrite")

    def _read(self, path: Path, attack: str, start: int) -> Optional[dict]:
        """The verified result saved at ``path``; None where nothing usable is saved (no file, or a file from
        before these checks, which is recomputed)."""
        key = self._key_of(attack)
        for part in (self.folder, path.parent, path):  # lstat: a link or a FIFO is refused without being opened
            try:
                mode = os.lstat(part).st_mode
            except FileNotFoundError:
                return None
            if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) if part != path else stat.S_ISREG(mode)):
                what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file" if part == path else \
                    "not a folder"
                raise self._refuse(part, f"it is {what}")
        try:
            saved = read_json(path, max_bytes=MAX_BATCH_BYTES)
        except ValueError as e:
            raise self._refuse(path, str(e).replace(f"{path} ", "", 1)) from None
        if not isinstance(saved, dict):
            raise self._refuse(path, "it is not a JSON object")
        if "format" not in saved and "sha256" not in saved:
            return None  # written before batches were verified: attacked again, never trusted
        if saved.get("format") != FORMAT:
            raise self._refuse(path, f"its format is {saved.get('format')!r}, not {FORMAT!r}")
        if saved.get("attack") != attack or saved.get("start") != start:
            raise self._refuse(path, f"it holds batch {saved.get('start')!r} of {saved.get('attack')!r}, not "
                                     f"batch {start} of {attack!r}")
        if saved.get("key") != key:
            raise self._refuse(path, "it belongs to another evaluation (other weights, examples, threat model, "
                                     "attack parameters, batch size or precision)")
        result = saved.get("result")
        if not isinstance(result, dict) or saved.get("sha256") != _digest(result):
            raise self._refuse(path, "its checksum does not match its content (the file was changed or damaged)")
        return result
