"""Models and inputs a user brings, as a reviewer of the library API brought them: a forward that flattens with
``.view``, bf16/fp16 images, wrappers built in train mode, a model that rounds its input, a model without
parameters, torchattacks habits (``random_init=``, an L2 attack in an L∞ evaluation)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sirobust
from sirobust.attacks import PGD, SIPGD, Square
from sirobust.evaluate import evaluate
from sirobust.models import ScaledLogits
from sirobust.modes import modules_in_train_mode
from sirobust.sanity import check_gradients


class ViewNet(nn.Module):
    """The usual user CNN: batch norm inside a Sequential, ``h.view(h.size(0), -1)`` to flatten (illegal on a
    channels_last tensor), a linear head."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(8 * 14 * 14, 10)

    def forward(self, x):
        h = self.body(x)
        return self.fc(h.view(h.size(0), -1))


class Normalize(nn.Module):
    def forward(self, x):
        return (x - 0.5) / 0.5


class Rounded(nn.Module):
    """Quantises its input: no gradient anywhere, whatever the loss."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(torch.round(x * 3) / 3)


@pytest.fixture
def view_net(fmnist_test):
    model = ViewNet().eval()
    with torch.no_grad():  # running statistics that are not the identity, so that folding has work to do
        model.train()(fmnist_test[0][:128])
    return model.eval()


@pytest.mark.parametrize("cls", [PGD, SIPGD, Square])
def test_a_forward_that_views_runs_under_the_default_precision_as_given(view_net, fmnist_test, cls):
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    kw = {"queries": 20} if cls is Square else {"steps": 3}
    atk = cls(view_net, eps=0.1, **kw)  # precision "auto": the channels_last copy cannot run this forward
    x_adv = atk(x, y)
    assert atk.ran_as["model"].startswith("as given")
    assert torch.equal(x_adv, cls(view_net, eps=0.1, precision="fp32", **kw)(x, y))


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_evaluate_runs_a_forward_that_views_and_its_scale_check_uses_the_evaluations_precision(
        view_net, fmnist_test, precision, monkeypatch):
    import importlib
    module = importlib.import_module("sirobust.evaluate")  # the package's ``evaluate`` is the function
    built = []
    real = module.check_scale_sensitivity

    def spy(*args, **kw):
        built.append(kw.get("precision"))
        return real(*args, **kw)

    monkeypatch.setattr(module, "check_scale_sensitivity", spy)
    x, y = fmnist_test[0][:24], fmnist_test[1][:24]
    rep = evaluate(view_net, (x, y), attacks=["pgd", "si-pgd"], eps=0.1, steps=2, progress=False,
                   precision=precision)
    assert {"pgd", "si-pgd"} <= set(rep.attacks) and built == [precision]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm,eps", [("Linf", 8 / 255), ("Linf", 0.1), ("L2", 1.5)])
def test_half_precision_images_come_back_inside_the_ball_exactly(tiny_net, dtype, norm, eps):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 12, 12, generator=g).to(dtype)
    y = torch.randint(0, 10, (32,), generator=g)
    x0 = x.clone()
    x_adv = PGD(tiny_net.eval(), eps=eps, norm=norm, steps=5, early_stop=False)(x, y)
    assert x_adv.dtype == dtype and torch.equal(x, x0)
    d = x_adv.double() - x.double()  # exact: both are on the half-precision grid
    dist = d.flatten(1).abs().amax(1) if norm == "Linf" else d.flatten(1).norm(dim=1)
    assert (dist <= eps).all(), dist.max().item()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if norm == "Linf":  # the attack still uses the budget: points reach the boundary's grid neighbour
        assert dist.max() > eps - 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("model_dtype,x_dtype", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16),
                                                  (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
def test_half_precision_models_return_points_inside_the_ball_exactly(model_dtype, x_dtype):
    from conftest import TinyNet
    model = TinyNet().to(model_dtype).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(32, 1, 12, 12, generator=g).to(x_dtype)
    y = torch.randint(0, 10, (32,), generator=g)
    for norm, eps in (("Linf", 8 / 255), ("L2", 0.5)):
        x_adv = PGD(model, eps=eps, norm=norm, steps=3, early_stop=False)(x, y)
        d = (x_adv.double() - x.double()).flatten(1)
        dist = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
        assert x_adv.dtype == x_dtype and (dist <= eps).all() and x_adv.min() >= 0 and x_adv.max() <= 1


def test_an_outside_attack_far_outside_the_ball_on_bf16_data_is_excluded(tiny_net):
    x = torch.rand(8, 1, 12, 12, generator=torch.Generator().manual_seed(3)).bfloat16()
    y = torch.arange(8)
    model = tiny_net.eval().bfloat16()
    rep = evaluate(model, (x, y), attacks=[("far", lambda a, b: (a + 1.9 * 8 / 255).clamp(0, 1))], eps=8 / 255,
                   progress=False)
    assert rep.attacks["far"].excluded  # 1.9ε: was within the old bf16 slack of 4 ulps at 1.0 (0.031)


def test_float64_images_come_back_inside_the_ball_around_the_callers_own_x(tiny_net):
    x = torch.rand(8, 1, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(8)
    x_adv = PGD(tiny_net.eval(), eps=0.1, steps=3, early_stop=False)(x, y)
    assert x_adv.dtype == torch.float64 and ((x_adv - x).abs().amax() <= 0.1)


def test_the_train_mode_flag_names_modules_that_behave_differently_not_fresh_containers(view_net):
    assert modules_in_train_mode(nn.Sequential(Normalize(), view_net)) == []  # a new Sequential is in train mode
    assert modules_in_train_mode(view_net.train()) == ["body.1"]  # its BatchNorm2d
    view_net.eval()

    class DropsOut(nn.Module):  # reads self.training in a nested function: found in the compiled code
        def forward(self, x):
            def drop(t):
                return F.dropout(t, 0.5, self.training)
            return drop(x)

    assert modules_in_train_mode(nn.Sequential(DropsOut(), view_net)) == ["0"]
    assert modules_in_train_mode(nn.BatchNorm1d(4, track_running_stats=False)) == []  # batch statistics either way
    assert modules_in_train_mode(nn.Dropout(0.0)) == []


def test_evaluate_flags_a_train_mode_model_and_not_a_wrapper_around_an_eval_one(view_net, fmnist_test):
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]

    def fired(model):
        rep = evaluate(model, (x, y), attacks=["fgsm"], eps=0.1, progress=False)
        return {f["name"]: f for f in rep.flags if f["triggered"]}

    assert "model_in_train_mode" not in fired(nn.Sequential(Normalize(), view_net))
    flag = fired(view_net.train())["model_in_train_mode"]
    assert "body.1" in flag["message"] and view_net.training  # named, and the mode restored
    view_net.eval()


def test_zero_gradients_names_its_cause(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:64], fmnist_test[1][:64]
    saturated = check_gradients(ScaledLogits(trained_cnn, 1e4), x, y)[1]
    assert saturated["triggered"] and "saturates" in saturated["message"] and "black-box" not in saturated["message"]
    rounded = check_gradients(Rounded(trained_cnn).eval(), x, y)[1]
    assert rounded["triggered"] and rounded["value"] == 1.0
    assert "black-box" in rounded["message"] and "scale-invariant ones included" in rounded["message"]


def test_evaluate_takes_a_model_without_parameters(fmnist_test):
    class Fixed(nn.Module):  # buffers only
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randn(10, 784, generator=torch.Generator().manual_seed(0)))

        def forward(self, x):
            return x.flatten(1) @ self.w.t()

    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    rep = evaluate(Fixed(), (x, y), attacks=["fgsm"], eps=0.1, progress=False)
    assert rep.attacks["fgsm"].robust_acc <= rep.clean_acc


def test_a_keyword_neither_the_attack_nor_its_loss_takes_is_the_attacks_error(tiny_net):
    with pytest.raises(ValueError, match=r"PGD has no parameter random_init \(did you mean random_start\?\)"):
        PGD(tiny_net, eps=0.1, random_init=False)
    with pytest.raises(ValueError, match=r"APGDCE has no parameter rhoo \(did you mean rho\?\)"):
        sirobust.attacks.APGDCE(tiny_net, eps=0.1, rhoo=0.5)
    assert PGD(tiny_net, eps=0.1, loss="si", scale=3.0).loss.params == {"scale": 3.0}  # a loss's own still goes to it


def test_an_outside_attack_in_another_norm_is_refused(tiny_net, image_batch):
    torchattacks = pytest.importorskip("torchattacks")
    with pytest.raises(ValueError, match="attacks in the L2 norm but the evaluation is Linf"):
        evaluate(tiny_net, image_batch, attacks=[torchattacks.PGDL2(tiny_net, eps=0.1)], eps=0.1, progress=False)
    with pytest.raises(ValueError, match="attacks in the Linf norm but the evaluation is L2"):
        evaluate(tiny_net, image_batch, attacks=[torchattacks.APGD(tiny_net, eps=0.5)], eps=0.5, norm="L2",
                 progress=False)
    rep = evaluate(tiny_net, image_batch, attacks=[torchattacks.PGD(tiny_net, eps=0.1, steps=2)], eps=0.1,
                   progress=False)
    assert len(rep.attacks) == 1
    from sirobust.attacks.external import attack_norm

    class Spelled:  # sirobust's own spellings are read; an unrelated string says nothing
        def __init__(self, norm):
            self.norm = norm

    assert [attack_norm(Spelled(n)) for n in ("L_inf", "l2", "batch", float("inf"), 2)] == \
        ["Linf", "L2", None, "Linf", "L2"]
