"""Contract tests over the loss registry, and the formulas against direct computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from sirobust.features import ModelOutput
from sirobust.losses import cosine_logits, get_loss, list_losses


def _out(seed=0, B=6, K=10, D=16, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, D, generator=g)
    W = torch.randn(K, D, generator=g)
    b = torch.randn(K, generator=g)
    return ModelOutput(scale * (z @ W.t() + b), z, W, b), torch.randint(0, K, (B,), generator=g)


def _call(name, out, y):
    loss = get_loss(name)
    kw = {}
    if name == "kl":
        loss = loss.with_params(clean_logits=out.logits.flip(0))
    if name == "dlr-targeted":
        kw["target"] = (y + 1) % out.logits.shape[1]
    return loss(out, y, **kw)


@pytest.mark.parametrize("name", list_losses())
def test_shape_finite_and_differentiable(name):
    out, y = _out()
    out = ModelOutput(out.logits.requires_grad_(), out.features.requires_grad_(), out.weight, out.bias)
    v = _call(name, out, y)
    assert v.shape == (6,)
    assert torch.isfinite(v).all()
    v.sum().backward()
    assert out.logits.grad is not None or out.features.grad is not None


def test_registry_contains_the_paper_losses():
    assert {"ce", "cw", "dlr", "dlr-targeted", "kl", "si", "si-margin"} <= set(list_losses())


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match="valid losses: .*si-margin"):
        get_loss("cross-entropy")


@pytest.mark.parametrize("shift,scale", [(3.0, 1.0), (-7.0, 0.01), (0.0, 250.0), (1.5, 40.0)])
def test_dlr_unchanged_by_shift_and_positive_scale(shift, scale):
    out, y = _out()
    moved = ModelOutput(scale * out.logits + shift)
    torch.testing.assert_close(get_loss("dlr")(moved, y), get_loss("dlr")(out, y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("alpha", [1e-3, 0.5, 7.0, 1e3])
def test_si_unchanged_by_scaling_z_w_or_logits(alpha):
    out, y = _out()
    base = get_loss("si")(out, y)
    for scaled in (ModelOutput(out.logits, alpha * out.features, out.weight),
                   ModelOutput(out.logits, out.features, alpha * out.weight),
                   ModelOutput(alpha * out.logits, out.features, out.weight, out.bias)):
        torch.testing.assert_close(get_loss("si")(scaled, y), base, rtol=1e-5, atol=1e-6)


def test_si_is_ce_on_scaled_cosines():
    out, y = _out()
    cos = torch.stack([torch.stack([torch.dot(z, w) / (z.norm() * w.norm()) for w in out.weight]) for z in out.features])
    torch.testing.assert_close(cosine_logits(out), cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(get_loss("si", scale=15)(out, y), F.cross_entropy(15 * cos, y, reduction="none"))


def test_si_margin_subtracts_the_margin_on_the_true_class_only():
    out, y = _out()
    cos = cosine_logits(out)
    manual = cos.clone()
    for i, c in enumerate(y):
        manual[i, c] -= 0.2
    expect = F.cross_entropy(15 * manual, y, reduction="none")
    torch.testing.assert_close(get_loss("si-margin")(out, y), expect)
    # the margin makes the loss strictly larger than the plain SI loss
    assert (get_loss("si-margin")(out, y) > get_loss("si")(out, y)).all()


def test_cw_margin_sign_tracks_misclassification():
    out, y = _out()
    margin = get_loss("cw")(out, y)
    wrong = out.logits.argmax(1) != y
    assert torch.equal(margin > 0, wrong)
    i = 0
    others = [out.logits[i, k] for k in range(10) if k != y[i]]
    assert math.isclose(margin[i].item(), (max(others) - out.logits[i, y[i]]).item(), rel_tol=1e-6)


def test_dlr_matches_formula():
    out, y = _out()
    g = out.logits
    i = 2
    srt = g[i].sort(descending=True).values
    other = max(g[i, k] for k in range(10) if k != y[i])
    expect = -(g[i, y[i]] - other) / (srt[0] - srt[2] + 1e-12)
    assert math.isclose(get_loss("dlr")(out, y)[i].item(), expect.item(), rel_tol=1e-5)


def test_kl_is_zero_for_identical_distributions_and_positive_otherwise():
    out, y = _out()
    same = get_loss("kl", clean_logits=out.logits)(out, y)
    assert same.abs().max() < 1e-6
    diff = get_loss("kl", clean_logits=out.logits.flip(0))(out, y)
    assert (diff > 0).any()
    p = F.softmax(out.logits.flip(0), 1)
    q = F.softmax(out.logits, 1)
    torch.testing.assert_close(diff, (p * (p.log() - q.log())).sum(1), rtol=1e-5, atol=1e-6)


def test_losses_needing_extra_arguments_say_so():
    out, y = _out()
    with pytest.raises(ValueError, match="clean_logits"):
        get_loss("kl")(out, y)
    with pytest.raises(ValueError, match="target"):
        get_loss("dlr-targeted")(out, y)
    with pytest.raises(ValueError, match="at least 3 classes"):
        get_loss("dlr")(ModelOutput(torch.randn(4, 2)), torch.zeros(4, dtype=torch.long))
