"""Copy the mini-preset results of `sirobust reproduce` into the repository and docs/reproduction.md.

    python scripts/collect_reproduction.py runs/reproduce

For each OUT/NAME-mini/ found (or, while a grid of several seeds is still running, the OUT/NAME-mini+HASH/ of
the seeds that finished, made with `--seeds` alone and saying so under its title): its table.json or
figure.json goes to benchmarks/reproduction/NAME-mini.json,
a figure's PNG to docs/figures/NAME-mini.png, and the block between the reproduction-results markers of
docs/reproduction.md is regenerated from the committed JSONs (tests/test_reproduce.py checks it matches), so
no number there is ever typed by hand.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "reproduction"
FIGURES = ROOT / "docs" / "figures"
DOC = ROOT / "docs" / "reproduction.md"
MARKERS = ("<!-- reproduction-results:begin -->", "<!-- reproduction-results:end -->")


def render_block(results: Path = RESULTS) -> str:
    """The docs block, from the committed result JSONs, in the paper's order."""
    from sirobust.reproduce import list_experiments, load_experiment, tables
    from sirobust.reproduce.figures import to_markdown as figure_markdown
    parts = []
    shown: dict[str, str] = {}  # a table's run keys -> the experiment whose block shows them
    for name in list_experiments():
        path = results / f"{name}-mini.json"
        if not path.exists():
            continue
        summary = json.loads(path.read_text())
        if "data" in summary:  # a figure: its image is committed beside this file
            text = figure_markdown(summary).replace(f"]({summary['spec']['figure']}.png)", f"](figures/{name}-mini.png)")
        else:  # a result written before configs carried the paper's numbers gets them from the config
            summary.setdefault("paper_tables", load_experiment(name).paper_tables)
            key = json.dumps(sorted(summary.get("runs") or {}))
            same = shown.get(key) if summary.get("runs") else None
            text = reused_markdown(summary, same) if same else tables.to_markdown(summary)
            shown.setdefault(key, name)
        parts.append(text.replace("\n## ", "\n### ").replace("## ", "### ", 1).strip())
    missing = [n for n in list_experiments() if not (results / f"{n}-mini.json").exists() and n != "table5"]
    if not (results / "table5-mini.json").exists():
        parts.append("table5 evaluates published CIFAR-10 models: it needs their files and CIFAR-10, which this "
                     "machine cannot download. Its machinery runs end to end in the tests on two small models "
                     "written in RobustBench's layout.")
    if missing:
        parts.append("Not run here yet (each is one command, `sirobust reproduce NAME --preset mini`; see `--list` "
                     "for its cost): " + ", ".join(missing) + ".")
    return "\n\n".join(parts)


def reused_markdown(summary: dict, source: str) -> str:
    """A table whose runs are all `source`'s (Table 7 is Table 6 at the mini preset): its title, the paper's
    numbers and its command, and a pointer to `source`'s block instead of the same cells printed twice."""
    from sirobust.reproduce import tables
    c = summary["counts"]
    source = source.replace("table", "Table ", 1) if source.startswith("table") else source
    lines = [f"## {summary['title']}", ""]
    if summary.get("paper"):
        lines += [summary["paper"], ""]
    lines += [f"Preset **{summary['preset']}**: {summary['protocol']}", "",
              f"Its runs are {source}'s, every one (the same rows, columns, seeds and settings), so its cells, "
              f"comparisons and flags are {source}'s block above, and are not repeated here. Computing it added "
              f"nothing: {c['trained']} runs trained, {c['evaluated']} evaluations computed, "
              f"{c['reused_evaluations']} reused. Its own files (benchmarks/reproduction/"
              f"{summary['experiment']}-mini.json) hold the same numbers."]
    for block in summary.get("paper_tables") or []:
        lines += tables.paper_markdown(summary, block)
    env = summary["environment"]
    lines += ["", f"command: `{summary['command']}`  ",
              f"sirobust {env['sirobust']}, torch {env['torch']}, commit {env['git_commit']}, {env['gpu'] or 'CPU'}", ""]
    return "\n".join(lines)


def result_folders(out: Path) -> list[Path]:
    """NAME-mini for each experiment, or else the NAME-mini+HASH with the most seeds whose only change from the
    preset is --seeds (the seeds of a grid that finished first)."""
    chosen = {p.name[: -len("-mini")]: p for p in out.glob("*-mini") if p.is_dir()}
    for p in sorted(out.glob("*-mini+*")):
        name = p.name.split("+")[0][: -len("-mini")]
        data = next((json.loads((p / k).read_text()) for k in ("table.json", "figure.json") if (p / k).exists()), None)
        if name in chosen and "+" not in chosen[name].name or data is None:
            continue
        overrides = data.get("overrides") or {}
        if any(overrides.get(section) for section in ("train", "eval", "figure")) or "seeds" not in overrides:
            continue
        best = chosen.get(name)
        if best is None or len(data.get("seeds", [])) > len(json.loads((best / "table.json").read_text())["seeds"]):
            chosen[name] = p
    return [chosen[k] for k in sorted(chosen)]


def main(out: str) -> None:
    out = Path(out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    FIGURES.mkdir(parents=True, exist_ok=True)
    for folder in result_folders(out):
        name = folder.name.split("+")[0][: -len("-mini")]
        for kind in ("table.json", "figure.json"):
            if (folder / kind).exists():
                shutil.copyfile(folder / kind, RESULTS / f"{name}-mini.json")
        for png in folder.glob("fig*.png"):
            shutil.copyfile(png, FIGURES / f"{name}-mini.png")
    doc = DOC.read_text()
    block = f"{MARKERS[0]}\n{render_block()}\n{MARKERS[1]}"
    doc = re.sub(re.escape(MARKERS[0]) + r".*?" + re.escape(MARKERS[1]), lambda _m: block, doc, flags=re.S)
    DOC.write_text(doc)
    print(f"updated {DOC.relative_to(ROOT)} from {len(list(RESULTS.glob('*-mini.json')))} results")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/reproduce")
