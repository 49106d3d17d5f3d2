"""The ledger (``sirobust reproduce --ledger DIR``): finished evaluations kept beyond the output folder, so that a
table is written on a machine that does not have its runs' weights, and nothing is trained or attacked twice."""
import gzip
import json
import sys
import textwrap

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


ORDER: list = []  # ("fit" | "evaluate", entries in the ledger at that moment), while `filed` computes its table


@pytest.fixture(scope="module")
def filed(tmp_path_factory):
    """The tiny table computed once into OUT, every evaluation filed in a ledger (the order of the trainings and
    evaluations noted in ORDER)."""
    tmp = tmp_path_factory.mktemp("ledger")
    cfg = _write(tmp, TINY)
    ledger = tmp / "ledger"
    train_module, evaluate_module = sys.modules["sirobust.train"], sys.modules["sirobust.evaluate"]
    fit, evaluate = train_module.fit, evaluate_module.evaluate

    def noted(name, fn):
        def call(*a, **k):
            ORDER.append((name, len(list(ledger.rglob("*.json.gz")))))
            return fn(*a, **k)
        return call
    train_module.fit, evaluate_module.evaluate = noted("fit", fit), noted("evaluate", evaluate)
    try:
        summary = reproduce(str(cfg), preset="smoke", out=str(tmp / "out"), progress=False, log=_quiet,
                            ledger=str(ledger))
    finally:
        train_module.fit, evaluate_module.evaluate = fit, evaluate
    return cfg, ledger, summary


def test_each_run_is_evaluated_and_filed_before_the_next_is_trained(filed):
    """A grid stopped halfway keeps the evaluations of the runs it finished (and has filed them), not only
    their weights: a table's runs were all trained before the first was attacked."""
    assert ORDER == [("fit", 0), ("evaluate", 0), ("fit", 1), ("evaluate", 1)]


def test_every_finished_evaluation_is_filed_with_its_run_and_every_outcome(filed, tmp_path):
    cfg, ledger, summary = filed
    assert summary["counts"] == {"trained": 2, "reused_runs": 0, "evaluated": 2, "reused_evaluations": 0,
                                 "ledger_runs": 0, "ledger_evaluations": 0, "filed": 2}
    assert summary["ledger"]["cells"] == 0 and summary["ledger"]["of"] == 2
    entries = sorted(ledger.rglob("eval-*.json.gz"))
    assert len(entries) == 2
    for path in entries:
        entry = read_entry(path)
        # filed under the run's folder name and its training, with the result exactly as OUT keeps it
        run_dir = path.parent.parent.relative_to(ledger)
        out_eval = json.loads(next((cfg.parent / "out" / "runs" / run_dir / "reproduce").glob("eval-*.json"))
                              .read_text())
        assert entry["result"] == out_eval
        assert path.parent.name == out_eval["spec"]["weights"]["sha256"][:16]
        assert len(entry["result"]["report"]["clean_correct"]) == 24  # every example's outcome, for the tests
        assert entry["run"]["summary"]["last"]["epoch"] == 1 and entry["run"]["train_seconds"] > 0
        # the key holds the run's configuration where OUT's key holds the weights' digest
        assert "weights" not in entry["key"] and entry["key"]["run"]["identity"]["defense"] == "at"
    assert (ledger / ".gitignore").read_text().splitlines()[1:] == [".*", "!.gitignore"]  # a killed write's files
    # the same result filed again elsewhere is the same bytes (no date in the entry or its gzip header)
    again = tmp_path / "again"
    reproduce(str(cfg), preset="smoke", out=str(cfg.parent / "out"), progress=False, log=_quiet, ledger=str(again))
    assert {p.relative_to(again): p.read_bytes() for p in again.rglob("*.gz")} == \
        {p.relative_to(ledger): p.read_bytes() for p in entries}


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
    (partial / kept.relative_to(ledger)).write_bytes(kept.read_bytes())  # one run's training, whole
    summary = reproduce(str(cfg), preset="smoke", out=str(tmp_path / "o"), progress=False, log=_quiet,
                        ledger=str(partial))
    c = summary["counts"]
    assert (c["trained"], c["ledger_runs"], c["evaluated"], c["ledger_evaluations"], c["filed"]) == (1, 1, 1, 1, 1)
    assert summary["ledger"]["cells"] == 1
    assert (partial / dropped.relative_to(ledger)).is_file()  # the new run's evaluation, under the same key
    # seeded training and attacks: the same numbers as the first table
    assert [r["values"] for r in summary["rows"]] == [r["values"] for r in first["rows"]]


def test_a_damaged_entry_is_named_and_spoils_its_training_alone(filed, tmp_path):
    """A truncated entry, and one whose compressed bytes were flipped (zlib's own error), are named; the
    training they belong to is not used, and the runs are trained here instead."""
    cfg, ledger, first = filed
    broken = _copy(ledger, tmp_path / "broken")
    truncated, flipped = sorted(broken.rglob("eval-*.json.gz"))
    truncated.write_bytes(truncated.read_bytes()[:-20])
    data = bytearray(flipped.read_bytes())
    data[20:400] = bytes(b ^ 0x5A for b in data[20:400])
    flipped.write_bytes(bytes(data))
    lines = []
    summary = reproduce(str(cfg), preset="smoke", out=str(tmp_path / "o"), progress=False, ledger=str(broken),
                        log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert summary["counts"]["trained"] == 2 and summary["counts"]["ledger_runs"] == 0
    for path in (truncated, flipped):
        assert any(str(path) in ln and "is not a ledger entry" in ln and "is not used" in ln for ln in lines), path
    assert [r["values"] for r in summary["rows"]] == [r["values"] for r in first["rows"]]


def test_a_damaged_entry_of_this_machines_own_training_is_filed_again(filed, tmp_path):
    cfg, ledger, _ = filed
    book = _copy(ledger, tmp_path / "book")
    victim = sorted(book.rglob("eval-*.json.gz"))[0]
    good = victim.read_bytes()
    victim.write_bytes(good[:-20])
    summary = reproduce(str(cfg), preset="smoke", out=str(cfg.parent / "out"), progress=False, log=_quiet,
                        ledger=str(book))  # OUT holds the runs: nothing is trained, the entry is filed again
    assert summary["counts"]["trained"] == 0 and summary["counts"]["filed"] == 1
    assert victim.read_bytes() == good


HE_TWO_VIEWS = TINY.split("[[rows]]")[0].replace('name = "tiny"', 'name = "tinyhe"') + textwrap.dedent('''
    [[rows]]
    label = "HE"
    train = { defense = "he" }
    [[rows]]
    label = "HE cos"
    train = { defense = "he" }
    view = "cosine"

    [presets.smoke]
    description = "seconds"
    eval = { n = 24, steps = 2 }
''')


def test_a_run_is_taken_whole_from_one_training_or_trained_here(tmp_path, monkeypatch):
    """Training differs between machines, and a cell (or a table's two views of one model) must never combine two
    trainings' evaluations. One HE run serves two cells (its logits and its cos θ view): a training in the ledger
    that holds one of them is not taken; one that holds both is, for both."""
    cfg = _write(tmp_path, HE_TWO_VIEWS, "he.toml")
    ledger = tmp_path / "L"
    first = reproduce(str(cfg), preset="smoke", out=str(tmp_path / "a"), progress=False, log=_quiet,
                      ledger=str(ledger))
    (run,) = [p for p in ledger.rglob("*") if p.is_dir() and p.name.startswith("he-e1-")]
    (training,) = [p.name for p in run.iterdir()]
    entries = sorted((run / training).iterdir())
    assert len(entries) == 2  # one evaluation per view
    # another machine's training, with only one of the two cells filed: sorted first, and not taken
    other = run / ("0" * 16)
    other.mkdir()
    entry = read_entry(entries[0])
    entry["result"]["spec"]["weights"]["sha256"] = "0" * 64
    (other / entries[0].name).write_bytes(gzip.compress(json.dumps(entry).encode()))
    _forbid(monkeypatch)
    again = reproduce(str(cfg), preset="smoke", out=str(tmp_path / "b"), progress=False, log=_quiet,
                      ledger=str(ledger))
    assert all(path.startswith(str(run / training)) for row in again["rows"] for path in row["reports"])
    assert [r["values"] for r in again["rows"]] == [r["values"] for r in first["rows"]]
    # with the complete training's cos θ entry gone, no training covers the run: it is trained here
    entries[1].unlink()
    with pytest.raises(AssertionError, match="work was redone"):
        reproduce(str(cfg), preset="smoke", out=str(tmp_path / "c"), progress=False, log=_quiet, ledger=str(ledger))


def test_a_table_whose_cells_of_one_run_attacked_two_trainings_is_refused():
    from types import SimpleNamespace

    from sirobust.reproduce.runner import one_training_per_run
    train = SimpleNamespace(dataset="d", model="m", defense="he", si=False, epochs=1, accept_checksum_mismatch=False,
                            identity=lambda: {"defense": "he"})
    cells = [SimpleNamespace(train=train), SimpleNamespace(train=train)]
    report = lambda sha: [{"spec": {"weights": {"sha256": sha}}}]  # noqa: E731
    one_training_per_run(cells, {id(cells[0]): report("a" * 64), id(cells[1]): report("a" * 64)})
    with pytest.raises(ValueError, match="run d/m/he-e1-.* attacked different weights \\(aaaaaaaaaaaa, bbbbbbbbbbbb\\)"):
        one_training_per_run(cells, {id(cells[0]): report("a" * 64), id(cells[1]): report("b" * 64)})


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
    lines = []
    ledger = Ledger(tmp_path, log=lines.append)
    key, result = _entry()
    assert ledger.file("d/m/at-e1-x", [(key, result)], {"last": {"epoch": 1}}, 1.0) == 1
    assert ledger.covering("d/m/at-e1-x", [key])[0]["run"]["summary"] == {"last": {"epoch": 1}}
    path = ledger.path("d/m/at-e1-x", "a" * 16, key)
    entry = read_entry(path)
    collision = {**entry, "key": {**key, "n": 11},  # another evaluation's entry under this one's name
                 "result": {**entry["result"], "spec": {**entry["result"]["spec"], "n": 11}}}
    path.write_bytes(gzip.compress(json.dumps(collision).encode()))
    assert ledger.covering("d/m/at-e1-x", [key]) is None and not lines
    moved = {**entry, "result": {**entry["result"], "spec": {**entry["result"]["spec"],
                                                             "weights": {"sha256": "b" * 64, "which": "last"}}}}
    path.write_bytes(gzip.compress(json.dumps(moved).encode()))  # filed under another training's folder
    with pytest.raises(ValueError, match="other weights than its folder names"):
        ledger.get("d/m/at-e1-x", "a" * 16, key)
    assert ledger.covering("d/m/at-e1-x", [key]) is None  # that training is not used, and the log says why
    assert "other weights than its folder names" in lines[-1] and f"training {'a' * 16}" in lines[-1]
    edited = json.loads(json.dumps(entry))
    edited["result"]["spec"]["n"] = 11  # a result edited away from its key
    no_epoch = json.loads(json.dumps(entry))
    del no_epoch["run"]["summary"]["last"]
    for bad in (edited, no_epoch):
        path.write_bytes(gzip.compress(json.dumps(bad).encode()))
        with pytest.raises(ValueError, match="or was edited"):
            ledger.get("d/m/at-e1-x", "a" * 16, key)
    for bad in (b"[" * 200000, json.dumps({"format": 1, "key": {}, "run": "x", "result": 5}).encode(),
                b"<<<<<<< HEAD\n"):
        path.write_bytes(gzip.compress(bad))
        with pytest.raises(ValueError, match="is not a ledger entry"):
            ledger.get("d/m/at-e1-x", "a" * 16, key)
    with pytest.raises(NotADirectoryError, match="--ledger"):
        Ledger(path)
    path.write_bytes(gzip.compress(json.dumps(entry).encode()))
    assert Ledger(tmp_path).covering("d/m/at-e1-x", [key]) is not None
    assert Ledger(tmp_path, read=False).covering("d/m/at-e1-x", [key]) is None


def test_each_training_files_under_its_own_folder_and_an_entry_is_never_replaced(tmp_path, monkeypatch):
    from pathlib import Path
    ledger = Ledger(tmp_path)
    key, result = _entry("a" * 64)
    assert ledger.file("d/m/at-e1-y", [(key, result)], {}, 1.0) == 1
    path = ledger.path("d/m/at-e1-y", "a" * 16, key)
    before = path.read_bytes()
    _key, other = _entry("b" * 64)  # another machine's training of the run: its own folder, never blocked
    assert ledger.file("d/m/at-e1-y", [(key, other)], {}, 1.0) == 1
    assert ledger.trainings("d/m/at-e1-y") == ["a" * 16, "b" * 16]
    with pytest.raises(ValueError, match="different weights"):
        ledger.file("d/m/at-e1-y", [(key, result), (key, other)], {}, 1.0)
    # of two processes filing one evaluation at once, the first keeps its entry
    monkeypatch.setattr(Path, "exists", lambda self: False)  # the second looked before the first had filed
    assert ledger.file("d/m/at-e1-y", [(key, {**result, "seconds": 9})], {}, 2.0) == 0
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == [path.name]


def test_shards_file_their_runs_and_another_folder_collects_the_table_from_the_ledger(tmp_path, monkeypatch):
    cfg = _write(tmp_path, TINY)
    ledger, out = tmp_path / "L", tmp_path / "o"
    done = [reproduce(str(cfg), preset="smoke", out=str(out), progress=False, log=_quiet, shard=(k, 2),
                      ledger=str(ledger)) for k in (1, 2)]
    assert done[0] is None and done[1] is not None  # the last shard to finish writes the table
    # before the second shard, another folder with the ledger finds one cell of two, and says so
    from sirobust.reproduce import IncompleteGrid
    partial = tmp_path / "partial"
    import shutil
    shutil.copytree(ledger, partial)
    for run in [p for p in partial.rglob("*") if p.is_dir() and p.name.startswith("at-si-")]:
        shutil.rmtree(run)
    with pytest.raises(IncompleteGrid, match=r"\(1 of its 2 cells are done, 1 of them from the ledger .*partial; "
                                             r"missing:\)\n  AT-SI"):
        reproduce(str(cfg), preset="smoke", out=str(tmp_path / "p"), progress=False, log=_quiet, collect=True,
                  ledger=str(partial))
    assert len(list(ledger.rglob("eval-*.json.gz"))) == 2
    _forbid(monkeypatch)
    collected = reproduce(str(cfg), preset="smoke", out=str(tmp_path / "elsewhere"), progress=False, log=_quiet,
                          collect=True, ledger=str(ledger))
    assert [r["values"] for r in collected["rows"]] == [r["values"] for r in done[1]["rows"]]
    assert collected["ledger"]["cells"] == 2
