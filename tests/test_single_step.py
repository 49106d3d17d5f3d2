"""Single-step defenses (FGSM-RS, FreeAT), learning-rate schedules, the catastrophic-overfitting guard,
and the one loop shape (hooks, replays, defense state) that carries them."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sirobust.defenses import DEFENSES, InnerAttack, SIConfig, build_defense
from sirobust.defenses.at import AT
from sirobust.defenses.free import FreeAT
from sirobust.interrupts import RunInterrupted
from sirobust.io import read_jsonl
from sirobust.train import TrainConfig, fit, learning_rate

from conftest import TinyNet
from helpers import assert_same_weights, small_config

EPS = 0.1


def quiet(*_):
    pass


def batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_presets_resolve_to_each_methods_reference_settings():
    rs = TrainConfig(defense="fgsm-rs").resolved()
    assert (rs.attack_steps, rs.attack_random_start, rs.attack_mode, rs.lr_schedule, rs.overfit_check) == \
        (1, True, "train", "cyclic", True)
    assert rs.attack_alpha == pytest.approx(1.25 * rs.eps)
    free = TrainConfig(defense="free").resolved()
    assert (free.attack_steps, free.attack_random_start, free.overfit_check) == (1, False, True)
    assert free.attack_alpha == pytest.approx(free.eps)
    # the epoch budget is divided by the replays, so free costs about what the same preset of AT costs
    assert free.epochs == round(TrainConfig(defense="at").resolved().epochs / 8)
    assert TrainConfig(defense="free", defense_params={"m": 4}).resolved().epochs == round(30 / 4)
    at = TrainConfig(defense="at").resolved()
    assert (at.attack_steps, at.attack_mode, at.lr_schedule, at.overfit_check) == (10, "eval", "piecewise", False)
    # a flag wins over the preset
    assert TrainConfig(defense="fgsm-rs", attack_steps=2, lr_schedule="onecycle").resolved().lr_schedule == "onecycle"
    assert DEFENSES["fgsm-rs"] is type(build_defense("rfgsm-at"))


@pytest.mark.parametrize("defense", sorted(DEFENSES))
def test_a_resolved_config_resolves_to_itself(defense):
    """The runner resolves a config to name its run, then training resolves it again: FGSM-RS's own 1.25ε step
    once stopped that second pass ("step size larger than eps")."""
    for si in ((False, True) if defense not in ("he", "standard") else (False,)):  # neither takes SI
        once = TrainConfig(defense=defense, si=si, dataset="fashion-mnist-mini", model="cnn-small").resolved()
        assert once.resolved() == once
    with pytest.raises(ValueError, match="attack_alpha .* larger than eps"):  # a user's own big step still needs force
        TrainConfig(defense="fgsm-rs", attack_alpha=0.2, dataset="fashion-mnist-mini").resolved()


def test_fgsm_rs_is_one_step_of_1_25_eps_from_a_uniform_start():
    model = TinyNet().train()
    x, y = batch()
    x0 = x.clone()
    d = build_defense("fgsm-rs", attack=InnerAttack(eps=EPS, alpha=1.25 * EPS, steps=1, model_mode="train"))
    x_adv = d.make_adversarial(model, x, y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x, x0) and model.training
    # the same start, drawn from the same generator, and one signed step of 1.25ε on CE, projected
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
    start = torch.min(torch.max(x + (2 * u - 1) * EPS, x - EPS), x + EPS).clamp(0, 1)
    s = start.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(s), y, reduction="sum"), s)
    expected = torch.min(torch.max(start + 1.25 * EPS * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected)
    assert ((x_adv - x).abs().amax() <= EPS + 1e-7) and ((start - x).abs() > EPS / 2).any()


@pytest.mark.parametrize("si", [None, SIConfig()])
def test_free_replays_one_batch_with_a_persistent_delta(si):
    torch.manual_seed(0)
    model = TinyNet().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    d = FreeAT(attack=InnerAttack(eps=EPS, alpha=EPS, steps=1, random_start=False, model_mode="train"), si=si, m=3)
    x, y = batch()
    x0 = x.clone()
    deltas = []
    for _ in range(d.replays):
        loss, stats = d(model, x, y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert model.fc2.weight.grad.abs().sum() > 0
        d.after_backward()
        opt.step()
        deltas.append(d.delta.clone())
    assert torch.equal(x, x0)
    # δ starts at 0 and takes a signed step of ε per replay, inside the ball and [0, 1]
    assert (deltas[0].abs() > 0).any() and not torch.equal(deltas[0], deltas[1])
    for delta in deltas:
        assert delta.abs().max() <= EPS + 1e-7 and (x + delta).min() >= 0 and (x + delta).max() <= 1
    # the next minibatch starts from the δ the last one left (shorter batches use its first rows)
    x2, y2 = batch(1, n=5)
    d(model, x2, y2)
    assert torch.equal(d._live[0].detach(), deltas[-1][:5])
    state = d.state_dict()
    fresh = FreeAT(attack=d.attack, si=si, m=3)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.delta, d.delta)



def test_free_refuses_l2_naming_the_norm_and_the_allowed_one(tmp_path):
    """Its δ step is ε·sign(∇δ), the L∞ ascent: under L2 it would train against another threat model."""
    with pytest.raises(ValueError, match=r"free is defined for the Linf ball.*got norm L2"):
        FreeAT(attack=InnerAttack(eps=0.5, norm="L2"))
    # and a training run says so while its config is resolved, before any data is loaded
    with pytest.raises(ValueError, match=r"free .*Linf.*got norm L2"):
        TrainConfig(defense="free", norm="L2", out=str(tmp_path / "run")).resolved()
    assert FreeAT(attack=InnerAttack(eps=8 / 255, norm="Linf")).attack.threat.norm == "Linf"

def test_learning_rate_schedules():
    cfg = TrainConfig(epochs=10, lr=0.2, lr_schedule="cyclic", milestones=()).resolved()
    lrs = [learning_rate(cfg, e, b, 4) for e in range(10) for b in range(4)]
    assert lrs[0] == pytest.approx(0.2 * 0.25 / 5) and max(lrs) == pytest.approx(0.2)
    assert lrs.index(max(lrs)) == 5 * 4 - 1 and lrs[-1] == pytest.approx(0.0)
    one = TrainConfig(epochs=10, lr=0.2, lr_schedule="onecycle", milestones=()).resolved()
    lrs = [learning_rate(one, e, b, 4) for e in range(10) for b in range(4)]
    assert lrs.index(max(lrs)) == 4 * 4 - 1 and lrs[-1] == pytest.approx(0.0)
    # piecewise: the paper's milestones, exactly what MultiStepLR stepping once per epoch gives
    pw = TrainConfig(epochs=6, lr=0.1, milestones=(2, 4)).resolved()
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    for e in range(6):
        assert learning_rate(pw, e, 0, 3) == pytest.approx(opt.param_groups[0]["lr"])
        sched.step()


def _interrupt_at(monkeypatch, cls, epoch_batch):
    """SIGINT this process when the defense starts (epoch, batch): the run saves mid-epoch and stops."""
    seen = {"epoch": -1}
    start_epoch, start_batch = cls.start_epoch, cls.start_batch

    def on_epoch(self, epoch, epochs):
        seen["epoch"] = epoch
        start_epoch(self, epoch, epochs)

    def on_batch(self, index):
        if (seen["epoch"], index) == epoch_batch:
            os.kill(os.getpid(), signal.SIGINT)
        start_batch(self, index)

    monkeypatch.setattr(cls, "start_epoch", on_epoch)
    monkeypatch.setattr(cls, "start_batch", on_batch)


@pytest.mark.parametrize("defense,params,si", [("fgsm-rs", {}, False), ("free", {"m": 2}, True)])
def test_resume_mid_epoch_is_exact_for_replays_delta_state_and_cyclic_rates(tmp_path, monkeypatch, defense,
                                                                           params, si):
    kw = dict(defense=defense, defense_params=params, si=si, epochs=2, train_n=192, batch_size=64, val_n=32, attack_steps=None,
              val_steps=1, overfit_n=32)
    fit(small_config(tmp_path / "straight", **kw), log=quiet)
    _interrupt_at(monkeypatch, type(build_defense(defense, **params)), (1, 1))
    with pytest.raises(RunInterrupted):
        fit(small_config(tmp_path / "split", **kw), log=quiet)
    monkeypatch.undo()
    fit(small_config(tmp_path / "split", **kw), resume=True, log=quiet)
    assert_same_weights(tmp_path / "straight" / "model.safetensors", tmp_path / "split" / "model.safetensors")
    rows = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and all("overfit_pgd_acc" in r for r in rows)


def test_cyclic_runs_refuse_another_length_on_resume(tmp_path):
    fit(small_config(tmp_path, defense="fgsm-rs", epochs=1, train_n=64, val_n=16, overfit_n=16, attack_steps=None), log=quiet)
    with pytest.raises(ValueError, match="differs in: epochs"):
        fit(small_config(tmp_path, defense="fgsm-rs", epochs=2, train_n=64, val_n=16, overfit_n=16, attack_steps=None),
            resume=True, log=quiet)


class Sabotage(AT):
    """AT that, from the third epoch, trains on shifted labels: a forced collapse of its robust accuracy."""

    name = "sabotage"
    guard_overfitting = True

    def start_epoch(self, epoch, epochs):
        self.wrong = epoch >= 2

    def training_loss(self, model, x, x_adv, y, clean, adv):
        return F.cross_entropy(adv.logits, (y + 1) % 10 if self.wrong else y)


@pytest.mark.parametrize("early_stop", [True, pytest.param(False, marks=pytest.mark.slow)])  # False: 14 s
def test_the_guard_fires_on_a_collapse_and_early_stop_keeps_the_checkpoint_before_it(tmp_path, monkeypatch,
                                                                                    early_stop):
    monkeypatch.setitem(DEFENSES, "sabotage", Sabotage)
    cfg = small_config(tmp_path, defense="sabotage", epochs=4, train_n=384, val_n=64, overfit_n=64, lr=0.05,
                       early_stop=early_stop)
    summary = fit(cfg, log=quiet)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    collapse = [r["epoch"] for r in rows if r["overfit_collapse"]]
    assert collapse and collapse[0] == 3                       # fires at the sabotaged epoch, not before
    assert not any(r["overfit_collapse"] for r in rows[:2])
    best = json.loads((tmp_path / "summary.json").read_text())["best"]
    assert best["epoch"] <= 2
    if early_stop:
        assert [r["epoch"] for r in rows] == [1, 2, 3] and summary["stopped_early"]
        # Wong et al.: the run's weights are the epoch's before the collapse, also without a validation split
        assert summary["last"]["epoch"] == 2 and not summary["last"]["overfit_collapse"]
        from sirobust.checkpoint import read_metadata
        assert json.loads(read_metadata(tmp_path / "model.safetensors")["extra"])["epoch"] == 2
        # a resume has nothing to do
        again = fit(small_config(tmp_path, defense="sabotage", epochs=4, train_n=384, val_n=64, overfit_n=64,
                                 lr=0.05, early_stop=True), resume=True, log=quiet)
        assert again["stopped_early"] and len(read_jsonl(tmp_path / "metrics.jsonl")) == 3
    else:
        assert len(rows) == 4 and not summary["stopped_early"]


def test_a_healthy_run_never_triggers_the_guard(tmp_path):
    fit(small_config(tmp_path, defense="at", overfit_check=True, epochs=3, train_n=384, val_n=64, overfit_n=64),
        log=quiet)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(rows) == 3 and not any(r["overfit_collapse"] for r in rows)
