"""Single-step defenses: GradAlign (Andriushchenko & Flammarion 2020) and GAT (Sriramanan et al. 2020), ± SI."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TinyNet
from sirobust.attacks.loop import pgd_loop
from sirobust.defenses.base import Defense, InnerAttack
from sirobust.defenses.gat import GAT, gat_lambda, relaxation
from sirobust.defenses.gradalign import GradAlign, gradalign_lambda, gradient_alignment
from sirobust.defenses.si import SIConfig
from sirobust.features import ModelOutput, forward_with_features
from sirobust.losses import get_loss

EPS = 8 / 255


def _gen(seed=7):
    return torch.Generator().manual_seed(seed)


def _batch(n=8, seed=1):
    g = _gen(seed)
    return torch.rand(n, 1, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)


def _gradalign(eps=EPS, si=None, **kw):
    return GradAlign(attack=InnerAttack(eps=eps, alpha=1.25 * eps, steps=1, random_start=False, model_mode="train"),
                     si=si, **kw)


def _gat(eps=EPS, si=None, alpha=None, **kw):
    return GAT(attack=InnerAttack(eps=eps, alpha=eps if alpha is None else alpha, steps=1, random_start=True,
                                  model_mode="eval"), si=si, **kw)


def _head(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _record_modes(model):
    """Per forward call: (model.training, whether the input needs a gradient)."""
    calls = []
    model.register_forward_pre_hook(lambda m, inp: calls.append((m.training, inp[0].requires_grad)))
    return calls


BUILD = {"gradalign": _gradalign, "gat": _gat}


# ---------------------------------------------------------------- one training step, both defenses × SI

@pytest.mark.parametrize("si", [False, True], ids=["plain", "si"])
@pytest.mark.parametrize("name", ["gradalign", "gat"])
def test_training_step(name, si):
    x, y = _batch()
    model, x0 = TinyNet().train(), x.clone()
    d = BUILD[name](si=SIConfig() if si else None)
    d.start_epoch(0, 10)
    d.start_batch(1)  # GAT: a guided minibatch
    loss, stats = d(model, x, y, generator=_gen())
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values())
    if si:
        assert stats["loss_si"] > 0 and loss.item() == pytest.approx(stats["loss_defense"] + stats["loss_si"], rel=1e-5)
    loss.backward()
    grad = _head(model).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(m.training for m in model.modules())  # back in train mode
    assert torch.equal(x, x0)  # x not mutated
    assert d.state_dict() == {}


@pytest.mark.parametrize("name", ["gradalign", "gat"])
def test_si_weight_zero_equals_plain_objective(name, monkeypatch):
    """β = 0: the loss is the plain objective on the SI run's x^' (same seed, so the same η for GradAlign),
    and the inner attack really is SI's (the plain attack from the same seed differs)."""
    x, y = _batch()
    model = TinyNet().train()
    d0, plain = BUILD[name](si=SIConfig(weight=0)), BUILD[name]()
    for d in (d0, plain):
        d.start_epoch(0, 10)
        d.start_batch(1)
    made = []
    real = d0.make_adversarial
    monkeypatch.setattr(d0, "make_adversarial", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    loss, stats = d0(model, x, y, generator=_gen())
    assert stats["loss_si"] == 0.0
    x_adv = made[0]
    clean = forward_with_features(model, x, need_features=False) if plain.needs_clean_output else None
    adv = forward_with_features(model, x_adv, need_features=False)
    kw = {"generator": _gen()} if name == "gradalign" else {}
    expected = plain.training_loss(model, x, x_adv, y, clean, adv, **kw)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-7)
    assert not torch.equal(x_adv, plain.make_adversarial(model, x, y, _gen()))


# ---------------------------------------------------------------- GradAlign

def _direct_alignment(model, x, y, eta):
    """Both gradients with autograd, as the authors write them (batch-mean CE, grad w.r.t. the input)."""
    xr = x.clone().requires_grad_(True)
    g1, = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
    xe = (x + eta).requires_grad_(True)
    g2, = torch.autograd.grad(F.cross_entropy(model(xe), y), xe)
    return F.cosine_similarity(g1.flatten(1), g2.flatten(1), dim=1, eps=0.0), g1


def test_gradalign_regulariser_matches_direct_computation():
    model, (x, y) = TinyNet().train(), _batch()
    torch.manual_seed(0)  # the global RNG must not matter
    reg, cos, valid = gradient_alignment(model, x, y, EPS, _gen(5))
    eta = (2 * torch.rand(x.shape, generator=_gen(5)) - 1) * EPS  # the same η: uniform in the L∞ ball
    expected_cos, g1 = _direct_alignment(model, x, y, eta)
    assert valid.all()
    torch.testing.assert_close(cos, expected_cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reg, 1 - expected_cos.mean(), rtol=1e-5, atol=1e-6)
    assert 0 < reg.item() < 2
    # η comes from the generator only: another global seed, the same value; another generator seed, another value
    torch.manual_seed(123)
    assert gradient_alignment(model, x, y, EPS, _gen(5)).reg.item() == reg.item()
    assert gradient_alignment(model, x, y, EPS, _gen(6)).reg.item() != reg.item()
    # an example with a zero gradient is left out of the mean (the authors' nonzero mask)
    g_zero = g1.clone()
    g_zero[0] = 0
    reg0, _, valid0 = gradient_alignment(model, x, y, EPS, _gen(5), grad_clean=g_zero)
    assert valid0.tolist() == [False] + [True] * 7
    torch.testing.assert_close(reg0, 1 - expected_cos[1:].mean(), rtol=1e-5, atol=1e-6)


def test_gradalign_regulariser_trains_the_model_by_double_backprop():
    model, (x, y) = TinyNet().train(), _batch()
    reg = gradient_alignment(model, x, y, EPS, _gen(5)).reg
    reg.backward()  # the regulariser alone
    for p in (_head(model).weight, model.conv.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # without the second-order graph the same value carries no gradient to the weights
    assert not gradient_alignment(model, x, y, EPS, _gen(5), create_graph=False).reg.requires_grad


def test_gradalign_lambda_schedule():
    assert gradalign_lambda(1 / 255) == pytest.approx(0.027, abs=5e-4)
    assert gradalign_lambda(8 / 255) == pytest.approx(0.2, rel=1e-9)
    assert gradalign_lambda(16 / 255) == pytest.approx(2.0, abs=5e-3)
    assert gradalign_lambda(16.5 / 255) == 2.0 and gradalign_lambda(32 / 255) == 2.0  # capped at their largest
    # the authors' per-ε values (sh/exps_diff_eps_cifar10.sh): the formula to 3 decimals, except that they
    # wrote 1.5 and 2.0 for its 1.498 and 1.998 at e = 15, 16
    table = [0.027, 0.036, 0.047, 0.063, 0.084, 0.112, 0.150, 0.200, 0.267, 0.356, 0.474, 0.632, 0.843, 1.124,
             1.500, 2.000]
    for e, lam in enumerate(table, start=1):
        assert gradalign_lambda(e / 255) == pytest.approx(lam, abs=2.5e-3), e
    assert _gradalign(eps=4 / 255).lam == gradalign_lambda(4 / 255)
    assert _gradalign(lam=0.5).lam == 0.5
    d = _gradalign(eps=12 / 255).describe()
    assert d["params"] == {"lam": gradalign_lambda(12 / 255)} and d["defense"] == "gradalign"
    json.dumps(d)


def test_gradalign_fgsm_step_reuses_its_gradient_and_matches_the_base_loop(monkeypatch):
    """The FGSM gradient is g1: one forward fewer, and the same x^' as the base class's loop."""
    model, (x, y) = TinyNet().train(), _batch()
    d = _gradalign()
    made = []
    real = d.make_adversarial
    monkeypatch.setattr(d, "make_adversarial", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    calls = _record_modes(model)
    d(model, x, y, generator=_gen())
    assert len(calls) == 3  # f(x) for g1 and the step, f(x^') for the CE, f(x + η) for g2
    assert all(training for training, _ in calls)  # train mode throughout, as the authors' code
    x_adv = made[0]
    assert torch.equal(x_adv, Defense.make_adversarial(d, model, x, y, _gen()))
    xr = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
    assert torch.equal(x_adv, (x + EPS * g.sign()).clamp(0, 1))  # 1.25ε from 0, projected: ε·sign(g)
    assert (x_adv - x).abs().max() <= EPS + 1e-7 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_gradalign_restores_mode_and_rejects_bad_settings():
    model, (x, y) = TinyNet().eval(), _batch()
    calls = _record_modes(model)
    _gradalign().make_adversarial(model, x, y, _gen())
    assert calls and all(training for training, _ in calls)  # the attack ran in train mode
    assert not any(m.training for m in model.modules())  # and the model is back in eval mode
    with pytest.raises(ValueError, match="Linf"):
        GradAlign(attack=InnerAttack(eps=0.5, norm="L2"))
    with pytest.raises(ValueError):
        _gradalign(lam=-1.0)


# ---------------------------------------------------------------- GAT

def test_gat_relaxation_and_training_objective_against_hand_computation():
    g = _gen(0)
    c = (3 * torch.randn(8, 10, generator=g, dtype=torch.float64)).requires_grad_(True)
    a = (3 * torch.randn(8, 10, generator=g, dtype=torch.float64)).requires_grad_(True)
    y = torch.arange(8)
    pc, pa = c.exp() / c.exp().sum(1, keepdim=True), a.exp() / a.exp().sum(1, keepdim=True)
    hand = ((pc - pa) ** 2).sum(1)
    torch.testing.assert_close(relaxation(c, a), hand)
    d = _gat()
    loss = d.training_loss(None, None, None, y, ModelOutput(c), ModelOutput(a))
    torch.testing.assert_close(loss, -pc.log()[torch.arange(8), y].mean() + 10 * hand.mean())  # CE on the CLEAN side
    loss.backward()
    assert c.grad.abs().sum() > 0 and a.grad.abs().sum() > 0  # both sides carry gradient


def test_gat_attack_objective_alternates_per_minibatch():
    g = _gen(1)
    c, a = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g).requires_grad_(True)
    y = torch.arange(8)
    d = _gat()
    d.start_epoch(0, 100)
    ce = F.cross_entropy(a, y, reduction="none")
    for index, guided in [(0, False), (1, True), (2, False), (3, True)]:  # their counter % 2, from 0
        d.start_batch(index)
        value = d.adversarial_loss(ModelOutput(c))(ModelOutput(a), y)
        expected = ce + 10 * relaxation(c, a) if guided else ce
        torch.testing.assert_close(value, expected)
    d.start_batch(1)
    cr = c.clone().requires_grad_(True)
    d.adversarial_loss(ModelOutput(cr))(ModelOutput(a), y).sum().backward()
    assert cr.grad is None  # softmax(f(x)) is a constant for the attack
    d.start_epoch(90, 100)
    value = d.adversarial_loss(ModelOutput(c))(ModelOutput(a), y)
    torch.testing.assert_close(value, ce + 40 * relaxation(c, a))  # the attack's λ follows the schedule


def test_gat_alternation_changes_the_examples_and_the_guided_step_is_the_hand_step():
    """Batch 1 (guided) and batch 0 (plain) give different examples from the same start. On an untrained
    TinyNet the guide's gradient is small next to the CE's (f(x') ≈ f(x)), so λ is large here to make it count."""
    lam = 1e4
    model, (x, y) = TinyNet().train(), _batch()
    d = _gat(lam=lam)
    d.start_epoch(0, 100)
    out = {}
    for index in (0, 1, 2):
        d.start_batch(index)
        out[index] = d.make_adversarial(model, x, y, _gen())
    assert torch.equal(out[0], out[2])  # a pure function of the batch index
    assert (out[0] != out[1]).sum() > 20

    # by hand: random-sign start, one signed ε step on CE + λ‖p − softmax(f(x'))‖², projected
    def hand(weight):
        start = d.start_point(x, _gen())
        with torch.no_grad():
            p = F.softmax(model(x), 1)  # the caller's mode (train)
        with torch.enable_grad():
            model.eval()
            xs = start.clone().requires_grad_(True)
            logits = model(xs)
            cost = F.cross_entropy(logits, y) + weight * ((p - F.softmax(logits, 1)) ** 2).sum(1).mean()
            grad, = torch.autograd.grad(cost, xs)
            model.train()
        return torch.min(torch.max(start + EPS * grad.sign(), x - EPS), x + EPS).clamp(0, 1)

    torch.testing.assert_close(out[1], hand(lam), rtol=0, atol=1e-7)
    torch.testing.assert_close(out[0], hand(0.0), rtol=0, atol=1e-7)


def test_gat_lambda_schedule():
    assert [gat_lambda(e, 100) for e in (0, 50, 85)] == [10.0, 10.0, 10.0]
    assert [gat_lambda(e, 100) for e in (86, 99)] == [40.0, 40.0]  # after their epoch 85 of 100
    assert gat_lambda(25, 30) == 10.0 and gat_lambda(26, 30) == 40.0  # ⌈0.86 · 30⌉ = 26
    assert gat_lambda(1, 2) == 10.0 and gat_lambda(0, 1) == 10.0  # short runs never switch
    d = _gat(lam=5.0, lam_multiplier=3.0)
    c, a, y = torch.randn(4, 10), torch.randn(4, 10), torch.arange(4)
    for epoch, lam in [(0, 5.0), (85, 5.0), (86, 15.0), (99, 15.0)]:
        d.start_epoch(epoch, 100)
        assert d.lam_now == lam
        torch.testing.assert_close(d.training_loss(None, None, None, y, ModelOutput(c), ModelOutput(a)),
                                   F.cross_entropy(c, y) + lam * relaxation(c, a).mean())


def test_gat_start_is_a_random_sign_of_half_eps():
    eps = 0.2
    x, y = _batch(16)
    x[:, :, :2] = 0.0  # pixels where the start is clipped
    x[:, :, -2:] = 1.0
    d = _gat(eps=eps)
    torch.manual_seed(0)
    start = d.start_point(x, _gen(3))
    torch.manual_seed(1)
    assert torch.equal(start, d.start_point(x, _gen(3)))  # the generator's draw, not the global RNG's
    delta = start - x
    up, down = (delta - eps / 2).abs() < 1e-6, (delta + eps / 2).abs() < 1e-6
    clipped = ((start == 0) | (start == 1)) & ~(up | down)
    assert (up | down | clipped).all()
    assert ((x[clipped] - eps / 2 < 0) | (x[clipped] + eps / 2 > 1)).all()  # clipped only where it must be
    free = ~clipped
    assert 0.4 < up[free].float().mean().item() < 0.6  # a fair sign
    # the attack starts there: with a zero step the examples are the start itself
    model = TinyNet().train()
    for si in (None, SIConfig()):  # with SI too: the start is kept
        zero_step = _gat(eps=eps, alpha=0.0, si=si)
        zero_step.start_batch(1)
        torch.testing.assert_close(zero_step.make_adversarial(model, x, y, _gen(3)), start, rtol=0, atol=0)


def test_gat_examples_in_ball_and_box_inputs_untouched_mode_restored():
    eps = 0.1
    x, y = _batch(16)
    x[:4] = x[:4].round()  # saturated pixels
    x0 = x.clone()
    for mode in ("train", "eval"):
        model = TinyNet().train(mode == "train")
        calls = _record_modes(model)
        d = _gat(eps=eps)
        d.start_batch(1)
        x_adv = d.make_adversarial(model, x, y, _gen())
        assert torch.equal(x, x0)
        assert all(m.training == (mode == "train") for m in model.modules())
        # f(x) for the guide in the caller's mode, the attack's forward (input with a gradient) in eval mode
        assert calls[0] == (mode == "train", False) and calls[-1] == (False, True)
        delta = x_adv - x
        assert delta.abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        # ±ε/2 start, one step of ε: every pixel the box does not clip ends at distance ε or ε/2
        free = (x_adv > 0) & (x_adv < 1) & (x - eps > 0) & (x + eps < 1)
        dist = delta[free].abs()
        assert ((dist - eps).abs() < 1e-6).logical_or((dist - eps / 2).abs() < 1e-6).all()
        assert ((dist - eps).abs() < 1e-6).any() and ((dist - eps / 2).abs() < 1e-6).any()


def test_gat_with_si_maximises_the_si_loss_from_the_same_start():
    model, (x, y) = TinyNet().train(), _batch()
    d = _gat(si=SIConfig(scale=10.0))
    d.start_batch(1)
    calls = _record_modes(model)
    x_adv = d.make_adversarial(model, x, y, _gen())
    assert all(not training for training, _ in calls)  # no guide forward: SI replaces the GAT objective
    with torch.no_grad():
        model.eval()
        expected = pgd_loop(model, x, y, loss=get_loss("si", scale=10.0), threat=d.attack.threat, alpha=EPS, steps=1,
                            random_start=False, start=d.start_point(x, _gen()))
    assert torch.equal(x_adv, expected)


def test_gat_describe_and_bad_settings():
    d = _gat().describe()
    assert d["defense"] == "gat" and d["params"] == {"lam": 10.0, "lam_multiplier": 4.0, "start_noise": 0.5}
    assert d["attack"]["model_mode"] == "eval"
    json.dumps(d)
    assert GAT.inner_preset == {"steps": 1, "alpha": 1.0, "random_start": True, "model_mode": "eval"}
    assert GAT.guard_overfitting and GradAlign.guard_overfitting and GradAlign.lr_schedule_preset == "onecycle"
    with pytest.raises(ValueError, match="Linf"):
        GAT(attack=InnerAttack(eps=0.5, norm="L2"))
    for kw in ({"lam": -1.0}, {"lam_multiplier": -1.0}, {"start_noise": 1.5}):
        with pytest.raises(ValueError):
            _gat(**kw)
