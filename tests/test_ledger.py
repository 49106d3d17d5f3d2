"""The ledger (``sirobust reproduce --ledger DIR``): finished evaluations kept beyond the output folder, so that a
table is written on a machine that does not have its runs' weights, and nothing is trained or attacked twice."""
import gzip
import json
import sys

import pytest

from sirobust.reproduce import reproduce
from sirobust.reproduce.ledger import Ledger, read_entry

from test_reproduce import TINY, TINY_FIGURE, _quiet, _write


def _copy(ledger, to):
    import shutil
    shutil.copytree(ledger, to)
    return to


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
        # the run is represented by the weights these evaluations attacked
        sha = entry["result"]["spec"]["weights"]["sha256"]
        assert json.loads((path.parent / "weights-last.json").read_text())["sha256"] == sha
    assert (ledger / ".gitignore").read_text().splitlines()[1:] == [".*", "!.gitignore"]  # a killed write's files
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
    for name in (kept.name, "weights-last.json"):  # one run's entry and the weights that represent it
        (partial / kept.parent.relative_to(ledger) / name).write_bytes((kept.parent / name).read_bytes())
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
    broken = _copy(ledger, tmp_path / "broken")
    for p in broken.rglob("eval-*.json.gz"):
        p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(ValueError, match="is not a ledger entry .*remove it"):
        reproduce(str(cfg), preset="smoke", out=str(tmp_path / "o"), progress=False, log=_quiet, ledger=str(broken))


def test_a_run_the_ledger_holds_from_another_training_is_trained_here_and_nothing_of_it_is_filed(filed, tmp_path):
    """Training differs between machines: one cell must never combine two trainings' evaluations (a worst case
    no model has). Here the ledger represents the AT run by other weights than its entries attacked (as when
    another machine filed first): its entries are not taken, this machine trains the run, uses its own
    evaluations for the whole cell, files none of them, and says why."""
    cfg, ledger, first = filed
    book = _copy(ledger, tmp_path / "book")
    (record,) = [p for p in book.rglob("weights-last.json") if "/at-e1-" in str(p)]
    record.write_text(json.dumps({"sha256": "0" * 64, "which": "last"}))
    before = {p: p.read_bytes() for p in book.rglob("*") if p.is_file()}
    lines = []
    summary = reproduce(str(cfg), preset="smoke", out=str(tmp_path / "o"), progress=False,
                        log=lambda *a, **k: lines.append(" ".join(map(str, a))), ledger=str(book))
    c = summary["counts"]
    assert (c["trained"], c["ledger_runs"], c["evaluated"], c["ledger_evaluations"], c["filed"]) == (1, 1, 1, 1, 0)
    assert any("differs from the one the ledger holds (000000000000)" in line for line in lines)
    assert {p: p.read_bytes() for p in book.rglob("*") if p.is_file()} == before
    at = [r for r in summary["rows"] if r["row"] == "AT"][0]
    assert not at["reports"][0].startswith(str(book))  # this machine's own evaluation


def test_collect_writes_the_table_from_the_ledger_and_overwrite_takes_nothing_from_it(filed, tmp_path, monkeypatch):
    cfg, ledger, first = filed
    collected = reproduce(str(cfg), preset="smoke", out=str(tmp_path / "c"), progress=False, log=_quiet,
                          collect=True, ledger=str(ledger))
    assert [r["values"] for r in collected["rows"]] == [r["values"] for r in first["rows"]]
    _forbid(monkeypatch, "training")
    with pytest.raises(AssertionError, match="training was redone"):  # --overwrite: everything computed again
        reproduce(str(cfg), preset="smoke", out=str(tmp_path / "c"), progress=False, log=_quiet, overwrite=True,
                  ledger=str(ledger))


def test_a_figure_does_not_use_the_ledger(filed):
    cfg, ledger, _ = filed
    fig = _write(cfg.parent, TINY_FIGURE, "tinyfig.toml")
    before = sorted(ledger.rglob("*"))
    lines = []
    summary = reproduce(str(fig), preset="smoke", out=str(cfg.parent / "out"), progress=False,
                        log=lambda *a, **k: lines.append(" ".join(map(str, a))), ledger=str(ledger))
    assert summary["data"]["labels"] == ["AT", "AT-SI"]
    assert any("is a figure: it is computed from its runs' weights, so --ledger is not used" in ln for ln in lines)
    assert sorted(ledger.rglob("*")) == before


def test_jobs_pass_the_ledger_on_and_a_file_given_as_the_ledger_stops_before_any_work(tmp_path, monkeypatch):
    from sirobust.cli import build_parser
    from sirobust.reproduce import jobs
    args = build_parser().parse_args(["reproduce", "table6", "--ledger", str(tmp_path / "L"), "--jobs", "2"])
    assert args.ledger == str(tmp_path / "L")
    seen = {}
    real = sys.modules["sirobust.reproduce"].reproduce
    monkeypatch.setattr(sys.modules["sirobust.reproduce"], "reproduce", lambda *a, **k: seen.update(k))
    spec = {"name": "table6", "preset": "smoke", "out": "o", "overrides": {}, "device": "cpu", "shard": [1, 2],
            "model_dir": None, "accept_unpinned": False, "steal": True, "ledger": str(tmp_path / "L"),
            "ledger_read": False}
    assert jobs.main([json.dumps(spec)]) == 0
    assert (seen["ledger"], seen["ledger_read"]) == (str(tmp_path / "L"), False)
    monkeypatch.undo()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="--ledger .*afile: not a folder"):
        real("table6", preset="smoke", out=str(tmp_path / "o"), jobs=2, ledger=str(tmp_path / "afile"), log=_quiet)
    assert not (tmp_path / "o").exists()


def _entry(sha="a" * 64, n=10):
    key = {"run": {"identity": {"seed": 0}, "epochs": 1}, "training": 1, "which": "last", "n": n}
    result = {"spec": {"weights": {"sha256": sha, "which": "last"}, "n": n}, "report": {"n": n}}
    return key, result


def test_entries_are_checked_when_read(tmp_path):
    ledger = Ledger(tmp_path)
    key, result = _entry()
    assert ledger.file("d/m/at-e1-x", "last", [(key, result)], {"last": {"epoch": 1}}, 1.0) == (1, "a" * 64)
    assert ledger.cell("d/m/at-e1-x", "last", [key])[0]["run"]["summary"] == {"last": {"epoch": 1}}
    path = ledger.path("d/m/at-e1-x", key)
    entry = read_entry(path)
    collision = {**entry, "key": {**key, "n": 11},  # another evaluation's entry under this one's name
                 "result": {**entry["result"], "spec": {**entry["result"]["spec"], "n": 11}}}
    path.write_bytes(gzip.compress(json.dumps(collision).encode()))
    assert Ledger(tmp_path).get("d/m/at-e1-x", key) is None
    entry["result"]["spec"]["n"] = 11  # a result edited away from its key
    path.write_bytes(gzip.compress(json.dumps(entry).encode()))
    with pytest.raises(ValueError, match="or was edited"):
        Ledger(tmp_path).get("d/m/at-e1-x", key)
    for bad in (b"[" * 200000, json.dumps({"format": 1, "key": {}, "run": "x", "result": 5}).encode()):
        path.write_bytes(gzip.compress(bad))
        with pytest.raises(ValueError, match="is not a ledger entry"):
            Ledger(tmp_path).get("d/m/at-e1-x", key)
    with pytest.raises(NotADirectoryError, match="--ledger"):
        Ledger(path)
    assert Ledger(tmp_path, read=False).cell("d/m/at-e1-x", "last", [key]) is None


def test_a_run_is_represented_by_the_first_weights_filed_and_an_entry_is_never_replaced(tmp_path, monkeypatch):
    from pathlib import Path
    ledger = Ledger(tmp_path)
    key, result = _entry("a" * 64)
    assert ledger.file("d/m/at-e1-y", "last", [(key, result)], {}, 1.0) == (1, "a" * 64)
    path = ledger.path("d/m/at-e1-y", key)
    before = path.read_bytes()
    key2, other = _entry("b" * 64, n=20)
    assert ledger.file("d/m/at-e1-y", "last", [(key2, other)], {}, 1.0) == (0, "a" * 64)  # another training
    assert not ledger.path("d/m/at-e1-y", key2).exists()
    with pytest.raises(ValueError, match="different weights"):
        ledger.file("d/m/at-e1-y", "last", [(key, result), (key2, other)], {}, 1.0)
    # of two processes filing one evaluation at once, the first keeps its entry
    monkeypatch.setattr(Path, "exists", lambda self: False)  # the second looked before the first had filed
    assert ledger.file("d/m/at-e1-y", "last", [(key, {**result, "seconds": 9})], {}, 2.0) == (0, "a" * 64)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, "weights-last.json"])
