"""A table in the paper's layout, from the per-run evaluation JSONs: Markdown, CSV and LaTeX (booktabs).

Rows are grouped as the paper groups them (``row_group_by``: the network in Table 6, the dataset in
Table 10); column groups come from ``column_group_by`` (the dataset in Table 6) and from each column's
own ``group`` (Table 5's "Single run" and "5 random restarts", Table 9's "SPSA" and "RayS").
Accuracies are in %, two decimals, as in the paper; RayS's ADBD is an L∞ distance, four decimals.
"""
from __future__ import annotations

import csv
import io
from typing import Optional

from .plan import result_name
from .schema import Column


def cell_values(columns: list[Column], reports: list[dict]) -> dict:
    """{column label: value} of one cell from its evaluation results (fractions; ADBD as a distance)."""
    main = max(reports, key=lambda r: r["report"]["n"])["report"]
    out: dict = {}
    for col in columns:
        if col.value == "natural":
            out[col.label] = main["clean_acc"]
        elif col.value == "worst_case":
            out[col.label] = main["worst_case_acc"]
        else:
            name = result_name(col)
            found = next((r["report"]["attacks"][name] for r in reports
                          if name in r["report"]["attacks"] and r["spec"]["restarts"] == col.restarts), None)
            if found is None:
                out[col.label] = None
            elif col.value == "adbd":
                out[col.label] = ((found.get("stats") or {}).get("adbd") or {}).get("mean")
            else:
                out[col.label] = found["robust_acc"]
    return out


def _fmt(col: dict, value) -> str:
    if value is None:
        return "–"
    if col["value"] == "adbd":
        return f"{value:.4f}"
    return f"{100 * value:.2f}"


def _layout(summary: dict):
    """(column groups, [(row group, [rows])], the columns, whether to show the Model column)."""
    groups = summary["column_groups"]
    by_row: dict = {}
    for r in summary["rows"]:
        by_row.setdefault(r["row_group"], {}).setdefault(r["row"], {"arch": r["architecture"], "values": {}})
        by_row[r["row_group"]][r["row"]]["values"][r["column_group"]] = r["values"]
    show_model = any(r["run"] is None for r in summary["rows"])  # published models: their architecture
    return groups, by_row, summary["columns"], show_model


def header_rows(summary: dict) -> list[list[str]]:
    """The header lines of the value columns: column groups, the columns' own groups, the labels."""
    groups, _, cols, _ = _layout(summary)
    lines = []
    if any(groups):
        lines.append([g for g in groups for _ in cols])
    if any(c["group"] for c in cols):
        lines.append([c["group"] for _ in groups for c in cols])
    lines.append([c["label"] for _ in groups for c in cols])
    return lines


def body_rows(summary: dict) -> list[list[str]]:
    """[row group, (model,) method, value cells...] per row."""
    groups, by_row, cols, show_model = _layout(summary)
    out = []
    for row_group, rows in by_row.items():
        for i, (label, data) in enumerate(rows.items()):
            cells = [row_group if i == 0 else "", label] + ([data["arch"]] if show_model else [])
            for g in groups:
                values = data["values"].get(g, {})
                cells += [_fmt(c, values.get(c["label"])) for c in cols]
            out.append(cells)
    return out


def _lead(summary: dict) -> list[str]:
    by = summary.get("row_group_by")
    lead = [{"dataset": "Dataset", "model": "Network"}.get(by, by or ""), "Method"]
    if _layout(summary)[3]:
        lead.append("Model")
    return lead


def to_markdown(summary: dict) -> str:
    heads = header_rows(summary)
    lead = _lead(summary)
    show_group = bool(summary.get("row_group_by"))
    keep = slice(0 if show_group else 1, None)
    lines = [f"## {summary['title']}", ""]
    if summary.get("paper"):
        lines += [summary["paper"], ""]
    lines.append(f"Preset **{summary['preset']}**: {summary['protocol']}")
    lines.append("")
    label_row = lead[keep] + [
        " / ".join(p for p in parts if p) for parts in zip(*heads)]
    lines.append("| " + " | ".join(label_row) + " |")
    lines.append("|" + "---|" * len(lead[keep]) + "---:|" * (len(label_row) - len(lead[keep])))
    for cells in body_rows(summary):
        lines.append("| " + " | ".join(cells[keep]) + " |")
    e = summary["eval"]
    n = max(r["n"] for r in summary["rows"])
    weights = "the best checkpoint's" if e["which"] == "best" else "the last epoch's"
    lines += ["", f"Accuracy in % on the first {n} test images ({weights} weights), "
              f"{e['steps']}-step attacks of step ε/4" + (f", ε = {e['eps']}" if e.get("eps") else
                                                          ", ε = the dataset's (8/255 for CIFAR and SVHN)") + "."]
    caps = e.get("attack_n") or {}
    if caps:
        lines.append("Fewer images for: " + ", ".join(f"{k} (first {v})" for k, v in caps.items()) + ".")
    lines += [f"- {note}" for note in summary.get("notes", [])]
    env = summary["environment"]
    c = summary["counts"]
    lines += ["", f"command: `{summary['command']}`  ", f"{c['trained']} runs trained, {c['reused_runs']} reused; "
              f"{c['evaluated']} evaluations computed, {c['reused_evaluations']} reused; {summary['seconds']:.0f} s.  ",
              f"sirobust {env['sirobust']}, torch {env['torch']}, commit {env['git_commit']}, {env['gpu'] or 'CPU'}", ""]
    return "\n".join(lines)


def to_csv(summary: dict) -> str:
    """One line per (row, column group, column): long format, easy to load anywhere."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row_group", "method", "model", "column_group", "column_group2", "column", "value", "unit"])
    for r in summary["rows"]:
        for c in summary["columns"]:
            v = r["values"].get(c["label"])
            unit = "linf_distance" if c["value"] == "adbd" else "percent"
            shown = "" if v is None else (f"{v:.6f}" if c["value"] == "adbd" else f"{100 * v:.4f}")
            w.writerow([r["row_group"], r["row"], r["architecture"], r["column_group"], c["group"], c["label"],
                        shown, unit])
    return buf.getvalue()


_TEX = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
        "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}", "†": r"$^\dagger$",
        "θ": r"$\theta$", "ε": r"$\epsilon$", "·": r"$\cdot$", "–": "--"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def to_latex(summary: dict, caption: Optional[str] = None) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``), grouped headers with \\cmidrule."""
    heads = header_rows(summary)
    lead = _lead(summary)
    show_group = bool(summary.get("row_group_by"))
    lead = lead if show_group else lead[1:]
    width = len(heads[-1])
    lines = [r"\begin{table}[t]", r"\centering",
             rf"\caption{{{tex_escape(caption or summary['title'])} (sirobust, preset {tex_escape(summary['preset'])})}}",
             rf"\begin{{tabular}}{{{'l' * len(lead)}{'r' * width}}}", r"\toprule"]
    for head in heads[:-1]:  # spanning headers: runs of equal labels
        cells, rules, col = [""] * len(lead), [], len(lead) + 1
        i = 0
        while i < len(head):
            j = i
            while j < len(head) and head[j] == head[i]:
                j += 1
            span = j - i
            cells.append(rf"\multicolumn{{{span}}}{{c}}{{{tex_escape(head[i])}}}" if head[i] else "")
            if head[i]:
                rules.append(rf"\cmidrule(lr){{{col}-{col + span - 1}}}")
            col += span
            i = j
        lines.append(" & ".join(c for c in cells) + r" \\")
        if rules:
            lines.append("".join(rules))
    lines.append(" & ".join(tex_escape(x) for x in lead + heads[-1]) + r" \\")
    lines.append(r"\midrule")
    prev_group = None
    for cells in body_rows(summary):
        if show_group and cells[0] and prev_group is not None:
            lines.append(r"\midrule")
        prev_group = cells[0] or prev_group
        shown = cells if show_group else cells[1:]
        lines.append(" & ".join(tex_escape(x) for x in shown) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)
