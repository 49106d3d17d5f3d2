"""Paired statistics for a table's comparisons: is one row's accuracy different from another's?

Two rows of a table (TRADES and TRADES-SI, say) are evaluated on the same test points with the same
attacks, so each comparison is paired:

* **per seed**, McNemar's exact test on the per-example outcomes (robust or not): with ``b`` the points
  only the base keeps and ``c`` the points only the other row keeps, under H0 each of the ``b + c``
  discordant points is the other row's with probability 1/2, and the two-sided p-value is
  ``min(1, 2 · P[Binomial(b + c, 1/2) <= min(b, c)])`` (computed exactly, in integers);
* **across seeds**, the mean of the per-seed differences (other − base, in accuracy points) with a 95 %
  Student-t interval ``mean ± t(0.975, k−1) · spread / √k`` over the ``k`` seeds, and the matching
  one-sample t-test. The spread is the seeds' sd, but never less than one seed's own sampling error on
  these test points (:func:`sampling_se`, from McNemar's discordant counts): three seeds can agree more
  closely than the test set can measure any one of them (on 200 images a difference moves in steps of
  0.5 points, and three seeds each at −1.00 have sd 0, an infinite t), and the mean of ``k`` seeds is
  not claimed more precise than ``k`` independent measurements of it would be.

A difference is *detected* when, with two seeds or more, that interval excludes 0 (the t-test's p < 0.05);
otherwise the statement says "no difference detected". One seed never detects a difference between the
methods: two trainings of one configuration differ by about as much as SI's gains at this scale (Tables 2, 8
and 10 of docs/reproduction.md: one seed's significant gaps that the next seeds reversed). With one seed the
statement says "no difference detected", and, where McNemar's p < 0.05, that *these two runs* differ on these
points. A table makes many comparisons, so each stated difference (and each pair of runs said to differ) also
says whether it survives Holm's step-down correction over all of the table's comparisons (family-wise error
5 %; :func:`holm`), applied to the p-value its verdict rests on. Statements are rebuilt from the stored per-seed counts (:func:`summarise`), so a table written by an
earlier version is judged by these rules when it is shown.
"""
from __future__ import annotations

import math
import statistics
from fractions import Fraction
from typing import Sequence

ALPHA = 0.05


def t_quantile_975(df: int) -> float:
    """t(0.975, df), the two-sided 95 % quantile of Student's t."""
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    from scipy.stats import t
    return float(t.ppf(0.975, df))


def mcnemar_exact(base: Sequence[bool], other: Sequence[bool]) -> dict:
    """McNemar's exact test on paired per-example outcomes (the same points, in the same order).

    Returns ``{"n", "base_only", "other_only", "p"}``: ``base_only`` points are robust for the base alone,
    ``other_only`` for the other row alone; ``p`` is the two-sided exact p-value (1.0 with no discordant
    point)."""
    if len(base) != len(other):
        raise ValueError(f"paired outcomes need the same points: {len(base)} against {len(other)}")
    b = sum(1 for x, y in zip(base, other) if x and not y)
    c = sum(1 for x, y in zip(base, other) if y and not x)
    return {"n": len(base), "base_only": b, "other_only": c, "p": binomial_two_sided(b, c)}


def binomial_two_sided(b: int, c: int) -> float:
    """``min(1, 2 · P[Binomial(b + c, 1/2) <= min(b, c)])``, exact (integer arithmetic, any size)."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))


def mean_interval(diffs: Sequence[float], floor: float = 0.0) -> dict:
    """Mean, sd and the 95 % t interval of per-seed differences (no interval and sd from one seed), with the
    matching two-sided t-test p. ``floor``: the least spread believed (each seed's own measurement error, see
    the module's docstring); the interval and p use ``spread = max(sd, floor)``."""
    k = len(diffs)
    if k == 0:
        raise ValueError("no differences to summarise")
    mean = statistics.fmean(diffs)
    if k == 1:
        return {"k": 1, "mean": mean, "sd": None, "spread": None, "floored": False, "low": None, "high": None,
                "p": None}
    sd = statistics.stdev(diffs)
    spread = max(sd, floor)
    half = t_quantile_975(k - 1) * spread / math.sqrt(k)
    return {"k": k, "mean": mean, "sd": sd, "spread": spread, "floored": floor > sd, "low": mean - half,
            "high": mean + half, "p": t_test_p(mean, spread, k)}


def t_test_p(mean: float, spread: float, k: int) -> float:
    """Two-sided p-value of the one-sample t-test of ``k`` per-seed differences against 0, with ``spread``
    as their sd (1 when the spread is 0: then every difference is 0, see :func:`summarise`)."""
    if k < 2:
        raise ValueError(f"a t-test needs at least 2 seeds, got {k}")
    if spread <= 0:
        return 1.0 if mean == 0 else 0.0
    from scipy.stats import t
    return float(2 * t.sf(abs(mean) / (spread / math.sqrt(k)), k - 1))


def sampling_se(seed: dict) -> float:
    """One seed's standard error of its difference (points) on its ``n`` test points: with ``b`` and ``c`` the
    points only the base or only the other row keeps, ``100 · √(b + c − (c − b)² / n) / n``, the paired
    difference of two proportions (the variance McNemar's test is built on)."""
    n, b, c = seed["n"], seed["base_only"], seed["other_only"]
    return 100 * math.sqrt(max(0.0, b + c - (c - b) ** 2 / n)) / n


def summarise(per_seed: list) -> dict:
    """The across-seed result of per-seed comparisons (each ``{"seed", "n", "base", "other", "diff",
    "base_only", "other_only", "p"}``): mean, sd, the spread used (the sd floored at the seeds' mean
    sampling error), the 95 % interval, the p-value the verdict rests on, and the verdict."""
    diffs = [p["diff"] for p in per_seed]
    k = len(diffs)
    if k == 0:
        raise ValueError("no seeds to summarise")
    out = {**mean_interval(diffs, floor=statistics.fmean(sampling_se(p) for p in per_seed)),
           "above": sum(d > 0 for d in diffs), "below": sum(d < 0 for d in diffs),
           "significant_seeds": sum(p["p"] < ALPHA for p in per_seed)}
    if k == 1:  # these two runs, not the methods (the module's docstring)
        out["p"] = per_seed[0]["p"]
        out["runs_differ"] = out["p"] < ALPHA
        out["verdict"] = "no difference detected"
        return out
    out["verdict"] = ("higher" if out["mean"] > 0 else "lower") if out["p"] < ALPHA else "no difference detected"
    return out


def holm(ps: Sequence[float], alpha: float = ALPHA) -> list[bool]:
    """Holm's step-down correction: which of these p-values are rejections at family-wise error ``alpha``.
    Sorted ascending, the i-th (from 0) is compared with ``alpha / (m - i)``; the first that fails stops it,
    and it and every larger p fail. Holds for any dependence between the tests (Holm 1979). A NaN is 1."""
    ps = [1.0 if math.isnan(p) else p for p in ps]
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    keep = [False] * len(ps)
    for rank, i in enumerate(order):
        if ps[i] >= alpha / (len(ps) - rank):
            break
        keep[i] = True
    return keep


def holm_note(result: dict, holds: bool, m: int) -> str:
    """What Holm's correction over the table's ``m`` comparisons says of a stated difference ("" for none)."""
    if result["verdict"] == "no difference detected" and not result.get("runs_differ"):
        return ""
    # with seeds the p-value is not printed elsewhere in the statement: say it, so the reader sees how far
    # from Holm's threshold it is (3 seeds need t > 20 for p < 0.05 / 20)
    p = f"t-test p = {p_text(result['p'])} over the {result['k']} seeds: " if result["k"] >= 2 else \
        "the two runs' difference "  # one seed: what is corrected is the runs' difference, not a verdict
    return f"; {p}{'holds' if holds else 'does not hold'} under Holm's correction for the {m} " \
           f"comparison{'s' if m != 1 else ''}"


def compare(base: dict, other: dict) -> dict:
    """One comparison under one column: ``base`` and ``other`` map seed -> per-example outcomes (the same
    points for both rows of a seed). Per seed: the two accuracies, their difference in points and McNemar's
    test; across seeds: :func:`summarise`."""
    seeds = sorted(set(base) & set(other))
    if not seeds:
        raise ValueError("the two rows share no seed")
    per_seed = []
    for s in seeds:
        test = mcnemar_exact(base[s], other[s])
        n = test["n"]
        kept_b, kept_o = sum(map(bool, base[s])), sum(map(bool, other[s]))
        # from the integer counts: equal differences in images are equal floats, whatever the accuracies
        per_seed.append({"seed": s, "base": kept_b / n, "other": kept_o / n, "diff": 100 * (kept_o - kept_b) / n,
                         **test})
    return {"seeds": seeds, "per_seed": per_seed, **summarise(per_seed)}


def paired_values(base: Sequence[float], other: Sequence[float]) -> dict:
    """Two models' values on the same images, in the same order (Fig. 5's cos θ_y): the mean of the per-image
    differences (other − base) with its 95 % t interval over the images, how many images each model has the
    larger value on, and the two-sided Wilcoxon signed-rank p-value (zero differences dropped). It compares
    these two trained models on these images: with one model per method it says nothing of the spread between
    training seeds."""
    if len(base) != len(other):
        raise ValueError(f"paired values need the same images: {len(base)} against {len(other)}")
    if len(base) < 2:
        raise ValueError(f"paired values need at least 2 images, got {len(base)}")
    diffs = [o - b for b, o in zip(base, other)]
    from scipy.stats import wilcoxon
    nonzero = [d for d in diffs if d != 0]
    p = float(wilcoxon(nonzero).pvalue) if nonzero else 1.0
    return {"n": len(diffs), **mean_interval(diffs), "larger": sum(d > 0 for d in diffs),
            "smaller": sum(d < 0 for d in diffs), "p": p}


def _points(x: float) -> str:
    return f"{x:+.2f}".replace("-", "−")


def statement(other: str, base: str, column: str, result: dict) -> str:
    """The sentence a table prints for one comparison, generated from the numbers alone, e.g.
    "TRADES-SI above TRADES under worst case in 3 of 3 seeds, mean +1.20 points [+0.40, +2.00]"."""
    k = result["k"]
    seeds = f"{k} seed{'s' if k > 1 else ''}"
    if k >= 2:
        floored = f" (the seeds' sd, {result['sd']:.2f}, is below one seed's sampling error on these points: " \
                  f"{result['spread']:.2f} is used)" if result.get("floored") else ""
        numbers = f"mean {_points(result['mean'])} points, 95 % interval [{_points(result['low'])}, " \
                  f"{_points(result['high'])}]{floored}; McNemar p < 0.05 in {result['significant_seeds']} of {k}"
    else:
        p = result["per_seed"][0]
        kept = f"{p['other_only']} point{'' if p['other_only'] == 1 else 's'}"
        numbers = f"{_points(result['mean'])} points, McNemar p = {p_text(p['p'])} ({kept} kept by " \
                  f"{other} alone, {p['base_only']} by {base} alone, of {p['n']})"
        runs = "these two runs differ, which says nothing of another seed's: " if result.get("runs_differ") else ""
        return f"{other} vs {base} under {column}: no difference detected (one seed; {runs}{numbers})"
    if result["verdict"] == "no difference detected":
        return f"{other} vs {base} under {column}: no difference detected ({numbers}; {other} above in " \
               f"{result['above']} of {seeds})"
    word = "above" if result["verdict"] == "higher" else "below"
    count = result["above"] if word == "above" else result["below"]
    return f"{other} {word} {base} under {column} in {count} of {seeds} ({numbers})"


def p_text(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def default_pairs(rows: list) -> list[tuple[str, str]]:
    """(base, other) for every row trained with SI whose row without SI (the same training settings
    otherwise) is in the table: every ± SI pair."""
    pairs = []
    for row in rows:
        if not row.train.get("si"):
            continue
        plain = {k: v for k, v in row.train.items() if k != "si"}
        base = next((r for r in rows if r is not row and r.model is None and r.view == row.view
                     and {k: v for k, v in r.train.items() if k != "si"} == plain and not r.train.get("si")), None)
        if base is not None:
            pairs.append((base.label, row.label))
    return pairs
