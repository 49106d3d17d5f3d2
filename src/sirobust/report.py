"""A robustness report: counts with confidence intervals, who broke what, and where it all came from.

A number in a report carries its count, its denominator and a 95 % Wilson
score interval, so that two reports can be compared honestly; the report names
the attack that first broke each example and says that a worst case over the
attacks run is an upper bound on true robustness. ``provenance`` records what
was measured: the weights' sha256, the model, the data and the examples, the
threat model, every attack's parameters, the seed, device and precision, the
versions, the command line and the time.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .io import PathLike, atomic_write_text, dumps_json, read_json
from .markdown import markdown_table

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def wilson_interval(count: int, n: int, z: float = Z95) -> list[float]:
    """The Wilson score interval for ``count`` successes in ``n`` trials ([0, 1] when n = 0)."""
    if n == 0:
        return [0.0, 1.0]
    p = count / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at 0 and n successes the bound on that side is exactly 0 or 1 (rounding would leave 1e-16 off)
    return [0.0 if count == 0 else max(0.0, centre - half), 1.0 if count == n else min(1.0, centre + half)]


def accuracy(count: int, n: int) -> dict:
    """``{"count", "n", "fraction", "ci95"}``: the count is the record, the rest follows from it."""
    return {"count": int(count), "n": int(n), "fraction": count / n if n else 0.0, "ci95": wilson_interval(count, n)}


UPPER_BOUND_NOTE = ("The worst case is an upper bound on the model's true robust accuracy: it counts the examples that "
                    "no attack run here broke, and a stronger attack may break more.")


@dataclass
class AttackResult:
    name: str
    robust_acc: float        # n_robust / n
    n_robust: int
    n: int                   # examples evaluated (the report's denominator)
    ci95: list
    seconds: float
    max_perturbation: float
    params: dict
    robust: list = field(default_factory=list)  # per evaluated example: still correct after this attack
    excluded: bool = False   # left the threat model: reported, not counted in the worst case
    note: str = ""
    stages: list = field(default_factory=list)           # ensembles: accuracy after each stage
    broken_by_stage: list = field(default_factory=list)  # ensembles: the stage that broke each example
    stats: dict = field(default_factory=dict)            # queries spent, stages skipped, ...


@dataclass
class Report:
    n: int
    clean_acc: float
    clean: dict              # accuracy(count, n)
    attacks: dict            # name -> AttackResult
    worst_case_acc: float
    worst_case: dict         # accuracy(count, n)
    worst_case_robust: list  # per example: correct under every attack counted
    broken_by: list          # per example: None (robust), "clean" (misclassified unattacked) or the first attack
    max_perturbation: float
    eps: float
    norm: str
    indices: list
    config: dict
    flags: list
    environment: dict
    provenance: dict = field(default_factory=dict)
    clean_correct: list = field(default_factory=list)

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return dumps_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        d = dict(d)
        d["attacks"] = {k: AttackResult(**v) for k, v in d["attacks"].items()}
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: PathLike) -> "Report":
        """A report saved by :meth:`save`; any other JSON file is a ValueError naming it."""
        data = read_json(path)
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a sirobust evaluation report (no {e} in it)") from None

    def save(self, path: PathLike, markdown: bool = True) -> Path:
        """Strict JSON written atomically; with ``markdown`` a ``.md`` table beside it, written first: a
        report whose JSON exists is complete (an interrupted save leaves no JSON, and is redone on resume)."""
        path = Path(path)
        if markdown:
            atomic_write_text(path.with_suffix(".md"), self.to_markdown())
        atomic_write_text(path, self.to_json())
        return path

    def __repr__(self) -> str:
        counted = [a for a, r in self.attacks.items() if not r.excluded]
        return (f"Report(n={self.n}, {self.norm} ε={self.eps:.4g}, clean {100 * self.clean_acc:.2f}%, worst case "
                f"{100 * self.worst_case_acc:.2f}% over {', '.join(counted) or 'no attack'})")

    # ------------------------------------------------------------ reading
    def rows(self) -> list[tuple[str, dict, Optional[float], Optional[float], str]]:
        """(label, accuracy dict, seconds, max ‖δ‖, note) for clean, each attack and the worst case."""
        out = [("clean", self.clean, None, None, "")]
        for r in self.attacks.values():
            note = "excluded from the worst case: " + r.note if r.excluded else r.note
            out.append((r.name, accuracy(r.n_robust, r.n), r.seconds, r.max_perturbation, note))
        out.append(("worst case", self.worst_case, None, self.max_perturbation, "upper bound on true robustness"))
        return out

    def broken_counts(self) -> dict:
        """How many examples each attack was the first to break (in the order run)."""
        counts: dict = {}
        for b in self.broken_by:
            if b is not None:
                counts[b] = counts.get(b, 0) + 1
        return counts

    def to_markdown(self) -> str:
        p = self.provenance
        lines = ["# Robustness report", "",
                 f"{self.n} examples of {p.get('dataset') or '?'} ({p.get('split') or '?'}), {self.norm} "
                 f"ε = {self.eps:.6g}; model: {p.get('model') or self.config.get('model_description', '-')}", ""]
        rows = []
        for label, acc, seconds, delta, note in self.rows():
            lo, hi = acc["ci95"]
            bold = "**" if label == "worst case" else ""
            rows.append([f"{bold}{label}{bold}", f"{acc['count']}/{acc['n']}", f"{bold}{100 * acc['fraction']:.2f}{bold}",
                         f"{100 * lo:.1f}–{100 * hi:.1f}", "" if seconds is None else f"{seconds:.1f}",
                         "" if delta is None else f"{delta:.6g}", note])
        lines += markdown_table(["attack", "robust / n", "accuracy (%)", "95% CI (%)", "seconds", "max ‖δ‖", "note"],
                                rows, align="lrrrrrl")
        for r in self.attacks.values():
            if r.stages:
                lines += ["", f"### {r.name}: accuracy after each stage", ""]
                stages = []
                for st in r.stages:
                    after = st["robust_after"]
                    lo, hi = after["ci95"]
                    stages.append([st["name"], st["broke"], f"{after['count']}/{after['n']}",
                                   f"{100 * after['fraction']:.2f}", f"{100 * lo:.1f}–{100 * hi:.1f}"])
                lines += markdown_table(["stage", "broke", "robust after", "accuracy after (%)", "95% CI (%)"], stages,
                                        align="lrrrr")
                for why in r.stats.get("skipped", []):
                    lines.append(f"\nskipped: {why}")
            if r.stats.get("queries"):
                q = r.stats["queries"]
                lines += ["", f"{r.name}: {q['mean']:.0f} queries per example on average, {q['max']:.0f} at most"]
            if r.stats.get("adbd") and not r.stats["adbd"]["found"]:
                lines += ["", f"{r.name}: no decision boundary found within the query budget for any of the "
                              f"{r.stats['adbd']['not_found']} clean-correct examples (no ADBD)"]
            elif r.stats.get("adbd"):
                a = r.stats["adbd"]
                lines += ["", f"{r.name}: ADBD (average L∞ distance to the decision boundary found, over the "
                              f"{a['found']} clean-correct examples where one was found) = {a['mean']:.5f}, median "
                              f"{a['median']:.5f}" + (f"; no boundary found within the budget for {a['not_found']}"
                                                      if a["not_found"] else "")]
        lines += ["", UPPER_BOUND_NOTE, "", "## Which attack broke each example", ""]
        counts = self.broken_counts()
        lines += [f"- {name}: {k} example{'s' if k != 1 else ''} ({'misclassified without attack' if name == 'clean' else 'first to break them'})"
                  for name, k in counts.items()] or ["- none broken"]
        lines += ["", "(per example: `broken_by` in the JSON report)", "", "## Sanity flags", ""]
        triggered = [f for f in self.flags if f["triggered"]]
        lines += [f"- **{f['name']}**: {f['message']}" for f in triggered] or ["none triggered"]
        unchecked = {f["message"] for f in self.flags if not f["triggered"] and f["value"] is None and f["message"]}
        lines += [f"- {message}" for message in sorted(unchecked)]
        lines += ["", "## Provenance", ""]
        lines += markdown_table(None, [*([key, _cell(value)] for key, value in p.items()
                                         if key not in ("attacks", "indices")),
                                       *([f"attack {name}", _cell(params)] for name, params in p.get("attacks", {}).items())],
                                align="ll")
        lines.append("")
        return "\n".join(lines)

    def table(self) -> str:
        """A plain-text table for the terminal, with a line for each sanity flag that fired: a number printed
        without the warnings that qualify it (to_markdown lists them too) would be read as trustworthy."""
        rows = self.rows()
        w = max(len(r[0]) for r in rows)
        out = [f"{'attack':<{w}}  {'robust/n':>11}  accuracy  95% CI          seconds"]
        for label, acc, seconds, _delta, note in rows:
            lo, hi = acc["ci95"]
            out.append(f"{label:<{w}}  {acc['count']:>5}/{acc['n']:<5}  {100 * acc['fraction']:7.2f}%  "
                       f"[{100 * lo:5.1f}, {100 * hi:5.1f}]  {'' if seconds is None else f'{seconds:8.1f}'}"
                       + (f"  ({note})" if note and label != "worst case" else ""))
        out.append(UPPER_BOUND_NOTE)
        out += [f"warning [{f['name']}]: {f['message']}" for f in self.flags if f["triggered"]]
        return "\n".join(out)


def _cell(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
    return text.replace("|", "\\|")
