"""The ledger (``sirobust reproduce --ledger DIR``): finished evaluations kept beyond the output folder, so that a
table is written on a machine that does not have its runs' weights, and nothing is trained or attacked twice."""
import gzip
import json
import sys

import pytest

from sirobust.reproduce import reproduce
from sirobust.reproduce.ledger import Ledger, read_entry

from test_reproduce import TINY, _quiet, _write


def _forbid(monkeypatch, what="work"):
    def must_not_run(*a, **k):
        raise AssertionError(f"{what} was redone")
    monkeypatch.setattr(sys.modules["sirobust.train"], "fit", must_not_run)
    monkeypatch.setattr(sys.modules["sirobust.evaluate"], "evaluate", must_not_run)


@pytest.fixture(scope="module")
def filed(tmp_path_factory):
    """The tiny table computed once into OUT, every evaluation filed in a ledger."""
    tmp = tmp_path_factory.mktemp("ledger")
    cfg = _write(tmp, TINY)
    ledger = tmp / "ledger"
    summary = reproduce(str(cfg), preset="smoke", out=str(tmp / "out"), progress=False, log=_quiet,
                        ledger=str(ledger))
    return cfg, ledger, summary


def test_every_finished_evaluation_is_filed_with_its_run_and_every_outcome(filed):
    cfg, ledger, summary = filed
    assert summary["counts"] == {"trained": 2, "reused_runs": 0, "evaluated": 2, "reused_evaluations": 0,
                                 "ledger_runs": 0, "ledger_evaluations": 0, "filed": 2}
    assert summary["ledger"]["cells"] == 0 and summary["ledger"]["of"] == 2
    entries = sorted(ledger.rglob("eval-*.json.gz"))
    assert len(entries) == 2
    for path in entries:
        entry = read_entry(path)
        # filed under the run's folder name, with the result exactly as OUT keeps it
        run_dir = path.parent.relative_to(ledger)
        out_eval = json.loads(next((cfg.parent / "out" / "runs" / run_dir / "reproduce").glob("eval-*.json"))
                              .read_text())
        assert entry["result"] == out_eval
        assert len(entry["result"]["report"]["clean_correct"]) == 24  # every example's outcome, for the tests
        assert entry["run"]["summary"]["last"]["epoch"] == 1 and entry["run"]["train_seconds"] > 0
        # the key holds the run's configuration where OUT's key holds the weights' digest
        assert "weights" not in entry["key"] and entry["key"]["run"]["identity"]["defense"] == "at"
        assert entry["result"]["spec"]["weights"]["sha256"]
    # the same entry is the same bytes wherever it is written (no timestamp in the gzip header)
    assert gzip.compress(gzip.decompress(entries[0].read_bytes()), mtime=0) == entries[0].read_bytes()


def test_another_output_folder_writes_the_same_table_from_the_ledger_alone(filed, tmp_path, monkeypatch):
    cfg, ledger, first = filed
    before = {p: p.read_bytes() for p in ledger.rglob("*.gz")}
    _forbid(monkeypatch)  # no run is trained, no model attacked: the weights are not in this folder
    again = reproduce(str(cfg), preset="smoke", out=str(tmp_path / "elsewhere"), progress=False, log=_quiet,
                      ledger=str(ledger))
    assert again["counts"] == {"trained": 0, "reused_runs": 0, "evaluated": 0, "reused_evaluations": 0,
                               "ledger_runs": 2, "ledger_evaluations": 2, "filed": 0}
    for a, b in zip(first["rows"], again["rows"]):
        assert (a["row"], a["values"], a["epoch"], a["n"]) == (b["row"], b["values"], b["epoch"], b["n"])
    assert again["work"]["train_seconds"] == pytest.approx(first["work"]["train_seconds"])
    assert again["work"]["eval_seconds"] == pytest.approx(first["work"]["eval_seconds"])
    md = (tmp_path / "elsewhere" / "tiny-smoke" / "table.md").read_text()
    assert f"2 of 2 cells were taken from the ledger `{ledger}` (2 runs)" in md
    assert {p: p.read_bytes() for p in ledger.rglob("*.gz")} == before  # read, never rewritten
    assert not (tmp_path / "elsewhere" / "runs").exists()


def test_another_evaluation_setting_is_not_in_the_ledger(filed, tmp_path, monkeypatch):
    cfg, ledger, _ = filed
    _forbid(monkeypatch, "training")
    with pytest.raises(AssertionError, match="training was redone"):
        reproduce(str(cfg), preset="smoke", out=str(tmp_path / "o"), progress=False, log=_quiet,
                  ledger=str(ledger), overrides={"eval": {"steps": 3}})


def test_a_run_missing_from_the_ledger_is_trained_and_filed(filed, tmp_path):
    cfg, ledger, first = filed
    partial = tmp_path / "partial"
    kept, dropped = sorted(ledger.rglob("eval-*.json.gz"))
    (partial / kept.parent.relative_to(ledger)).mkdir(parents=True)
    (partial / kept.relative_to(ledger)).write_bytes(kept.read_bytes())
    summary = reproduce(str(cfg), preset="smoke", out=str(tmp_path / "o"), progress=False, log=_quiet,
                        ledger=str(partial))
    c = summary["counts"]
    assert (c["trained"], c["ledger_runs"], c["evaluated"], c["ledger_evaluations"], c["filed"]) == (1, 1, 1, 1, 1)
    assert summary["ledger"]["cells"] == 1
    assert (partial / dropped.relative_to(ledger)).is_file()  # the new run's evaluation, under the same key
    # seeded training and attacks: the same numbers as the first table
    assert [r["values"] for r in summary["rows"]] == [r["values"] for r in first["rows"]]


def test_a_damaged_entry_is_named(filed, tmp_path):
    cfg, ledger, _ = filed
    broken = tmp_path / "broken"
    for p in ledger.rglob("eval-*.json.gz"):
        (broken / p.parent.relative_to(ledger)).mkdir(parents=True, exist_ok=True)
        (broken / p.relative_to(ledger)).write_bytes(p.read_bytes()[:-20])
    with pytest.raises(ValueError, match="is not a ledger entry .*remove it"):
        reproduce(str(cfg), preset="smoke", out=str(tmp_path / "o"), progress=False, log=_quiet, ledger=str(broken))


def test_an_entry_whose_stored_key_differs_is_not_taken(tmp_path):
    ledger = Ledger(tmp_path)
    key = {"run": {"identity": {"seed": 0}}, "which": "last", "n": 10}
    assert ledger.add("d/m/at-e1-x", key, {"spec": {}, "report": {}}, {"last": {"epoch": 1}}, 1.0) is not None
    assert ledger.get("d/m/at-e1-x", key)["run"]["summary"] == {"last": {"epoch": 1}}
    assert ledger.add("d/m/at-e1-x", key, {"spec": {"x": 1}, "report": {}}, {}, 2.0) is None  # never replaced
    path = ledger.path("d/m/at-e1-x", key)
    entry = read_entry(path)
    entry["key"]["n"] = 11  # a hand-edited file, or a hash collision
    path.write_bytes(gzip.compress(json.dumps(entry).encode()))
    assert ledger.get("d/m/at-e1-x", key) is None
    with pytest.raises(NotADirectoryError, match="--ledger"):
        Ledger(path)


def test_a_figure_does_not_use_the_ledger_and_jobs_pass_it_on(tmp_path, monkeypatch):
    from sirobust.cli import build_parser
    from sirobust.reproduce import jobs
    args = build_parser().parse_args(["reproduce", "table6", "--ledger", str(tmp_path / "L"), "--jobs", "2"])
    assert args.ledger == str(tmp_path / "L")
    seen = {}
    monkeypatch.setattr(sys.modules["sirobust.reproduce"], "reproduce", lambda *a, **k: seen.update(k))
    spec = {"name": "table6", "preset": "smoke", "out": "o", "overrides": {}, "device": "cpu", "shard": [1, 2],
            "model_dir": None, "accept_unpinned": False, "steal": True, "ledger": str(tmp_path / "L")}
    assert jobs.main([json.dumps(spec)]) == 0 and seen["ledger"] == str(tmp_path / "L")


def test_each_run_is_evaluated_and_filed_before_the_next_is_trained(tmp_path, monkeypatch):
    """A grid stopped halfway keeps the evaluations of the runs it finished (and has filed them), not only
    their weights: a table's runs were all trained before the first was attacked."""
    train_module, evaluate_module = sys.modules["sirobust.train"], sys.modules["sirobust.evaluate"]
    order = []
    fit, evaluate = train_module.fit, evaluate_module.evaluate
    ledger = tmp_path / "ledger"

    def fit_and_note(cfg, *a, **k):
        order.append(("fit", len(list(ledger.rglob("*.gz")))))
        return fit(cfg, *a, **k)

    def evaluate_and_note(*a, **k):
        order.append(("evaluate", len(list(ledger.rglob("*.gz")))))
        return evaluate(*a, **k)
    monkeypatch.setattr(train_module, "fit", fit_and_note)
    monkeypatch.setattr(evaluate_module, "evaluate", evaluate_and_note)
    cfg = _write(tmp_path, TINY)
    reproduce(str(cfg), preset="smoke", out=str(tmp_path / "o"), progress=False, log=_quiet, ledger=str(ledger))
    assert order == [("fit", 0), ("evaluate", 0), ("fit", 1), ("evaluate", 1)]


def test_of_two_processes_filing_one_evaluation_at_once_the_first_keeps_its_entry(tmp_path, monkeypatch):
    from pathlib import Path
    ledger = Ledger(tmp_path)
    key = {"run": {"identity": {"seed": 1}}, "which": "last", "n": 10}
    first = ledger.add("d/m/at-e1-y", key, {"spec": {"a": 1}, "report": {}}, {}, 1.0)
    before = first.read_bytes()
    monkeypatch.setattr(Path, "exists", lambda self: False)  # the second looked before the first had filed
    assert ledger.add("d/m/at-e1-y", key, {"spec": {"a": 2}, "report": {}}, {}, 2.0) is None
    monkeypatch.undo()
    assert first.read_bytes() == before and [p.name for p in first.parent.iterdir()] == [first.name]
