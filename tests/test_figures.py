"""The paper's Figs. 3-5 (input and weight loss surfaces, cos θ_y histograms) and the figure saving shared
with Fig. 1: the numbers are checked against independent computations, the plots against the numbers."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import small_config

from sirobust.attacks import PGD
from sirobust.experiments import figures, rescale
from sirobust.experiments.plotting import figure_paths, new_figure, save_figure
from sirobust.models import build_model
from sirobust.rng import stream_key

EPS = 0.1
N = 24


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """cnn-small adversarially trained for a second: PGD raises its loss, and it is not a random net."""
    from sirobust import load
    from sirobust.train import fit
    out = tmp_path_factory.mktemp("fig-at")
    fit(small_config(out, epochs=1, train_n=256, val_n=32), log=lambda *_: None)
    return load(out / "model.safetensors").eval()


@pytest.fixture(scope="module")
def other():
    """A second model of the same architecture (untrained), for the several-model figures."""
    torch.manual_seed(3)
    return build_model("cnn-small", num_classes=10, in_channels=1).eval()


@pytest.fixture(scope="module")
def data(fmnist_test):
    x, y = fmnist_test
    return x[:64].clone(), y[:64].clone()


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same_state(m, state):
    now = m.state_dict()
    return now.keys() == state.keys() and all(now[k].dtype == state[k].dtype and torch.equal(now[k], state[k])
                                              for k in state)


def _modes(m):
    return [mod.training for mod in m.modules()]


def _ce(m, x, y):
    with torch.no_grad():
        return F.cross_entropy(m(x), y, reduction="none")


def _pgd_ce(m, x, y, steps, seed=0):
    """PGD-10-style examples (all steps, ε/4, random start keyed on the index) and their mean CE, built
    directly from the attack class, not through the figure code."""
    atk = PGD(m, eps=EPS, alpha=EPS / 4, steps=steps, random_start=True, early_stop=False, seed=seed, precision="fp32")
    x_adv = atk(x, y, keys=torch.arange(len(y)))
    return x_adv, _ce(m, x_adv, y).double().mean().item()


# ------------------------------------------------------------------------------------ Fig. 3

@pytest.fixture(scope="module")
def fig3(model, data):
    x, y = data
    model.train()  # the figure must run in eval mode and give the training mode back
    before, x_before = _state(model), x.clone()
    res = figures.input_loss_surface(model, (x, y), eps=EPS, n_images=3, grid=5, seed=0, steps=5)
    assert all(_modes(model)) and _same_state(model, before) and torch.equal(x, x_before)
    model.eval()
    return res


def test_input_surface_centre_is_the_clean_loss_and_the_axis_end_the_pgd_point(model, data, fig3):
    x, y = data[0][:3], data[1][:3]
    g, mid = fig3["grid"], fig3["grid"] // 2
    assert fig3["delta1"][mid] == 0.0 and fig3["delta1"][0] == -EPS and fig3["delta1"][-1] == EPS
    loss = np.asarray(fig3["loss"])
    assert loss.shape == (3, g, g)
    clean = _ce(model, x, y).numpy()
    np.testing.assert_allclose(loss[:, mid, mid], clean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fig3["clean_loss"], clean, rtol=1e-5, atol=1e-6)

    dirs = figures.surface_directions(model, x, y, EPS, keys=torch.arange(3), steps=5, seed=0)
    v, r = dirs["v"], dirs["r"]
    assert set(r.unique().tolist()) == {-1.0, 1.0}                        # Rademacher
    assert torch.equal(v.flatten(1).abs().amax(1), torch.ones(3))         # ‖v‖∞ = 1
    at_pgd = _ce(model, (x + EPS * v).clamp(0, 1), y).numpy()             # clip01(x + ε·v), by hand
    np.testing.assert_allclose(loss[:, -1, mid], at_pgd, rtol=1e-5, atol=1e-6)
    assert (loss[:, -1, mid] > clean).all()                               # PGD raised every image's loss
    # the perturbation saturated, so x + ε·v is the PGD-10 point and its loss is the reported pgd_loss
    np.testing.assert_allclose(fig3["pgd_linf"], EPS, rtol=1e-5)
    np.testing.assert_allclose(fig3["pgd_loss"], loss[:, -1, mid], rtol=1e-4)
    np.testing.assert_allclose(fig3["pgd_loss"], _ce(model, dirs["x_pgd"], y).numpy(), rtol=1e-5)
    # r comes from the seed alone (no global RNG): the same again after reseeding torch
    torch.manual_seed(123)
    assert torch.equal(figures.surface_directions(model, x, y, EPS, keys=torch.arange(3), steps=5, seed=0)["r"], r)
    json.dumps(fig3, allow_nan=False)


def test_every_input_surface_point_is_a_valid_image_in_the_eps_ball(model, data, fig3):
    x, y = data[0][:3], data[1][:3]
    dirs = figures.surface_directions(model, x, y, EPS, keys=torch.arange(3), steps=5, seed=0)
    loss = np.asarray(fig3["loss"])
    for i, d1 in enumerate(fig3["delta1"]):
        for j, d2 in enumerate(fig3["delta2"]):
            p = figures.surface_points(x, dirs["v"], dirs["r"], d1, d2, EPS)
            assert p.min() >= 0 and p.max() <= 1
            assert (p - x).abs().max() <= EPS + 1e-6
            np.testing.assert_allclose(loss[:, i, j], _ce(model, p, y).numpy(), rtol=1e-5, atol=1e-6)
    # without the projection the corners leave the ball (|δ1| + |δ2| reaches 2ε): the projection does work
    corner = figures.surface_points(x, dirs["v"], dirs["r"], EPS, EPS)
    assert (corner - x).abs().max() > EPS * 1.5


def test_input_surface_needs_an_odd_grid(model, data):
    with pytest.raises(ValueError, match="odd"):
        figures.input_loss_surface(model, data, eps=EPS, n_images=1, grid=4)


def test_input_surface_plot_draws_the_result(fig3, tmp_path):
    saved = figures.plot_input_loss_surface(fig3, tmp_path / "fig3.png", title="Fashion-MNIST, cnn-small AT, ε = 0.1")
    assert saved.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and saved.pdf.read_bytes()[:5] == b"%PDF-"
    assert saved.pdf == tmp_path / "fig3.pdf"
    fig = saved.figure
    assert fig.get_suptitle() == "Fashion-MNIST, cnn-small AT, ε = 0.1"
    assert len(fig.axes) == 3
    for ax, z in zip(fig.axes, fig3["loss"]):
        z = np.asarray(z)
        assert ax.name == "3d"
        assert figures.DELTA1_LABEL in ax.get_xlabel() and figures.DELTA2_LABEL in ax.get_ylabel()
        assert ax.get_zlabel() == figures.LOSS_LABEL
        # each drawn facet is coloured by the mean of its four corner losses
        cells = (z[:-1, :-1] + z[1:, :-1] + z[:-1, 1:] + z[1:, 1:]) / 4
        np.testing.assert_allclose(np.sort(ax.collections[0].get_array()), np.sort(cells.ravel()), rtol=1e-6)
        lo, hi = ax.get_zlim()
        assert lo <= z.min() and hi >= z.max()


# ------------------------------------------------------------------------------------ Fig. 4

def test_filter_normalised_direction(model, other):
    d = figures.filter_normalized_direction(model, seed=5)
    params = dict(model.named_parameters())
    assert d.keys() == params.keys()
    for name, p in params.items():
        if p.dim() <= 1:  # biases and batch-norm weights stay put
            assert not d[name].any(), name
        else:
            w_norm = p.detach().flatten(1).norm(dim=1)
            np.testing.assert_allclose(d[name].flatten(1).norm(dim=1).numpy(), w_norm.numpy(), rtol=1e-5)
    assert any(n.endswith("bias") for n in params) and any(".1.weight" in n for n in params)  # BN and biases seen
    # same architecture, same seed: the same pattern before normalisation, whatever the global RNG did
    torch.manual_seed(99)
    e = figures.filter_normalized_direction(other, seed=5)
    for name, p in params.items():
        if p.dim() > 1:
            torch.testing.assert_close(F.normalize(d[name].flatten(1), dim=1), F.normalize(e[name].flatten(1), dim=1))


@pytest.fixture(scope="module")
def fig4(model, other, data):
    x, y = data
    model.train()
    model.body.conv[1].eval()  # a mixed state must come back as it was, module by module
    modes, before = _modes(model), _state(model)
    res = figures.weight_loss_surfaces({"TRADES": model, "TRADES-SI": other}, (x, y), eps=EPS,
                                       deltas=[-0.5, 0.0, 0.5], n=N, steps=3, seed=0)
    assert _modes(model) == modes
    assert _same_state(model, before)  # bit for bit, buffers included
    model.eval()
    return res


def test_weight_surfaces_along_several_directions(model, other, data, fig4):
    """The first direction (index 0) is the one-direction figure's (the same stream, the same numbers); the
    others (index 1, 2) are new draws, the same for every model; ``rise`` is the mean loss change over δ ≠ 0."""
    x, y = data
    res = figures.weight_loss_surfaces({"TRADES": model, "TRADES-SI": other}, (x, y), eps=EPS,
                                       deltas=[-0.5, 0.0, 0.5], n=N, steps=3, seed=0, directions=3)
    assert res["models"] == fig4["models"] and len(res["more_directions"]) == 2
    for j, more in enumerate(res["more_directions"], start=1):
        assert set(more) == {"TRADES", "TRADES-SI"}
        for label in more:
            assert more[label]["direction"]["seed_stream"] == f"fig4/weight-direction/{j}"
            assert more[label]["loss"][1] == res["models"][label]["loss"][1]  # δ = 0: the same model
            assert more[label]["loss"] != res["models"][label]["loss"]       # elsewhere: another direction
    # the pairing: each model's 2nd direction is the same draw, filter-normalised to that model, rebuilt by hand
    for label, net in (("TRADES", model), ("TRADES-SI", other)):
        d = figures.filter_normalized_direction(net, stream_key(0, "fig4/weight-direction/1"))
        moved = copy.deepcopy(net)
        with torch.no_grad():
            for name, p in moved.named_parameters():
                p.add_(-0.5 * d[name])
        _, ref = _pgd_ce(moved, x[:N], y[:N], steps=3)
        assert res["more_directions"][0][label]["loss"][0] == pytest.approx(ref, rel=1e-5)
    r = res["more_directions"][0]["TRADES-SI"]
    assert figures.rise(r) == pytest.approx((r["loss_change"][0] + r["loss_change"][2]) / 2)
    with pytest.raises(ValueError, match="directions must be at least 1"):
        figures.weight_loss_surfaces({"TRADES": model}, (x, y), eps=EPS, directions=0)
    with pytest.raises(ValueError, match="give one or the other"):  # one given direction, k draws: refused
        figures.weight_loss_surfaces({"TRADES": model}, (x, y), eps=EPS, directions=2,
                                     direction=figures.filter_normalized_direction(model, 0))


def test_weight_surface_values(model, data, fig4):
    x, y = data[0][:N], data[1][:N]
    r = fig4["models"]["TRADES"]
    assert fig4["labels"] == ["TRADES", "TRADES-SI"] and r["deltas"] == [-0.5, 0.0, 0.5] and r["n"] == N
    assert r["loss_change"][1] == 0.0 and r["loss_at_zero"] == r["loss"][1]
    _, ref = _pgd_ce(model, x, y, steps=3)
    assert r["loss"][1] == pytest.approx(ref, rel=1e-6)       # δ = 0: the unperturbed model's PGD loss
    np.testing.assert_allclose(r["loss_change"], np.asarray(r["loss"]) - ref, rtol=1e-6, atol=1e-6)
    # δ = 0.5: a copy moved by hand along the same direction, attacked afresh
    d = figures.filter_normalized_direction(model, stream_key(0, "fig4/weight-direction"))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            p.add_(0.5 * d[name])
    _, ref_moved = _pgd_ce(moved, x, y, steps=3)
    assert r["loss"][2] == pytest.approx(ref_moved, rel=1e-5)
    assert abs(r["loss"][2] - r["loss"][1]) > 1e-3            # the direction does move the loss
    assert all(n in r["direction"]["perturbed_parameters"] for n, p in model.named_parameters() if p.dim() > 1)
    json.dumps(fig4, allow_nan=False)


def test_weight_surface_restores_the_weights_on_an_error(model, data, monkeypatch):
    before, calls = _state(model), []
    real = figures._adversarial_loss

    def failing(m, *a):
        calls.append(1)
        if len(calls) == 2:  # the weights are at w + δ·d now
            raise RuntimeError("interrupted")
        return real(m, *a)

    monkeypatch.setattr(figures, "_adversarial_loss", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        figures.weight_loss_surface(model, data, eps=EPS, deltas=[0.0, 1.0], n=4, steps=1)
    assert _same_state(model, before)


def test_weight_surface_plot_draws_the_result(fig4, tmp_path):
    saved = figures.plot_weight_loss_surface(fig4, tmp_path / "fig4.pdf", title="Fig. 4 test")
    assert saved.png == tmp_path / "fig4.png" and saved.png.read_bytes()[:4] == b"\x89PNG"
    assert saved.pdf.read_bytes()[:5] == b"%PDF-"
    ax = saved.figure.axes[0]
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == ["TRADES", "TRADES-SI"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["TRADES", "TRADES-SI"]
    for ln, label in zip(lines, fig4["labels"]):
        np.testing.assert_allclose(ln.get_xdata(), fig4["models"][label]["deltas"])
        np.testing.assert_allclose(ln.get_ydata(), fig4["models"][label]["loss_change"])
    assert ax.get_xlabel() == figures.WEIGHT_DELTA_LABEL and ax.get_ylabel() == figures.WEIGHT_LOSS_LABEL
    assert ax.get_title() == "Fig. 4 test"


# ------------------------------------------------------------------------------------ Fig. 5

@pytest.fixture(scope="module")
def fig5(model, other, data):
    before = _state(model)
    res = figures.cos_theta_histograms({"TRADES": model, "TRADES-SI": other}, data, eps=EPS, n=40, steps=3, bins=20)
    assert _same_state(model, before)
    return res


def test_cos_histogram_values(model, data, fig5):
    x, y = data[0][:40], data[1][:40]
    edges = np.asarray(fig5["bin_edges"])
    assert len(edges) == 21 and edges[0] == -1 and edges[-1] == 1
    for label, r in fig5["models"].items():
        v = np.asarray(r["values"])
        assert r["n"] == len(v) == sum(r["counts"]) == 40
        assert v.min() >= -1 and v.max() <= 1
        assert r["counts"] == np.histogram(v, bins=edges)[0].tolist() and r["bin_edges"] == fig5["bin_edges"]
        assert r["mean"] == pytest.approx(v.mean()) and r["median"] == pytest.approx(np.median(v))
    # cos θ_y by hand: W_y·z / (‖W_y‖‖z‖) on the PGD-10 points, bias ignored
    x_adv, _ = _pgd_ce(model, x, y, steps=3)
    with torch.no_grad():
        z, w = model.features(x_adv[:6]), model.head.weight[y[:6]]
        cos = (z * w).sum(1) / (z.norm(dim=1) * w.norm(dim=1))
    np.testing.assert_allclose(fig5["models"]["TRADES"]["values"][:6], cos.numpy(), rtol=1e-5, atol=1e-6)
    json.dumps(fig5, allow_nan=False)


def test_cos_histogram_plot_draws_the_result(fig5, tmp_path):
    saved = figures.plot_cos_histogram(fig5, tmp_path / "fig5.png", title="Fig. 5 test")
    assert saved.png.stat().st_size > 0 and saved.pdf.read_bytes()[:5] == b"%PDF-"
    ax = saved.figure.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["TRADES", "TRADES-SI"]
    assert len(ax.containers) == 2
    edges = np.asarray(fig5["bin_edges"])
    for bars, label in zip(ax.containers, fig5["labels"]):
        assert [p.get_height() for p in bars.patches] == fig5["models"][label]["counts"]
        np.testing.assert_allclose([p.get_x() for p in bars.patches], edges[:-1])
        np.testing.assert_allclose([p.get_width() for p in bars.patches], np.diff(edges))
    assert ax.get_xlabel() == figures.COS_LABEL and ax.get_ylabel() == figures.COUNT_LABEL


# ------------------------------------------------------------------------ saving (shared with Fig. 1)

def test_figure_paths_and_atomic_save(tmp_path):
    assert figure_paths(tmp_path / "a.png") == (tmp_path / "a.png", tmp_path / "a.pdf")
    assert figure_paths(tmp_path / "a.pdf") == (tmp_path / "a.png", tmp_path / "a.pdf")
    assert figure_paths(tmp_path / "a") == (tmp_path / "a", tmp_path / "a.pdf")
    fig = new_figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "sub" / "a.png")
    first = (tmp_path / "sub" / "a.pdf").read_bytes()
    save_figure(fig, tmp_path / "sub" / "a.png")
    assert (tmp_path / "sub" / "a.pdf").read_bytes() == first  # no creation date: the same bytes again
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.pdf", "a.png"]  # no temp files


def test_save_failure_keeps_the_old_figure(tmp_path, disk_full):
    fig = new_figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "a.png")
    old = (tmp_path / "a.png").read_bytes()
    disk_full(room=100)
    with pytest.raises(OSError, match="a.png"):
        save_figure(fig, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pdf", "a.png"]


def test_rescale_plot_writes_png_and_pdf(tmp_path, monkeypatch):
    result = {"alphas": [0.01, 1.0, 100.0], "attacks": ["pgd", "si-pgd"],
              "accuracy": {"pgd": [0.2, 0.3, 0.9], "si-pgd": [0.2, 0.2, 0.2]}, "clean": [0.8, 0.8, 0.8],
              "rows": []}
    out = rescale.plot(result, tmp_path / "rescale.png")
    assert out == tmp_path / "rescale.png" and out.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "rescale.pdf").read_bytes()[:5] == b"%PDF-"
    # save() keeps its signature: the JSON, then the plot at the PNG path it was given (drawing again costs 1.5 s)
    drawn = []
    monkeypatch.setattr(rescale, "plot", lambda res, path: drawn.append((res, path)))
    rescale.save(result, tmp_path / "r.json", tmp_path / "r.png")
    assert json.loads((tmp_path / "r.json").read_text())["alphas"] == result["alphas"]
    assert drawn == [(result, tmp_path / "r.png")]
