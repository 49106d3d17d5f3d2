"""`sirobust reproduce`: configs read safely and checked key by key, plans resolved before anything runs,
tables built from the per-run evaluations, every run and evaluation reused on a second call, published
models checked by sha256 before any attack."""
import hashlib
import json
import re
import textwrap

import pytest
import torch

from sirobust.reproduce import ConfigError, list_experiments, load_experiment, reproduce
from sirobust.reproduce.plan import make_plan
from sirobust.reproduce.schema import parse_experiment, read_config_file

PAPER = ["fig1", "fig3", "fig4", "fig5"] + [f"table{i}" for i in range(2, 11)]

# a table small enough to train and evaluate in seconds: two rows, one axis value, two attacks
TINY = textwrap.dedent('''
    name = "tiny"
    kind = "table"
    title = "A tiny table"
    row_group_by = "dataset"

    [train]
    dataset = "fashion-mnist-mini"
    model = "cnn-small"
    epochs = 1
    train_n = 128
    batch_size = 64
    attack_steps = 1
    val_size = 0

    [[columns]]
    label = "Natural"
    value = "natural"
    [[columns]]
    label = "PGD"
    attack = "pgd"
    [[columns]]
    label = "SI-PGD"
    attack = "si-pgd"
    [[columns]]
    label = "worst"
    value = "worst_case"

    [[rows]]
    label = "AT"
    train = { defense = "at" }
    [[rows]]
    label = "AT-SI"
    train = { defense = "at", si = true }

    [presets.smoke]
    description = "seconds"
    eval = { n = 24, steps = 2 }

    [[paper_tables]]
    setting = "CIFAR-10, ResNet18"
    [paper_tables.rows]
    AT = { Natural = 85.57, PGD = 54.12 }
    AT-SI = { "SI-PGD" = 52.89 }
''')


def _write(tmp_path, text, name="tiny.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _quiet(*_a, **_k):
    pass


# ---------------------------------------------------------------- the packaged configs

def test_every_table_and_figure_of_the_paper_is_packaged_and_plans_under_every_preset():
    assert list_experiments() == PAPER
    for name in PAPER:
        exp = load_experiment(name)
        assert set(exp.presets) == {"smoke", "mini", "paper"}, name
        for preset in exp.presets:
            plan = make_plan(exp, preset)
            assert plan.cells, (name, preset)
            if preset in ("smoke", "mini") and not exp.models:  # the small presets run on the bundled data
                assert {c.train.dataset for c in plan.cells} == {"fashion-mnist-mini"}, (name, preset)
                assert {c.train.model for c in plan.cells} == {"cnn-small"}, (name, preset)


def test_the_paper_preset_follows_the_reference_protocol():
    plan = make_plan(load_experiment("table6"), "paper")
    assert plan.eval["n"] == 10000 and plan.eval["steps"] == 20 and plan.eval["which"] == "last"
    assert {c.train.dataset for c in plan.cells} == {"cifar10", "cifar100"}
    assert {c.train.model for c in plan.cells} == {"resnet18", "wrn-34-10"}
    for c in plan.cells:
        cfg = c.train
        assert cfg.val_size == 0 and cfg.attack_steps == 10
        assert cfg.attack_start == ("normal" if cfg.defense in ("trades", "mart") else "uniform")
        if cfg.model == "resnet18":  # ÷10 for the 75th, 90th and 100th of 120 epochs, as TRADES' code does
            assert (cfg.epochs, cfg.lr, cfg.milestones) == (120, 0.01, (74, 89, 99))
        else:
            assert (cfg.epochs, cfg.lr, cfg.milestones) == (90, 0.1, (74,))
    assert len(plan.runs) == 32  # 2 datasets × 2 networks × 8 rows, each trained once


def test_training_settings_stack_in_the_documented_order():
    """[train] < preset.train < axes < row.train < preset.defense_train < preset.force < command line."""
    base = parse_experiment({
        "name": "stack", "kind": "table", "title": "t", "columns": [{"label": "N", "value": "natural"}],
        "train": {"dataset": "fashion-mnist-mini", "model": "cnn-small", "epochs": 1, "lr": 0.1, "seed": 1,
                  "batch_size": 32, "train_n": 100, "val_n": 10},
        "axes": {"seed": [2]},
        "rows": [{"label": "R", "train": {"defense": "fgsm-rs", "batch_size": 48, "train_n": 200}},
                 {"label": "Q", "train": {"defense": "at"}}],
        "presets": {"smoke": {"description": "d", "train": {"lr": 0.2, "seed": 9, "batch_size": 16},
                              "defense_train": {"RFGSM-AT": {"train_n": 300, "val_n": 20}},
                              "force": {"val_n": 30}}}}, "stack")
    (r, q) = [c.train for c in make_plan(base, "smoke").cells]
    assert r.lr == q.lr == 0.2                  # preset.train over [train]
    assert r.seed == q.seed == 2                # the axis over preset.train
    assert r.batch_size == 48 and q.batch_size == 16   # the row over preset.train
    assert r.train_n == 300 and q.train_n == 100       # defense_train (an alias of fgsm-rs) over the row
    assert r.val_n == q.val_n == 30             # force over defense_train
    (r, q) = [c.train for c in make_plan(base, "smoke", {"train": {"val_n": 40, "defense": "at"}}).cells]
    assert r.val_n == q.val_n == 40 and r.defense == "at"
    assert r.train_n == 200  # the run is AT now: fgsm-rs's own settings no longer apply
    with pytest.raises(ConfigError, match=r"defense_train\.trdes: unknown defense"):
        parse_experiment({**{k: v for k, v in base.__dict__.items() if k in ("name", "kind", "title")},
                          "columns": [{"label": "N", "value": "natural"}],
                          "presets": {"smoke": {"defense_train": {"trdes": {"epochs": 2}}}}}, "x")


def test_evaluation_settings_are_checked_before_training(tmp_path):
    exp = load_experiment("table6")
    for bad, words in (({"attack_n": {"autoatak": 8}}, r"eval\.attack_n\.autoatak: .*autoatak"),
                       ({"attack_params": {"pgd": {"stepz": 3}}}, r"attack_params\.pgd: pgd with .*stepz"),
                       ({"attack_params": {"spsa": {"stepz": 3}}}, r"attack_params\.spsa\.stepz: spsa has no such"),
                       ({"eps": "abc"}, r"eval\.eps"), ({"which": "best"}, r"needs a validation split")):
        with pytest.raises(ConfigError, match=words):
            make_plan(exp, "smoke", {"eval": bad})
    plan = make_plan(exp, "smoke", {"eval": {"attack_n": {"AA": 8}, "eps": "8/255"}})
    assert plan.eval["attack_n"] == {"aa": 8} and plan.eval["eps"] == pytest.approx(8 / 255)
    with pytest.raises(ConfigError, match="must be a plain name"):
        parse_experiment({"name": "../x", "kind": "table", "title": "t",
                          "columns": [{"label": "N", "value": "natural"}]}, "x")
    with pytest.raises(ConfigError, match=r"columns\[1\]: a column 'N' already exists"):
        parse_experiment({"name": "x", "kind": "table", "title": "t",
                          "columns": [{"label": "N", "value": "natural"}, {"label": "N", "attack": "pgd"}]}, "x")
    # numbers out of range fail here, naming the key and where the value came from, not hours later
    for bad, words in (({"n": 0}, r"command line \(-n or --set eval\.n\): expected an integer >= 1, got 0"),
                       ({"seed": -1}, r"command line \(--seed .*eval\.seed\): expected an integer >= 0"),
                       ({"batch_size": 0}, r"eval\.batch_size\): expected an integer >= 1"),
                       ({"eps": 2.0}, r"--eps .*expected 0 < ε <= 1, got 2\.0")):
        with pytest.raises(ConfigError, match=words):
            make_plan(exp, "smoke", {"eval": bad})
    broken = parse_experiment({"name": "x", "kind": "table", "title": "t", "columns": [{"label": "N", "value": "natural"}],
                               "presets": {"smoke": {"eval": {"steps": 0}}}}, "x.toml")
    with pytest.raises(ConfigError, match=r"x\.toml: presets\.smoke\.eval\.steps: expected an integer >= 1"):
        make_plan(broken, "smoke")
    # a column headed "5 restarts" must really restart: an attack with a fixed schedule is refused
    for attack, hint in (("aa", "remove restarts"), ("rays", "remove restarts"),
                         ("square", r"params = \{ restarts = 5 \}"), ("apgd-ce", r"params = \{ restarts = 5 \}")):
        text = TINY.replace('attack = "si-pgd"', f'attack = "{attack}"\nrestarts = 5')
        with pytest.raises(ConfigError, match=rf"columns\[2\]\.restarts: {attack} does not take .*{hint}"):
            make_plan(load_experiment(str(_write(tmp_path, text))), "smoke")
    tiny = load_experiment(str(_write(tmp_path, TINY.replace('attack = "si-pgd"', 'attack = "si-pgd"\nrestarts = 5'))))
    make_plan(tiny, "smoke")  # PGD-style attacks do restart
    make_plan(exp, "smoke", {"eval": {"attack_params": {"apgd-ce": {"restarts": 3}}}})  # an attack's own restarts
    text = TINY.replace('attack = "si-pgd"', 'attack = "apgd-ce"\nrestarts = 5\nparams = { restarts = 5 }')
    make_plan(load_experiment(str(_write(tmp_path, text))), "smoke")
    with pytest.raises(ConfigError, match=r"columns\[0\]\.attack: an \"adbd\" column .* got 'spsa'"):
        parse_experiment({"name": "x", "kind": "table", "title": "t",
                          "columns": [{"label": "A", "value": "adbd", "attack": "spsa"}]}, "x")
    # figures: -n, --steps and --seed become the figure's own settings; a setting it does not read is refused
    plan = make_plan(load_experiment("fig5"), "smoke", {"eval": {"n": 7, "steps": 2, "seed": 3}})
    assert plan.figure["n"] == 7 and plan.figure["steps"] == 2 and plan.figure["seed"] == 3
    with pytest.raises(ConfigError, match=r"fig5 does not use eval\.batch_size"):
        make_plan(load_experiment("fig5"), "smoke", {"eval": {"batch_size": 64}})
    for bad, words in (({"figure": {"n": -3}}, r"command line \(-n or --set figure\.n\): expected an integer >= 1"),
                       ({"eval": {"n": 0}}, r"command line \(-n or --set figure\.n\)"),
                       ({"figure": {"deltas": []}}, r"command line \(--set figure\.deltas\)")):
        with pytest.raises(ConfigError, match=words):
            make_plan(load_experiment("fig4"), "smoke", bad)
    with pytest.raises(ConfigError, match=r"0 < alpha_min < alpha_max"):
        make_plan(load_experiment("fig1"), "smoke", {"figure": {"alpha_min": 10.0, "alpha_max": 1.0}})
    # --precision trains the runs in it; fig3-5 compute in fp32 anyway, so it is not an evaluation setting there
    plan = make_plan(load_experiment("fig5"), "smoke", {"train": {"precision": "fp32"}, "eval": {"precision": "fp32"}})
    assert "precision" not in plan.overrides["eval"] and plan.overrides["train"]["precision"] == "fp32"
    with pytest.raises(ConfigError, match=r"fig5 does not use eval\.precision"):
        make_plan(load_experiment("fig5"), "smoke", {"eval": {"precision": "bf16"}})
    # a flag that repeats the preset's value is not an override
    from sirobust.reproduce.plan import result_folder
    plan = make_plan(exp, "mini", {"eval": {"n": 10000, "steps": 20}})
    assert plan.overrides["eval"] == {} and result_folder("table6", "mini", plan.overrides) == "table6-mini"
    plan = make_plan(exp, "mini", {"eval": {"n": 100}})
    assert result_folder("table6", "mini", plan.overrides).startswith("table6-mini+")
    with pytest.raises(ConfigError, match=r"no row labelled 'TRADES-XX'"):
        make_plan(load_experiment("fig5"), "smoke", {"figure": {"models": ["TRADES-XX"]}})


def test_an_evaluation_key_holds_the_arithmetic_really_used(tmp_path):
    from sirobust.reproduce.runner import Runner
    exp = load_experiment(str(_write(tmp_path, TINY)))
    specs = []
    for precision in ("auto", "fp32-fast", "fp32"):
        plan = make_plan(exp, "smoke", {"eval": {"precision": precision}})
        runner = Runner(plan, tmp_path, device="cpu", log=_quiet)
        cell = plan.cells[0]
        cell.train = __import__("dataclasses").replace(cell.train, out=str(tmp_path / "run"))
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "run" / "model.safetensors").write_bytes(b"weights")
        specs.append(runner.job_spec(cell, cell.jobs[0]))
    assert [s["precision"] for s in specs] == ["fp32-fast", "fp32-fast", "fp32"]  # auto is fp32-fast on a CPU
    assert specs[0] == specs[1] != specs[2] and "sirobust" in specs[0]["version"]
    # the key holds ε resolved (the dataset's default) and every attack parameter, defaults included
    assert specs[0]["eps"] == pytest.approx(0.1)
    pgd = next(r for r in specs[0]["resolved"] if r["name"] == "pgd")
    assert pgd["steps"] == 2 and pgd["random_start"] is True and pgd["loss"] == {"name": "ce"}


def test_plan_precedence_and_shared_runs():
    exp = load_experiment("table10")
    plan = make_plan(exp, "mini")
    # the two HE rows (two views of one model) share one training run, in each of the preset's seeds
    assert plan.seeds == [0, 1, 2]
    for seed in plan.seeds:
        he = [c for c in plan.cells if c.train.defense == "he" and c.seed == seed]
        assert len(he) == 2 and he[0].train == he[1].train
    assert len(plan.runs) == 3 * 3  # TRADES, TRADES-HE and TRADES-SI, each seed
    # the command line beats the preset's force, and replaces an axis rather than repeating it
    plan = make_plan(load_experiment("table6"), "paper", {"train": {"dataset": "svhn", "epochs": 2}})
    assert {c.train.dataset for c in plan.cells} == {"svhn"} and {c.train.epochs for c in plan.cells} == {2}
    assert len(plan.cells) == 16  # one dataset now, two networks


# ---------------------------------------------------------------- bad configs are refused by key

@pytest.mark.parametrize("edit, words", [
    (lambda t: t.replace('title = "A tiny table"', 'title = "A tiny table"\ncolour = "red"'),
     r"tiny\.toml\.colour: unknown key"),
    (lambda t: t.replace("epochs = 1", "epoch = 1"), r"tiny\.toml\.train\.epoch: unknown key"),
    (lambda t: t.replace("epochs = 1", 'epochs = "one"'), r"tiny\.toml\.train\.epochs: expected an integer"),
    (lambda t: t.replace("epochs = 1", "epochs = true"), r"tiny\.toml\.train\.epochs: expected an integer"),
    (lambda t: t.replace('si = true }', 'si = "yes" }'), r"rows\[1\]\.train\.si: expected true or false"),
    (lambda t: t.replace('attack = "pgd"', 'attack = "pgdd"'), r"columns\[1\]\.attack: .*pgdd"),
    (lambda t: t.replace('eval = { n = 24', 'eval = { images = 24'), r"presets\.smoke\.eval\.images: unknown key"),
    (lambda t: t.replace("[presets.smoke]", "[presets.huge]"), r"presets\.huge: unknown preset"),
    (lambda t: t.replace('label = "AT-SI"', 'label = "AT"'), r"the label 'AT' is used twice"),
    (lambda t: t.replace('kind = "table"', 'kind = "chart"'), r"tiny\.toml\.kind: expected one of table, figure"),
    (lambda t: t.replace('value = "worst_case"', 'value = "worst_case"\nattack = "pgd"'), r"takes no attack"),
    (lambda t: t.replace("attack_steps = 1", "attack_steps = 0"), r"row 'AT'.*attack_steps"),
    (lambda t: t.replace("AT = { Natural", "ATT = { Natural"), r"paper_tables\[0\]\.rows\.ATT: no row is labelled"),
    (lambda t: t.replace("PGD = 54.12", "PGDCW = 54.12"), r"paper_tables\[0\]\.rows\.AT\.PGDCW: no column"),
    (lambda t: t.replace("PGD = 54.12", 'PGD = "54.12"'), r"paper_tables\[0\]\.rows\.AT\.PGD: expected a number"),
    (lambda t: t.replace('setting = "CIFAR-10, ResNet18"', ""), r"paper_tables\[0\]\.setting: missing"),
])
def test_bad_configs_are_refused_naming_the_key(tmp_path, edit, words):
    path = _write(tmp_path, edit(TINY))
    with pytest.raises(ConfigError, match=words):
        make_plan(load_experiment(str(path)), "smoke")


def test_yaml_config_reads_as_the_toml_one_and_object_tags_are_refused(tmp_path):
    yaml = pytest.importorskip("yaml")
    toml_exp = load_experiment(str(_write(tmp_path, TINY)))
    data = read_config_file(tmp_path / "tiny.toml")
    ypath = tmp_path / "tiny.yaml"
    ypath.write_text(yaml.safe_dump(data, allow_unicode=True))
    yaml_exp = load_experiment(str(ypath))
    assert make_plan(yaml_exp, "smoke").runs.keys() == make_plan(toml_exp, "smoke").runs.keys()
    marker = tmp_path / "ran"
    evil = ypath.read_text().replace("epochs: 1", f"epochs: !!python/object/apply:os.system ['touch {marker}']")
    assert evil != ypath.read_text()
    ypath.write_text(evil)
    with pytest.raises(ConfigError, match=r'line \d+ \(key "epochs"\).*tag.*constructs an object'):
        load_experiment(str(ypath))
    assert not marker.exists()
    ypath.write_text("name: !!set {a, b}\n")
    with pytest.raises(ConfigError, match=r'key "name"'):
        read_config_file(ypath)


def test_command_line_settings_are_checked_like_the_config():
    exp = load_experiment("table7")
    with pytest.raises(ConfigError, match=r"command line \(train\)\.epoch: unknown key"):
        make_plan(exp, "smoke", {"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"command line \(eval\)\.n: expected an integer"):
        make_plan(exp, "smoke", {"eval": {"n": "many"}})
    with pytest.raises(ConfigError, match="has no preset"):
        make_plan(parse_experiment({"name": "x", "kind": "table", "title": "x",
                                    "columns": [{"label": "N", "value": "natural"}]}, "x"), "paper")


# ---------------------------------------------------------------- a run, and a second run that reuses it

def test_tiny_table_end_to_end_then_everything_is_reused(tmp_path, monkeypatch):
    cfg = _write(tmp_path, TINY)
    out = tmp_path / "out"
    summary = reproduce(str(cfg), preset="smoke", out=str(out), progress=False, log=_quiet)
    assert summary["counts"] == {"trained": 2, "reused_runs": 0, "evaluated": 2, "reused_evaluations": 0}
    target = out / "tiny-smoke"
    saved = json.loads((target / "table.json").read_text())
    # each value is the one its evaluation report holds
    for row in saved["rows"]:
        (spec,) = row["evaluations"]
        evals = list((out / "runs").rglob("eval-*.json"))
        match = [json.loads(p.read_text()) for p in evals if json.loads(p.read_text())["spec"] == spec]
        rep = match[0]["report"]
        assert row["values"]["Natural"] == rep["clean_acc"]
        assert row["values"]["PGD"] == rep["attacks"]["pgd"]["robust_acc"]
        assert row["values"]["SI-PGD"] == rep["attacks"]["si-pgd"]["robust_acc"]
        assert row["values"]["worst"] == rep["worst_case_acc"] <= min(row["values"]["PGD"], row["values"]["SI-PGD"])
        assert rep["n"] == 24
    md = (target / "table.md").read_text()
    for row in saved["rows"]:
        cells = f"| {row['row']} | " + " | ".join(f"{100 * row['values'][c]:.2f}"
                                                  for c in ("Natural", "PGD", "SI-PGD", "worst"))
        assert cells in md
    # the paper's numbers are printed under the table, as the paper prints them, for the rows shown
    assert "The paper's numbers (CIFAR-10, ResNet18):" in md
    assert "| Method | Natural | PGD | SI-PGD |" in md
    assert "| AT | 85.57 | 54.12 | – |" in md and "| AT-SI | – | – | 52.89 |" in md
    assert "Best checkpoint" not in md  # the last epoch's weights were evaluated
    csv_lines = (target / "table.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 2 * 4
    tex = (target / "table.tex").read_text()
    assert tex.count(r"\toprule") == tex.count(r"\midrule") == tex.count(r"\bottomrule") == 1
    body = [ln for ln in tex.splitlines() if ln.endswith(r"\\") and ("AT" in ln)]
    assert len(body) == 2 and all(ln.count("&") == 5 for ln in body)  # dataset, method, 4 values

    # the second call trains nothing and attacks nothing
    import sys

    def must_not_run(*a, **k):
        raise AssertionError("work was redone")

    monkeypatch.setattr(sys.modules["sirobust.train"], "fit", must_not_run)
    monkeypatch.setattr(sys.modules["sirobust.evaluate"], "evaluate", must_not_run)
    again = reproduce(str(cfg), preset="smoke", out=str(out), progress=False, log=_quiet)
    assert again["counts"] == {"trained": 0, "reused_runs": 2, "evaluated": 0, "reused_evaluations": 2}
    assert [r["values"] for r in again["rows"]] == [r["values"] for r in saved["rows"]]
    monkeypatch.undo()

    # an evaluation that is missing (a grid stopped during it) is the only thing computed again
    victim = sorted((out / "runs").rglob("eval-*.json"))[0]
    victim.unlink()
    third = reproduce(str(cfg), preset="smoke", out=str(out), progress=False, log=_quiet)
    assert third["counts"] == {"trained": 0, "reused_runs": 2, "evaluated": 1, "reused_evaluations": 1}
    assert [r["values"] for r in third["rows"]] == [r["values"] for r in saved["rows"]]  # seeded: the same numbers

    assert not list(out.rglob("*.partial"))  # an evaluation's saved batches go once its result is written

    # another setting is another evaluation, never a stale reuse; its table goes beside the preset's, saying so
    fourth = reproduce(str(cfg), preset="smoke", out=str(out), progress=False, log=_quiet,
                       overrides={"eval": {"steps": 3, "attack_n": {"si-pgd": 12}}})
    assert fourth["counts"]["evaluated"] == 4 and fourth["counts"]["trained"] == 0  # 2 jobs a cell: 24 and 12 images
    (other,) = [p for p in out.glob("tiny-smoke+*") if p.is_dir()]
    md = (other / "table.md").read_text()
    assert "**Changed from the preset on the command line**: eval.attack_n = {\"si-pgd\": 12}, eval.steps = 3." in md
    assert "L∞ ε = 0.1." in md and "Fewer images for: si-pgd (first 12). The worst case is taken on the first 12" in md
    # with an attack on fewer images, every column again on those, computed from the per-example results
    assert "The same cells on the first 12 images, where every attack ran" in md
    for row in fourth["rows"]:
        reps = [json.loads(open(p).read())["report"] for p in row["reports"]]
        big = max(reps, key=lambda r: r["n"])
        shared = row["shared"]
        assert shared["n"] == 12 and shared["values"]["Natural"] == sum(big["clean_correct"][:12]) / 12
        assert shared["values"]["PGD"] == sum(big["attacks"]["pgd"]["robust"][:12]) / 12
        assert shared["values"]["SI-PGD"] == row["values"]["SI-PGD"]  # it ran on those 12 only
        assert shared["values"]["worst"] == row["values"]["worst"] <= shared["values"]["PGD"]
    assert json.loads((target / "table.json").read_text())["rows"] == saved["rows"]  # the preset's table is intact


def test_latex_escapes_and_spanning_headers():
    from sirobust.reproduce.tables import tex_escape, to_latex, to_markdown
    assert tex_escape("RST [27] † 50% a_b & c") == r"RST [27] $^\dagger$ 50\% a\_b \& c"
    for row in load_experiment("table4").rows:  # pdflatex needs ASCII: β becomes $\beta$
        assert tex_escape(row.label).isascii()
    assert tex_escape("TRADES-SI β=0.2") == r"TRADES-SI $\beta$=0.2"
    columns = [{"label": "Natural", "value": "natural", "group": ""}, {"label": "Clean2", "value": "natural", "group": ""},
               {"label": "128", "value": "robust", "group": "SPSA"}, {"label": "256", "value": "robust", "group": "SPSA"}]
    values = {"Natural": 0.9, "Clean2": 0.8, "SPSA / 128": 0.5, "SPSA / 256": 0.4}
    summary = {"title": "T", "preset": "smoke", "protocol": "p", "row_group_by": None, "notes": [],
               "column_groups": ["CIFAR-10", "SVHN"], "columns": columns,
               "rows": [{"row": "AT", "row_group": "", "column_group": g, "architecture": "RN-18", "run": "x", "n": 10,
                         "values": {k: v - (0.1 if g == "SVHN" else 0) for k, v in values.items()}}
                        for g in ("CIFAR-10", "SVHN")],
               "eval": {"which": "last", "steps": 20}, "counts": {"trained": 0, "reused_runs": 0, "evaluated": 0,
                                                                   "reused_evaluations": 0},
               "seconds": 0, "command": "c", "environment": {"sirobust": "x", "torch": "x", "git_commit": "x",
                                                              "gpu": None}}
    tex = to_latex(summary)
    # dataset groups span their 4 columns; SPSA spans its 2 in each group, after 2 unlabelled cells
    assert r"& \multicolumn{4}{c}{CIFAR-10} & \multicolumn{4}{c}{SVHN} \\" in tex
    assert r"\cmidrule(lr){2-5}\cmidrule(lr){6-9}" in tex
    assert r"&  &  & \multicolumn{2}{c}{SPSA} &  &  & \multicolumn{2}{c}{SPSA} \\" in tex
    assert r"\cmidrule(lr){4-5}\cmidrule(lr){8-9}" in tex
    assert "AT & 90.00 & 80.00 & 50.00 & 40.00 & 80.00 & 70.00 & 40.00 & 30.00" in tex
    md = to_markdown(summary)
    assert "| Method | CIFAR-10 / Natural | CIFAR-10 / Clean2 | CIFAR-10 / SPSA / 128 |" in md
    assert "| AT | 90.00 | 80.00 | 50.00 | 40.00 | 80.00 | 70.00 | 40.00 | 30.00 |" in md


def test_the_best_checkpoints_epochs_are_said_and_the_paper_values_of_every_packaged_table_are_shown():
    from sirobust.reproduce.tables import paper_markdown, to_markdown
    columns = [{"label": "Natural", "value": "natural", "group": ""}, {"label": "PGD", "value": "robust", "group": ""}]
    summary = {"title": "T", "preset": "mini", "protocol": "p", "row_group_by": None, "notes": [], "column_groups": [""],
               "columns": columns, "paper_tables": [],
               "rows": [{"row": lab, "row_group": "", "column_group": "", "architecture": "", "run": "x", "n": 10,
                         "epoch": ep, "values": {"Natural": 0.9, "PGD": 0.5}} for lab, ep in (("AT", 28), ("AT-SI", 30))],
               "eval": {"which": "best", "steps": 20}, "counts": {"trained": 0, "reused_runs": 0, "evaluated": 0,
                                                                   "reused_evaluations": 0},
               "seconds": 0, "command": "c", "environment": {"sirobust": "x", "torch": "x", "git_commit": "x",
                                                              "gpu": None}}
    assert "Best checkpoint (by validation PGD accuracy): AT epoch 28, AT-SI epoch 30." in to_markdown(summary)
    # every packaged paper value reaches the Markdown of a table that shows all the config's rows
    for name in [n for n in PAPER if n.startswith("table")]:
        exp = load_experiment(name)
        assert exp.paper_tables, name
        cols = [{"label": c.label, "value": c.value, "group": c.group} for c in exp.columns]
        fake = {"columns": cols, "rows": [{"row": r.label} for r in exp.rows]}
        for block in exp.paper_tables:
            text = "\n".join(paper_markdown(fake, block))
            for values in block["rows"].values():
                for key, v in values.items():
                    shown = f"{v:.4f}" if key.endswith("ADBD") else f"{v:.2f}"
                    assert f" {shown} |" in text, (name, key, v)
    # Table 2's s = 15 row is Table 6's TRADES-SI (the same run in the paper)
    t2 = load_experiment("table2").paper_tables[0]["rows"]["TRADES-SI s=15"]
    t6 = load_experiment("table6").paper_tables[0]["rows"]["TRADES-SI"]
    assert t2 == t6


def test_a_stopped_evaluation_continues_from_its_saved_batches(tmp_path, monkeypatch):
    import sys
    cfg = _write(tmp_path, TINY.replace("eval = { n = 24, steps = 2 }", "eval = { n = 48, steps = 2, batch_size = 1 }"))
    out = tmp_path / "out"
    ev = sys.modules["sirobust.evaluate"]
    real = ev.evaluate

    def stop_after_two_batches(*a, saved=None, **k):  # the grid is killed inside its first evaluation
        batch = saved.save_batch

        def save_then_die(attack, start, result):
            batch(attack, start, result)
            if start >= 1:  # the second clean-correct example of the first attack
                raise KeyboardInterrupt
        saved.save_batch = save_then_die
        return real(*a, saved=saved, **k)

    monkeypatch.setattr(ev, "evaluate", stop_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        reproduce(str(cfg), preset="smoke", out=str(out), progress=False, log=_quiet)
    (partial,) = list(out.rglob("eval-*-b1.partial"))
    assert sorted(p.name for p in partial.rglob("batch-*.json")) == ["batch-000000000.json", "batch-000000001.json"]
    # the next call reads those two batches instead of attacking them again (a try with another batch size,
    # stopped earlier, is cleared with them once the result is written)
    stale = partial.with_name(partial.name.replace("-b1.partial", "-b64.partial"))
    (stale / "pgd").mkdir(parents=True)
    monkeypatch.setattr(ev, "evaluate", real)
    attacked = []
    run_batch = ev._run_batch
    monkeypatch.setattr(ev, "_run_batch", lambda model, atk, *a, **k: attacked.append(atk.name) or
                        run_batch(model, atk, *a, **k))
    summary = reproduce(str(cfg), preset="smoke", out=str(out), progress=False, log=_quiet)
    assert summary["counts"]["evaluated"] == 2 and not list(out.rglob("*.partial"))
    first = summary["rows"][0]
    batches = round(first["values"]["Natural"] * 48)  # one clean-correct example a batch
    assert attacked[:batches - 2] == ["pgd"] * (batches - 2) and attacked[batches - 2] != "pgd"


def test_a_shared_run_records_who_trained_it_and_who_used_it(tmp_path):
    from sirobust.reproduce.runner import record_use
    path = tmp_path / "protocol.json"
    path.write_text(json.dumps({"experiment": "fig1", "preset": "mini", "protocol": "30 epochs"}))  # older format
    record_use(path, {"experiment": "table10", "preset": "mini", "protocol": "p"}, trained=False)
    record_use(path, {"experiment": "fig5", "preset": "mini", "protocol": "p"}, trained=False)
    record_use(path, {"experiment": "table10", "preset": "mini", "protocol": "p"}, trained=False)
    saved = json.loads(path.read_text())
    assert saved["trained_by"] == {"experiment": "fig1", "preset": "mini", "protocol": "30 epochs"}
    assert saved["used_by"] == [{"experiment": "fig5", "preset": "mini"}, {"experiment": "table10", "preset": "mini"}]


def test_fired_sanity_checks_are_listed_under_the_table():
    from sirobust.reproduce.tables import to_markdown
    columns = [{"label": "PGD", "value": "robust", "group": ""}]
    flag = {"name": "scale_sensitivity", "message": "PGD-CE breaks 5.9 points more examples once ..."}
    summary = {"title": "T", "preset": "mini", "protocol": "p", "row_group_by": None, "notes": [], "column_groups": [""],
               "columns": columns, "overrides": {"train": {}, "eval": {}, "figure": {}},
               "rows": [{"row": "HE", "row_group": "", "column_group": "", "architecture": "", "run": "x", "n": 10,
                         "flags": [flag], "values": {"PGD": 0.5}}],
               "eval": {"which": "last", "steps": 20}, "counts": {"trained": 0, "reused_runs": 0, "evaluated": 0,
                                                                   "reused_evaluations": 0},
               "seconds": 0, "command": "c", "environment": {"sirobust": "x", "torch": "x", "git_commit": "x",
                                                              "gpu": None}}
    md = to_markdown(summary)
    assert "**Sanity checks that fired**" in md and "- HE: `scale_sensitivity`: PGD-CE breaks 5.9" in md
    assert "Changed from the preset" not in md


def test_cosine_view_is_the_logits_divided_by_the_he_scale():
    from sirobust.models import build_model
    from sirobust.reproduce.runner import cosine_view
    model = build_model("cnn-small", num_classes=10, in_channels=1).eval().use_cosine_head(15.0)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(cosine_view(model)(x), model(x) / 15.0)
        assert cosine_view(model)(x).abs().max() <= 1 + 1e-5  # a cosine
    with pytest.raises(ValueError, match="cosine head"):
        cosine_view(build_model("cnn-small", num_classes=10, in_channels=1))


# ---------------------------------------------------------------- published models (Table 5's machinery)

DEFINITION = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.conv = nn.Conv2d(1, width, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.fc = nn.Linear(width * 4, 10)

        def forward(self, x):
            return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


    def make_net(width=4):
        return Net(int(width))
''')


def _Net(width):
    namespace = {}
    exec(DEFINITION, namespace)  # the same class the definition file holds
    return namespace["make_net"](width)


def _published_table(tmp_path, wrong_sha=False):
    """Two small models in RobustBench's layout (model_dir/DATASET/Linf/NAME.pt) and a config listing them,
    each pinned by the sha256 of its weights and of its definition file."""
    model_dir = tmp_path / "models"
    folder = model_dir / "fashion-mnist-mini" / "Linf"
    folder.mkdir(parents=True)
    (model_dir / "net.py").write_text(DEFINITION)
    definition_sha = hashlib.sha256((model_dir / "net.py").read_bytes()).hexdigest()
    entries, rows = [], []
    for i, (name, width) in enumerate((("Alpha2020Small", 4), ("Beta2021Wrapped", 6))):
        torch.manual_seed(i)
        state = _Net(width).state_dict()
        if i == 1:  # as published checkpoints often are: wrapped, with DataParallel's prefix
            state = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
        torch.save(state, folder / f"{name}.pt")
        sha = hashlib.sha256((folder / f"{name}.pt").read_bytes()).hexdigest()
        if wrong_sha and i == 1:
            sha = "0" * 64
        entries.append(f'[[models]]\nname = "{name}"\ndefinition = "net.py:make_net"\nargs = {{ width = {width} }}\n'
                       f'sha256 = "{sha}"\ndefinition_sha256 = "{definition_sha}"\n'
                       f'dataset = "fashion-mnist-mini"\nlabel = "{name[:5]}"\n'
                       f'architecture = "CNN-{width}"\n')
        rows.append(f'[[rows]]\nlabel = "{name[:5]}"\nmodel = "{name}"\n')
    text = textwrap.dedent('''
        name = "pub"
        kind = "table"
        title = "Published models"
        [[columns]]
        label = "Natural"
        value = "natural"
        [[columns]]
        label = "PGD"
        group = "Single run"
        attack = "pgd"
        [[columns]]
        label = "PGD"
        group = "2 restarts"
        attack = "pgd"
        restarts = 2
    ''') + "\n".join(entries) + "\n".join(rows) + textwrap.dedent('''
        [presets.smoke]
        description = "seconds"
        eval = { n = 16, steps = 2, eps = 0.1 }
    ''')
    return _write(tmp_path, text, "pub.toml"), model_dir


def test_published_models_run_end_to_end(tmp_path):
    cfg, model_dir = _published_table(tmp_path)
    summary = reproduce(str(cfg), preset="smoke", out=str(tmp_path / "out"), model_dir=str(model_dir),
                        progress=False, log=_quiet)
    assert [r["row"] for r in summary["rows"]] == ["Alpha", "Beta2"]
    assert [r["architecture"] for r in summary["rows"]] == ["CNN-4", "CNN-6"]
    for r in summary["rows"]:  # each column holds its own evaluation: the worst of 2 restarts is never higher
        single, worst2 = r["values"]["Single run / PGD"], r["values"]["2 restarts / PGD"]
        reports = [json.loads(open(p).read()) for p in r["reports"]]
        assert single == next(x["report"]["attacks"]["pgd"]["robust_acc"] for x in reports if x["spec"]["restarts"] == 1)
        assert worst2 == next(x["report"]["attacks"]["pgd"]["robust_acc"] for x in reports if x["spec"]["restarts"] == 2)
        assert worst2 <= single <= r["values"]["Natural"]
    md = (tmp_path / "out" / "pub-smoke" / "table.md").read_text()
    assert "| Method | Model | Natural | Single run / PGD | 2 restarts / PGD |" in md
    again = reproduce(str(cfg), preset="smoke", out=str(tmp_path / "out"), model_dir=str(model_dir),
                      progress=False, log=_quiet)
    assert again["counts"]["evaluated"] == 0 and again["counts"]["reused_evaluations"] == 4


def test_a_wrong_sha256_stops_the_grid_before_any_attack(tmp_path, monkeypatch):
    cfg, model_dir = _published_table(tmp_path, wrong_sha=True)
    import sys

    def must_not_run(*a, **k):
        raise AssertionError("an attack ran")

    monkeypatch.setattr(sys.modules["sirobust.evaluate"], "evaluate", must_not_run)
    from sirobust.foreign.published import PublishedModelError
    with pytest.raises(PublishedModelError, match=r"Beta2021Wrapped.*sha256 [0-9a-f]{64}, expected 0{64}"):
        reproduce(str(cfg), preset="smoke", out=str(tmp_path / "out"), model_dir=str(model_dir), progress=False,
                  log=_quiet)
    assert not (tmp_path / "out" / "pub-smoke").exists()


def test_a_changed_definition_file_stops_the_grid_before_its_code_runs(tmp_path, monkeypatch):
    cfg, model_dir = _published_table(tmp_path)
    marker = tmp_path / "ran"
    (model_dir / "net.py").write_text(DEFINITION + f"\nopen({str(marker)!r}, 'w').close()\n")
    from sirobust.foreign.published import PublishedModelError
    with pytest.raises(PublishedModelError, match=r"\(definition\).*net\.py has sha256"):
        reproduce(str(cfg), preset="smoke", out=str(tmp_path / "out"), model_dir=str(model_dir), progress=False,
                  log=_quiet)
    assert not marker.exists()


def test_an_unpinned_published_model_needs_consent():
    exp = load_experiment("table5")
    plan = make_plan(exp, "smoke")
    from sirobust.reproduce import check_published
    with pytest.raises(ConfigError, match=r"no sha256 is given for Engstrom2019Robustness.*--accept-unpinned"):
        check_published(plan, __import__("pathlib").Path("nowhere"), accept_unpinned=False)


# ---------------------------------------------------------------- the command line

def test_cli_list_and_dry_run(capsys):
    from sirobust.cli import main
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for name in PAPER:
        assert re.search(rf"^\| {name} \|", out, re.M), name
    assert main(["reproduce", "table6", "--preset", "paper", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "32 cells, 32 training runs" in out and "cifar100/wrn-34-10/trades-si-e90-" in out
    assert main(["reproduce", "table6", "--set", "train.epoch=3", "--dry-run"]) == 2
    assert "train).epoch: unknown key" in capsys.readouterr().err
    assert main(["reproduce", "table11"]) == 2
    assert "no experiment named 'table11'" in capsys.readouterr().err


# ---------------------------------------------------------------- figures

TINY_FIGURE = (TINY.split("[[columns]]")[0].replace('kind = "table"', 'kind = "figure"\nfigure_kind = "fig5"')
               .replace('name = "tiny"', 'name = "tinyfig"')
               + "[[rows]]" + TINY.split("[[rows]]", 1)[1].split("[presets.smoke]")[0]  # the table's two rows
               + textwrap.dedent('''
    [figure]
    n = 20
    bins = 10
    steps = 2

    [presets.smoke]
    description = "seconds"
'''))


def test_figure_from_a_config_then_replotted_from_its_data(tmp_path, monkeypatch):
    cfg = _write(tmp_path, TINY_FIGURE, "tinyfig.toml")
    summary = reproduce(str(cfg), preset="smoke", out=str(tmp_path / "out"), progress=False, log=_quiet)
    target = tmp_path / "out" / "tinyfig-smoke"
    assert (target / "fig5.png").read_bytes()[:4] == b"\x89PNG" and (target / "fig5.pdf").read_bytes()[:4] == b"%PDF"
    data = summary["data"]
    assert data["labels"] == ["AT", "AT-SI"]
    for label in data["labels"]:
        m = data["models"][label]
        assert sum(m["counts"]) == m["n"] == 20 and len(m["counts"]) == 10
        assert all(-1 <= v <= 1 for v in m["values"])
    import sirobust.experiments.figures as computations

    def must_not_run(*a, **k):
        raise AssertionError("the figure's data was computed again")

    monkeypatch.setattr(computations, "cos_theta_histograms", must_not_run)
    (target / "fig5.png").unlink()
    again = reproduce(str(cfg), preset="smoke", out=str(tmp_path / "out"), progress=False, log=_quiet)
    assert again["data"] == json.loads(json.dumps(data)) and (target / "fig5.png").exists()
    with pytest.raises(AssertionError, match="computed again"):  # another setting is computed afresh
        reproduce(str(cfg), preset="smoke", out=str(tmp_path / "out"), progress=False, log=_quiet,
                  overrides={"figure": {"bins": 12}})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fig1", "fig3", "fig4", "fig5", "table6", "table8"])
def test_packaged_smoke_presets_run_and_a_second_run_reuses(tmp_path, name):
    first = reproduce(name, preset="smoke", out=str(tmp_path), progress=False, log=_quiet)
    again = reproduce(name, preset="smoke", out=str(tmp_path), progress=False, log=_quiet)
    if "counts" in again:
        assert again["counts"]["trained"] == again["counts"]["evaluated"] == 0
        assert [r["values"] for r in again["rows"]] == [r["values"] for r in first["rows"]]
    else:
        assert again["data"] == json.loads(json.dumps(first["data"]))


def test_docs_results_are_generated_from_the_committed_results():
    """docs/reproduction.md's results block is scripts/collect_reproduction.py's rendering of the committed JSONs."""
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("collect_reproduction", root / "scripts" / "collect_reproduction.py")
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)
    doc = (root / "docs" / "reproduction.md").read_text()
    block = re.search(re.escape(collect.MARKERS[0]) + r"\n(.*?)\n" + re.escape(collect.MARKERS[1]), doc, re.S)
    assert block and block.group(1).strip() == collect.render_block().strip()
    for path in collect.RESULTS.glob("*-mini.json"):
        summary = json.loads(path.read_text())
        assert summary["preset"] == "mini"
        if "data" in summary:
            assert (collect.FIGURES / path.name.replace(".json", ".png")).exists()


def test_fig5_over_training_seeds_compares_the_methods_across_seeds(tmp_path, monkeypatch):
    """Fig. 5 compares two methods, so it may have a seed axis: every seed's models on the same images, a
    paired test per seed and the t interval across seeds in the summary; each seed's data is what a figure of
    that seed alone computes (the same weights, the same attack). Figures of one model refuse seeds."""
    from sirobust.reproduce.figures import to_markdown
    cfg = _write(tmp_path, TINY_FIGURE, "tinyfig.toml")
    out = str(tmp_path / "out")
    summary = reproduce(str(cfg), preset="smoke", out=out, progress=False, log=_quiet, overrides={"seeds": [0, 1]})
    data = summary["data"]
    assert data["seeds"] == [0, 1] and set(data["per_seed"]) == {"0", "1"}
    assert set(summary["runs"]) == {"AT (seed 0)", "AT (seed 1)", "AT-SI (seed 0)", "AT-SI (seed 1)"}
    assert data["per_seed"]["0"]["models"]["AT"]["values"] != data["per_seed"]["1"]["models"]["AT"]["values"]
    one = reproduce(str(cfg), preset="smoke", out=out, progress=False, log=_quiet, overrides={"seeds": [1]})
    assert one["data"]["models"] == data["per_seed"]["1"]["models"]  # seed 1's runs, reused, the same numbers
    text = to_markdown(summary)
    assert "| AT-SI | 1 |" in text and "over 2 seeds, 95 % interval" in text and "seed 1:" in text
    assert any(p.parent.name.startswith("tinyfig-smoke+") for p in (tmp_path / "out").rglob("fig5.png"))

    import sirobust.experiments.figures as computations
    monkeypatch.setattr(computations, "cos_theta_histograms",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("computed again")))
    again = reproduce(str(cfg), preset="smoke", out=out, progress=False, log=_quiet, overrides={"seeds": [0, 1]})
    assert again["data"] == json.loads(json.dumps(data))
    with pytest.raises(ConfigError, match="fig1 is drawn from one seed's runs"):
        make_plan(load_experiment("fig1"), "smoke", {"seeds": [0, 1]})


def test_fig5_seed_summary_states_a_difference_only_when_the_seeds_interval_excludes_0():
    from sirobust.reproduce.figures import _summary5_seeds

    def figure(diffs_by_seed):
        per = {}
        for s, diffs in diffs_by_seed.items():
            base = [0.1 * (k % 7) for k in range(len(diffs))]
            models = {"A": {"values": base}, "A-SI": {"values": [b + d for b, d in zip(base, diffs)]}}
            for m in models.values():
                m.update(n=len(diffs), mean=sum(m["values"]) / len(diffs), median=0.0, robust_accuracy=0.5)
            per[str(s)] = {"labels": ["A", "A-SI"], "models": models}
        return {"seeds": sorted(diffs_by_seed), "per_seed": per}
    up = _summary5_seeds(figure({0: [0.05, 0.04, 0.06, 0.05] * 5, 1: [0.03, 0.05, 0.04, 0.04] * 5,
                                 2: [0.06, 0.05, 0.05, 0.07] * 5}))[-1]
    assert up.startswith("- A-SI's mean cos θ_y is above A's") and "larger in 3 of 3 seeds" in up
    mixed = _summary5_seeds(figure({0: [0.05] * 20, 1: [-0.06] * 20, 2: [0.01] * 20}))[-1]
    assert mixed.startswith("- A-SI vs A: no difference detected") and "larger in 2 of 3 seeds" in mixed
    down = _summary5_seeds(figure({0: [-0.05] * 20, 1: [-0.04] * 20, 2: [-0.06] * 20}))[-1]
    assert down.startswith("- A-SI's mean cos θ_y is below A's")


def test_fig4_over_training_seeds_and_directions_compares_how_fast_the_loss_rises(tmp_path):
    """Fig. 4 takes a seed axis and several random directions: each seed's models along the same draws, the
    rise per direction in a table, the per-seed mean differences and their interval across seeds."""
    from sirobust.experiments.figures import rise
    from sirobust.reproduce.figures import to_markdown
    text = TINY_FIGURE.replace('figure_kind = "fig5"', 'figure_kind = "fig4"').replace(
        "n = 20\nbins = 10\nsteps = 2", "n = 8\nsteps = 2\ndeltas = [-0.5, 0.0, 0.5]\ndirections = 2")
    assert "directions = 2" in text
    cfg = _write(tmp_path, text, "tinyfig4.toml")
    summary = reproduce(str(cfg), preset="smoke", out=str(tmp_path / "out"), progress=False, log=_quiet,
                        overrides={"seeds": [0, 1]})
    data = summary["data"]
    assert data["seeds"] == [0, 1]
    for s in ("0", "1"):
        assert len(data["per_seed"][s]["more_directions"]) == 1
    md = to_markdown(summary)
    r = rise(data["per_seed"]["1"]["more_directions"][0]["AT-SI"])
    assert f"| AT-SI | 1 | {rise(data['per_seed']['1']['models']['AT-SI']):.3f} | {r:.3f} |" in md
    assert "over 2 seeds, 95 % interval" in md and "flatter along" in md
    # stopped after its first seed (half an hour each on a CPU), it continues from the second, to the same data
    import sirobust.reproduce.figures as figure_module
    real, calls = figure_module.COMPUTE["fig4"], []

    def stopped_at_seed_1(runner, cells, fig):
        calls.append(cells[0].seed)
        if cells[0].seed == 1 and calls.count(1) == 1:
            raise KeyboardInterrupt  # as a kill between two seeds
        return real(runner, cells, fig)
    figure_module.COMPUTE["fig4"] = stopped_at_seed_1
    try:
        with pytest.raises(KeyboardInterrupt):
            reproduce(str(cfg), preset="smoke", out=str(tmp_path / "out2"), progress=False, log=_quiet,
                      overrides={"seeds": [0, 1]})
        lines = []
        again = reproduce(str(cfg), preset="smoke", out=str(tmp_path / "out2"), progress=False,
                          log=lambda *a, **_k: lines.append(a[0]), overrides={"seeds": [0, 1]})
    finally:
        figure_module.COMPUTE["fig4"] = real
    assert calls == [0, 1, 1] and any(line.startswith("[reuse]") and line.endswith(": seed 0") for line in lines)
    assert again["data"] == json.loads(json.dumps(data))
    assert not list((tmp_path / "out2").rglob("figure.partial.json"))  # all of it is in figure.json now
    with pytest.raises(ConfigError, match=r"directions: expected an integer >= 1"):
        make_plan(load_experiment(str(_write(tmp_path, text.replace("directions = 2", "directions = 0"),
                                              "bad.toml"))), "smoke")


def test_fig4_seed_summary_states_flatter_only_when_the_seeds_interval_excludes_0():
    from sirobust.reproduce.figures import _summary4_seeds

    def figure(rises_by_seed):  # {seed: (base rises, other rises)}, one per direction, at δ = ±1
        per = {}
        for s, (b, o) in rises_by_seed.items():
            curve = lambda r: {"deltas": [-1.0, 0.0, 1.0], "loss_change": [r, 0.0, r]}  # noqa: E731
            per[str(s)] = {"labels": ["A", "A-SI"], "models": {"A": curve(b[0]), "A-SI": curve(o[0])},
                           "more_directions": [{"A": curve(x), "A-SI": curve(y)} for x, y in zip(b[1:], o[1:])]}
        return {"seeds": sorted(rises_by_seed), "per_seed": per}
    flat = _summary4_seeds(figure({0: ([1.0, 1.2, 0.9], [0.8, 1.0, 0.7]), 1: ([1.1, 1.0, 1.3], [0.85, 0.8, 1.05]),
                                   2: ([0.9, 1.1, 1.0], [0.7, 0.85, 0.8])}))[-1]
    assert flat.startswith("- A-SI's adversarial loss rises less than A's along these 3 random directions")
    assert "flatter in 3 of 3 seeds" in flat
    mixed = _summary4_seeds(figure({0: ([1.0, 1.2], [0.8, 1.0]), 1: ([1.0, 1.1], [1.3, 1.4]),
                                    2: ([1.0, 0.9], [0.95, 0.9])}))[-1]
    assert mixed.startswith("- A-SI vs A: no difference detected")
    # the seeds agree exactly (sd 0) but each seed's directions scatter: the floor, one seed's standard error over
    # its directions, decides, and it is no difference (without it: t infinite, "less")
    noisy = ([1.0, 1.0, 1.0, 1.0], [0.4, 1.3, 0.5, 1.2])
    floored = _summary4_seeds(figure({0: noisy, 1: noisy, 2: noisy}))[-1]
    assert floored.startswith("- A-SI vs A: no difference detected") and "the seeds' sd, 0.000" in floored
    # one direction, the same draw in every seed: said, not generalised
    one = _summary4_seeds(figure({0: ([1.0], [0.8]), 1: ([1.1], [0.85]), 2: ([0.9], [0.7])}))[-1]
    assert "along the one random direction drawn (the same in every seed)" in one


def test_fig4_one_seed_several_directions_and_a_grid_without_offsets():
    from sirobust.reproduce.figures import _summary4
    curve = lambda r: {"deltas": [-1.0, 0.0, 1.0], "loss_change": [r, 0.0, r]}  # noqa: E731
    data = {"labels": ["A", "A-SI"], "deltas": [-1.0, 0.0, 1.0], "models": {"A": curve(1.0), "A-SI": curve(0.7)},
            "more_directions": [{"A": curve(1.2), "A-SI": curve(0.9)}, {"A": curve(0.9), "A-SI": curve(0.8)}]}
    text = "\n".join(_summary4(data))
    assert "| 2 | 1.200 | 0.900 |" in text and "smaller rise along 3 of 3 directions" in text
    assert "\n\n- A-SI − A, direction by direction" in text  # a paragraph of its own after the table
    del data["more_directions"]  # a figure stored before directions existed
    assert "Mean rise" not in "\n".join(_summary4(data))
    with pytest.raises(ConfigError, match="at least one step δ ≠ 0"):
        make_plan(load_experiment("fig4"), "smoke", {"figure": {"deltas": [0.0]}})


def test_fig5_rows_that_set_their_own_seeds_stay_one_figure(tmp_path):
    """A seed axis makes Fig. 5 per-seed; rows trained with seeds of their own (no axis) are compared as they
    always were, in one figure."""
    text = TINY_FIGURE.replace('train = { defense = "at" }', 'train = { defense = "at", seed = 0 }') \
                      .replace('train = { defense = "at", si = true }', 'train = { defense = "at", si = true, seed = 1 }')
    cfg = _write(tmp_path, text, "tinyfig.toml")
    summary = reproduce(str(cfg), preset="smoke", out=str(tmp_path / "out"), progress=False, log=_quiet)
    assert "per_seed" not in summary["data"] and summary["data"]["labels"] == ["AT", "AT-SI"]
    assert set(summary["runs"]) == {"AT", "AT-SI"}


def test_a_figure_of_a_published_model(tmp_path):
    """Fig. 1's rescaling study on a model brought from elsewhere (RobustBench's layout, pinned by sha256)."""
    cfg, model_dir = _published_table(tmp_path)
    text = cfg.read_text().replace('kind = "table"', 'kind = "figure"\nfigure_kind = "fig1"')
    text = text.replace("[presets.smoke]", "[figure]\npoints = 3\n\n[presets.smoke]")
    text = text.replace('name = "pub"', 'name = "pubfig"')
    text = re.sub(r"\[\[columns\]\].*?(?=\[\[models\]\])", "", text, flags=re.S)  # a figure has no columns
    text = text.replace('[[rows]]\nlabel = "Beta2"\nmodel = "Beta2021Wrapped"\n', "")
    cfg = _write(tmp_path, text, "pubfig.toml")
    summary = reproduce(str(cfg), preset="smoke", out=str(tmp_path / "out"), model_dir=str(model_dir),
                        progress=False, log=_quiet)
    assert summary["runs"] == {"Alpha": "published: Alpha2020Small"}
    assert len(summary["data"]["alphas"]) == 3 and (tmp_path / "out" / "pubfig-smoke" / "fig1.png").exists()
