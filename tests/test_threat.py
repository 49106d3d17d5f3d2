"""Threat models: random starts and projections stay in the ε-ball and in [0, 1]."""
import pytest
import torch

from sirobust.threat import L2Ball, LinfBall, make_threat


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("eps", [0.0, 0.01, 8 / 255, 0.3, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_init_and_project_respect_ball_and_box(norm, eps, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=g, dtype=dtype)
    t = make_threat(norm, eps)
    for x_adv in (t.random_init(x, g), t.project(x + 5 * torch.randn(x.shape, generator=g, dtype=dtype), x)):
        assert x_adv.dtype == dtype
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (t.distance(x_adv, x) <= eps + 1e-6).all()


def test_linf_project_is_the_nearest_point_in_the_box():
    x = torch.tensor([[[[0.5, 0.02, 0.98]]]])
    t = LinfBall(0.1)
    far = torch.tensor([[[[0.9, -0.5, 1.5]]]])
    torch.testing.assert_close(t.project(far, x), torch.tensor([[[[0.6, 0.0, 1.0]]]]))


def test_l2_step_has_length_alpha_and_project_scales_back():
    x = torch.full((1, 1, 2, 2), 0.5)
    t = L2Ball(0.1)
    step = t.step(x, torch.tensor([[[[3.0, 4.0, 0.0, 0.0]]]]).view(1, 1, 2, 2), 0.05)
    assert abs((step - x).norm().item() - 0.05) < 1e-6
    far = x + torch.tensor([0.3, 0.4, 0.0, 0.0]).view(1, 1, 2, 2)
    proj = t.project(far, x)
    assert abs((proj - x).norm().item() - 0.1) < 1e-6
    torch.testing.assert_close((proj - x) / 0.1, (far - x) / 0.5)  # same direction


def test_random_init_uses_only_the_given_generator():
    x = torch.rand(4, 1, 5, 5)
    before = torch.get_rng_state()
    a = LinfBall(0.1).random_init(x, torch.Generator().manual_seed(3))
    b = LinfBall(0.1).random_init(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_eps_is_refused(bad):
    with pytest.raises(ValueError, match="eps"):
        make_threat("Linf", bad)


def test_unknown_norm_lists_valid():
    with pytest.raises(ValueError, match="unknown norm 'L1'; valid norms: L2, Linf"):
        make_threat("L1", 0.1)
