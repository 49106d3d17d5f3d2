"""Saving the experiments' figures: every plot as PNG (to look at) and PDF (for a paper), written atomically.

Figures are built as bare :class:`matplotlib.figure.Figure` objects on an Agg canvas, never through
``pyplot``: no global backend switch, no figure registry to leak or to close, so plotting is safe in a
library called from anywhere (a notebook with its own backend, a headless run, a thread).

Example::

    fig = new_figure((6, 4))
    ax = fig.add_subplot()
    ax.plot([0, 1], [1, 0])
    saved = save_figure(fig, "out/fig.png")     # out/fig.png and out/fig.pdf
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..io import PathLike, atomic_write

DPI = 120


@dataclass
class SavedFigure:
    """Where a plot was written, and the figure itself (to read back what was drawn)."""

    png: Path
    pdf: Path
    figure: "object"  # matplotlib.figure.Figure (typed loosely: matplotlib is imported lazily)


def new_figure(figsize: tuple = (6, 4)):
    """A matplotlib Figure on an Agg canvas, outside pyplot (nothing global is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)  # attaches itself to fig: savefig and draw need a canvas
    return fig


def figure_paths(path: PathLike) -> tuple[Path, Path]:
    """(PNG path, PDF path) for ``path``: a ``.pdf`` path is the PDF and its PNG sits beside it; any other
    path is written as PNG exactly as named (callers' existing paths keep working) and the PDF takes its
    stem, ``fig.png`` -> ``fig.pdf``."""
    path = Path(path)
    if path.suffix.lower() == ".pdf":
        return path.with_suffix(".png"), path
    return path, path.with_suffix(".pdf")


def save_figure(fig, path: PathLike, dpi: int = DPI) -> SavedFigure:
    """Write ``fig`` as PNG and PDF (see :func:`figure_paths`), each atomically: a crash leaves the old
    file or the new one, never a torn image."""
    png, pdf = figure_paths(path)
    atomic_write(png, lambda f: fig.savefig(f, dpi=dpi, format="png"))
    # no creation date in the PDF: the same figure gives the same bytes (diffable, cacheable)
    atomic_write(pdf, lambda f: fig.savefig(f, format="pdf", metadata={"CreationDate": None}))
    return SavedFigure(png, pdf, fig)
