"""Attack properties: ε-ball and [0,1], no mutation, mode restored, known optimum,
scale invariance of SI-PGD, restarts, targeted mode, clear errors."""
import pytest
import torch
from torch import nn

from sirobust.attacks import FGSM, FGSMRS, PGD, PGDCW, PGDDLR, RFGSM, SIPGD, build_attack, list_attacks, pgd_loop
from sirobust.models import ScaledLogits
from sirobust.features import FeatureAccessError
from sirobust.losses import get_loss
from sirobust.threat import LinfBall

from conftest import LinearModel, TinyNet
from helpers import cheap_attack


@pytest.mark.parametrize("norm,eps", [("Linf", 0.0), ("Linf", 8 / 255), ("Linf", 0.3), ("L2", 0.5), ("L2", 3.0)])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("loss", ["ce", "cw", "dlr", "si"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_in_ball_and_box_input_untouched_mode_restored(norm, eps, steps, loss, dtype):
    model = TinyNet().to(dtype).train()
    g = torch.Generator().manual_seed(steps)
    x = torch.rand(6, 1, 12, 12, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (6,), generator=g)
    x0, y0 = x.clone(), y.clone()
    atk = PGD(model, eps=eps, steps=steps, loss=loss, norm=norm, restarts=2)
    x_adv = atk(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (atk.threat.distance(x_adv, x) <= eps + 1e-6).all()
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert model.training  # restored
    assert all(p.grad is None for p in model.parameters())  # attacks never touch parameter grads
    if eps == 0:
        assert torch.equal(x_adv, x) and x_adv is not x


@pytest.mark.parametrize("early_stop", [False, True])
def test_linf_pgd_reaches_the_analytic_optimum_on_a_linear_two_class_model(early_stop):
    model = LinearModel(in_shape=(1, 4, 4), num_classes=2, seed=3)
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(5, dtype=torch.long)
    eps = 0.1
    w = (model.fc.weight[0] - model.fc.weight[1]).view(1, 1, 4, 4)  # CE grows as (w0 - w1)·x shrinks
    optimum = (x - eps * w.sign()).clamp(0, 1)
    # a bias that keeps class 0 predicted (margin 3) even at the optimum, so early stopping never
    # triggers; a much larger margin would saturate the softmax and zero the gradient (paper Sec. 4.1)
    margin_at_opt = (optimum * w).flatten(1).sum(1).min().item()
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([3.0 - margin_at_opt, 0.0]))
    x_adv = PGD(model, eps=eps, alpha=eps / 4, steps=12, early_stop=early_stop)(x, y)
    assert (model(x_adv).argmax(1) == 0).all()
    torch.testing.assert_close(x_adv, optimum, rtol=0, atol=1e-6)


def test_early_stop_returns_the_first_fooling_iterate():
    model = TinyNet(seed=2).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 12, 12, generator=g)
    y = model(x).argmax(1)  # all correct at the start
    threat, loss = LinfBall(0.5), get_loss("ce")

    def run(steps, early):
        return pgd_loop(model, x, y, loss=loss, threat=threat, alpha=0.1, steps=steps, early_stop=early,
                        noise=torch.Generator().manual_seed(7))

    trajectory = [run(k, False) for k in range(1, 9)]
    trajectory.insert(0, LinfBall(0.5).random_init(x, torch.Generator().manual_seed(7)))
    got = run(8, True)
    fooled_any = False
    for i in range(len(x)):
        fooled_at = [k for k, xk in enumerate(trajectory) if model(xk[i:i + 1]).argmax(1).item() != y[i].item()]
        expect = trajectory[fooled_at[0]][i] if fooled_at else trajectory[-1][i]
        fooled_any |= bool(fooled_at)
        torch.testing.assert_close(got[i], expect, rtol=0, atol=1e-6)
    assert fooled_any  # the test must exercise the early-stop path


def test_global_rng_is_never_touched_and_seed_reproduces():
    model, x, y = TinyNet().eval(), torch.rand(4, 1, 12, 12), torch.tensor([1, 2, 3, 4])
    state = torch.get_rng_state()
    a = PGD(model, eps=0.1, steps=3, seed=5)(x, y)
    b = PGD(model, eps=0.1, steps=3, seed=5)(x, y)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)


def test_restarts_never_increase_robust_accuracy(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:120], fmnist_test[1][:120]
    acc = []
    for r in (1, 3):
        x_adv = PGD(trained_cnn, eps=0.03, steps=3, restarts=r, seed=0)(x, y)
        acc.append((trained_cnn(x_adv).argmax(1) == y).float().mean().item())
    assert acc[1] <= acc[0]


def test_trained_model_loses_accuracy_under_each_attack(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:200], fmnist_test[1][:200]
    clean = (trained_cnn(x).argmax(1) == y).float().mean().item()
    assert clean > 0.7
    # every registered attack on a small budget; the black-box ones, which need many queries at a small ε,
    # on 48 images at ε = 0.25 (SPSA with Adam steps large enough to get there in 20 iterations)
    budgets = {"square": {"queries": 100}, "spsa": {"samples": 8, "iterations": 20, "lr": 0.03},
               "rays": {"queries": 100, "stop_at_eps": True}}
    for name in list_attacks():
        black_box = name in budgets
        xs, ys = (x[:48], y[:48]) if black_box else (x, y)
        x_adv = cheap_attack(name, trained_cnn, budgets, eps=0.25 if black_box else 0.1, steps=10)(xs, ys)
        robust = (trained_cnn(x_adv).argmax(1) == ys).float().mean().item()
        assert robust < clean - 0.3, (name, clean, robust)


@pytest.mark.parametrize("alpha", [1e-3, 1.0, 1e3])
def test_si_pgd_gives_the_same_examples_on_rescaled_logits(trained_cnn, fmnist_test, alpha):
    x, y = fmnist_test[0][:64], fmnist_test[1][:64]
    ref = SIPGD(trained_cnn, eps=0.1, steps=10, seed=1)(x, y)
    got = SIPGD(ScaledLogits(trained_cnn, alpha), eps=0.1, steps=10, seed=1)(x, y)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_pgd_is_fooled_by_rescaled_logits_but_si_pgd_is_not(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:200], fmnist_test[1][:200]

    def acc(model, cls):
        x_adv = cls(model, eps=0.1, steps=10, seed=0)(x, y)
        return (model(x_adv).argmax(1) == y).float().mean().item()

    scaled = ScaledLogits(trained_cnn, 1e3)
    assert acc(scaled, PGD) > acc(trained_cnn, PGD) + 0.2       # CE gradients underflow: PGD looks stronger
    assert abs(acc(scaled, SIPGD) - acc(trained_cnn, SIPGD)) < 1e-9


def test_targeted_attack_moves_towards_the_target(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:100], fmnist_test[1][:100]
    target = (y + 1) % 10
    for loss in ("ce", "cw", "si", "dlr-targeted"):
        x_adv = PGD(trained_cnn, eps=0.2, steps=20, loss=loss)(x, y, target=target)
        hit = (trained_cnn(x_adv).argmax(1) == target).float().mean().item()
        assert hit > 0.5, (loss, hit)


def test_presets_are_pgd_with_their_loss():
    m = TinyNet()
    e = 8 / 255
    assert SIPGD(m, eps=e).loss.name == "si" and SIPGD(m, eps=e).loss.params["scale"] == 15
    assert PGDCW(m, eps=e).loss.name == "cw" and PGDDLR(m, eps=e).loss.name == "dlr"
    f = FGSM(m, eps=0.1)
    assert f.steps == 1 and f.alpha == 0.1 and not f.random_start
    r = FGSMRS(m, eps=0.1)
    assert r.steps == 1 and abs(r.alpha - 0.125) < 1e-12 and r.random_start
    t = RFGSM(m, eps=0.1)
    assert t.steps == 1 and abs(t.alpha - 0.05) < 1e-12
    assert SIPGD(m, eps=e).alpha == pytest.approx(2 / 255) and SIPGD(m, eps=e).steps == 20


def test_fgsm_is_one_signed_step_of_eps(linear_model):
    x = torch.full((2, 1, 4, 4), 0.5)
    y = linear_model(x).argmax(1)
    x_adv = FGSM(linear_model, eps=0.05, early_stop=False)(x, y)
    torch.testing.assert_close((x_adv - x).abs(), torch.full_like(x, 0.05))


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("x,match", [
    (torch.full((2, 1, 12, 12), float("nan")), "NaN"),
    (torch.full((2, 1, 12, 12), 200.0), "0-255"),
    (torch.full((2, 1, 12, 12), -1.2), "normalised"),
    (torch.rand(1, 12, 12), "shape"),
    (torch.randint(0, 255, (2, 1, 12, 12), dtype=torch.uint8), "float"),
])
def test_bad_images_are_refused_clearly(x, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PGD(TinyNet(), eps=0.1)(x, torch.zeros(x.shape[0] if x.dim() else 1, dtype=torch.long))


def test_wrong_channel_count_is_named():
    from sirobust.models import build_model
    model = build_model("cnn-small", num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match="3 channels but the model expects 1"):
        PGD(model, eps=0.1)(torch.rand(2, 3, 28, 28), torch.zeros(2, dtype=torch.long))


def test_labels_out_of_range_and_bad_eps():
    with pytest.raises(ValueError, match=r"class indices in \[0, 9\]"):
        PGD(TinyNet(), eps=0.1)(torch.rand(2, 1, 12, 12), torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="eps must be"):
        PGD(TinyNet(), eps=-0.1)
    with pytest.raises(ValueError, match="valid attacks"):
        build_attack("pgd-xyz", TinyNet())


def test_si_on_a_model_without_linear_head_is_a_clear_error():
    conv_only = nn.Sequential(nn.Conv2d(1, 10, 12), nn.Flatten())
    with pytest.raises(FeatureAccessError, match="last layer is linear"):
        SIPGD(conv_only, eps=0.1)(torch.rand(2, 1, 12, 12), torch.tensor([1, 2]))


def test_mixed_train_eval_modes_are_restored_exactly(trained_cnn, fmnist_test):
    wrapper = ScaledLogits(trained_cnn, 2.0)
    wrapper.training = True                     # wrapper in train mode, wrapped model in eval mode
    trained_cnn.body.conv[1].train()            # and one batch-norm layer left in train mode
    try:
        before = [m.training for m in wrapper.modules()]
        SIPGD(wrapper, eps=0.1, steps=2)(fmnist_test[0][:8], fmnist_test[1][:8])
        assert [m.training for m in wrapper.modules()] == before
    finally:
        trained_cnn.eval()


def test_nan_input_gradients_stop_the_attack_instead_of_stalling_it():
    from sirobust.attacks.loop import NonFiniteGradientError

    class NanGrad(nn.Module):
        """Logits of a linear model plus a term that is 0 in value but NaN in gradient."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            f = self.fc(x.flatten(1))
            return f + 0 * torch.sqrt((f - f.detach()).abs())

    model = NanGrad()
    x = torch.rand(4, 1, 4, 4)
    y = model(x).argmax(1)
    with pytest.raises(NonFiniteGradientError, match="NaN or infinite"):
        PGD(model, eps=0.1, steps=3)(x, y)
    from sirobust.sanity import check_gradients
    nonfinite, _ = check_gradients(model, x, y)
    assert nonfinite["name"] == "nonfinite_gradients" and nonfinite["triggered"]


def test_integer_labels_of_any_width_and_bad_settings():
    m, x = TinyNet().eval(), torch.rand(4, 1, 12, 12)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        for cls in (PGD, PGDCW, SIPGD):
            out = cls(m, eps=0.1, steps=2)(x, torch.tensor([1, 2, 3, 4], dtype=dtype))
            assert out.shape == x.shape
    with pytest.raises(ValueError, match=r"alpha \(the step size\) must be > 0"):
        PGD(m, eps=0.1, alpha=0.0, steps=5)
    with pytest.raises(ValueError, match="no parameter scale.*its loss 'ce': none"):
        PGD(m, eps=0.1, loss="ce", scale=30)
    with pytest.raises(ValueError, match="PGD has no parameter margin; .*its loss 'si': scale"):
        PGD(m, eps=0.1, loss="si", margin=0.1)
    from sirobust.attacks import APGDCE
    with pytest.raises(ValueError, match="apgd-ce runs the 'ce' loss and takes no other"):
        APGDCE(m, eps=0.1, loss="dlr")  # it was dropped without a word
    with pytest.raises(ValueError, match="si-pgd runs the 'si' loss and takes no other"):
        SIPGD(m, eps=0.1, loss="ce")
    assert APGDCE(m, eps=0.1, loss="ce").loss.name == "ce" and APGDCE(m, eps=0.1, loss="CE").loss.name == "ce"
    from sirobust.losses import get_loss
    with pytest.raises(ValueError, match="a Loss object: give its parameters to the attack itself"):
        SIPGD(m, eps=0.1, loss=get_loss("si", scale=30))  # its scale would have been overwritten by 15
    with pytest.raises(ValueError, match="PGD has no parameter bogus; .*its loss 'ce': none"):
        PGD(m, eps=0.1, loss=get_loss("ce"), bogus=1)  # a Loss object is held to its parameters too
    from sirobust.attacks.registry import build_attack
    with pytest.raises(ValueError, match="attack 'fgsm' sets steps itself; it is not one of its parameters"):
        build_attack("fgsm", m, {"steps": 5}, eps=0.1)
    assert build_attack("apgd-ce", m, {"loss": "ce"}, eps=0.1).loss.name == "ce"  # as the constructor: same rule


def test_si_pgd_works_on_a_cosine_head_model_behind_a_wrapper(fmnist_test):
    from sirobust.models import build_model
    he = build_model("cnn-small", in_channels=1).use_cosine_head(15.0).eval()
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    ref = SIPGD(he, eps=0.1, steps=3, early_stop=False)(x, y)
    got = SIPGD(ScaledLogits(he, 2.0), eps=0.1, steps=3, early_stop=False)(x, y)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_rfgsm_is_a_random_sign_step_then_a_gradient_sign_step(linear_model):
    """R+FGSM (Tramèr et al.): x + α·sign(N) then a step of ε − α (= α at the default α = ε/2): away from the
    box edges every pixel moves by exactly 0 or ±ε."""
    x = torch.full((3, 1, 4, 4), 0.5)
    y = linear_model(x).argmax(1)
    out = RFGSM(linear_model, eps=0.1, early_stop=False)(x, y)
    d = (out - x).abs().flatten()
    assert torch.all((d < 1e-6) | ((d - 0.1).abs() < 1e-6)) and (d > 0).any() and (d < 1e-6).any()
