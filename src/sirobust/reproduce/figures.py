"""The paper's figures from a plan: train (or reuse) the models, compute the figure's data, plot it.

The data is computed once and kept in ``OUT/figN-PRESET/figure.json`` with the settings it was
computed with; a second run with the same settings and the same weights re-plots from it.
Every figure is written as PNG and PDF, titled with the dataset, the model and ε.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..io import atomic_write_text, read_json, write_json
from ..markdown import markdown_table
from ..provenance import environment_info
from ..runfolder import command_line
from .plan import FIGURE_EVAL_KEYS, SEEDED_FIGURES, display
from .tables import overrides_lines
from .runner import EVAL_VERSION
from .stats import paired_values


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
    model = cell.published.architecture if cell.train is None else display("model", cell.train.model)
    return f"{what}\n{display('dataset', cell.dataset)}, {model}, L∞ ε = {eps:.4g}"


def make_figure(runner, target: Path) -> dict:
    """Compute and plot the plan's figure into ``target``; returns the figure's summary."""
    t0 = time.time()
    plan = runner.plan
    runner.train_all()
    kind = plan.experiment.figure_kind
    fig = plan.figure
    cells = _rows(runner, fig.get("models") or ([fig["model"]] if fig.get("model") else None))
    seeds = sorted({c.seed for c in cells if c.seed is not None})
    # a seed axis over a figure that compares methods: every seed has each row once (rows that set their own
    # seed, or a published model, are the one-seed figure they always were)
    seeded = kind in SEEDED_FIGURES and len(seeds) > 1 and all(
        sorted(c.row.label for c in cells if c.seed == s) == sorted({c.row.label for c in cells}) for s in seeds)

    def key(c) -> str:  # one seed keeps the keys it always had, so its stored data is still found
        return c.row.label + (f" (seed {c.seed})" if seeded else "")
    group = runner.group
    # an HE row's cosine view is another model than its logits (a logits row keeps the key it always had)
    weights = group.first(lambda: {key(c): {**runner.job_spec(c, c.jobs[0])["weights"],
                                            **({"view": c.row.view} if c.row.view != "logits" else {})}
                                   for c in cells})
    used = FIGURE_EVAL_KEYS[kind]
    spec = {"figure": kind, "settings": fig, "eval": {k: plan.eval[k] for k in used if k in plan.eval},
            "precision": runner.resolved_precision(), "version": EVAL_VERSION, "weights": weights}
    data_path = target / "figure.json"
    data = None
    saved = group.first(lambda: read_json(data_path) if data_path.exists() else None)
    if saved is not None and saved.get("spec") == json.loads(json.dumps(spec)):
        runner.log(f"[reuse] {data_path} (same settings and weights): plotting again")
        runner.reused_evals += 1
        data, computed = saved["data"], saved.get("computed")
    partial_path = target / "figure.partial.json"
    if data is None:
        if seeded:
            data = {"figure": kind, "seeds": seeds, "per_seed": _per_seed(runner, kind, cells, fig, seeds, spec,
                                                                          partial_path)}
        else:
            data = COMPUTE[kind](runner, cells, fig)
        runner.evaluated += 1
        computed = {"seconds": time.time() - t0, "command": command_line()}
    summary = {"experiment": plan.experiment.name, "title": plan.experiment.title, "paper": plan.experiment.paper,
               "preset": plan.preset, "protocol": plan.experiment.presets[plan.preset].description,
               "overrides": plan.overrides, "spec": spec,
               "data": data, "runs": {key(c): c.train.out if c.train is not None else f"published: {c.published.name}"
                                      for c in cells}}
    if not group.main:  # every process computed the data (figures are not sharded); rank 0 writes it
        return summary
    target.mkdir(parents=True, exist_ok=True)
    eps = _eps(runner, cells[0].dataset)
    if seeded:  # the image shows the first seed's models; the summary compares every seed's
        files = PLOT[kind](data["per_seed"][str(seeds[0])], target / kind, [c for c in cells if c.seed == seeds[0]],
                           eps, f"seed {seeds[0]} of {', '.join(map(str, seeds))}")
    else:
        files = PLOT[kind](data, target / kind, cells, eps)
    summary.update(files=[str(f) for f in files], seconds=time.time() - t0, command=command_line(),
                   computed=computed, environment=environment_info())
    write_json(data_path, summary)
    atomic_write_text(target / "figure.md", to_markdown(summary))
    partial_path.unlink(missing_ok=True)  # every seed is in figure.json now
    return summary


def _per_seed(runner, kind: str, cells, fig, seeds: list, spec: dict, partial_path: Path) -> dict:
    """Each seed's data of a seeded figure, each seed filed in ``partial_path`` as it is finished, so that a
    figure stopped after some of its seeds (Fig. 4: half an hour a seed on a CPU) continues from the next one.
    Seeds filed under another spec (other settings or weights) are not used."""
    group = runner.group
    filed = group.first(lambda: read_json(partial_path) if partial_path.exists() else None)
    per_seed = dict(filed["per_seed"]) if filed and filed.get("spec") == json.loads(json.dumps(spec)) else {}
    for s in seeds:
        if str(s) in per_seed:
            runner.log(f"[reuse] {partial_path}: seed {s}")
            continue
        per_seed[str(s)] = COMPUTE[kind](runner, [c for c in cells if c.seed == s], fig)
        if group.main:
            partial_path.parent.mkdir(parents=True, exist_ok=True)
            write_json(partial_path, {"spec": spec, "per_seed": per_seed})
    return {str(s): per_seed[str(s)] for s in seeds}


def to_markdown(summary: dict) -> str:
    """The figure's numbers in words and a small table, beside the image (and in docs/reproduction.md)."""
    data, kind = summary["data"], summary["spec"]["figure"]
    lines = [f"## {summary['title']}", "", summary["paper"], "", f"Preset **{summary['preset']}**: "
             f"{summary['protocol']}", ""] + overrides_lines(summary) + [f"![{kind}]({kind}.png)", ""]
    lines += SEEDED_SUMMARIES[kind](data) if "per_seed" in data else SUMMARIES[kind](data)
    env = summary["environment"]
    made = summary.get("computed") or summary
    lines += ["", f"command: `{made['command']}`  ", f"{made['seconds']:.0f} s; sirobust {env['sirobust']}, "
              f"torch {env['torch']}, commit {env['git_commit']}, {env['gpu'] or 'CPU'}", ""]
    return "\n".join(lines)


def _summary1(data) -> list:
    names = data["attacks"]
    lines = markdown_table(["α", "clean", *names],
                           ([f"{a:g}", f"{100 * data['clean'][i]:.1f}", *(f"{100 * data['accuracy'][n][i]:.1f}" for n in names)]
                            for i, a in enumerate(data["alphas"])), "rr" + "r" * len(names))
    return [f"Accuracy (%) on {data['n']} test images as the logits are multiplied by α:", "", *lines]


def _summary3(data) -> list:
    rows = [[idx, data["labels"][k], f"{data['clean_loss'][k]:.3f}", f"{data['pgd_loss'][k]:.3f}",
             f"{max(max(row) for row in data['loss'][k]):.3f}"] for k, idx in enumerate(data["indices"])]
    lines = markdown_table(["image", "label", "clean CE", "CE at the PGD-10 point", "largest CE on the grid"], rows,
                           "rrrrr")
    return [f"Cross-entropy on a {data['grid']}×{data['grid']} grid of δ1, δ2 ∈ [-ε, ε] (ε = {data['eps']:.4g}) "
            f"around {len(data['indices'])} test images:", "", *lines]


def _summary4(data) -> list:
    deltas = data["deltas"]
    more = data.get("more_directions") or []
    lines = markdown_table(["δ", *data["labels"]],
                           ([f"{d:g}", *(f"{data['models'][m]['loss_change'][i]:+.3f}" for m in data["labels"])]
                            for i, d in enumerate(deltas)), "r" * (1 + len(data["labels"])))
    out = ["Change of the adversarial loss (CE on PGD-10 examples against the perturbed weights) along a random "
           "filter-normalised direction" + (f" (the first of {1 + len(more)}, plotted)" if more else "") + ":", "",
           *lines]
    if not more:
        return out
    rises = _rises(data)
    rows = [[str(j + 1), *(f"{rises[m][j]:.3f}" for m in data["labels"])] for j in range(1 + len(more))]
    out += ["", f"Mean rise of the adversarial loss over δ ≠ 0 along each of the {1 + len(more)} directions (the same "
            "random draws for every model, each filter-normalised to its weights; smaller is flatter):", "",
            *markdown_table(["direction", *data["labels"]], rows, "r" * (1 + len(data["labels"])))]
    base = data["labels"][0]
    out.append("")
    for other in data["labels"][1:]:
        try:
            r = paired_values(rises[base], rises[other])
        except ImportError:  # the test's quantiles are scipy's; the table above stands without them
            continue
        out.append(f"- {other} − {base}, direction by direction: mean {r['mean']:+.3f} (95 % interval "
                   f"[{r['low']:+.3f}, {r['high']:+.3f}]), smaller rise along {r['smaller']} of {r['n']} directions. "
                   "One model of each: this compares these two trained models, not the methods over training seeds.")
    return out


def _rises(data) -> dict:
    """{label: [rise along each direction]} (see :func:`sirobust.experiments.figures.rise`)."""
    from ..experiments.figures import rise
    every = [data["models"], *(data.get("more_directions") or [])]
    return {m: [rise(d[m]) for d in every] for m in data["labels"]}


def _summary4_seeds(data) -> list:
    """Fig. 4 over training seeds: each seed's models' rise along the directions, then each model against the first
    across the seeds (the mean of the per-seed mean differences with its t interval; the seeds' spread taken as at
    least one seed's standard error over its directions, when there are several)."""
    from .stats import mean_interval
    seeds, per = data["seeds"], data["per_seed"]
    labels = per[str(seeds[0])]["labels"]
    rises = {s: _rises(per[str(s)]) for s in seeds}
    k = len(rises[seeds[0]][labels[0]])
    rows = [[m, str(s), *(f"{v:.3f}" for v in rises[s][m]), f"{sum(rises[s][m]) / k:.3f}"] for m in labels
            for s in seeds]
    lines = [f"Mean rise of the adversarial loss over δ ≠ 0 (CE on PGD-10 examples against the perturbed weights; "
             f"smaller is flatter) along {k} random filter-normalised direction{'s' if k > 1 else ''}, the same draws "
             f"for every model, for each training seed's models (the image shows seed {seeds[0]}'s, along the "
             "first direction):", "",
             *markdown_table(["model", "seed", *(f"direction {j + 1}" for j in range(k)), "mean"], rows,
                             "lr" + "r" * (k + 1)), ""]
    base = labels[0]
    for other in labels[1:]:
        diffs = {s: [o - b for b, o in zip(rises[s][base], rises[s][other])] for s in seeds}
        try:
            tests = {s: mean_interval(d) for s, d in diffs.items()}
            floor = sum(t["sd"] / k ** 0.5 for t in tests.values()) / len(seeds) if k > 1 else 0.0
            across = mean_interval([t["mean"] for t in tests.values()], floor=floor)
        except ImportError:
            lines.append(f"- {other} against {base}: not tested (scipy is not installed).")
            continue
        detected = across["p"] < 0.05
        numbers = (f"{_across_text(across, 'mean difference in rise', 'directions')}; {other} flatter in "
                   f"{sum(t['mean'] < 0 for t in tests.values())} of {len(seeds)} seeds")
        # what was measured: the mean rise along these draws (one draw, the same in every seed, says nothing of
        # other directions)
        along = f"along these {k} random directions" if k > 1 else "along the one random direction drawn (the same " \
                "in every seed)"
        verdict = (f"{_possessive(other)} adversarial loss rises {'more' if across['mean'] > 0 else 'less'} than "
                   f"{_possessive(base)} {along}" if detected else
                   f"{other} vs {base}: no difference detected in how fast the adversarial loss rises {along}")
        each = "; ".join(f"seed {s}: {t['mean']:+.3f}, flatter along {sum(d < 0 for d in diffs[s])} of {k}"
                         for s, t in tests.items())
        lines.append(f"- {verdict} ({numbers}). Per seed, the mean difference over the directions: {each}.")
    return lines


def _summary5(data) -> list:
    rows = [[m, f"{r['mean']:.3f}", f"{r['median']:.3f}", f"{100 * r['robust_accuracy']:.1f} %"]
            for m, r in ((m, data["models"][m]) for m in data["labels"])]
    lines = markdown_table(["model", "mean cos θ_y", "median", "robust accuracy under PGD-10"], rows, "lrrr")
    n = data["models"][data["labels"][0]]["n"]
    return [f"cos θ_y on PGD-10 examples of {n} test images:", "", *lines, *_paired5(data)]


def _paired5(data) -> list:
    """Each model against the first, image by image (the same test images, each attacked on its own model)."""
    from .stats import p_text
    base = data["labels"][0]
    lines = []
    for other in data["labels"][1:]:
        if data["models"][base]["n"] < 2:  # a paired test needs two images
            continue
        try:
            r = paired_values(data["models"][base]["values"], data["models"][other]["values"])
        except ImportError:  # the test's quantiles are scipy's; the figure and its table stand without them
            lines.append(f"- {other} − {base}, image by image: not tested (scipy is not installed).")
            continue
        lines.append(f"- {other} − {base}, image by image: mean {r['mean']:+.3f} (95 % interval [{r['low']:+.3f}, "
                     f"{r['high']:+.3f}]), larger on {r['larger']} of {r['n']} images and smaller on "
                     f"{r['smaller']}; Wilcoxon signed-rank p = {p_text(r['p'])}. One model of each: this compares "
                     "these two trained models, not the methods over training seeds.")
    return ["", *lines] if lines else []


def _summary5_seeds(data) -> list:
    """Fig. 5 over training seeds: each seed's models, then each model against the first across the seeds (the
    mean of the per-seed mean differences with its t interval; a difference only where it excludes 0)."""
    from .stats import mean_interval, p_text
    seeds, per = data["seeds"], data["per_seed"]
    labels = per[str(seeds[0])]["labels"]
    rows = [[m, str(s), f"{r['mean']:.3f}", f"{r['median']:.3f}", f"{100 * r['robust_accuracy']:.1f} %"]
            for m in labels for s in seeds for r in [per[str(s)]["models"][m]]]
    n = per[str(seeds[0])]["models"][labels[0]]["n"]
    lines = [f"cos θ_y on PGD-10 examples of the same {n} test images, for each training seed's models (the "
             f"histogram shows seed {seeds[0]}'s):", "",
             *markdown_table(["model", "seed", "mean cos θ_y", "median", "robust accuracy under PGD-10"], rows,
                             "lrrrr"), ""]
    base = labels[0]
    for other in labels[1:]:
        if n < 2:  # a paired test needs two images
            continue
        try:
            tests = [paired_values(per[str(s)]["models"][base]["values"], per[str(s)]["models"][other]["values"])
                     for s in seeds]
            # as for the tables' comparisons: the seeds' spread is not believed below one seed's own standard
            # error over its images (see stats' module docstring)
            across = mean_interval([t["mean"] for t in tests],
                                   floor=sum(t["sd"] / t["n"] ** 0.5 for t in tests) / len(tests))
        except ImportError:  # the tests' quantiles are scipy's; the table above stands without them
            lines.append(f"- {other} against {base}: not tested (scipy is not installed).")
            continue
        detected = across["low"] > 0 or across["high"] < 0
        each = "; ".join(f"seed {s}: {t['mean']:+.3f}, larger on {t['larger']} of {t['n']}, Wilcoxon p = "
                         f"{p_text(t['p'])}" for s, t in zip(seeds, tests))
        numbers = (f"{_across_text(across, 'mean difference', 'images')}; {other} larger in "
                   f"{sum(t['mean'] > 0 for t in tests)} of {len(seeds)} seeds")
        verdict = (f"{_possessive(other)} mean cos θ_y is {'above' if across['mean'] > 0 else 'below'} "
                   f"{_possessive(base)}"
                   if detected else f"{other} vs {base}: no difference detected in mean cos θ_y")
        lines.append(f"- {verdict} ({numbers}). Image by image, per seed: {each}.")
    return lines


def _across_text(across: dict, what: str, units: str) -> str:
    """"mean difference +0.071 over 3 seeds, 95 % interval [...]" (saying when the spread was floored)."""
    floored = (f" (the seeds' sd, {across['sd']:.3f}, is below one seed's standard error over its {units}: "
               f"{across['spread']:.3f} is used)" if across["floored"] else "")
    return (f"{what} {across['mean']:+.3f} over {across['k']} seeds, 95 % interval [{across['low']:+.3f}, "
            f"{across['high']:+.3f}]{floored}")


def _possessive(name: str) -> str:
    return name + ("'" if name[-1:] in "sS" else "'s")  # TRADES', TRADES-SI's


SUMMARIES = {"fig1": _summary1, "fig3": _summary3, "fig4": _summary4, "fig5": _summary5}
SEEDED_SUMMARIES = {"fig4": _summary4_seeds, "fig5": _summary5_seeds}


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
                                        steps=fig.get("steps", 10), directions=fig.get("directions", 1),
                                        log=runner.log)


def _plot4(data, stem: Path, cells, eps, note: str = "") -> list:
    from ..experiments import figures
    what = "Weight loss surfaces" + (" along the first direction" if data.get("more_directions") else "")
    saved = figures.plot_weight_loss_surface(data, stem.with_suffix(".png"), title=_title(
        cells[0], eps, what + (f" ({note})" if note else "")))
    return [saved.png, saved.pdf]


def _fig5(runner, cells, fig) -> dict:
    from ..experiments import figures
    dataset = cells[0].dataset
    return figures.cos_theta_histograms(_models(runner, cells), runner.test_set(dataset), eps=_eps(runner, dataset),
                                        n=fig.get("n", 1000), bins=fig.get("bins", 40), steps=fig.get("steps", 10),
                                        seed=fig.get("seed", 0), log=runner.log)


def _plot5(data, stem: Path, cells, eps, note: str = "") -> list:
    from ..experiments import figures
    saved = figures.plot_cos_histogram(data, stem.with_suffix(".png"), title=_title(
        cells[0], eps, "cos θ_y on PGD-10 examples" + (f" ({note})" if note else "")))
    return [saved.png, saved.pdf]


COMPUTE = {"fig1": _fig1, "fig3": _fig3, "fig4": _fig4, "fig5": _fig5}
PLOT = {"fig1": _plot1, "fig3": _plot3, "fig4": _plot4, "fig5": _plot5}
