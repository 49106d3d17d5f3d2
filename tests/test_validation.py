"""The validation layer: every bad argument is refused before any work, by name, the same way in the
API and the command line; every input an attack may get either works or is refused by name."""
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sirobust
from sirobust import checks
from sirobust.attacks import ATTACKS, PGD, SIPGD, list_attacks
from sirobust.checks import UnknownNameError
from sirobust.evaluate import evaluate

from conftest import TinyNet
from helpers import cheap_attack

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sirobust.cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, trained_cnn):
    from sirobust.checkpoint import save_model
    return save_model(trained_cnn, tmp_path_factory.mktemp("w") / "w.safetensors", model_name="cnn-small",
                      dataset="fashion-mnist-mini")


# ----------------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("args,named", [
    (["evaluate", "--weights", "{w}", "--eps", "8"], "did you mean 8/255 = 0.0313725?"),
    (["evaluate", "--weights", "{w}", "--step-size", "inf"], "--step-size must be a finite number"),
    (["evaluate", "--weights", "{w}", "--eps", "0.1", "--step-size", "0.2"], "--step-size (the step size) = 0.2 is "
                                                                             "larger than eps = 0.1"),
    (["evaluate", "--weights", "{w}", "--attacks", "pgd,sipgdd"], "unknown attack 'sipgdd' (did you mean 'si-pgd'"),
    (["evaluate", "--weights", "{w}", "--num-examples", "0"], "--num-examples must be >= 1, got 0"),
    (["evaluate", "--weights", "{w}", "--data-dir", "{tmp}/missing"], "data_dir (--data-dir)"),
    (["train", "--eps", "8", "--out", "{tmp}/t"], "eps = 8 is outside [0, 1]"),
    (["train", "--val-n", "0", "--out", "{tmp}/t"], "--val-n must be >= 1"),
    (["train", "--data-dir", "{tmp}/missing", "--out", "{tmp}/t"], "data_dir (--data-dir)"),
    (["compare", "--defenses", "at,mrat", "--out", "{tmp}/c"], "unknown defense 'mrat' (did you mean 'mart'"),
    (["compare", "--defense-param", "gamma=2", "--defenses", "trades", "--out", "{tmp}/c"],
     "none of trades has a parameter 'gamma'"),
])
def test_bad_arguments_exit_before_any_work_with_one_line_naming_them(tmp_path, weights, args, named, capsys,
                                                                     monkeypatch):
    # in-process (the exit path of a real process is tested in test_cli): main() returns the exit code
    from sirobust.cli import main
    monkeypatch.chdir(tmp_path)
    args = [a.format(w=weights, tmp=tmp_path) for a in args]
    try:
        code = main([*args, "--no-progress"])
    except SystemExit as e:  # argparse's own refusals exit
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, err
    first = err.splitlines()[0]
    assert first.startswith(f"sirobust {args[0]}: error:") and named in first, err
    assert "epoch" not in out and "evaluating" not in out  # no training, no attack
    assert not (tmp_path / "t").exists() and not (tmp_path / "c").exists()  # and no run folder left


def test_names_are_case_insensitive_and_each_attack_line_comes_when_it_finishes(tmp_path, weights):
    r = cli("evaluate", "--weights", str(weights), "--attacks", "PGD,SI_PGD", "--norm", "LINF", "--dataset",
            "Fashion-MNIST-Mini", "-n", "24", "--steps", "2", "--out", str(tmp_path / "r.json"), "--no-progress")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    table = next(i for i, line in enumerate(lines) if line.startswith("attack "))
    done = [line.split()[0] for line in lines[:table] if line.startswith(("pgd ", "si-pgd "))]
    assert done == ["pgd", "si-pgd"]  # printed as each attack finished, before the final table


# ----------------------------------------------------------------------------------- the checks themselves

@given(st.floats(allow_nan=True, allow_infinity=True))
@settings(max_examples=200, deadline=None)
def test_eps_is_accepted_exactly_in_the_pixel_box(eps):
    if math.isfinite(eps) and 0 <= eps <= 1:
        assert checks.check_eps(eps, "Linf") == eps
    else:
        with pytest.raises(ValueError, match=r"^eps"):
            checks.check_eps(eps, "Linf")


@given(st.integers(min_value=2, max_value=255))
def test_an_integer_eps_gets_the_8_over_255_hint(k):
    with pytest.raises(ValueError, match=rf"did you mean {k}/255 = {k / 255:.6g}\?"):
        checks.check_eps(k, "Linf")


@given(st.floats(min_value=1e-6, max_value=1.0), st.floats(allow_nan=True, allow_infinity=True))
@settings(max_examples=200, deadline=None)
def test_step_size_must_be_finite_positive_and_at_most_eps_unless_forced(eps, alpha):
    ok = math.isfinite(alpha) and 0 < alpha <= eps
    if ok:
        assert checks.check_step_size(alpha, eps, 10) == alpha
    else:
        with pytest.raises(ValueError, match=r"^alpha \(the step size\)"):
            checks.check_step_size(alpha, eps, 10)
    if math.isfinite(alpha) and eps < alpha <= checks.MAX_STEP_RATIO * eps:
        assert checks.check_step_size(alpha, eps, 10, force=True) == alpha
    elif math.isfinite(alpha) and alpha > checks.MAX_STEP_RATIO * eps:  # absurd even when forced (issue 21)
        with pytest.raises(ValueError, match=r"^alpha \(the step size\) = .* even with force"):
            checks.check_step_size(alpha, eps, 10, force=True)


@given(st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=3), st.booleans(), st.none()))
@settings(max_examples=200, deadline=None)
def test_integer_settings_are_checked_by_name(value):
    is_int = not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
    if is_int and value >= 1:
        assert checks.check_int("steps", value, min=1) == int(value)
    else:
        with pytest.raises((TypeError, ValueError), match=r"^steps must be"):
            checks.check_int("steps", value, min=1)


@given(st.sampled_from(list_attacks()), st.data())
def test_names_resolve_in_any_case_and_typos_list_the_valid_names(name, data):
    variant = "".join(c.upper() if data.draw(st.booleans()) else c for c in name).replace("-", "_")
    assert checks.resolve_name("attack", variant, ATTACKS) == name
    with pytest.raises(UnknownNameError, match=r"^unknown attack 'zz.*valid attacks: " + ", ".join(sorted(ATTACKS))):
        checks.resolve_name("attack", "zz" + name, ATTACKS)


def test_strings_where_the_user_means_a_list_or_a_number(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:12], fmnist_test[1][:12]
    rep = evaluate(trained_cnn, (x, y), attacks="pgd, si-pgd", eps="1/10", steps=2, progress=False)
    assert list(rep.attacks) == ["pgd", "si-pgd"] and rep.eps == pytest.approx(0.1)
    with pytest.raises(ValueError, match="attacks is empty"):
        evaluate(trained_cnn, (x, y), attacks=" , ", eps=0.1, progress=False)
    with pytest.raises(ValueError, match="attacks is empty"):
        evaluate(trained_cnn, (x, y), attacks=[], eps=0.1, progress=False)


def test_default_eps_is_the_recorded_datasets_else_required(trained_cnn, tiny_net):
    assert PGD(trained_cnn).eps == pytest.approx(0.1)  # fashion-mnist-mini, as the checkpoint records
    assert PGD(trained_cnn, norm="L2").eps == pytest.approx(1.5)
    with pytest.raises(ValueError, match="eps is required"):
        PGD(tiny_net)


# ----------------------------------------------------------------------------------- inputs, in every attack

def _attack(name, model, **kw):
    return cheap_attack(name, model, eps=0.1, steps=2, **kw)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "aa-plus" else n  # aa-plus: 11 s
                                  for n in list_attacks()])
def test_every_attack_handles_odd_inputs_correctly_or_names_them(name):
    model = TinyNet().eval()
    atk = _attack(name, model)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 12, 12, generator=g)
    y = torch.tensor([1, 2, 3, 4])
    ref = atk(x, y, keys=torch.arange(4))
    # float64: computed in the model's precision, returned in float64, inside the ball in float64
    x64 = x.double()
    out = _attack(name, model)(x64, y, keys=torch.arange(4))
    assert out.dtype == torch.float64 and (out - x64).abs().max() <= 0.1 and 0 <= out.min() and out.max() <= 1
    # channels-last memory: the same numbers
    torch.testing.assert_close(atk(x.to(memory_format=torch.channels_last), y, keys=torch.arange(4)), ref)
    # an empty batch: an empty answer
    assert atk(x[:0], y[:0]).shape == (0, 1, 12, 12)
    with pytest.raises(TypeError, match=r"^x must be a float tensor.*x.float\(\) / 255"):
        atk((x * 255).to(torch.uint8), y)
    with pytest.raises(TypeError, match=r"^y must be an integer tensor"):
        atk(x, y.float())
    with pytest.raises(ValueError, match=r"^y must be class indices in \[0, 9\]"):
        atk(x, y + 10)
    with pytest.raises(ValueError, match=r"^y must have shape \(4,\)"):
        atk(x, y[:, None])
    with pytest.raises(ValueError, match=r"^x is on cpu but the model's parameters are on meta"):
        _attack(name, TinyNet().to("meta"))(x, y)


class Tupled(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.net, self.kind = TinyNet().eval(), kind

    def forward(self, x):
        out = self.net(x)
        return (out, out.sum()) if self.kind == "tuple" else {"logits": out}


@pytest.mark.parametrize("kind,hint", [("tuple", r"SelectOutput\(model, 0\)"), ("dict", r"SelectOutput\(model, 'logits'\)")])
def test_a_model_returning_a_tuple_or_dict_is_named_with_the_adapter(fmnist_test, kind, hint):
    model = Tupled(kind)
    x = torch.rand(3, 1, 12, 12)
    with pytest.raises(TypeError, match=rf"returned a {'tuple' if kind == 'tuple' else 'dict'}.*{hint}"):
        PGD(model, eps=0.1)(x, torch.tensor([0, 1, 2]))
    adapted = sirobust.models.SelectOutput(model, 0 if kind == "tuple" else "logits")
    assert PGD(adapted, eps=0.1, steps=2)(x, torch.tensor([0, 1, 2])).shape == x.shape


def test_evaluate_applies_the_same_rules(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:8], fmnist_test[1][:8]
    with pytest.raises(ValueError, match="data has no examples"):
        evaluate(trained_cnn, (x[:0], y[:0]), eps=0.1, progress=False)
    with pytest.raises(TypeError, match="^labels must be an integer tensor"):
        evaluate(trained_cnn, (x, y.float()), eps=0.1, progress=False)
    rep = evaluate(trained_cnn, ((x * 255).round().to(torch.uint8), y), attacks=["fgsm"], eps=0.1, progress=False)
    assert rep.n == 8  # uint8 data is taken as 0-255 pixels
    with pytest.raises(ValueError, match=r"^steps must be >= 1"):
        evaluate(trained_cnn, (x, y), eps=0.1, steps=0, progress=False)
    with pytest.raises(ValueError, match=r"^alpha \(the step size\) = 0.5 is larger than eps = 0.1"):
        evaluate(trained_cnn, (x, y), eps=0.1, alpha=0.5, progress=False)
    assert evaluate(trained_cnn, (x, y), attacks=["pgd"], eps=0.1, alpha=0.5, force_step_size=True,
                    progress=False).attacks["pgd"].params["alpha"] == 0.5


def test_evaluate_checks_every_attack_can_run_before_running_any(fmnist_test, monkeypatch):
    """SI-PGD needs a linear head: without one the evaluation stops before PGD spends its time."""
    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 10, 28)

        def forward(self, x):
            return self.conv(x).flatten(1)

    import importlib
    ev = importlib.import_module("sirobust.evaluate")  # (sirobust.evaluate is also the function's name)
    ran = []
    real = ev._run_attack
    monkeypatch.setattr(ev, "_run_attack", lambda *a, **k: ran.append(a[1].name) or real(*a, **k))
    x, y = fmnist_test[0][:8], fmnist_test[1][:8]
    with pytest.raises(sirobust.FeatureAccessError, match="attack 'si-pgd' cannot run on this model"):
        evaluate(NoLinear(), (x, y), attacks=["pgd", "si-pgd"], eps=0.1, progress=False)
    assert ran == []
    # the default list: the message names every attack that cannot run and the list that can, to pass as is
    with pytest.raises(sirobust.FeatureAccessError) as err:
        evaluate(NoLinear(), (x, y), eps=0.1, progress=False, attack_params={"pgd-cw": {}})
    assert "drop 'si-pgd': attacks=['pgd', 'pgd-cw', 'pgd-dlr'] (sirobust evaluate --attacks pgd,pgd-cw,pgd-dlr)" \
        in str(err.value)
    # an ensemble with a stage that reads the features is dropped too; an attack of the user's is not named as
    # a string that would build another attack (a PGD of 50 steps is not "pgd")
    mine = sirobust.attacks.PGD(NoLinear(), eps=0.1, steps=50)
    with pytest.raises(sirobust.FeatureAccessError) as err:
        evaluate(NoLinear(), (x, y), attacks=[("strong", mine), "aa-si", "si-pgd"], eps=0.1, progress=False)
    assert "drop 'aa-si', 'si-pgd'" in str(err.value) and "attacks=[" not in str(err.value)
    with pytest.raises(sirobust.FeatureAccessError, match=r"'si-pgd' cannot run on this model \(nor can 'aa-si'\)"):
        evaluate(NoLinear(), (x, y), attacks=["si-pgd", "pgd", "aa-si"], eps=0.1, progress=False)
    assert ran == []
    assert evaluate(NoLinear(), (x, y), attacks=["pgd", "pgd-cw", "pgd-dlr"], eps=0.1, steps=2,
                    progress=False).attacks.keys() == {"pgd", "pgd-cw", "pgd-dlr"}
    with pytest.raises(sirobust.FeatureAccessError, match="head: no submodule named 'fc'"):
        SIPGD(NoLinear(), eps=0.1, head="fc")


def test_an_absurd_forced_step_is_refused_by_name():
    """--norm L2 --eps 1.5 --step-size 1e30 --force-step-size made PGD return its inputs unchanged (the
    normalised step overflows): 56 % "robust" instead of 46 %, and no flag fired (issue 21)."""
    from sirobust.checks import MAX_STEP_RATIO, check_step_size
    with pytest.raises(ValueError, match=r"alpha \(the step size\) = 1e\+30 .* at most 1500"):
        check_step_size(1e30, 1.5, 10, force=True)
    assert check_step_size(MAX_STEP_RATIO * 1.5, 1.5, 10, force=True) == 1500.0  # up to the bound, forced


def test_an_attack_that_moves_nothing_is_flagged(trained_cnn, fmnist_test):
    import sirobust
    x, y = fmnist_test
    rep = sirobust.evaluate(trained_cnn, (x[:64], y[:64]), attacks=[("lazy", lambda a, b: a.clone()), "fgsm"],
                            eps=0.1, progress=False)
    flagged = {f["value"] for f in rep.flags if f["name"] == "attack_did_not_move" and f["triggered"]}
    assert flagged == {"lazy"}                       # FGSM moved, the lazy one did not
    assert rep.attacks["lazy"].robust_acc == rep.clean_acc
