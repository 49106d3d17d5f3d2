"""A table in the paper's layout, from the per-run evaluation JSONs: Markdown, CSV and LaTeX (booktabs).

Rows are grouped as the paper groups them (``row_group_by``: the network in Table 6, the dataset in
Table 10); column groups come from ``column_group_by`` (the dataset in Table 6) and from each column's
own ``group`` (Table 5's "Single run" and "5 random restarts", Table 9's "SPSA" and "RayS").
Accuracies are in %, two decimals, as in the paper; RayS's ADBD is an L∞ distance, four decimals.
Over several training seeds a cell is the mean ± sd (the per-seed values are in the CSV and JSON), and
the paired comparisons of :mod:`.stats` are printed under the table as generated sentences.
"""
from __future__ import annotations

import csv
import io
import statistics
from typing import Optional

from ..markdown import count, markdown_table
from .plan import changed_settings, result_name
from .schema import Column
from .stats import compare, holm, holm_note, statement, summarise


def column_key(col) -> str:
    """The name of a column's value in a cell: its label, under its group when it has one ("5 restarts / PGD")."""
    label, group = (col["label"], col["group"]) if isinstance(col, dict) else (col.label, col.group)
    return f"{group} / {label}" if group else label


def cell_values(columns: list[Column], reports: list[dict]) -> dict:
    """{column key: value} of one cell from its evaluation results (fractions; ADBD as a distance).

    The worst case is the per-example AND over every evaluation of the cell, on the images they share
    (the first n of the smallest one, when an attack ran on fewer)."""
    main = max(reports, key=lambda r: r["report"]["n"])["report"]
    out: dict = {}
    for col in columns:
        key = column_key(col)
        if col.value == "natural":
            out[key] = main["clean_acc"]
        elif col.value == "worst_case":
            shared = min(r["report"]["n"] for r in reports)
            robust = [all(r["report"]["worst_case_robust"][i] for r in reports) for i in range(shared)]
            out[key] = sum(robust) / shared
        else:
            name = result_name(col)
            found = next((r["report"]["attacks"][name] for r in reports
                          if name in r["report"]["attacks"] and r["spec"]["restarts"] == col.restarts), None)
            if found is None:
                out[key] = None
            elif col.value == "adbd":
                out[key] = ((found.get("stats") or {}).get("adbd") or {}).get("mean")
            else:
                out[key] = found["robust_acc"]
    return out


def shared_values(columns: list[Column], reports: list[dict]) -> Optional[dict]:
    """When an attack ran on fewer images (AutoAttack on the first 200 of 1000), every column again on those
    first k images, so that the columns can be compared with each other; None when all ran on the same."""
    k = min(r["report"]["n"] for r in reports)
    if k == max(r["report"]["n"] for r in reports):
        return None
    main = max(reports, key=lambda r: r["report"]["n"])["report"]
    out: dict = {}
    for col in columns:
        key = column_key(col)
        if col.value == "natural":
            out[key] = sum(main["clean_correct"][:k]) / k
        elif col.value == "worst_case":
            out[key] = sum(all(r["report"]["worst_case_robust"][i] for r in reports) for i in range(k)) / k
        elif col.value == "adbd":
            out[key] = None  # a mean distance over other examples: not recomputed here
        else:
            name = result_name(col)
            found = next((r["report"]["attacks"][name] for r in reports
                          if name in r["report"]["attacks"] and r["spec"]["restarts"] == col.restarts), None)
            out[key] = None if found is None else sum(found["robust"][:k]) / k
    return {"n": k, "values": out}


def cell_outcomes(columns: list[Column], reports: list[dict]) -> dict:
    """{column key: per-example outcomes (True: correct, or robust)} of one cell, for the paired tests; the
    worst case on the images every evaluation shares; None for a column without per-example outcomes."""
    main = max(reports, key=lambda r: r["report"]["n"])["report"]
    out: dict = {}
    for col in columns:
        key = column_key(col)
        if col.value == "natural":
            out[key] = [bool(x) for x in main["clean_correct"]]
        elif col.value == "worst_case":
            shared = min(r["report"]["n"] for r in reports)
            out[key] = [all(r["report"]["worst_case_robust"][i] for r in reports) for i in range(shared)]
        elif col.value == "robust":
            name = result_name(col)
            found = next((r["report"]["attacks"][name] for r in reports
                          if name in r["report"]["attacks"] and r["spec"]["restarts"] == col.restarts), None)
            out[key] = None if found is None else [bool(x) for x in found["robust"]]
        else:
            out[key] = None
    return out


def _mean_sd(values: list):
    """(mean, sd) of per-seed values; (None, None) when a seed has none."""
    if any(v is None for v in values):
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(plan, cells: list[dict], outcomes: list[dict]) -> tuple[list, list]:
    """The table's rows (one per row and setting: the mean over its seeds, with each seed's values kept in
    ``per_seed``) and the paired comparisons of ``plan.comparisons`` (see :mod:`.stats`)."""
    groups: dict = {}
    for cell, outcome in zip(cells, outcomes):
        groups.setdefault((cell["row"], cell["row_group"], cell["column_group"]), []).append((cell, outcome))
    rows = []
    for items in groups.values():
        first = items[0][0]
        seeds = [c["seed"] for c, _ in items if c["seed"] is not None]
        if len(items) == 1:
            rows.append({**first, "seeds": seeds, "sd": None})
            continue
        keys = list(first["values"])
        stats = {k: _mean_sd([c["values"][k] for c, _ in items]) for k in keys}
        shared = None
        if all(c["shared"] for c, _ in items):
            sh = {k: _mean_sd([c["shared"]["values"][k] for c, _ in items]) for k in keys}
            shared = {"n": first["shared"]["n"], "values": {k: v[0] for k, v in sh.items()},
                      "sd": {k: v[1] for k, v in sh.items()}}
        rows.append({**{k: first[k] for k in ("row", "row_group", "column_group", "combo", "architecture", "run",
                                              "epoch")},
                     "seed": None, "seeds": seeds, "values": {k: v[0] for k, v in stats.items()},
                     "sd": {k: v[1] for k, v in stats.items()}, "shared": shared,
                     "flags": [{**f, "message": f"seed {c['seed']}: {f['message']}"} for c, _ in items
                               for f in c["flags"]],
                     "n": max(c["n"] for c, _ in items), "reports": [p for c, _ in items for p in c["reports"]],
                     "evaluations": [e for c, _ in items for e in c["evaluations"]],
                     "per_seed": [{k: c[k] for k in ("seed", "values", "shared", "run", "epoch", "n")}
                                  for c, _ in items]})
    comparisons = []
    for base, other in plan.comparisons:
        for (label, row_group, column_group), items in groups.items():
            if label != other:
                continue
            base_items = groups.get((base, row_group, column_group))
            if not base_items:
                continue
            for col in plan.experiment.columns:
                key = column_key(col)
                b = {c["seed"]: o[key] for c, o in base_items if o.get(key) is not None}
                o_ = {c["seed"]: o[key] for c, o in items if o.get(key) is not None}
                if not set(b) & set(o_) or any(len(b[s]) != len(o_[s]) for s in set(b) & set(o_)):
                    continue
                result = compare(b, o_)
                comparisons.append({"base": base, "other": other, "row_group": row_group,
                                    "column_group": column_group, "column": key, **result,
                                    "statement": statement(other, base, key, result)})
    return rows, comparisons


def _fmt(col: dict, value, sd=None) -> str:
    if value is None:
        return "–"
    if col["value"] == "adbd":
        return f"{value:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")
    return f"{100 * value:.2f}" + (f" ± {100 * sd:.2f}" if sd is not None else "")


def _layout(summary: dict):
    """(column groups, [(row group, [rows])], the columns, whether to show the Model column)."""
    groups = summary["column_groups"]
    by_row: dict = {}
    for r in summary["rows"]:
        by_row.setdefault(r["row_group"], {}).setdefault(r["row"], {"arch": r["architecture"], "values": {},
                                                                      "sd": {}})
        by_row[r["row_group"]][r["row"]]["values"][r["column_group"]] = r["values"]
        by_row[r["row_group"]][r["row"]]["sd"][r["column_group"]] = r.get("sd") or {}
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
                values, sd = data["values"].get(g, {}), data["sd"].get(g, {})
                cells += [_fmt(c, values.get(column_key(c)), sd.get(column_key(c))) for c in cols]
            out.append(cells)
    return out


def _lead(summary: dict) -> list[str]:
    by = summary.get("row_group_by")
    lead = [{"dataset": "Dataset", "model": "Network"}.get(by, by or ""), "Method"]
    if _layout(summary)[3]:
        lead.append("Model")
    return lead


def _eps_text(summary: dict) -> str:
    """The ε the evaluations used (each records it, resolved), as 8/255 when it is one."""
    found = sorted({ev["eps"] for r in summary["rows"] for ev in r.get("evaluations") or []
                    if isinstance(ev.get("eps"), (int, float))})
    if not found:
        eps = summary["eval"].get("eps")
        return str(eps) if eps else "the dataset's (8/255 for CIFAR and SVHN)"

    def one(eps: float) -> str:
        k = round(eps * 255)
        return f"{k}/255" if k and abs(eps * 255 - k) < 1e-6 else f"{eps:.4g}"
    return " and ".join(one(x) for x in found)


def _markdown_grid(summary: dict) -> list[str]:
    """The table itself: a header line (groups joined with " / ") and one line per row."""
    heads = header_rows(summary)
    lead = _lead(summary)
    keep = slice(0 if summary.get("row_group_by") else 1, None)
    label_row = lead[keep] + [" / ".join(p for p in parts if p) for parts in zip(*heads)]
    align = "l" * len(lead[keep]) + "r" * (len(label_row) - len(lead[keep]))
    return markdown_table(label_row, (cells[keep] for cells in body_rows(summary)), align)


def _budget_text(summary: dict) -> str:
    """"20-step attacks of step ε/4, " for the columns whose attack takes a step count; the others (AutoAttack,
    SPSA, RayS, Square) run the budgets their description gives, and the caption says which they are."""
    from ..attacks.registry import attack_parameters
    attacked = [c for c in summary["columns"] if c.get("attack")]
    stepped = [c for c in attacked if "steps" in (attack_parameters(c["attack"]) or ["steps"])]  # None: any
    if not stepped:
        return ""
    text = f"{summary['eval']['steps']}-step attacks of step ε/4"
    own = [c["label"] for c in attacked if c not in stepped]
    if own:
        text += (" (" + ", ".join(c["label"] for c in stepped) + "; " + ", ".join(own)
                 + (" at its own budget)" if len(own) == 1 else " at their own budgets)"))
    return text + ", "


def to_markdown(summary: dict) -> str:
    lines = [f"## {summary['title']}", ""]
    if summary.get("paper"):
        lines += [summary["paper"], ""]
    lines.append(f"Preset **{summary['preset']}**: {summary['protocol']}")
    lines.append("")
    lines += overrides_lines(summary)
    lines += _markdown_grid(summary)
    e = summary["eval"]
    n = max(r["n"] for r in summary["rows"])
    weights = "the best checkpoint's" if e["which"] == "best" else "the last epoch's"
    lines += ["", f"Accuracy in % on the first {n} test images ({weights} weights), "
              f"{_budget_text(summary)}L∞ ε = {_eps_text(summary)}." + seeds_text(summary)]
    attacked = {c.get("attack") for c in summary["columns"]}
    caps = {k: v for k, v in (e.get("attack_n") or {}).items() if v < n and k in attacked}
    if caps:
        worst = any(c["value"] == "worst_case" for c in summary["columns"])
        lines.append("Fewer images for: " + ", ".join(f"{k} (first {v})" for k, v in caps.items()) + "."
                     + (f" The worst case is taken on the first {min(caps.values())}, where every attack ran."
                        if worst else ""))
    shared = [r for r in summary["rows"] if r.get("shared")]
    if shared:
        k = min(r["shared"]["n"] for r in shared)
        lines += ["", f"The same cells on the first {k} images, where every attack ran (compare the columns here):",
                  ""] + _markdown_grid({**summary, "rows": [{**r, "values": r["shared"]["values"],
                                                             "sd": r["shared"].get("sd")} for r in shared]})
        lines.append("")
    lines += comparison_lines(summary)
    epochs = _best_epochs(summary)
    if epochs:
        lines.append(f"Best checkpoint (by validation PGD accuracy): {epochs}.")
    lines += [f"- {note}" for note in summary.get("notes", [])]
    lines += flag_lines(summary)
    lines += ledger_lines(summary)
    for block in summary.get("paper_tables") or []:
        lines += paper_markdown(summary, block)
    env = summary["environment"]
    c = summary["counts"]
    work = summary.get("work")
    made = (f"The results took {work['train_seconds'] / 3600:.1f} h of training ({work['runs']} runs) and "
            f"{work['eval_seconds'] / 3600:.1f} h of evaluation ({work['evaluations']} evaluations), summed over "
            "every process and session that computed them.  ") if work else ""
    lines += ["", f"command: `{summary['command']}`  ",
              f"{count(c['trained'], 'run')} trained, {c['reused_runs']} reused; {count(c['evaluated'], 'evaluation')} "
              f"computed, {c['reused_evaluations']} reused; {summary['seconds']:.0f} s.  ",
              *([made] if made else []),
              f"sirobust {env['sirobust']}, torch {env['torch']}, commit {env['git_commit']}, {env['gpu'] or 'CPU'}", ""]
    return "\n".join(lines)


def ledger_lines(summary: dict) -> list[str]:
    """Which cells were taken from a ledger (:mod:`.ledger`) rather than from runs in the output folder."""
    led = summary.get("ledger")
    if not led or not led.get("cells"):
        return []
    return ["", f"{led['cells']} of {led['of']} cells were taken from the ledger `{led['folder']}` "
                f"({len(led['runs'])} runs): evaluations computed elsewhere (another machine or output folder), whose "
                "runs' weights are not in this one. Each entry names the sha256 of the weights it attacked and holds "
                "every example's outcome, on which the paired tests are computed as for the others."]


def seeds_text(summary: dict) -> str:
    """" Mean ± sd over 3 training seeds (0, 1, 2) ..." when the table has more than one seed."""
    seeds = summary.get("seeds") or []
    if len(seeds) < 2:
        return f" Training seed {seeds[0]}." if seeds else ""
    return (f" Each cell: mean ± sd over {len(seeds)} training seeds ({', '.join(map(str, seeds))}); each seed's "
            "values are in table.csv and table.json.")


def comparison_lines(summary: dict) -> list[str]:
    """The generated statements of the paired comparisons (see :mod:`.stats`), by setting."""
    found = summary.get("comparisons") or []
    if not found:
        return []
    k = len(summary.get("seeds") or [None])
    how = ("McNemar's exact test on the same test points for each seed, and the mean difference over the seeds "
           "with its 95 % t interval (the seeds' spread taken as at least one seed's sampling error on these "
           "points); a difference is stated when that interval excludes 0" if k > 1 else
           "McNemar's exact test on the same test points; one seed, so no difference between the methods is "
           "stated (that needs two seeds or more): where p < 0.05 the statement says these two runs differ")
    # Every statement is rebuilt from the stored per-seed counts, so a table written by an earlier version is
    # judged by the current rules; then Holm over all of them: many comparisons at 5 % each make some false
    # statements likely.
    found = [{**c, **summarise(c["per_seed"])} for c in found]
    holds = holm([c["p"] for c in found])
    notes = {id(c): holm_note(c, h, len(found)) for c, h in zip(found, holds)}
    lines = ["", f"**Paired comparisons** ({how}; each stated difference{' (here: each pair of runs said to differ)' if k == 1 else ''} says whether "
             f"it survives Holm's correction for the {len(found)} comparisons here, family-wise error 5 %). Generated from the numbers:"]
    settings = list(dict.fromkeys((c["row_group"], c["column_group"]) for c in found))
    for setting in settings:
        where = ", ".join(x for x in setting if x)
        if where and len(settings) > 1:
            lines.append(f"- {where}:")
        indent = "  " if where and len(settings) > 1 else ""
        lines += [f"{indent}- {_with_note(statement(c['other'], c['base'], c['column'], c), notes[id(c)])}"
                  for c in found if (c["row_group"], c["column_group"]) == setting]
    return lines


def _with_note(text: str, note: str) -> str:
    """The statement with Holm's verdict inside its closing parenthesis."""
    return text[:-1] + note + ")" if note and text.endswith(")") else text + note


def overrides_lines(summary: dict) -> list[str]:
    """What the command line changed from the preset's description (which then is not the whole story)."""
    changed = changed_settings(summary.get("overrides") or {})
    if not changed:
        return []
    return [f"**Changed from the preset on the command line**: {', '.join(changed)}.", ""]


def flag_lines(summary: dict) -> list[str]:
    """The sanity checks that fired, by row (each evaluation's report holds the details)."""
    fired = [(" ".join(str(x) for x in (r["row_group"], r["row"], r["column_group"]) if x), f)
             for r in summary["rows"] for f in r.get("flags") or []]
    if not fired:
        return []
    return ["", "**Sanity checks that fired** (read these numbers with them; the evaluation reports hold the "
            "details):"] + [f"- {where}: `{f['name']}`: {f['message']}" for where, f in fired]


def _best_epochs(summary: dict) -> str:
    """"TRADES epoch 28, TRADES-SI epoch 30" when the best checkpoints were evaluated (the last epoch needs
    no saying)."""
    if summary["eval"].get("which") != "best":
        return ""
    seen: dict = {}
    for r in summary["rows"]:
        if r.get("epoch") is not None:
            name = " ".join(str(x) for x in (r["row_group"], r["row"], r["column_group"]) if x)
            seen.setdefault(name, r["epoch"])
    return ", ".join(f"{k} epoch {v}" for k, v in seen.items())


def paper_markdown(summary: dict, block: dict) -> list[str]:
    """The paper's numbers for the rows this table shows, in its columns (values as the paper prints them)."""
    labels = list(dict.fromkeys(r["row"] for r in summary["rows"] if r["row"] in block["rows"]))
    cols = [c for c in summary["columns"] if any(column_key(c) in block["rows"][lab] for lab in labels)]
    if not labels or not cols:
        return []
    rows = []
    for label in labels:
        values = block["rows"][label]
        rows.append([label] + ["–" if column_key(c) not in values else
                               (f"{values[column_key(c)]:.4f}" if c["value"] == "adbd" else f"{values[column_key(c)]:.2f}")
                               for c in cols])
    return ["", f"The paper's numbers ({block['setting']}):", "",
            *markdown_table(["Method", *(column_key(c) for c in cols)], rows, "l" + "r" * len(cols))]


def to_csv(summary: dict) -> str:
    """One line per (row, column group, column): long format, easy to load anywhere."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row_group", "method", "model", "column_group", "column_group2", "column", "seed", "value", "unit"])
    for r in summary["rows"]:
        for c in summary["columns"]:
            unit = "linf_distance" if c["value"] == "adbd" else "percent"

            def shown(v):
                return "" if v is None else (f"{v:.6f}" if c["value"] == "adbd" else f"{100 * v:.4f}")
            lead = [r["row_group"], r["row"], r["architecture"], r["column_group"], c["group"], c["label"]]
            key = column_key(c)
            if r.get("per_seed"):  # each seed's value, then their mean and sd
                for one in r["per_seed"]:
                    w.writerow(lead + [one["seed"], shown(one["values"].get(key)), unit])
                w.writerow(lead + ["mean", shown(r["values"].get(key)), unit])
                w.writerow(lead + ["sd", shown((r.get("sd") or {}).get(key)), unit])
            else:
                seed = r.get("seed")
                w.writerow(lead + ["" if seed is None else seed, shown(r["values"].get(key)), unit])
    return buf.getvalue()


_TEX = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
        "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}", "†": r"$^\dagger$",
        "·": r"$\cdot$", "–": "--", "—": "---", "∞": r"$\infty$", "≤": r"$\leq$", "≥": r"$\geq$",
        "×": r"$\times$", "÷": r"$\div$", "±": r"$\pm$", "‖": r"$\|$", "→": r"$\to$", "’": "'"}
# Greek letters as pdflatex knows them (ε is \epsilon in the paper)
_GREEK = {chr(0x3B1 + i): name for i, name in enumerate(
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho varsigma sigma tau "
    "upsilon phi chi psi omega".split())}


def tex_escape(text: str) -> str:
    """Text for a LaTeX table that pdflatex compiles without extra packages: specials escaped, Greek and
    mathematical symbols as math, any other non-ASCII character as a question mark (never an error)."""
    out = []
    for ch in str(text):
        if ch in _TEX:
            out.append(_TEX[ch])
        elif ch in _GREEK and _GREEK[ch] != "omicron":
            out.append(f"$\\{_GREEK[ch]}$")
        elif ord(ch) < 128:
            out.append(ch)
        else:
            out.append("?")
    return "".join(out)


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
    per_group = len(summary["columns"])
    for head in heads[:-1]:  # spanning headers: runs of equal labels, never across a column group's edge
        cells, rules, col = [""] * len(lead), [], len(lead) + 1
        i = 0
        while i < len(head):
            j = i + 1
            while j < len(head) and head[j] == head[i] and j % per_group:
                j += 1
            span = j - i
            if head[i]:
                cells.append(rf"\multicolumn{{{span}}}{{c}}{{{tex_escape(head[i])}}}")
                rules.append(rf"\cmidrule(lr){{{col}-{col + span - 1}}}")
            else:
                cells += [""] * span  # unlabelled columns: one empty cell each
            col += span
            i = j
        lines.append(" & ".join(cells) + r" \\")
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
