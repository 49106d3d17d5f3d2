"""The reference codes' training protocol (TRADES, MART): no validation split (val_size 0), the inner
attack started at x + 0.001·N(0, I) (attack_start "normal"), and learning-rate drops for the 75th
(90th, 100th) epoch, 1-based, as their `epoch >= 75` with `for epoch in range(1, epochs + 1)`."""
import argparse
import json

import pytest
import torch
from helpers import assert_same_weights, small_config
from torch import nn

import sirobust.train as tr
from sirobust.attacks.loop import pgd_loop
from sirobust.cli import main
from sirobust.defenses import InnerAttack, build_defense
from sirobust.io import read_jsonl
from sirobust.train import NO_VALIDATION, ResumeMismatch, TrainConfig, fit, learning_rate

QUIET = dict(log=lambda *_: None)


# ----------------------------------------------------------------------------- val_size 0

@pytest.mark.parametrize("zero", [0, 0.0])
def test_val_size_zero_is_accepted_and_the_old_values_still_are(zero):
    assert TrainConfig(val_size=zero, device="cpu").resolved().val_size == 0
    assert TrainConfig(val_size=0.2, device="cpu").resolved().val_size == 0.2
    assert TrainConfig(val_size=500, device="cpu").resolved().val_size == 500
    assert TrainConfig(val_size=500.0, device="cpu").resolved().val_size == 500


@pytest.mark.parametrize("bad", [-1, -0.1, 1.5, 2.5, float("nan"), float("inf")])
def test_a_bad_val_size_names_the_field_and_the_allowed_values(bad):
    with pytest.raises(ValueError, match=r"val_size .*0 \(no validation split\), a fraction in \(0, 1\) or a count"):
        TrainConfig(val_size=bad, device="cpu").resolved()


def test_val_size_zero_trains_on_the_whole_training_set(tmp_path, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def spy(ds, *a, **k):
        seen["n"] = len(ds)
        raise Stop  # the size is all this test needs: no training

    monkeypatch.setattr(tr.BatchLoader, "from_dataset", spy)
    for val_size, expected in ((0, 6000), (0.1, 5400)):  # fashion-mnist-mini has 6000 training images
        with pytest.raises(Stop):
            fit(small_config(tmp_path / str(val_size), val_size=val_size, train_n=None), **QUIET)
        assert seen.pop("n") == expected


def test_val_size_zero_has_no_validation_no_best_and_says_why(tmp_path):
    out = tmp_path / "run"
    summary = fit(small_config(out, val_size=0, epochs=1, milestones=()), **QUIET)
    (out / "best.safetensors").write_bytes(b"stale")  # left by someone: must not survive a resume
    summary = fit(small_config(out, val_size=0, epochs=2, milestones=()), resume=True, **QUIET)
    assert summary["best"] == {"epoch": None, "metric": None, "reason": NO_VALIDATION}
    assert "epoch" in summary["best"] and summary["best"]["epoch"] is None  # what compare.py reads
    assert summary["best_weights"] is None
    assert not (out / "best.safetensors").exists()
    assert json.loads((out / "summary.json").read_text())["best"]["reason"] == NO_VALIDATION
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert not any(k.startswith("val_") for k in r), r
        assert r["loss"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["val_size"] == 0 and cfg["val_indices"] == []


def test_the_command_line_takes_val_size_zero_and_reports_the_last_weights(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--dataset", "fashion-mnist-mini", "--model", "cnn-small", "--defense", "at",
                 "--epochs", "1", "--train-n", "128", "--steps", "1", "--batch-size", "64", "--val-size", "0",
                 "--attack-start", "normal", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "no validation split" in printed and "best by" not in printed
    record = json.loads((out / "run.json").read_text())["config"]
    assert record["val_size"] == 0 and record["attack_start"] == "normal"


def test_the_val_size_flag_parses_zero_and_refuses_the_rest():
    from sirobust.cli.train import _val_size
    assert _val_size("0") == 0 and _val_size("0.0") == 0
    assert _val_size("0.1") == 0.1 and _val_size("500") == 500
    for bad in ("-1", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"--val-size must be 0 \(no validation split\)"):
            _val_size(bad)


# ----------------------------------------------------------------------------- attack_start

class Recorder(nn.Module):
    """A linear classifier that keeps every input it is run on (the attack's iterates)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)


def _batch(lo=0.1, hi=0.9, n=64):
    g = torch.Generator().manual_seed(1)
    x = lo + (hi - lo) * torch.rand(n, 1, 28, 28, generator=g)
    return x, torch.randint(0, 10, (n,), generator=g)


def _first_iterate(start, x, y, seed=5, eps=0.1):
    model = Recorder()
    d = build_defense("at", attack=InnerAttack(eps=eps, alpha=eps / 4, steps=1, start=start))
    d.make_adversarial(model, x, y, generator=torch.Generator().manual_seed(seed))
    return model.seen[0]


def test_normal_start_is_x_plus_a_thousandth_of_a_gaussian_from_the_attack_generator():
    x, y = _batch()  # pixels inside (0.1, 0.9): no clipping, the raw noise
    noise = _first_iterate("normal", x, y) - x
    assert abs(noise.std().item() - 0.001) < 0.2 * 0.001
    assert abs(noise.mean().item()) < 1e-4
    assert abs((noise.abs() < 0.001).float().mean().item() - 0.6827) < 0.02  # Gaussian, not uniform: 68 % in 1σ
    expected = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(_first_iterate("normal", x, y), expected)  # exactly the generator's N(0, I) draws


def test_normal_start_is_clipped_to_the_pixel_box():
    x, y = _batch(0.0, 1.0)
    x[:, :, :14] = 0.0  # black and white pixels, as in (Fashion-)MNIST
    x[:, :, 14:16] = 1.0
    first = _first_iterate("normal", x, y)
    assert first.min() >= 0 and first.max() <= 1
    assert (first[:, :, :14] > 0).any() and (first[:, :, 14:16] < 1).any()  # moved where the box allows
    assert torch.equal(first, (x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1))


def test_uniform_start_is_unchanged_bit_for_bit():
    x, y = _batch()
    eps = 0.1
    g = torch.Generator().manual_seed(5)
    u = torch.rand(x.shape, generator=g)
    expected = torch.min(torch.max(x + (2 * u - 1) * eps, x - eps), x + eps).clamp(0, 1)
    assert torch.equal(_first_iterate("uniform", x, y), expected)
    # the whole attack: the one loop with its own uniform start, as before the option existed
    d = build_defense("at", attack=InnerAttack(eps=eps, alpha=eps / 4, steps=3))
    model = Recorder()
    got = d.make_adversarial(model, x, y, generator=torch.Generator().manual_seed(7))
    ref = pgd_loop(model, x, y, loss=d.inner_loss(), threat=d.attack.threat, alpha=eps / 4, steps=3,
                   random_start=True, noise=torch.Generator().manual_seed(7))
    assert torch.equal(got, ref)


def test_normal_start_leaves_the_global_rng_alone():
    x, y = _batch()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model = Recorder()
    torch.set_rng_state(before)
    d = build_defense("trades", attack=InnerAttack(eps=0.1, alpha=0.025, steps=2, start="normal"))
    a = d.make_adversarial(model, x, y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), before)
    b = d.make_adversarial(model, x, y, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a, b)  # the start is drawn from the generator it was given


def test_attack_start_config_checks_and_identity():
    base = dict(device="cpu", defense="trades")
    assert TrainConfig(**base).resolved().attack_start == "uniform"
    normal = TrainConfig(**base, attack_start="normal").resolved()
    assert normal.attack_start == "normal" and normal.identity()["attack_start"] == "normal"
    assert TrainConfig(**base).resolved().identity()["attack_start"] == "uniform"
    with pytest.raises(ValueError, match=r"attack_start \(--attack-start\).*normal.*uniform"):
        TrainConfig(**{**base, "attack_start": "gaussian"}).resolved()
    for defense in ("free", "gradalign"):  # no random start in their reference code
        with pytest.raises(ValueError, match="attack_start .* needs the attack's random start"):
            TrainConfig(device="cpu", defense=defense, attack_start="normal").resolved()
    with pytest.raises(ValueError, match="does not apply to gat"):
        TrainConfig(device="cpu", defense="gat", attack_start="normal").resolved()
    with pytest.raises(ValueError, match="needs the attack's random start"):
        TrainConfig(**base, attack_start="normal", attack_random_start=False).resolved()


def test_another_attack_start_is_another_run_and_old_records_resume_as_uniform(tmp_path):
    out = tmp_path / "run"
    fit(small_config(out, epochs=1, milestones=()), **QUIET)
    with pytest.raises(ResumeMismatch, match="differs in: attack_start"):
        fit(small_config(out, epochs=2, milestones=(), attack_start="normal"), resume=True, **QUIET)
    # a run recorded before the option existed had the uniform start
    record = json.loads((out / "run.json").read_text())
    del record["config"]["attack_start"]
    (out / "run.json").write_text(json.dumps(record))
    fit(small_config(out, epochs=2, milestones=()), resume=True, **QUIET)
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("kw", [dict(defense="mart", attack_start="normal", val_size=0),  # both options at once
                                pytest.param(dict(val_size=0), marks=pytest.mark.slow),
                                pytest.param(dict(defense="trades", attack_start="normal"), marks=pytest.mark.slow)])
def test_paper_protocol_runs_resume_exactly(tmp_path, kw):
    kw = dict(milestones=(1,), **kw)  # the rate drops after epoch 1: the resumed epoch has the lower one
    fit(small_config(tmp_path / "straight", epochs=2, **kw), **QUIET)
    fit(small_config(tmp_path / "split", epochs=1, **kw), **QUIET)
    fit(small_config(tmp_path / "split", epochs=2, **kw), resume=True, **QUIET)
    assert_same_weights(tmp_path / "straight" / "model.safetensors", tmp_path / "split" / "model.safetensors")
    rows = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.005])
    cfg = json.loads((tmp_path / "split" / "config.json").read_text())
    assert cfg["defense"]["attack"]["start"] == kw.get("attack_start", "uniform")


def test_normal_start_changes_the_training_run(tmp_path):
    kw = dict(epochs=1, milestones=(), val_size=0, defense="trades")
    fit(small_config(tmp_path / "u", **kw), **QUIET)
    fit(small_config(tmp_path / "n", attack_start="normal", **kw), **QUIET)
    with pytest.raises(AssertionError):
        assert_same_weights(tmp_path / "u" / "model.safetensors", tmp_path / "n" / "model.safetensors")


# ----------------------------------------------------------------------------- learning-rate drops

def _lr(cfg, epoch_1based):
    return learning_rate(cfg, epoch_1based - 1, 0, 10)


def test_resnet_preset_drops_for_the_75th_90th_and_100th_epoch_as_trades_and_mart():
    cfg = TrainConfig(model="resnet18", dataset="cifar10", defense="trades", device="cpu").resolved()
    assert cfg.epochs == 120 and cfg.lr == 0.01
    expected = {1: 0.01, 74: 0.01, 75: 1e-3, 89: 1e-3, 90: 1e-4, 99: 1e-4, 100: 1e-5, 120: 1e-5}
    for epoch, lr in expected.items():
        assert _lr(cfg, epoch) == pytest.approx(lr, rel=1e-9), epoch
    # every batch of the epoch, not only the first
    assert learning_rate(cfg, 74, 9, 10) == pytest.approx(1e-3) and learning_rate(cfg, 73, 9, 10) == pytest.approx(0.01)


def test_wideresnet_preset_drops_for_the_75th_of_90_epochs():
    cfg = TrainConfig(model="wrn-34-10", dataset="cifar10", defense="mart", device="cpu").resolved()
    assert cfg.epochs == 90 and cfg.lr == 0.1
    for epoch, lr in {74: 0.1, 75: 0.01, 90: 0.01}.items():
        assert _lr(cfg, epoch) == pytest.approx(lr, rel=1e-9), epoch


def test_an_explicit_milestone_keeps_its_meaning():
    # m = 75 (a recorded run's resolved value): the 75th epoch at full rate, the 76th lowered
    cfg = TrainConfig(model="resnet18", dataset="cifar10", milestones=(75,), device="cpu").resolved()
    assert cfg.milestones == (75,)
    assert _lr(cfg, 75) == pytest.approx(0.01) and _lr(cfg, 76) == pytest.approx(1e-3)


@pytest.mark.parametrize("model,full", [("resnet18", 120), ("wrn-34-10", 90)])
def test_rescaled_preset_milestones_stay_sensible(model, full):
    first = 74 / full  # the share of the run at the full rate
    for epochs in (1, 2, 3, 5, 10, 30, 60, 119, 200):
        ms = TrainConfig(model=model, dataset="cifar10", epochs=epochs, device="cpu").resolved().milestones
        assert list(ms) == sorted(set(ms)) and all(1 <= m < epochs for m in ms), (epochs, ms)
        if epochs >= 10:
            assert ms and abs(ms[0] / epochs - first) <= 1 / epochs, (epochs, ms)
