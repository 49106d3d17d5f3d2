"""The command line: help, number parsing, the evaluate/rescale/train round trip, the demo, clear errors."""
import json
import subprocess
import sys

import pytest

from sirobust.cli import main, parse_number


def run(*args):
    return subprocess.run([sys.executable, "-m", "sirobust.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("sub", [[], ["demo"], ["train"], ["evaluate"], ["rescale"], ["compare"], ["list"]])
def test_every_command_has_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([*sub, "--help"])
    assert e.value.code == 0
    assert "usage: sirobust" in capsys.readouterr().out


def test_numbers_accept_fractions():
    assert parse_number("8/255") == pytest.approx(8 / 255)
    assert parse_number("0.1") == 0.1
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="8/255"):
        parse_number("eight")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_number("1/0")


@pytest.mark.parametrize("args,match", [
    (["train", "--dataset", "cifar11"], "(did you mean 'cifar10' or 'cifar100'?); valid datasets: cifar10"),
    (["train", "--model", "vgg"], "valid models: cnn-small"),
    (["train", "--defense", "magic"], "valid defenses:"),
    (["evaluate", "--weights", "x.safetensors", "--eps", "abc"], "8/255"),
])
def test_bad_names_list_the_valid_ones(args, match):
    r = run(*args)
    assert r.returncode == 2 and match in r.stderr.splitlines()[0]
    assert r.stderr.splitlines()[1].startswith("usage:")  # the error first, then the usage


def test_train_evaluate_rescale_round_trip(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--train-n", "256", "--val-n", "32", "--defense", "at",
                 "--attack-steps", "2", "--out", str(out), "--no-progress"]) == 0
    report = tmp_path / "rep.json"
    assert main(["evaluate", "--model-dir", str(out), "--attacks", "pgd,si-pgd,fgsm", "--eps", "1/10", "--steps", "3",
                 "-n", "40", "--out", str(report), "--no-progress"]) == 0
    rep = json.loads(report.read_text())
    assert set(rep["attacks"]) == {"pgd", "si-pgd", "fgsm"} and rep["n"] == 40
    assert rep["eps"] == pytest.approx(0.1) and rep["config"]["dataset"] == "fashion-mnist-mini"
    assert rep["worst_case_acc"] <= min(r["robust_acc"] for r in rep["attacks"].values())
    assert (tmp_path / "rep.md").exists()
    assert main(["rescale", "--model-dir", str(out), "--alphas", "1,1000", "--steps", "3", "-n", "30",
                 "--out", str(tmp_path / "rs"), "--no-progress"]) == 0
    rs = json.loads((tmp_path / "rs" / "rescale.json").read_text())
    assert rs["alphas"] == [1, 1000] and set(rs["accuracy"]) == {"pgd", "si-pgd"}
    assert (tmp_path / "rs" / "rescale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_are_one_line_not_tracebacks(tmp_path):
    r = run("evaluate", "--weights", str(tmp_path / "missing.safetensors"))
    assert r.returncode == 2 and "no weights file" in r.stderr and "Traceback" not in r.stderr
    r = run("train", "--out", str(tmp_path / "x"), "--resume")
    assert r.returncode == 2 and "nothing to resume" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv,hint", [(["evaluate", "--attaks", "pgd"], "(did you mean --attacks?)"),
                                       (["evaluate", "--stpes=3"], "(did you mean --steps?)"),
                                       (["trian"], "(did you mean 'train'?)"),
                                       (["evaluate", "--split", "tset"], "(did you mean 'test'?)"),
                                       (["evaluate", "--zzzzzz"], "unrecognized arguments: --zzzzzz\n")])
def test_a_mistyped_flag_or_command_gets_the_closest_name(capsys, argv, hint):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and hint in err.splitlines()[0] + "\n", err
    assert "did you mean" not in err or hint.startswith("(did")  # nothing far-fetched for a word close to none


def test_quick_demo_runs_every_stage_and_writes_its_files(tmp_path):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    for name in ("comparison.md", "rescale.json", "rescale.png", "demo.json"):
        assert (tmp_path / name).exists(), name
    table = (tmp_path / "comparison.md").read_text()
    assert "SI-PGD" in table and "Natural" in table


def test_defense_params_reach_the_defense_and_unknown_ones_are_named(tmp_path):
    from sirobust.cli import parse_param
    assert parse_param("lam=6") == ("lam", 6) and parse_param("pairing=l2") == ("pairing", "l2")
    assert parse_param("alpha=0.25") == ("alpha", 0.25)
    out = tmp_path / "alp"
    assert main(["train", "--defense", "alp", "--defense-param", "pairing=l2", "--defense-param", "lam=1",
                 "--epochs", "1", "--train-n", "64", "--val-n", "16", "--attack-steps", "1", "--out", str(out),
                 "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["defense"]["params"] == {"alpha": 0.5, "lam": 1, "pairing": "l2"}
    r = run("train", "--defense", "trades", "--defense-param", "gamma=2", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "no parameter gamma" in r.stderr and "lam" in r.stderr
