"""The paper's figures from a plan: train (or reuse) the models, compute the figure's data, plot it.

The data is computed once and kept in ``OUT/figN-PRESET/figure.json`` with the settings it was
computed with; a second run with the same settings and the same weights re-plots from it.
Every figure is written as PNG and PDF, titled with the dataset, the model and ε.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..io import read_json, write_json
from ..provenance import environment_info
from ..runfolder import command_line
from .plan import display


def _rows(runner, wanted) -> list:
    """The plan's cells whose rows are named in ``wanted`` (all when None), in the config's order."""
    cells = runner.plan.cells
    if wanted:
        missing = [w for w in wanted if w not in [c.row.label for c in cells]]
        if missing:
            raise ValueError(f"figure: no row labelled {', '.join(missing)} (rows: "
                             f"{', '.join(c.row.label for c in cells)})")
        cells = [c for c in cells if c.row.label in wanted]
    return cells


def _eps(runner, dataset: str) -> float:
    from ..data import get_dataset_info
    from .runner import _number
    eps = runner.plan.eval.get("eps")
    return get_dataset_info(dataset).default_eps if eps is None else _number(eps)


def _title(cell, eps: float, what: str) -> str:
    t = cell.train
    return f"{what}: {display('dataset', t.dataset)}, {display('model', t.model)}, L∞ ε = {eps:.4g}"


def make_figure(runner, target: Path) -> dict:
    """Compute and plot the plan's figure into ``target``; returns the figure's summary."""
    t0 = time.time()
    plan = runner.plan
    runner.train_all()
    kind = plan.experiment.figure_kind
    fig = plan.figure
    cells = _rows(runner, fig.get("models") or ([fig["model"]] if fig.get("model") else None))
    weights = {c.row.label: runner.job_spec(c, c.jobs[0])["weights"] for c in cells}
    spec = {"figure": kind, "settings": fig, "eval": {k: plan.eval[k] for k in ("n", "steps", "seed", "eps", "which")
                                                      if k in plan.eval}, "weights": weights}
    target.mkdir(parents=True, exist_ok=True)
    data_path = target / "figure.json"
    data = None
    if data_path.exists():
        saved = read_json(data_path)
        if saved.get("spec") == json.loads(json.dumps(spec)):
            runner.log(f"[reuse] {data_path} (same settings and weights): plotting again")
            runner.reused_evals += 1
            data = saved["data"]
    if data is None:
        data = COMPUTE[kind](runner, cells, fig)
        runner.evaluated += 1
    eps = _eps(runner, cells[0].dataset)
    files = PLOT[kind](data, target / kind, cells, eps)
    summary = {"experiment": plan.experiment.name, "title": plan.experiment.title, "paper": plan.experiment.paper,
               "preset": plan.preset, "protocol": plan.experiment.presets[plan.preset].description, "spec": spec,
               "data": data, "files": [str(f) for f in files], "runs": {c.row.label: c.train.out for c in cells},
               "seconds": time.time() - t0, "command": command_line(), "environment": environment_info()}
    write_json(data_path, summary)
    return summary


# ---------------------------------------------------------------- Fig. 1
def _fig1(runner, cells, fig) -> dict:
    from ..experiments import rescale
    cell = cells[0]
    model, _w, _s, prov = runner.model_of(cell)
    e = runner.plan.eval
    alphas = rescale.log_grid(fig.get("alpha_min", 1e-3), fig.get("alpha_max", 1e3), fig.get("points", 13))
    result = rescale.rescale_study(model, runner.test_set(cell.dataset), alphas,
                                   attacks=tuple(fig.get("attacks", ("pgd", "si-pgd"))), eps=_eps(runner, cell.dataset),
                                   steps=e["steps"], n=e["n"], seed=e["seed"], batch_size=e["batch_size"],
                                   progress=runner.progress, log=runner.log, precision=e["precision"],
                                   provenance=prov)
    return {k: result[k] for k in ("alphas", "attacks", "accuracy", "clean", "rows", "n")}


def _plot1(data, stem: Path, cells, eps) -> list:
    from ..experiments import rescale
    rescale.plot(data, stem.with_suffix(".png"), title=_title(cells[0], eps, f"{cells[0].row.label}, logits × α"))
    return [stem.with_suffix(".png"), stem.with_suffix(".pdf")]


# ---------------------------------------------------------------- Figs. 3, 4, 5 (sirobust.experiments.figures)
def _models(runner, cells) -> dict:
    return {c.row.label: runner.model_of(c)[0] for c in cells}


def _fig3(runner, cells, fig) -> dict:
    from ..experiments import figures
    cell = cells[0]
    return figures.input_loss_surface(runner.model_of(cell)[0], runner.test_set(cell.dataset),
                                      eps=_eps(runner, cell.dataset), n_images=fig.get("images", 10),
                                      grid=fig.get("grid", 21), seed=fig.get("seed", 0), steps=fig.get("steps", 10),
                                      log=runner.log)


def _plot3(data, stem: Path, cells, eps) -> list:
    from ..experiments import figures
    saved = figures.plot_input_loss_surface(data, stem.with_suffix(".png"),
                                            title=_title(cells[0], eps, f"{cells[0].row.label}, input loss surfaces"))
    return [saved.png, saved.pdf]


def _fig4(runner, cells, fig) -> dict:
    from ..experiments import figures
    dataset = cells[0].dataset
    return figures.weight_loss_surfaces(_models(runner, cells), runner.test_set(dataset), eps=_eps(runner, dataset),
                                        deltas=fig.get("deltas"), n=fig.get("n", 1000), seed=fig.get("seed", 0),
                                        steps=fig.get("steps", 10), log=runner.log)


def _plot4(data, stem: Path, cells, eps) -> list:
    from ..experiments import figures
    saved = figures.plot_weight_loss_surface(data, stem.with_suffix(".png"),
                                             title=_title(cells[0], eps, "Weight loss surfaces"))
    return [saved.png, saved.pdf]


def _fig5(runner, cells, fig) -> dict:
    from ..experiments import figures
    dataset = cells[0].dataset
    return figures.cos_theta_histograms(_models(runner, cells), runner.test_set(dataset), eps=_eps(runner, dataset),
                                        n=fig.get("n", 1000), bins=fig.get("bins", 40), steps=fig.get("steps", 10),
                                        log=runner.log)


def _plot5(data, stem: Path, cells, eps) -> list:
    from ..experiments import figures
    saved = figures.plot_cos_histogram(data, stem.with_suffix(".png"),
                                       title=_title(cells[0], eps, "cos θ_y on PGD-10 examples"))
    return [saved.png, saved.pdf]


COMPUTE = {"fig1": _fig1, "fig3": _fig3, "fig4": _fig4, "fig5": _fig5}
PLOT = {"fig1": _plot1, "fig3": _plot3, "fig4": _plot4, "fig5": _plot5}
