"""Markdown tables: the one writer of every table sirobust prints or saves (reports, reproductions, the demo).

Example::

    markdown_table(["attack", "accuracy (%)"], [["pgd", "41.20"]], align="lr")
    # ['| attack | accuracy (%) |', '|---|---:|', '| pgd | 41.20 |']
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

_RULE = {"l": "---", "r": "---:"}


def markdown_table(header: Optional[Sequence[str]], rows: Iterable[Sequence], align: str) -> list[str]:
    """The lines of a GitHub table: header, rule, one line per row; cells are written with ``str``.

    ``align`` has one letter per column, ``l`` (left) or ``r`` (right: numbers). A table without a header
    (``header=None``) gets a row of blank header cells, ``| | |``, as Markdown needs one."""
    if set(align) - set(_RULE):
        raise ValueError(f"align takes one of l, r per column, got {align!r}")
    top = "|" + " |" * len(align) if header is None else _row(header)
    return [top, "|" + "".join(_RULE[a] + "|" for a in align), *(_row(r) for r in rows)]


def _row(cells: Sequence) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def count(n: int, noun: str) -> str:
    """``1 run``, ``3 runs``, ``0 runs``: a count with its noun (regular plurals only)."""
    return f"{n} {noun}" + ("" if n == 1 else "s")
