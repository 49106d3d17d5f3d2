"""Multi-step defenses (paper Table 1: AT, TRADES, ALP, MART; Table 10: HE) and the SI mechanism on them."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sirobust.defenses import DEFENSES, InnerAttack, SIConfig, build_defense, list_defenses, si_regulariser
from sirobust.defenses.alp import logit_pairing
from sirobust.defenses.mart import boosted_ce, weighted_kl
from sirobust.features import FeatureAccessError, ModelOutput, forward_with_features
from sirobust.losses import cosine_logits, margin_cosine_logits
from sirobust.models import build_model

ADVERSARIAL = ["at", "trades", "alp", "mart", "he"]
FAST = dict(steps=2)  # two PGD steps are enough to exercise every path


def _cnn(seed=0):
    torch.manual_seed(seed)
    return build_model("cnn-small", num_classes=10, in_channels=1).train()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    return torch.rand(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)


def _gen(seed=7):
    return torch.Generator().manual_seed(seed)


def _logits(seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(8, 10, generator=g, dtype=torch.float64)


_Y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])


# ---------------------------------------------------------------- registry and construction

def test_registry_and_unknown_name():
    assert set(DEFENSES) == {"standard", "at", "trades", "alp", "mart", "he", "fgsm-rs", "free", "gat", "gradalign"}
    with pytest.raises(ValueError) as e:
        build_defense("tradez")
    for name in list_defenses():
        assert name in str(e.value)


def test_he_with_si_raises():
    with pytest.raises(ValueError, match="si"):
        build_defense("he", si=SIConfig())


@pytest.mark.parametrize("name,kw", [("trades", {"lam": -1}), ("mart", {"lam": -1}), ("alp", {"alpha": 1.5}),
                                     ("alp", {"lam": -1}), ("he", {"scale": 0}), ("he", {"margin": -0.1})])
def test_bad_parameters_raise(name, kw):
    with pytest.raises(ValueError):
        build_defense(name, **kw)



@pytest.mark.parametrize("name,kw,says", [
    ("trades", {"lam": "abc"}, "trades parameter lam (λ) must be a finite number >= 0, got 'abc'"),
    ("mart", {"lam": -1}, "mart parameter lam (λ) must be a finite number >= 0, got -1"),
    ("alp", {"alpha": 1.5}, "alp parameter alpha (weight of the clean CE) must be a finite number in [0, 1], got 1.5"),
    ("he", {"lam": True}, "he parameter lam (λ) must be a finite number >= 0, got True"),
    ("gat", {"lam_multiplier": float("nan")}, "gat parameter lam_multiplier must be a finite number >= 0, got nan"),
    ("gradalign", {"lam": "x"}, "gradalign parameter lam (λ) must be a finite number >= 0, got 'x'"),
    ("free", {"m": 2.5}, "free parameter m (minibatch replays) must be an integer >= 1, got 2.5")])
def test_a_bad_parameter_is_named_with_its_allowed_values(name, kw, says, tmp_path):
    """--defense-param lam=abc fails in checks.py as every other argument does, not with a comparison error."""
    with pytest.raises(ValueError) as e:
        build_defense(name, **kw)
    assert str(e.value) == says
    from sirobust.train import TrainConfig
    with pytest.raises(ValueError) as e:  # and a training config says the same before any data is loaded
        TrainConfig(defense=name, defense_params=kw, out=str(tmp_path / "run")).resolved()
    assert str(e.value) == says

def test_describe_records_parameters_and_mode():
    for name, params in [("trades", {"lam": 6.0}), ("alp", {"alpha": 0.5, "lam": 3.0, "pairing": "mse"}), ("mart", {"lam": 6.0}),
                         ("he", {"lam": 6.0, "scale": 15.0, "margin": 0.2})]:
        d = build_defense(name).describe()
        assert d["defense"] == name and d["params"] == params
        assert d["attack"]["model_mode"] == "eval" and d["attack"]["steps"] == 10
        json.dumps(d)  # goes into the run's config record
    assert build_defense("at", attack=InnerAttack(model_mode="train")).describe()["attack"]["model_mode"] == "train"


# ---------------------------------------------------------------- one training step, every defense × SI

@pytest.mark.parametrize("si", [False, True], ids=["plain", "si"])
@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_training_step(name, si, batch):
    x, y = batch
    cfg = SIConfig() if si else None
    if si and name in ("he", "standard"):  # no adversary to make SI (standard) / not a combination (he)
        with pytest.raises(ValueError):
            build_defense(name, attack=InnerAttack(**FAST), si=cfg)(_cnn(), x, y)
        return
    model, x0 = _cnn(), x.clone()
    loss, stats = build_defense(name, attack=InnerAttack(**FAST), si=cfg)(model, x, y, generator=_gen())
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values())
    if si:
        assert stats["loss_si"] > 0 and loss.item() == pytest.approx(stats["loss_defense"] + stats["loss_si"], rel=1e-5)
    loss.backward()
    grad = model.head.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(m.training for m in model.modules())  # back in train mode
    assert torch.equal(x, x0)  # x not mutated


# ---------------------------------------------------------------- SI: β = 0 is the plain defense

@pytest.mark.parametrize("name", ["at", "trades", "alp", "mart"])
def test_si_weight_zero_equals_plain_objective(name, batch, monkeypatch):
    """With β = 0 the SI term is exactly 0 and the loss is the plain training objective on the same x^'.

    (The SI-PGD examples differ from PGD's, so the plain objective is evaluated on the SI run's x^'.)"""
    x, y = batch
    model = _cnn()
    d0 = build_defense(name, attack=InnerAttack(**FAST), si=SIConfig(weight=0))
    made = []
    real = d0.make_adversarial
    monkeypatch.setattr(d0, "make_adversarial", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    loss, stats = d0(model, x, y, generator=_gen())
    assert stats["loss_si"] == 0.0
    x_adv = made[0]
    plain = build_defense(name, attack=InnerAttack(**FAST))
    clean = forward_with_features(model, x, need_features=False) if plain.needs_clean_output else None
    expected = plain.training_loss(model, x, x_adv, y, clean, forward_with_features(model, x_adv, need_features=False))
    assert loss.item() == expected.item()
    # and the inner attack really is SI-PGD: the same seed gives different examples without SI
    assert not torch.equal(x_adv, plain.make_adversarial(model, x, y, _gen()))


def test_si_regulariser_is_margin_ce_on_adv(batch):
    model = _cnn().eval()
    x, y = batch
    out = forward_with_features(model, x)
    cfg = SIConfig(scale=10.0, margin=0.3, weight=0.5)
    cos = F.normalize(out.features, dim=1) @ F.normalize(out.weight, dim=1).t()
    expected = 0.5 * F.cross_entropy(10.0 * (cos - 0.3 * F.one_hot(y, 10)), y)
    torch.testing.assert_close(si_regulariser(out, y, cfg), expected)


def test_si_margin_on_true_class_only(tiny_net, image_batch):
    x, y = image_batch
    out = forward_with_features(tiny_net, x)
    s, m = 15.0, 0.2
    diff = margin_cosine_logits(out, y, s, m) - s * cosine_logits(out)
    true = F.one_hot(y, 10).bool()
    assert torch.all(diff[~true] == 0)
    torch.testing.assert_close(diff[true], torch.full((8,), -s * m))


# ---------------------------------------------------------------- the objectives against hand computations

def test_trades_objective_and_kl_direction():
    d = build_defense("trades")
    gc, ga = _logits(0).requires_grad_(True), _logits(1)
    pc, pa = F.softmax(gc, 1), F.softmax(ga, 1)
    kl_fwd = (pc * (pc.log() - pa.log())).sum(1)  # KL(p_clean ‖ p_adv), TRADES' direction
    kl_rev = (pa * (pa.log() - pc.log())).sum(1)
    assert (kl_fwd - kl_rev).abs().mean() > 0.1  # the direction matters for these logits
    loss = d.training_loss(None, None, None, _Y, ModelOutput(gc), ModelOutput(ga))
    torch.testing.assert_close(loss, F.cross_entropy(gc, _Y) + 6 * kl_fwd.mean())
    assert not torch.allclose(loss, F.cross_entropy(gc, _Y) + 6 * kl_rev.mean())
    # the inner objective: per example, same direction, f(x) a constant
    inner = d.adversarial_loss(ModelOutput(gc))(ModelOutput(ga), _Y)
    torch.testing.assert_close(inner, kl_fwd.detach())
    # in the outer objective the clean side of the KL carries gradient (as in TRADES)
    g_total, = torch.autograd.grad(loss, gc)
    g_ce, = torch.autograd.grad(F.cross_entropy(gc, _Y), gc)
    assert not torch.allclose(g_total, g_ce)


def test_trades_inner_clean_is_in_attack_mode(batch, monkeypatch):
    """f(x) in the inner KL comes from the model in eval mode (the attack's mode), not train mode."""
    x, y = batch
    model = _cnn()
    with torch.no_grad():
        model(x)  # move the BN running stats away from their init so eval != train output
        ref = copy.deepcopy(model)
        eval_out, train_out = ref.eval()(x), ref.train()(x)
    assert not torch.allclose(eval_out, train_out)
    seen = []
    d = build_defense("trades", attack=InnerAttack(**FAST))
    real = d.adversarial_loss
    monkeypatch.setattr(d, "adversarial_loss", lambda clean: seen.append(clean) or real(clean))
    d(model, x, y, generator=_gen())
    torch.testing.assert_close(seen[0].logits, eval_out)


def test_alp_objective_is_mean_logit_distance(tiny_net, image_batch):
    gc, ga = _logits(2), _logits(3)
    ce = 0.5 * F.cross_entropy(gc, _Y) + 0.5 * F.cross_entropy(ga, _Y)
    # pairing="l2": the literal ‖Wᵀ(z − z')‖₂ of Table 1, averaged over the batch
    loss = build_defense("alp", pairing="l2").training_loss(None, None, None, _Y, ModelOutput(gc), ModelOutput(ga))
    pairing = torch.stack([torch.sqrt(((gc[i] - ga[i]) ** 2).sum()) for i in range(8)]).mean()
    torch.testing.assert_close(loss, ce + 3 * pairing)
    # default pairing="mse": Kannan et al.'s L2 loss, the mean squared logit difference
    loss = build_defense("alp").training_loss(None, None, None, _Y, ModelOutput(gc), ModelOutput(ga))
    torch.testing.assert_close(loss, ce + 3 * F.mse_loss(gc, ga))
    with pytest.raises(ValueError, match="pairing"):
        build_defense("alp", pairing="l1")
    # on a real head with a bias: ‖g(x) − g(x')‖ = ‖Wᵀ(z − z')‖ (the bias cancels)
    x, _ = image_batch
    with torch.no_grad():
        tiny_net.fc2.bias.fill_(5.0)
    a = forward_with_features(tiny_net, x)
    b = forward_with_features(tiny_net, (x + 0.1).clamp(0, 1))
    torch.testing.assert_close(logit_pairing(a.logits, b.logits),
                               torch.linalg.vector_norm((a.features - b.features) @ a.weight.t(), dim=1))
    # x' = x: the pairing term and its gradient are 0, not NaN
    g = _logits(2).requires_grad_(True)
    logit_pairing(g, g.detach()).sum().backward()
    assert torch.all(g.grad == 0)


def test_mart_objective_by_hand():
    d = build_defense("mart")
    gc, ga = _logits(4), _logits(5)
    gc[0] = 0.0
    gc[0, _Y[0]] = 30.0  # example 0 is confidently right on x: its KL gets ~zero weight
    loss = d.training_loss(None, None, None, _Y, ModelOutput(gc), ModelOutput(ga))
    bce, wkl = [], []
    for i in range(8):
        pa, pc, yi = F.softmax(ga[i], 0).tolist(), F.softmax(gc[i], 0).tolist(), int(_Y[i])
        other = max(p for k, p in enumerate(pa) if k != yi)
        bce.append(-math.log(pa[yi]) - math.log(1.0001 - other + 1e-12))
        kl = sum(p * (math.log(p) - math.log(q + 1e-12)) for p, q in zip(pc, pa) if p > 0)
        wkl.append(kl * (1.0000001 - pc[yi]))
    assert loss.item() == pytest.approx(sum(bce) / 8 + 6 * sum(wkl) / 8, rel=1e-9)
    torch.testing.assert_close(boosted_ce(ga, _Y), torch.tensor(bce, dtype=torch.float64))
    # the weighting: example 0 has a large KL but a weight ≈ 0
    pc0, pa0 = F.softmax(gc[0], 0), F.softmax(ga[0], 0)
    assert (pc0 * (pc0.log() - pa0.log())).sum() > 1 and weighted_kl(gc, ga, _Y)[0] < 1e-6
    # the safety terms barely move the value
    pa, pc = F.softmax(ga, 1), F.softmax(gc, 1)
    exact = (-pa.gather(1, _Y[:, None]).log().squeeze(1)
             - (1 - pa.masked_fill(F.one_hot(_Y, 10).bool(), 0).amax(1)).log()).mean() \
        + 6 * ((pc * (pc.log() - pa.log())).sum(1) * (1 - pc.gather(1, _Y[:, None]).squeeze(1))).mean()
    assert loss.item() == pytest.approx(exact.item(), abs=1e-3)


def test_he_logits_and_objective(tiny_net, image_batch):
    x, y = image_batch
    he = build_defense("he")
    wrapped = he.wrap(tiny_net)
    assert he.wrap(wrapped) is wrapped
    out = forward_with_features(tiny_net, x)
    cos = F.normalize(out.features, dim=1) @ F.normalize(out.weight, dim=1).t()  # bias dropped
    torch.testing.assert_close(wrapped(x), 15 * cos)
    x_adv = (x + 0.05 * torch.randn(x.shape, generator=_gen())).clamp(0, 1)
    c, a = ModelOutput(wrapped(x)), ModelOutput(wrapped(x_adv))
    pc, pa = F.softmax(c.logits, 1), F.softmax(a.logits, 1)
    kl = (pc * (pc.log() - pa.log())).sum(1)
    he_logits = 15 * (cos - 0.2 * F.one_hot(y, 10))  # s·(cos θ − m·onehot(y)): the margin in the CE only
    torch.testing.assert_close(he.training_loss(wrapped, x, x_adv, y, c, a), F.cross_entropy(he_logits, y) + 6 * kl.mean())
    torch.testing.assert_close(he.adversarial_loss(c)(a, y), kl)  # inner KL: no margin


def test_he_uses_cosine_logits_everywhere(batch):
    """Rescaling W and changing b leave s·cos θ, hence HE's whole loss (attack included), unchanged."""
    x, y = batch
    model, other = _cnn(), _cnn()
    with torch.no_grad():
        other.head.weight.mul_(7.0)
        other.head.bias.add_(torch.arange(10.0))
    he = build_defense("he", attack=InnerAttack(**FAST))
    loss1, stats1 = he(model, x, y, generator=_gen())
    loss2, stats2 = he(other, x, y, generator=_gen())
    assert loss2.item() == pytest.approx(loss1.item(), rel=1e-5)
    assert stats1["adv_acc"] == stats2["adv_acc"] and stats1["clean_acc"] == stats2["clean_acc"]
    # TRADES (plain logits) does change: the invariance above is HE's doing
    tr = build_defense("trades", attack=InnerAttack(**FAST))
    assert tr(_cnn(), x, y, generator=_gen())[0].item() != pytest.approx(tr(other, x, y, generator=_gen())[0].item(), rel=1e-3)


# ---------------------------------------------------------------- the inner attack's mode

@pytest.mark.parametrize("name", ADVERSARIAL)
def test_inner_attack_in_eval_mode_keeps_bn_stats(name, batch):
    x, y = batch
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = build_defense(name, attack=InnerAttack(**FAST))
    x_adv = d.make_adversarial(model, x, y, generator=_gen())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched
    assert all(m.training for m in model.modules())
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and not torch.equal(x_adv, x)


def test_inner_attack_in_train_mode_moves_bn_stats(batch):
    """The converse, so the test above can fail: made in train mode, the BN running stats move."""
    x, y = batch
    model = _cnn()
    before = model.body.conv[1].running_mean.clone()
    build_defense("at", attack=InnerAttack(model_mode="train", **FAST)).make_adversarial(model, x, y, generator=_gen())
    assert not torch.equal(before, model.body.conv[1].running_mean)


# ---------------------------------------------------------------- models without a linear head

class _NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_feature_access_error_without_linear_head(name, batch):
    x, y = batch
    si = None if name == "he" else SIConfig()  # HE needs z and W even without SI
    with pytest.raises(FeatureAccessError):
        build_defense(name, attack=InnerAttack(**FAST), si=si)(_NoLinear(), x, y)
    if name != "he":  # and without SI it trains
        loss, _ = build_defense(name, attack=InnerAttack(**FAST))(_NoLinear(), x, y)
        assert torch.isfinite(loss)
