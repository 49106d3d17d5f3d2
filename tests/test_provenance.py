"""Reports a reviewer can trust: provenance, counts with intervals, who broke what, results that do not
depend on the batch size, and any attack (torchattacks, a callable) held to the same rules."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from sirobust.attacks import PGD
from sirobust.evaluate import evaluate
from sirobust.report import Report, wilson_interval

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sirobust.cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, trained_cnn):
    from sirobust.checkpoint import save_model
    return save_model(trained_cnn, tmp_path_factory.mktemp("w") / "w.safetensors", model_name="cnn-small",
                      dataset="fashion-mnist-mini")


def test_wilson_interval_matches_known_values():
    # Wilson score interval, z = 1.96 (e.g. Newcombe 1998, Table I: 81/263 -> 0.2553-0.3662)
    lo, hi = wilson_interval(81, 263)
    assert lo == pytest.approx(0.2553, abs=5e-5) and hi == pytest.approx(0.3662, abs=5e-5)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=5e-5)
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=5e-5) and hi == 1


def test_cli_report_provenance_names_what_was_measured(tmp_path, weights):
    out = tmp_path / "r.json"
    r = cli("evaluate", "--weights", str(weights), "--attacks", "pgd,si-pgd", "-n", "40", "--steps", "3",
            "--restarts", "2", "--seed", "5", "--out", str(out), "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    p = rep["provenance"]
    expected = subprocess.run(["sha256sum", str(weights)], capture_output=True, text=True).stdout.split()[0]
    assert p["weights_sha256"] == expected == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert p["weights_sha256_of"] == "file" and p["weights_file"] == str(weights)
    assert p["model"] == "sirobust zoo model cnn-small" and p["dataset"] == "fashion-mnist-mini" and p["split"] == "test"
    assert p["examples"] == {"count": 40, "first_index": 0, "last_index": 39, "contiguous": True}
    assert p["threat_model"] == {"norm": "Linf", "eps": 0.1, "step_size": 0.025, "steps": 3, "restarts": 2}
    assert p["attacks"]["si-pgd"]["loss"] == {"name": "si", "scale": 15.0} and p["attacks"]["pgd"]["seed"] == 5
    assert p["seed"] == 5 and p["device"] == "cpu" and p["precision"] == "float32"
    assert p["torch"] == torch.__version__ and p["python"] == sys.version.split()[0] and p["sirobust"]
    assert p["threads"] == 1 and p["cpu"]  # the command ran with OMP_NUM_THREADS=1 (ENV)
    assert p["command"].startswith("sirobust evaluate --weights") and "--restarts 2" in p["command"]
    assert p["utc_time"].endswith("Z")
    # counts are the record; fractions and intervals follow from them
    for a in rep["attacks"].values():
        assert a["robust_acc"] == a["n_robust"] / a["n"] and a["ci95"] == wilson_interval(a["n_robust"], a["n"])
    assert rep["clean"]["count"] == sum(rep["clean_correct"])
    md = out.with_suffix(".md").read_text()
    assert expected in md and "upper bound" in md and "95% CI" in md and "first to break" in md


@pytest.mark.slow  # 20 s; test_batch_independence_holds_in_the_api_with_restarts checks the same in the API
def test_the_command_gives_the_same_examples_for_any_batch_size(tmp_path, weights):
    """Random starts are keyed per example: batch size and restarts change no per-example result."""
    base = ["evaluate", "--weights", str(weights), "--attacks", "pgd,si-pgd,rfgsm", "-n", "60", "--steps", "3",
            "--restarts", "3", "--eps", "0.15", "--no-progress"]
    reports = []
    for bs in ("64", "7"):
        out = tmp_path / f"r{bs}.json"
        assert cli(*base, "--batch-size", bs, "--out", str(out), cwd=tmp_path).returncode == 0
        reports.append(json.loads(out.read_text()))
    a, b = reports
    for name in ("pgd", "si-pgd", "rfgsm"):
        assert a["attacks"][name]["robust"] == b["attacks"][name]["robust"], name
    assert a["broken_by"] == b["broken_by"]
    # and re-running the recorded command gives the same numbers
    again = tmp_path / "again.json"
    cmd = a["provenance"]["command"].split()[1:]
    cmd[cmd.index("--out") + 1] = str(again)
    assert cli(*cmd, cwd=tmp_path).returncode == 0
    assert json.loads(again.read_text())["attacks"]["pgd"]["robust"] == a["attacks"]["pgd"]["robust"]


def test_batch_independence_holds_in_the_api_with_restarts(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:50], fmnist_test[1][:50]
    kw = dict(attacks=["pgd", "pgd-dlr"], eps=0.15, steps=2, restarts=3, progress=False)
    r1 = evaluate(trained_cnn, (x, y), batch_size=50, **kw)
    r2 = evaluate(trained_cnn, (x, y), batch_size=9, **kw)
    assert r1.attacks["pgd"].robust == r2.attacks["pgd"].robust
    assert r1.attacks["pgd-dlr"].robust == r2.attacks["pgd-dlr"].robust
    # keyed on the dataset index: the same example keeps its start when the slice around it changes
    r3 = evaluate(trained_cnn, (x[10:], y[10:]), indices=range(10, 50), batch_size=16, **kw)
    assert r3.attacks["pgd"].robust == r1.attacks["pgd"].robust[10:]


def test_state_dict_hash_for_a_model_given_in_python(tiny_net):
    x, y = torch.rand(6, 1, 12, 12), torch.tensor([0, 1, 2, 3, 4, 5])
    rep = evaluate(tiny_net, (x, y), attacks=["fgsm"], eps=0.1, progress=False)
    state = {k: v.detach().contiguous().clone() for k, v in sorted(tiny_net.state_dict().items())}
    assert rep.provenance["weights_sha256"] == hashlib.sha256(safetensors.torch.save(state)).hexdigest()
    assert rep.provenance["weights_sha256_of"].startswith("state dict")


def test_report_names_who_broke_each_example_and_its_repr_is_one_line(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:60], fmnist_test[1][:60]
    rep = evaluate(trained_cnn, (x, y), attacks=["fgsm", "pgd"], eps=0.1, steps=5, progress=False)
    for i, who in enumerate(rep.broken_by):
        if who is None:
            assert rep.worst_case_robust[i]
        elif who == "clean":
            assert not rep.clean_correct[i]
        else:
            assert rep.clean_correct[i] and not rep.attacks[who].robust[i]
            if who == "pgd":
                assert rep.attacks["fgsm"].robust[i]  # fgsm ran first: pgd is named only when fgsm missed
    assert "\n" not in repr(rep) and "worst case" in repr(rep)
    again = Report.from_json(rep.to_json())
    assert again.broken_by == rep.broken_by and again.worst_case == rep.worst_case


# ----------------------------------------------------------------------------------- any attack

def test_torchattacks_objects_and_callables_join_the_worst_case(trained_cnn, fmnist_test):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = fmnist_test[0][:80], fmnist_test[1][:80]
    ta = torchattacks.PGD(trained_cnn, eps=0.1, alpha=0.025, steps=5, random_start=True)

    def flip_towards_zero(x, y):  # a weak attack of the user's own: every pixel 0.1 darker
        return (x - 0.1).clamp(0, 1)

    rep = evaluate(trained_cnn, (x, y), attacks=["fgsm", ta, ("darker", flip_towards_zero)], eps=0.1,
                   progress=False)
    assert list(rep.attacks) == ["fgsm", "torchattacks:PGD", "darker"]
    assert rep.attacks["torchattacks:PGD"].params["steps"] == 5 and rep.attacks["torchattacks:PGD"].params["external"]
    columns = [torch.tensor(r.robust) for r in rep.attacks.values()]
    expected = torch.stack(columns).all(0) & torch.tensor(rep.clean_correct)
    assert rep.worst_case_robust == expected.tolist()  # the per-example minimum over all three
    assert not any(r.excluded for r in rep.attacks.values())
    with pytest.raises(ValueError, match="uses ε = 0.3 but the evaluation is Linf ε = 0.1"):
        evaluate(trained_cnn, (x, y), attacks=[torchattacks.PGD(trained_cnn, eps=0.3)], eps=0.1, progress=False)


def test_a_callable_that_leaves_the_ball_is_reported_not_counted(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:40], fmnist_test[1][:40]

    def cheat(x, y):  # a "perturbation" of 0.5: breaks everything, outside ε = 0.1
        return (1 - x).clamp(0, 1)

    rep = evaluate(trained_cnn, (x, y), attacks=["fgsm", ("cheat", cheat)], eps=0.1, progress=False)
    cheat_r = rep.attacks["cheat"]
    assert cheat_r.excluded and "outside the Linf ε-ball" in cheat_r.note
    assert cheat_r.robust_acc < rep.attacks["fgsm"].robust_acc  # its column is still shown
    assert rep.worst_case_robust == [c and f for c, f in zip(rep.clean_correct, rep.attacks["fgsm"].robust)]
    assert "cheat" not in rep.broken_by
    flag = next(f for f in rep.flags if f["name"] == "attack_left_threat_model")
    assert flag["triggered"] and "cheat" in flag["message"]
    assert rep.max_perturbation <= 0.1 + 1e-6


def test_attack_objects_with_keys_are_independent_of_batching(tiny_net):
    atk = PGD(tiny_net, eps=0.2, steps=3)
    x, y = torch.rand(10, 1, 12, 12), torch.arange(10)
    whole = atk(x, y, keys=torch.arange(10))
    halves = torch.cat([atk(x[:4], y[:4], keys=torch.arange(4)), atk(x[4:], y[4:], keys=torch.arange(4, 10))])
    torch.testing.assert_close(whole, halves, rtol=0, atol=0)


def test_weights_changed_after_loading_are_hashed_as_they_are_not_as_the_file_was(tmp_path, weights, fmnist_test):
    import sirobust
    model = sirobust.load(weights)
    x, y = fmnist_test[0][:8], fmnist_test[1][:8]
    rep = evaluate(model, (x, y), attacks=["fgsm"], progress=False)
    assert rep.provenance["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    with torch.no_grad():
        model.head.weight.mul_(0.5)  # the file no longer describes what is measured
    rep = evaluate(model, (x, y), attacks=["fgsm"], progress=False)
    assert rep.provenance["weights_sha256_of"].startswith("state dict")
    state = {k: v.detach().contiguous().clone() for k, v in sorted(model.state_dict().items())}
    assert rep.provenance["weights_sha256"] == hashlib.sha256(safetensors.torch.save(state)).hexdigest()


def test_an_external_attack_returning_garbage_is_excluded_not_fatal(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:20], fmnist_test[1][:20]

    def nan_attack(x, y):
        return torch.full_like(x, float("nan"))

    def wrong_shape(x, y):
        return x[:, :, :10]

    rep = evaluate(trained_cnn, (x, y), attacks=["fgsm", ("nan", nan_attack), ("shape", wrong_shape)], eps=0.1,
                   progress=False)
    assert rep.attacks["nan"].excluded and "non-finite" in rep.attacks["nan"].note
    assert rep.attacks["shape"].excluded and "shape" in rep.attacks["shape"].note
    assert rep.worst_case_robust == [c and f for c, f in zip(rep.clean_correct, rep.attacks["fgsm"].robust)]
    assert "not keyed" in rep.attacks["nan"].note


def test_a_named_attack_object_is_checked_and_left_unchanged(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:8], fmnist_test[1][:8]
    big = PGD(trained_cnn, eps=0.5)
    with pytest.raises(ValueError, match="attack 'big' uses Linf ε = 0.5 but the evaluation is Linf ε = 0.05"):
        evaluate(trained_cnn, (x, y), attacks=["pgd", ("big", big)], eps=0.05, progress=False)
    mine = PGD(trained_cnn, eps=0.1, steps=2)
    rep = evaluate(trained_cnn, (x, y), attacks=[("mine", mine)], eps=0.1, progress=False)
    assert list(rep.attacks) == ["mine"] and mine.name == "pgd"  # a renamed copy ran; the object is untouched
