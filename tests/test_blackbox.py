"""Black-box attacks: SPSA (score-based) and RayS (hard-label, with the ADBD measure)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sirobust.attacks import SPSA, RayS, build_attack
from sirobust.attacks.spsa import margin_loss
from sirobust.evaluate import evaluate
from sirobust.rng import GeneratorNoise, KeyedNoise

from conftest import TinyNet
from helpers import cheap_attack

BLACK_BOX = ["spsa", "rays"]


def linear_two_class(d: int = 16, n: int = 24, seed: int = 0):
    """A two-class linear model and inputs in [0.3, 0.7] whose boundary lies within 0.3 in L∞, so the
    box [0, 1] never binds and the L∞ distance is |Δw·x + Δb| / ‖Δw‖₁ exactly."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2)).double()
    x = 0.3 + 0.4 * torch.rand(n, 1, 4, d // 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        w, b = model[1].weight, model[1].bias
        w.copy_(torch.randn(2, d, generator=g, dtype=torch.float64))
        dw = w[1] - w[0]
        scores = x.flatten(1) @ dw
        # centre the boundary among the points, halfway between two of them (no point sits on it)
        mid = scores.sort().values[n // 2 - 1: n // 2 + 1].mean()
        b.copy_(torch.tensor([0.0, -float(mid)], dtype=torch.float64))
        margin = x.flatten(1) @ dw + b[1] - b[0]
        y = (margin > 0).long()
    distance = margin.abs() / dw.abs().sum()
    assert distance.max() < 0.3
    return model, x, y, distance


class NoGradients(nn.Module):
    """Answers queries only: any forward pass that could build a graph raises."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        if torch.is_grad_enabled() or x.requires_grad:
            raise RuntimeError("this model gives no gradients")
        return self.model(x)


def test_rays_finds_the_analytic_linf_distance_of_a_linear_model():
    model, x, y, distance = linear_two_class()
    found, queries = RayS(model, eps=0.05, queries=3000).distances(x, y)
    assert (found >= distance * (1 - 1e-9)).all()           # a point RayS returns is misclassified: never closer
    assert ((found - distance) / distance).abs().max() < 1e-3
    assert (queries <= 3000 + 1).all()


def test_rays_robust_decision_and_returned_points_agree_with_the_distance():
    model, x, y, distance = linear_two_class(seed=1)
    eps = float(distance.sort().values[11:13].mean())   # between two examples' distances
    atk = RayS(model, eps=eps, queries=3000)
    out = atk.perturb(x, y)
    x_adv = out.x_adv
    assert ((x_adv - x).abs().flatten(1).amax(1) <= eps + 1e-12).all()
    fooled = model(x_adv).argmax(1) != y
    assert torch.equal(fooled, out.distances <= eps)
    assert torch.equal(fooled, distance <= eps)
    # stopping at ε gives the same verdicts with fewer queries
    quick = RayS(model, eps=eps, queries=3000, stop_at_eps=True).perturb(x, y)
    assert torch.equal(model(quick.x_adv).argmax(1) != y, fooled)
    assert quick.queries.sum() < out.queries.sum()


def test_rays_never_lies_below_the_distance_on_a_multiclass_linear_model():
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).double()
    x = 0.3 + 0.4 * torch.rand(20, 1, 4, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
        y = logits.argmax(1)
        w = model[1].weight
        gaps = logits.gather(1, y[:, None]) - logits                      # (n, K) ≥ 0
        norms = (w[y][:, None, :] - w[None]).abs().sum(2)                  # ‖w_y − w_j‖₁
        pair = torch.where(norms > 0, gaps / norms, torch.full_like(gaps, float("inf")))
        lower = pair.min(1).values          # the closest pairwise boundary (the box may only push it out)
    found, _ = RayS(model, eps=0.05, queries=1500).distances(x, y)
    assert (found >= lower * (1 - 1e-9)).all()


def test_spsa_gradient_estimate_points_along_the_true_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(16, 1, 8, 8, generator=g, dtype=torch.float64)
    y = model(x).argmax(1)
    xr = x.clone().requires_grad_(True)
    true, = torch.autograd.grad(margin_loss(model(xr), y, None).sum(), xr)

    def mean_cosine(samples):
        est = SPSA(model, eps=0.1, samples=samples, delta=1e-3).estimate_gradient(
            x, y, None, GeneratorNoise(torch.Generator().manual_seed(4)))
        return torch.cosine_similarity(est.flatten(1), true.flatten(1)).mean().item()

    few, many = mean_cosine(8), mean_cosine(512)
    assert few > 0.1 and many > 0.6 and many > few + 0.2


def test_spsa_breaks_a_standard_model_at_a_large_eps(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:32], fmnist_test[1][:32]
    clean = (trained_cnn(x).argmax(1) == y).float().mean().item()
    # Adam moves a pixel by about lr per step: 30 steps of 0.02 can cross ε = 0.3
    out = SPSA(trained_cnn, eps=0.3, samples=16, iterations=30, lr=0.02).perturb(x, y)
    robust = (trained_cnn(out.x_adv).argmax(1) == y).float().mean().item()
    assert clean > 0.7 and robust <= 0.05
    assert out.queries.max() <= 30 * (2 * 16 + 1) + 1


def test_spsa_draws_do_not_depend_on_chunk_or_batch():
    model = TinyNet().eval()
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(6, 1, 12, 12, generator=g), torch.randint(0, 10, (6,), generator=g)
    keys = torch.arange(10, 16)
    a = SPSA(model, eps=0.05, samples=6, iterations=3, chunk=1000)(x, y, keys=keys)
    b = SPSA(model, eps=0.05, samples=6, iterations=3, chunk=4)(x, y, keys=keys)
    parts = torch.cat([SPSA(model, eps=0.05, samples=6, iterations=3, chunk=5)(x[:2], y[:2], keys=keys[:2]),
                       SPSA(model, eps=0.05, samples=6, iterations=3, chunk=7)(x[2:], y[2:], keys=keys[2:])])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(a, parts, rtol=0, atol=1e-6)


def test_keyed_draws_in_pieces_equal_one_draw():
    noise = KeyedNoise(0, "s", torch.tensor([3, 9]))
    whole = noise.uniform(torch.empty(2, 10))
    pieces = torch.cat([noise.uniform(torch.empty(2, 4)), noise.uniform(torch.empty(2, 6), offset=4)], 1)
    assert torch.equal(whole, pieces)


@pytest.mark.parametrize("norm,eps", [("Linf", 8 / 255), ("Linf", 0.3), ("L2", 0.5)])
@pytest.mark.parametrize("name", BLACK_BOX)
def test_black_box_attacks_keep_every_guarantee(name, norm, eps):
    if name == "rays" and norm == "L2":
        with pytest.raises(ValueError, match="norm must be 'Linf' for rays"):
            build_attack("rays", TinyNet(), eps=eps, norm=norm)
        return
    model = NoGradients(TinyNet()).train()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 1, 12, 12, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    with torch.no_grad():
        y[:3] = model(x[:3]).argmax(1)                   # half of them correctly classified: attacked
        correct = model(x).argmax(1) == y
    x0, y0 = x.clone(), y.clone()
    atk = cheap_attack(name, model, eps=eps, norm=norm, seed=1)
    result = atk.perturb(x, y, keys=torch.arange(6))
    out = result.x_adv
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert model.training and model.model.training                  # the mode it was handed over in
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    dist = (out - x).flatten(1).abs().amax(1) if norm == "Linf" else (out - x).flatten(1).norm(dim=1)
    assert (dist <= eps + 1e-6).all()
    assert len(result.queries) == 6 and torch.equal(result.queries > 0, correct)


def test_evaluate_reports_queries_and_adbd_and_needs_no_gradients(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:12], fmnist_test[1][:12]
    model = NoGradients(trained_cnn)
    rep = evaluate(model, (x, y), attacks=BLACK_BOX, eps=0.1, progress=False,
                   attack_params={"spsa": {"samples": 8, "iterations": 5}, "rays": {"queries": 60}})
    spsa, rays = rep.attacks["spsa"], rep.attacks["rays"]
    assert spsa.stats["queries"]["max"] <= 5 * 17 + 1
    assert rays.stats["queries"]["max"] <= 60
    adbd = rays.stats["adbd"]
    assert adbd["found"] + adbd["not_found"] == sum(rep.clean_correct)
    assert 0 < adbd["mean"] < 1
    gradient_flags = [f for f in rep.flags if f["name"] == "zero_gradients"]
    assert gradient_flags[0]["value"] is None and "not checked" in gradient_flags[0]["message"]
    md = rep.to_markdown()
    assert "ADBD" in md and "queries per example" in md and "gives no input gradient" in md
    assert type(rep).from_json(rep.to_json()).attacks["rays"].stats["adbd"] == adbd


def test_unknown_attack_parameters_are_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"attack 'spsa' has no parameter 'sample'.*samples"):
        build_attack("spsa", TinyNet(), overrides={"sample": 3}, eps=0.1)
    with pytest.raises(ValueError, match="rays is untargeted"):
        RayS(TinyNet(), eps=0.1, queries=5)(torch.rand(2, 1, 12, 12), torch.tensor([1, 2]),
                                             torch.tensor([3, 4]))


def test_cli_attack_params_reach_the_attacks_and_bad_ones_are_named(trained_cnn, tmp_path, capsys):
    import json

    from sirobust import save_model
    from sirobust.cli import main
    weights = save_model(trained_cnn, tmp_path / "std.safetensors", model_name="cnn-small",
                         dataset="fashion-mnist-mini")
    out = tmp_path / "bb.json"
    assert main(["evaluate", "--weights", str(weights), "--attacks", "spsa,rays", "-n", "6", "--no-progress",
                 "--attack-param", "spsa.samples=4", "--attack-param", "spsa.iterations=2",
                 "--attack-param", "rays.queries=30", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    spsa, rays = rep["provenance"]["attacks"]["spsa"], rep["provenance"]["attacks"]["rays"]
    assert spsa["samples"] == 4 and spsa["iterations"] == 2 and rays["queries"] == 30
    assert rep["attacks"]["rays"]["stats"]["queries"]["max"] <= 30
    for bad, message in ((["--attack-param", "spsa.sample=4"], "has no parameter 'sample'"),
                         (["--attack-param", "pgd.steps=4"], "pgd is not among --attacks"),
                         (["--attack-param", "samples=4"], "must be ATTACK.KEY=VALUE")):
        assert main(["evaluate", "--weights", str(weights), "--attacks", "spsa", "-n", "4", "--no-progress",
                     "--out", str(tmp_path / "x.json"), *bad]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x.json").exists()
    # the PGD and APGD families name their own parameters and their loss's, before anything is loaded
    for bad, message in ((["pgd.foo=1"], "attack 'pgd' has no parameter 'foo'; its parameters are eps, alpha"),
                         (["si-pgd.bogus=3"], "'bogus'; its parameters are eps, alpha, steps, scale"),
                         (["si-pgd.bogus=3"], "; and those of its loss 'si': scale"),
                         (["pgd.eps=0.5"], "belong to the whole evaluation; use --eps, --norm"),
                         (["apgd-ce.loss=dlr"], "apgd-ce runs the 'ce' loss and takes no other (got loss='dlr')")):
        assert main(["evaluate", "--weights", str(weights), "--attacks", "pgd,si-pgd,apgd-ce", "-n", "4",
                     "--no-progress", "--out", str(tmp_path / "x.json"), "--attack-param", *bad]) == 2
        said = capsys.readouterr()
        assert message in said.err and "evaluating" not in said.out, said


def test_spsa_never_sends_more_probes_than_chunk_and_counts_its_queries_exactly():
    sizes = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinyNet().eval()

        def forward(self, x):
            sizes.append(x.shape[0])
            return self.net(x)

    model = Spy()
    x, y = torch.rand(5, 1, 12, 12), torch.randint(0, 10, (5,))
    atk = SPSA(model, eps=0.05, samples=12, iterations=3, chunk=10, early_stop=False)
    queries = atk.perturb(x, y, keys=torch.arange(5)).queries
    probe_calls = [s for s in sizes if s != 5]          # the per-iteration checks see the batch itself
    assert probe_calls and max(probe_calls) <= 10
    assert torch.equal(queries, torch.full((5,), 3 * (2 * 12 + 1) + 1.0))
    # nothing attacked (ε = 0): zero queries, not the last call's
    assert torch.equal(SPSA(model, eps=0.0, samples=4, iterations=2)(x, y), x)


def test_an_attack_cannot_change_the_evaluations_threat_model_and_booleans_parse():
    from sirobust.cli import parse_param
    with pytest.raises(ValueError, match="belong to the whole evaluation"):
        build_attack("spsa", TinyNet(), overrides={"norm": "L2"}, eps=0.1, norm="Linf")
    assert parse_param("rays.stop_at_eps=false") == ("rays.stop_at_eps", False)
    assert parse_param("spsa.early_stop=True") == ("spsa.early_stop", True)


def test_white_box_attacks_on_a_model_without_gradients_are_refused_before_any_work(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:6], fmnist_test[1][:6]
    with pytest.raises(ValueError, match="gives no input gradient, so pgd cannot run on it"):
        evaluate(NoGradients(trained_cnn), (x, y), attacks=["rays", "pgd"], eps=0.1, progress=False,
                 attack_params={"rays": {"queries": 5}})


def test_spsa_starts_from_the_clean_image_when_asked():
    """random_start=False is torchattacks' start: after one tiny Adam step the points are still at x (up to
    the step), while the default uniform start lies anywhere in the ball."""
    model = TinyNet().eval()
    x, y = torch.rand(6, 1, 12, 12), torch.randint(0, 10, (6,))
    clean_start = SPSA(model, eps=0.1, samples=4, iterations=1, lr=1e-6, random_start=False, early_stop=False)
    assert (clean_start(x, y, keys=torch.arange(6)) - x).abs().max() <= 1e-5
    random_start = SPSA(model, eps=0.1, samples=4, iterations=1, lr=1e-6, early_stop=False)
    assert (random_start(x, y, keys=torch.arange(6)) - x).abs().max() > 0.05
    assert clean_start.params()["random_start"] is False


def test_labelled_black_box_attacks_are_known_by_their_class_not_their_name(trained_cnn, fmnist_test):
    """`sirobust reproduce table9` labels SPSA "spsa[samples=64]". Such a label is still SPSA: it runs on a model
    that gives no gradient, and it is not a white-box column for RayS to beat (the black-box flag misfired on
    Table 9's mini run, where SPSA and RayS were the only attacks)."""
    x, y = fmnist_test[0][:8], fmnist_test[1][:8]
    rep = evaluate(NoGradients(trained_cnn), (x, y), eps=0.1, progress=False,
                   attacks=[("spsa[samples=8]", "spsa"), "rays"],
                   attack_params={"spsa": {"samples": 8, "iterations": 3}, "rays": {"queries": 40}})
    assert set(rep.attacks) == {"spsa[samples=8]", "rays"}
    checked = [f for f in rep.flags if f["name"] == "black_box_beats_white_box"]
    assert len(checked) == 2                # one entry per black-box result: the labelled SPSA is one of them
    assert all(not f["triggered"] and f["value"] == 0 for f in checked)  # no white-box result to compare with


def test_the_black_box_flag_compares_black_box_results_with_white_box_ones_only():
    from sirobust.report import AttackResult
    from sirobust.sanity import result_flags

    def res(name, acc):
        return AttackResult(name=name, robust_acc=acc, n_robust=int(100 * acc), n=100, ci95=[0, 1], seconds=0.0,
                            max_perturbation=0.1, params={})

    results = {"spsa[samples=64]": res("spsa[samples=64]", 0.60), "rays": res("rays", 0.50)}
    black = {"spsa[samples=64]", "rays"}
    assert not any(f["triggered"] for f in result_flags(results, 100, black_box=black))
    # the same numbers beside a white-box column that the black-box ones undercut: both fire
    results["pgd"] = res("pgd", 0.65)
    fired = {f["message"].split(":")[0] for f in result_flags(results, 100, black_box=black) if f["triggered"]}
    assert fired == {"spsa[samples=64]", "rays"}
    # by default only registered names count as black-box: the labelled SPSA is then taken for a white-box
    # column, which is why evaluate passes the set from the attacks' classes
    fired = {f["message"].split(":")[0] for f in result_flags(results, 100) if f["triggered"]}
    assert fired == {"rays"}


def test_every_registered_attack_says_whether_it_is_black_box(trained_cnn):
    """sanity.BLACK_BOX (the registered names, used for ensemble stages and for stored reports) and each attack
    class's ``black_box`` (used by evaluate) must agree."""
    from sirobust.attacks import build_attack, list_attacks
    from sirobust.sanity import BLACK_BOX
    for name in list_attacks():
        assert build_attack(name, trained_cnn, eps=0.1).black_box == (name in BLACK_BOX), name


def test_tables_take_the_black_box_flag_again_from_stored_results():
    """A report stored before the fix carries a black-box flag that compared RayS with a labelled SPSA; the
    table built from it takes the flag again from the stored numbers, and drops it. A real one (RayS below a
    white-box column) still shows."""
    from sirobust.reproduce.runner import _fired
    from sirobust.reproduce.schema import Column

    def attack(acc):
        return {"name": "x", "robust_acc": acc, "n_robust": int(100 * acc), "n": 100, "ci95": [0, 1],
                "seconds": 0.0, "max_perturbation": 0.1, "params": {}}

    stale = {"name": "black_box_beats_white_box", "triggered": True, "value": 0.03, "message": "rays: stale"}
    columns = [Column("128", attack="spsa", params={"samples": 64}), Column("Rob.Acc", attack="rays")]
    report = {"n": 100, "flags": [stale], "attacks": {"spsa[samples=64]": attack(0.80), "rays": attack(0.77)}}
    assert _fired([{"report": report}], columns) == []
    report["attacks"]["pgd"] = attack(0.79)
    columns.append(Column("PGD", attack="pgd"))
    fired = _fired([{"report": report}], columns)
    assert [f["name"] for f in fired] == ["black_box_beats_white_box"] and fired[0]["message"].startswith("rays:")
