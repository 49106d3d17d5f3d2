"""A grid's evidence: seeds as an axis (mean ± sd per cell), paired tests generated from the per-example
outcomes (McNemar per seed, a t interval across seeds), and grids computed in parallel (--jobs, --shard,
--collect) with every run trained exactly once."""
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats as sps

from sirobust.reproduce import ConfigError, IncompleteGrid, load_experiment, reproduce
from sirobust.reproduce.plan import make_plan, shard_runs
from sirobust.reproduce.stats import (compare, default_pairs, holm, mcnemar_exact, mean_interval, paired_values, statement,
                                      t_test_p)
from sirobust.reproduce.tables import comparison_lines

from test_reproduce import TINY, _quiet, _write

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the statistics alone

def test_mcnemar_exact_equals_scipys_binomial_test():
    import random
    rng = random.Random(0)
    for n, flip in ((50, 0.1), (400, 0.03), (10000, 0.01), (3000, 0.3)):
        base = [rng.random() < 0.6 for _ in range(n)]
        other = [b if rng.random() > flip else not b for b in base]
        got = mcnemar_exact(base, other)
        b = sum(x and not y for x, y in zip(base, other))
        c = sum(y and not x for x, y in zip(base, other))
        assert (got["base_only"], got["other_only"], got["n"]) == (b, c, n)
        expected = sps.binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
        assert got["p"] == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert mcnemar_exact([True, False], [True, False])["p"] == 1.0  # no discordant point
    with pytest.raises(ValueError, match="same points"):
        mcnemar_exact([True], [True, False])


def test_mean_interval_is_students_t_interval():
    diffs = [1.5, 0.4, 2.1]
    got = mean_interval(diffs)
    low, high = sps.t.interval(0.95, len(diffs) - 1, loc=statistics.fmean(diffs), scale=sps.sem(diffs))
    assert got["low"] == pytest.approx(low) and got["high"] == pytest.approx(high)
    assert got["sd"] == pytest.approx(statistics.stdev(diffs))
    one = mean_interval([0.7])
    assert one["low"] is None and one["sd"] is None and one["mean"] == 0.7


def test_paired_values_test_the_per_image_differences():
    """Fig. 5's comparison: the same images under two models. Six positive differences: Wilcoxon's exact
    two-sided p is 2/2^6; the interval is the t interval of the differences."""
    base = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    other = [b + d for b, d in zip(base, [0.01, 0.02, 0.03, 0.04, 0.05, 0.06])]
    got = paired_values(base, other)
    diffs = [o - b for b, o in zip(base, other)]
    low, high = sps.t.interval(0.95, 5, loc=statistics.fmean(diffs), scale=sps.sem(diffs))
    assert got["p"] == pytest.approx(2 / 2 ** 6) and got["larger"] == 6 and got["smaller"] == 0
    assert got["low"] == pytest.approx(low) and got["high"] == pytest.approx(high) and got["low"] > 0
    mixed = paired_values(base, [b + d for b, d in zip(base, [0.01, -0.02, 0.03, -0.04, 0.05, -0.06])])
    assert mixed["p"] > 0.5 and mixed["low"] < 0 < mixed["high"] and (mixed["larger"], mixed["smaller"]) == (3, 3)
    assert paired_values(base, base)["p"] == 1.0  # no difference at all
    with pytest.raises(ValueError, match="same images"):
        paired_values(base, other[:5])


def test_statements_say_only_what_the_numbers_support():
    # 3 seeds, all above, interval above 0: a detected difference
    up = {s: [True] * (60 + d) + [False] * (40 - d) for s, d in ((0, 0), (1, 1), (2, -1))}
    down = {s: [True] * 50 + [False] * 50 for s in range(3)}
    res = compare(down, up)
    assert res["verdict"] == "higher" and res["above"] == 3
    text = statement("X-SI", "X", "PGD", res)
    assert text.startswith("X-SI above X under PGD in 3 of 3 seeds (mean +10.00 points")
    # one seed above, one below: no difference detected, whatever the per-seed p-values
    mixed = compare({0: [True] * 50 + [False] * 50, 1: [True] * 60 + [False] * 40},
                    {0: [True] * 60 + [False] * 40, 1: [True] * 50 + [False] * 50})
    assert mixed["verdict"] == "no difference detected"
    assert "no difference detected" in statement("X-SI", "X", "PGD", mixed)
    # one seed: McNemar decides; a 2-point gap on 100 images is not a difference
    small = compare({0: [True] * 50 + [False] * 50}, {0: [True] * 52 + [False] * 48})
    assert small["verdict"] == "no difference detected" and small["k"] == 1
    assert "McNemar p = 0.5" in statement("X-SI", "X", "PGD", small)
    # one seed never states a difference between the methods, however small McNemar's p: it says these two
    # runs differ (two trainings of one configuration differ by as much, docs/reproduction.md)
    big = compare({0: [True] * 50 + [False] * 50}, {0: [True] * 80 + [False] * 20})
    assert big["p"] < 1e-8 and big["verdict"] == "no difference detected" and big["runs_differ"]
    assert statement("X-SI", "X", "PGD", big).startswith(
        "X-SI vs X under PGD: no difference detected (one seed; these two runs differ, which says nothing of "
        "another seed's: +30.00 points, McNemar p = ")
    assert not small["runs_differ"] and "runs differ" not in statement("X-SI", "X", "PGD", small)


def test_the_demo_says_two_runs_differ_never_that_one_method_beats_the_other():
    from types import SimpleNamespace

    from sirobust.demo import si_verdict
    def report(kept):
        return SimpleNamespace(worst_case_robust=[True] * kept + [False] * (100 - kept), worst_case_acc=kept / 100)
    text = si_verdict([("TRADES", report(50)), ("TRADES-SI", report(80))], epochs=3)  # McNemar p ~ 1e-9
    assert "these two runs differ" in text and "no difference between the methods is detected" in text
    assert "keeps 30.0 points more" in text and "TRADES-SI is" not in text
    assert "no difference detected (McNemar p = 0.5" in si_verdict([("TRADES", report(50)), ("TRADES-SI", report(52))], 3)


def test_holm_rejects_step_down_and_stops_at_the_first_failure():
    # m = 4: thresholds 0.0125, 0.0167, 0.025, 0.05 for the sorted p-values
    assert holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]  # 0.03 > 0.025 stops it: 0.04 fails too
    assert holm([0.001, 0.012, 0.02, 0.049]) == [True, True, True, True]
    assert holm([0.03, 0.02]) == [True, True]  # step-down: Bonferroni (0.025 each) would keep 0.02 alone
    assert holm([0.026, 0.04]) == [False, False]  # the first fails, so 0.04 < 0.05 fails too
    assert holm([0.02, 0.02]) == [True, True] and holm([0.026, 0.026]) == [False, False]  # ties: one decision
    assert holm([float("nan"), 0.001]) == [False, True]  # a missing p is no evidence
    assert holm([]) == []


def test_the_t_test_p_value_agrees_with_scipy_and_with_the_interval():
    for diffs in ([1.2, 2.0, 2.2], [0.3, -0.1, 0.9, 0.4], [-1.5, -1.4, -1.7], [0.5, 0.6]):
        mi = mean_interval(diffs)
        p = t_test_p(mi["mean"], mi["sd"], mi["k"])
        assert p == pytest.approx(sps.ttest_1samp(diffs, 0.0).pvalue)
        assert (p < 0.05) == (mi["low"] > 0 or mi["high"] < 0)  # the verdict and its p-value agree
    mi = mean_interval([0.3, -0.1, 0.9], floor=2.0)  # a floor above the sd widens the interval, raises p
    assert mi["floored"] and mi["spread"] == 2.0 and mi["p"] == pytest.approx(t_test_p(mi["mean"], 2.0, 3))
    assert mi["high"] - mi["low"] == pytest.approx(2 * sps.t.ppf(0.975, 2) * 2.0 / 3 ** 0.5)
    assert t_test_p(0.0, 0.0, 3) == 1.0
    with pytest.raises(ValueError, match="at least 2 seeds"):
        t_test_p(1.0, 1.0, 1)


def _kept(kept, n):
    return [True] * kept + [False] * (n - kept)


def test_seeds_that_agree_closer_than_the_test_set_can_measure_are_not_a_certainty():
    # AutoAttack on 200 images moves in steps of 0.5 points: three seeds each 2 images lower have sd 0, an
    # infinite t; the spread is floored at one seed's sampling error, so it is no difference. The accuracies
    # 113, 120 and 57 of 200 give unequal floats for the difference under accuracy subtraction.
    base = {s: _kept(k, 200) for s, k in enumerate((113, 120, 57))}
    other = {s: _kept(k - 2, 200) for s, k in enumerate((113, 120, 57))}
    res = compare(base, other)
    assert {p["diff"] for p in res["per_seed"]} == {-1.0}  # from the counts: exactly equal
    assert res["sd"] == 0 and res["floored"] and res["spread"] == pytest.approx(100 * (2 - 4 / 200) ** 0.5 / 200)
    assert res["p"] > 0.05 and res["verdict"] == "no difference detected"
    assert "the seeds' sd, 0.00, is below one seed's sampling error on these points: 0.70 is used" in \
        statement("B", "A", "AA", res)
    # continuous in the evidence: the same gap with a hair of spread gets the same p (the floor binds in both)
    n = 10000
    same = compare({s: _kept(5000, n) for s in range(3)}, {s: _kept(4000, n) for s in range(3)})
    near = compare({s: _kept(5000, n) for s in range(3)}, {0: _kept(4000, n), 1: _kept(3999, n), 2: _kept(4000, n)})
    assert same["verdict"] == near["verdict"] == "lower" and same["p"] == pytest.approx(near["p"], rel=0.01)


def test_the_verdict_is_the_interval_rule_on_random_counts():
    import random
    rng = random.Random(1)
    for _ in range(200):
        n, k = rng.choice((200, 1000, 10000)), rng.choice((2, 3, 5))
        kept = rng.randrange(n // 4, 3 * n // 4)
        gaps = [rng.randrange(-n // 20, n // 20 + 1) for _ in range(k)]
        shifts = [rng.randrange(0, n // 10) for _ in range(k)]  # points lost both ways, not only one
        other = {s: (lambda o, r: o[r:] + o[:r])(_kept(kept + gaps[s], n), shifts[s]) for s in range(k)}
        res = compare({s: _kept(kept, n) for s in range(k)}, other)
        excludes = res["low"] > 0 or res["high"] < 0
        assert (res["verdict"] != "no difference detected") == excludes == (res["p"] < 0.05)
        assert res["spread"] >= res["sd"]


def test_a_table_stored_by_an_earlier_version_is_shown_by_the_current_rules():
    # written before the floor: sd of float noise, a stated "lower" and its old sentence, no top-level p
    per_seed = [{"seed": s, "n": 200, "base": 0.6, "other": 0.59, "diff": -1.0 + e, "base_only": 3, "other_only": 1,
                 "p": 0.625} for s, e in enumerate((0.0, 1e-15, -1e-15))]
    old = {"base": "A", "other": "B", "row_group": None, "column_group": None, "column": "AA", "k": 3,
           "mean": -1.0, "sd": 1e-15, "low": -1.0, "high": -1.0, "above": 0, "below": 3, "significant_seeds": 0,
           "verdict": "lower", "seeds": [0, 1, 2], "per_seed": per_seed,
           "statement": "B below A under AA in 3 of 3 seeds (mean −1.00 points, 95 % interval [−1.00, −1.00])"}
    text = "\n".join(comparison_lines({"seeds": [0, 1, 2], "comparisons": [old]}))
    assert "B vs A under AA: no difference detected" in text and "[−1.00, −1.00]" not in text
    assert "Holm's correction for the 1 comparison)" not in text  # nothing stated, nothing corrected
    assert "for the 1 comparison here" in text or "for the 1 comparisons here" in text


def test_each_stated_difference_says_whether_it_survives_holm_over_the_table():
    def outcomes(kept):
        return [True] * kept + [False] * (1000 - kept)
    # a large gap in each of 3 seeds, nearly equal: t-test p tiny; a small unequal one: p ~ 0.03
    strong = compare({s: outcomes(600) for s in range(3)}, {0: outcomes(700), 1: outcomes(701), 2: outcomes(699)})
    weak = compare({s: outcomes(600) for s in range(3)}, {0: outcomes(610), 1: outcomes(620), 2: outcomes(615)})
    none = compare({s: outcomes(600) for s in range(3)}, {0: outcomes(610), 1: outcomes(590), 2: outcomes(600)})
    assert strong["verdict"] == weak["verdict"] == "higher" and none["verdict"] == "no difference detected"
    assert strong["p"] < 0.05 / 3 and 0.05 / 2 < weak["p"] < 0.05
    found = [{**c, "row_group": None, "column_group": None, "base": "A", "other": "B", "column": col,
              "statement": statement("B", "A", col, c)} for c, col in ((strong, "PGD"), (weak, "CW"), (none, "AA"))]
    text = "\n".join(comparison_lines({"seeds": [0, 1, 2], "comparisons": found}))
    assert "Holm's correction for the 3 comparisons" in text
    line = {col: next(x for x in text.splitlines() if f"under {col}" in x) for col in ("PGD", "CW", "AA")}
    assert line["PGD"].endswith("over the 3 seeds: holds under Holm's correction for the 3 comparisons)")
    assert "over the 3 seeds: does not hold under Holm's correction" in line["CW"]
    assert "Holm" not in line["AA"]  # nothing stated, nothing to correct
    # one seed: McNemar's p (already in the statement) is the one corrected
    one = compare({0: outcomes(600)}, {0: outcomes(640)})
    found = [{**one, "row_group": None, "column_group": None, "base": "A", "other": "B", "column": "PGD",
              "statement": statement("B", "A", "PGD", one)}]
    text = "\n".join(comparison_lines({"seeds": [0], "comparisons": found}))
    assert one["p"] == one["per_seed"][0]["p"] < 0.05 and "the two runs' difference holds under Holm's correction for the 1 comparison)" in text


def test_every_si_row_is_compared_with_its_base_by_default():
    exp = load_experiment("table6")
    assert default_pairs(exp.rows) == [("AT", "AT-SI"), ("TRADES", "TRADES-SI"), ("ALP", "ALP-SI"),
                                       ("MART", "MART-SI")]
    assert make_plan(exp, "mini").comparisons == default_pairs(exp.rows)


# ---------------------------------------------------------------- seeds in a plan

def test_seeds_are_an_axis_over_every_run_and_seed_0_keeps_its_runs(tmp_path):
    exp = load_experiment("table6")
    plan = make_plan(exp, "mini")
    assert plan.seeds == [0, 1, 2] and len(plan.runs) == 24 and len(plan.cells) == 24
    assert sorted({c.seed for c in plan.cells}) == [0, 1, 2]
    one = make_plan(exp, "mini", {"seeds": [0]})
    assert set(one.runs) <= set(plan.runs)  # seed 0's runs are the grid's: reused, never retrained
    # ... and those of a table without seeds, as named before seeds existed (a running grid keeps its runs)
    assert "fashion-mnist-mini/cnn-small/at-e30-cf01001cb3" in one.runs
    assert "fashion-mnist-mini/cnn-small/trades-si-e30-f571c92599" in one.runs
    # --seed S on a table with a seed axis is that one seed
    single = make_plan(exp, "mini", {"train": {"seed": 1}})
    assert single.seeds == [1] and {c.seed for c in single.cells} == {1} and single.overrides["seeds"] == [1]
    assert one.overrides["seeds"] == [0]
    assert "seeds" not in make_plan(exp, "mini", {"seeds": [0, 1, 2]}).overrides  # the preset's own: no override
    with pytest.raises(ConfigError, match="--seed and --seeds together"):
        make_plan(exp, "mini", {"seeds": [0, 1], "train": {"seed": 3}})
    for bad, words in (([], "at least one seed"), ([0, 0], "given twice"), ([-1], "integer >= 0")):
        with pytest.raises(ConfigError, match=words):
            make_plan(exp, "mini", {"seeds": bad})
    with pytest.raises(ConfigError, match="fig3 is drawn from one seed's runs"):
        make_plan(load_experiment("fig3"), "smoke", {"seeds": [0, 1]})
    bad_cfg = _write(tmp_path, TINY + '\n[[comparisons]]\nbase = "AT"\nother = "HE"\n')
    with pytest.raises(ConfigError, match=r"comparisons\[0\].other: no row is labelled 'HE'"):
        load_experiment(str(bad_cfg))


def test_a_shard_is_a_deterministic_quarter_and_the_shards_cover_the_grid():
    plan = make_plan(load_experiment("table6"), "paper")
    parts = [shard_runs(plan, k, 4) for k in range(1, 5)]
    assert all(len(p) == 8 for p in parts)
    assert set().union(*parts) == set(plan.runs) and sum(map(len, parts)) == 32  # disjoint, complete
    assert parts == [shard_runs(make_plan(load_experiment("table6"), "paper"), k, 4) for k in range(1, 5)]
    with pytest.raises(ConfigError, match="between 1 and N"):
        shard_runs(plan, 5, 4)


def test_cli_shard_dry_run_lists_a_quarter_of_the_runs(capsys):
    from sirobust.cli import main
    assert main(["reproduce", "table6", "--preset", "paper", "--shard", "1/4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "shard 1/4 trains 8 of them" in out
    assert len(re.findall(r"^    cifar\d+/\S+-e\d+-[0-9a-f]{10}$", out, re.M)) == 8
    for bad in ("0/4", "5/4", "a/b", "3"):
        with pytest.raises(SystemExit) as e:
            main(["reproduce", "table6", "--shard", bad, "--dry-run"])
        assert e.value.code == 2 and "--shard takes K/N" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "table6", "--seeds", "0,x", "--dry-run"])
    assert e.value.code == 2 and "--seeds takes integers" in capsys.readouterr().err


# ---------------------------------------------------------------- a 2-seed grid, end to end

def _reports(row):
    return [json.loads(Path(p).read_text())["report"] for p in row["reports"]]


def test_two_seed_grid_cells_and_tests_equal_a_direct_computation(tmp_path):
    cfg = _write(tmp_path, TINY)
    out = tmp_path / "out"
    summary = reproduce(str(cfg), preset="smoke", out=str(out), progress=False, log=_quiet,
                        overrides={"seeds": [0, 1]})
    assert summary["seeds"] == [0, 1] and summary["counts"]["trained"] == 4
    rows = {r["row"]: r for r in summary["rows"]}
    outcomes = {}
    for label, row in rows.items():
        assert [p["seed"] for p in row["per_seed"]] == [0, 1]
        per_seed = {}
        for one in row["per_seed"]:
            (path,) = [p for p in row["reports"] if Path(p).is_relative_to(Path(one["run"]))]
            rep = json.loads(Path(path).read_text())["report"]
            assert one["values"]["PGD"] == rep["attacks"]["pgd"]["robust_acc"]
            per_seed[one["seed"]] = rep
        for key, get in (("Natural", lambda r: r["clean_acc"]), ("PGD", lambda r: r["attacks"]["pgd"]["robust_acc"]),
                         ("worst", lambda r: r["worst_case_acc"])):
            vals = [get(per_seed[s]) for s in (0, 1)]
            assert row["values"][key] == pytest.approx(statistics.fmean(vals))
            assert row["sd"][key] == pytest.approx(statistics.stdev(vals))
        outcomes[label] = per_seed
    md = (out / [p.name for p in out.iterdir() if p.name.startswith("tiny-smoke+")][0] / "table.md").read_text()
    at = rows["AT"]
    assert f"| AT | {100 * at['values']['PGD']:.2f} ± {100 * at['sd']['PGD']:.2f} |" in md.replace(
        f"{100 * at['values']['Natural']:.2f} ± {100 * at['sd']['Natural']:.2f} | ", "")
    assert "mean ± sd over 2 training seeds (0, 1)" in md
    work = summary["work"]  # the time the results took, whoever computed them
    assert work["runs"] == 4 and work["evaluations"] == 4 and work["train_seconds"] > 0 and work["eval_seconds"] > 0
    assert "h of training (4 runs)" in md
    # every comparison: McNemar's p from the raw per-example outcomes, and the mean difference
    found = {c["column"]: c for c in summary["comparisons"]}
    assert set(found) == {"Natural", "PGD", "SI-PGD", "worst"}
    for key, field in (("PGD", lambda r: r["attacks"]["pgd"]["robust"]),
                       ("SI-PGD", lambda r: r["attacks"]["si-pgd"]["robust"]),
                       ("worst", lambda r: r["worst_case_robust"]), ("Natural", lambda r: r["clean_correct"])):
        c = found[key]
        assert (c["base"], c["other"]) == ("AT", "AT-SI")
        diffs = []
        for one in c["per_seed"]:
            b, o = field(outcomes["AT"][one["seed"]]), field(outcomes["AT-SI"][one["seed"]])
            only_b = sum(x and not y for x, y in zip(b, o))
            only_o = sum(y and not x for x, y in zip(b, o))
            p = sps.binomtest(min(only_b, only_o), only_b + only_o, 0.5).pvalue if only_b + only_o else 1.0
            assert (one["base_only"], one["other_only"]) == (only_b, only_o)
            assert one["p"] == pytest.approx(p)
            diffs.append(100 * (sum(map(bool, o)) - sum(map(bool, b))) / len(b))
        assert c["mean"] == pytest.approx(statistics.fmean(diffs))
        assert c["statement"][:-1] in md  # Holm's note goes inside its closing parenthesis
    csv = (out / [p.name for p in out.iterdir() if p.name.startswith("tiny-smoke+")][0] / "table.csv").read_text()
    assert csv.splitlines()[0].endswith(",seed,value,unit")
    assert len(csv.splitlines()) == 1 + 2 * 4 * 4  # 2 rows, 4 columns, (seed 0, seed 1, mean, sd)

    # seed 0 alone afterwards: reused, and the same numbers as seed 0 inside the grid
    again = reproduce(str(cfg), preset="smoke", out=str(out), progress=False, log=_quiet)
    assert again["counts"]["trained"] == 0 and again["counts"]["evaluated"] == 0
    assert {r["row"]: r["values"] for r in again["rows"]} == {
        label: row["per_seed"][0]["values"] for label, row in rows.items()}


def test_collect_names_what_is_missing(tmp_path):
    cfg = _write(tmp_path, TINY)
    with pytest.raises(IncompleteGrid, match=r"AT, seed 0: .*at-e1-"):
        reproduce(str(cfg), preset="smoke", out=str(tmp_path / "out"), progress=False, log=_quiet, collect=True)
    with pytest.raises(ConfigError, match="--shard and --collect together"):
        reproduce(str(cfg), preset="smoke", out=str(tmp_path / "out"), log=_quiet, collect=True, shard=(1, 2))
    with pytest.raises(ConfigError, match="--overwrite with --shard"):
        reproduce(str(cfg), preset="smoke", out=str(tmp_path / "out"), log=_quiet, overwrite=True, shard=(1, 2))
    with pytest.raises(ConfigError, match="one GPU of its own"):
        reproduce(str(cfg), preset="smoke", out=str(tmp_path / "out"), log=_quiet, jobs=2, device="cuda:1")


# ---------------------------------------------------------------- in parallel

def _cli(args, cwd, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SIROBUST_NUM_THREADS": "1", **(env_extra or {})}
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "sirobust", "reproduce", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _trainings(text: str) -> int:
    return len(re.findall(r"epoch 1/1 ", text))


def _table(out: Path) -> dict:
    (folder,) = [p for p in out.iterdir() if p.name.startswith("tiny-smoke")]
    return {(r["row"], r.get("seed")): (r["values"], r.get("sd")) for r in
            json.loads((folder / "table.json").read_text())["rows"]}


# 44 s on this project's 2-core CPU (seven CLI processes, three grids of four runs): in the slow set; the lock that
# gives each unit to one process is also tested in-process by the next test, in the default set
@pytest.mark.slow
def test_jobs_and_concurrent_shards_train_each_run_once_and_give_the_one_process_table(tmp_path):
    cfg = _write(tmp_path, TINY)
    common = [str(cfg), "--preset", "smoke", "--seeds", "0,1", "--no-progress"]
    single = _cli(common + ["--out", str(tmp_path / "single")], tmp_path)
    text = single.communicate(timeout=300)[0]
    assert single.returncode == 0, text
    assert _trainings(text) == 4
    reference = _table(tmp_path / "single")

    jobs = _cli(common + ["--out", str(tmp_path / "jobs"), "--jobs", "2"], tmp_path)
    text = jobs.communicate(timeout=300)[0]
    assert jobs.returncode == 0, text
    assert _trainings(text) == 4 and "[job 1/2]" in text and "[job 2/2]" in text
    assert _table(tmp_path / "jobs") == reference

    # two shards of a SLURM array started together, and a third process doing the whole grid beside them
    # (a shard of one): the locks let every run be trained exactly once
    procs = [_cli(common + ["--out", str(tmp_path / "shards"), "--shard", s], tmp_path) for s in ("1/2", "2/2", "1/1")]
    texts = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), texts
    assert _trainings("".join(texts)) == 4
    collect = _cli(common + ["--out", str(tmp_path / "shards"), "--collect"], tmp_path)
    text = collect.communicate(timeout=300)[0]
    assert collect.returncode == 0, text
    assert _trainings(text) == 0 and "evaluate]" not in text
    assert _table(tmp_path / "shards") == reference
    runs = list((tmp_path / "shards" / "runs").rglob("summary.json"))
    assert len(runs) == 4 and not list((tmp_path / "shards").rglob("*.partial"))


# ~45 s of CLI processes: slow set (the same stops in-process are in the default set, below)
@pytest.mark.slow
def test_a_stop_signal_to_jobs_inside_an_evaluation_saves_its_batches_and_says_how_to_continue(tmp_path):
    """SIGTERM to `reproduce --jobs 2` reaches each job, which ends its evaluation after the batch it is on (saved
    in the .partial folder), or stops after it when that was its last batch, and says so, instead of dying by
    the signal (exit -15, nothing said)."""
    import signal
    long_eval = TINY.replace('eval = { n = 24, steps = 2 }', 'eval = { n = 4000, steps = 20, batch_size = 100 }')
    cfg = _write(tmp_path, long_eval)
    proc = _cli([str(cfg), "--preset", "smoke", "--no-progress", "--out", str(tmp_path / "out"), "--jobs", "2"],
                tmp_path)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "[evaluate]" in line:
            break
    proc.send_signal(signal.SIGTERM)
    text = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "exited with status" not in text, text
    assert "SIGTERM received; stopping after the current step" in text, text  # heard at once
    assert re.search(r"\[job \d/2\] stopped: stopped by SIGTERM ((during|before) \S+; every finished batch is saved \(in "
                     r".*\.partial\)|after the evaluation \S+; every finished evaluation is saved)\. Continue with "
                     r"the same command", text), text
    assert list((tmp_path / "out").rglob("*.partial/*")) or list((tmp_path / "out").rglob("eval-*.json")), text


def _signal_during(monkeypatch, module, name, signum, at_end=False):
    """Make ``module.name`` send this process ``signum`` on its first call, as it starts or (``at_end``) as it
    returns."""
    import os
    real = getattr(module, name)
    calls = []

    def signalled(*a, **k):
        calls.append(1)
        if len(calls) == 1 and not at_end:
            os.kill(os.getpid(), signum)  # handled by graceful_stop's handler: the flag is set, the work goes on
        out = real(*a, **k)
        if len(calls) == 1 and at_end:
            os.kill(os.getpid(), signum)
        return out
    monkeypatch.setattr(module, name, signalled)
    return calls


def test_a_stop_signal_in_a_grids_evaluation_stops_it_after_the_batch_and_the_same_command_continues(
        tmp_path, monkeypatch):
    """Inside an evaluation (its first batch): stopped after that batch, which is saved; in the last batch
    of the last attack (the evaluation finishes): the grid stops after it rather than going on with its queue;
    the same command then finishes the grid, reusing what was saved."""
    import importlib
    import signal

    from sirobust.interrupts import RunInterrupted, take_pending_stop
    ev = importlib.import_module("sirobust.evaluate")  # the module (the package's `evaluate` is the function)
    cfg = _write(tmp_path, TINY.replace('eval = { n = 24, steps = 2 }', 'eval = { n = 24, steps = 2, batch_size = 12 }'))
    out = str(tmp_path / "out")
    batches = _signal_during(monkeypatch, ev, "_run_batch", signal.SIGTERM)
    with pytest.raises(RunInterrupted, match=r"stopped by SIGTERM (during|before) \S+; every finished batch is saved \(in .*"
                                             r"\.partial\)\. Continue with the same command") as e:
        reproduce(str(cfg), preset="smoke", out=out, progress=False, log=_quiet)
    assert e.value.exit_code == 143 and len(batches) == 1 and list((tmp_path / "out").rglob("*.partial/*"))
    monkeypatch.undo()
    evaluations = _signal_during(monkeypatch, ev, "evaluate", signal.SIGTERM, at_end=True)
    with pytest.raises(RunInterrupted, match=r"stopped by SIGTERM after the evaluation \S+eval-\S+\.json; every "
                                             r"finished evaluation is saved\. Continue with the same command"):
        reproduce(str(cfg), preset="smoke", out=out, progress=False, log=_quiet)
    assert len(evaluations) == 1 and take_pending_stop() is None  # the grid stopped there, not after its queue
    monkeypatch.undo()
    lines = []
    summary = reproduce(str(cfg), preset="smoke", out=out, progress=False, log=lambda *a, **_k: lines.append(a[0]))
    assert summary is not None and any(line.startswith("[reuse]") for line in lines)
    # an evaluation the grid computes says its cost bound first, then each attack's accuracy as it finishes
    computed = [i for i, line in enumerate(lines) if line.startswith("[evaluate]")]
    assert computed and lines[computed[-1] + 1].startswith("  cost: at most about")
    assert re.match(r"  si-pgd\s+\d+\.\d\d%", lines[computed[-1] + 3]), lines[computed[-1]:]


def test_a_second_stop_signal_to_the_jobs_parent_stops_its_jobs_at_once_and_none_outlives_it():
    """`reproduce --jobs`: the first Ctrl-C asks each job to stop after its step; a second one, while the parent
    waits, passes a second signal on (a job then stops at once), and a job that still runs is killed, so that
    none is left holding its locks behind the parent."""
    import signal
    import threading

    from sirobust.reproduce.jobs import _stop_children
    stops_on_second = ("import signal, sys, time\nseen = []\n"
                       "def h(*_):\n    seen.append(1)\n    if len(seen) == 2: sys.exit(7)\n"
                       "signal.signal(signal.SIGTERM, h)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    deaf = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)\n"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for code in (stops_on_second, deaf)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    second = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # the user's second Ctrl-C
    second.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            _stop_children(procs, grace_seconds=2.0)
    finally:
        second.cancel()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert procs[0].returncode == 7  # stopped by the second signal passed on
    assert procs[1].returncode == -signal.SIGKILL  # ignored both: killed after the grace period


def test_a_job_that_finishes_its_part_takes_the_runs_no_other_job_has_started(tmp_path, monkeypatch):
    """--jobs: a static split cannot know which runs are done already, so a job does its shard's units first and
    then the others' from the end; a run another process holds is waited for, and taken over once its holder
    has gone. Alone, job 1 of 2 computes the whole grid, its own runs first, and writes the table (that --jobs 2
    gives the one-process table is the test above)."""
    import threading
    from sirobust.reproduce.runner import Runner, UnitLock
    monkeypatch.setattr(Runner, "poll_seconds", 0.2)
    cfg = _write(tmp_path, TINY)
    plan = make_plan(load_experiment(str(cfg)), "smoke", {"seeds": [0, 1]})
    own = shard_runs(plan, 1, 2)
    assert 0 < len(own) < len(plan.runs)
    held_name = [name for name in plan.runs if name not in own][0]  # "another process" trains it at first
    held_path = (tmp_path / "out" / "runs" / held_name).resolve()
    lines, lock = [], {}

    def log(*a, **_k):
        line = " ".join(map(str, a))
        lines.append(line)
        if "runs/" in line and not lock:  # the first run: the folder exists, hold the other's lock
            lock["unit"] = UnitLock(tmp_path / "out", f"run {held_path}").__enter__()
            assert lock["unit"].held
        if line.startswith("[busy]") and held_name in line:  # it went on; the holder ends a moment later
            threading.Timer(0.5, lock["unit"].__exit__).start()
    summary = reproduce(str(cfg), preset="smoke", overrides={"seeds": [0, 1]}, out=str(tmp_path / "out"),
                        progress=False, log=log, shard=(1, 2), steal=True)
    assert summary is not None  # every unit done, the held one too (waited for, then taken over), the table written
    assert any(line.startswith("[busy]") and held_name in line for line in lines)
    order = [m.group(1).split("/runs/")[1] for line in lines for m in re.finditer(r"^\s*\[\d+/\d+\] (\S+)$", line, re.M)]
    others = [name for name in plan.runs if name not in own]
    assert order == [name for name in plan.runs if name in own] + others[::-1]
    assert sum(1 for line in lines if "epoch 1/1 " in line) == len(plan.runs)
    assert [r["row"] for r in summary["rows"]] == list(dict.fromkeys(c.row.label for c in plan.cells))  # plan order
    # without stealing, the shard does its part and leaves the rest
    part = reproduce(str(cfg), preset="smoke", overrides={"seeds": [0, 1]}, out=str(tmp_path / "part"),
                     progress=False, log=_quiet, shard=(1, 2))
    assert part is None and len(list((tmp_path / "part" / "runs").rglob("summary.json"))) == len(own)
    with pytest.raises(ConfigError, match="needs shard"):
        reproduce(str(cfg), preset="smoke", out=str(tmp_path / "x"), log=_quiet, steal=True)


def test_table8_paper_preset_follows_the_single_step_defenses_own_code():
    plan = make_plan(load_experiment("table8"), "paper")
    by_row = {c.row.label: c.train for c in plan.cells}
    for label in ("RFGSM-AT", "RFGSM-AT-SI"):
        cfg = by_row[label]
        assert (cfg.epochs, cfg.lr, cfg.early_stop, cfg.val_size, cfg.lr_schedule) == (15, 0.2, True, 0, "cyclic")
    for label in ("GradAlign", "GradAlign-SI"):
        assert (by_row[label].epochs, by_row[label].lr, by_row[label].early_stop) == (30, 0.3, False)
    for label in ("FreeAT", "GAT"):
        assert not by_row[label].early_stop
    text = plan.experiment.presets["paper"].description
    assert "Wong et al.'s early stop" in text and "peaking at 0.30" in text and "depart from Sec. 5.1" in text


def test_collecting_takes_the_finished_seeds_of_a_grid_still_running(tmp_path):
    """scripts/collect_reproduction.py: NAME-mini when it exists; else the NAME-mini+HASH made with --seeds alone
    (the most seeds), never one made with another override."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("collect_reproduction", REPO / "scripts" / "collect_reproduction.py")
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)

    def table(folder, seeds, overrides):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "table.json").write_text(json.dumps({"seeds": seeds, "overrides": overrides}))
    table("table6-mini+aaaa", [0], {"seeds": [0], "train": {}, "eval": {}, "figure": {}})
    table("table6-mini+bbbb", [0, 1], {"seeds": [0, 1], "train": {}, "eval": {}, "figure": {}})
    table("table6-mini+cccc", [0, 1, 2], {"seeds": [0, 1, 2], "train": {"epochs": 3}, "eval": {}, "figure": {}})
    table("table2-mini+dddd", [0], {"train": {}, "eval": {"n": 100}, "figure": {}})
    assert [p.name for p in collect.result_folders(tmp_path)] == ["table6-mini+bbbb"]
    table("table6-mini", [0, 1, 2], {"train": {}, "eval": {}, "figure": {}})
    assert [p.name for p in collect.result_folders(tmp_path)] == ["table6-mini"]


def test_a_table_made_of_another_tables_runs_is_shown_once(tmp_path):
    """Table 7's mini preset is Table 6's runs: the docs show its paper numbers and a pointer, not the same cells
    twice; a table whose runs differ (even by one) is shown in full."""
    import importlib.util
    import shutil
    spec = importlib.util.spec_from_file_location("collect_reproduction", REPO / "scripts" / "collect_reproduction.py")
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)
    committed = REPO / "benchmarks" / "reproduction"
    for name in ("table6", "table7"):
        shutil.copyfile(committed / f"{name}-mini.json", tmp_path / f"{name}-mini.json")
    six = json.loads((tmp_path / "table6-mini.json").read_text())
    first_cell = f"| AT | {100 * six['rows'][0]['values']['Natural']:.2f} ±"
    block = collect.render_block(tmp_path)
    seven = block[block.index("(paper Table 7)"):]
    assert "Its runs are Table 6's, every one" in seven and "| AT | 92.91 |" in seven  # the paper's SVHN numbers
    assert first_cell not in seven and block.count(first_cell) == 1
    seven_json = json.loads((tmp_path / "table7-mini.json").read_text())
    seven_json["runs"].pop(next(iter(seven_json["runs"])))
    (tmp_path / "table7-mini.json").write_text(json.dumps(seven_json))
    block = collect.render_block(tmp_path)
    assert "Its runs are Table 6's" not in block and block.count(first_cell) == 2


def test_cli_collect_of_an_unfinished_grid_exits_1_naming_what_is_missing(tmp_path, capsys):
    from sirobust.cli import main
    cfg = _write(tmp_path, TINY)
    assert main(["reproduce", str(cfg), "--preset", "smoke", "--out", str(tmp_path / "o"), "--collect"]) == 1
    err = capsys.readouterr().err
    assert "the table waits for" in err and "AT-SI" in err and "Traceback" not in err
