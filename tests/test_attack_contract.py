"""The contract every registered attack keeps (timm's registry-wide contract tests; advertorch's
"the input is never mutated"): its points lie in the ε-ball and in [0, 1], the caller's tensors and
model (weights, buffers, train/eval mode) are left as they were, a norm it does not support is refused
with a ValueError that says so, and the same seed gives the same points, bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sirobust.attacks import list_attacks

from helpers import cheap_attack

EPS = {"Linf": 0.1, "L2": 1.0}
# a contract, not a strength test: cheap_attack with budgets smaller still (a few seconds for the registry)
TINY = {"apgd-ce": {"steps": 2}, "apgd-dlr": {"steps": 2}, "apgd-si": {"steps": 2},
        "apgd-t": {"steps": 2, "n_targets": 2}, "fab": {"steps": 2}, "fab-t": {"steps": 2, "n_targets": 2},
        "square": {"queries": 10}, "spsa": {"samples": 4, "iterations": 2}, "rays": {"queries": 20}}
REFUSES = {("rays", "L2"): "norm must be 'Linf' for rays", ("rfgsm", "L2"): "L∞ attack; use norm='Linf'"}
TOL = 1e-6  # float32 rounding of ‖δ‖, as evaluate() allows


class Net(nn.Module):
    """10 classes from 1×12×12 images, with a BatchNorm and a Dropout so that train and eval mode differ,
    and a linear head for the SI attacks."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 32), nn.ReLU(),
                                      nn.Dropout(0.1))
            self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture
def setup():
    model = Net().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 12, 12, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)                  # correctly classified: every example is attacked ...
    y[-2:] = (y[-2:] + 1) % 10                  # ... but two, which early stop must leave alone
    return model, x, y


def _attack(name, model, norm):
    return cheap_attack(name, model, TINY, eps=EPS.get(norm, 0.1), norm=norm, steps=2, seed=1)


def _distance(x_adv, x, norm):
    d = (x_adv - x).flatten(1)
    return d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)


def test_the_contract_runs_over_the_whole_registry():
    # the presets no other test holds to the contract are registered, hence checked below
    assert {"fgsm", "fgsm-rs", "rfgsm", "aa-plus", "aa-rand"} <= set(list_attacks())
    assert {name for name, _ in REFUSES} <= set(list_attacks())


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("name", list_attacks())
def test_attack_contract(setup, name, norm):
    model, x, y = setup
    eps = EPS[norm]
    if (name, norm) in REFUSES:
        with pytest.raises(ValueError, match=REFUSES[name, norm]):
            _attack(name, model, norm)
        return
    outputs = []
    for mode in ("train", "eval"):
        model.train(mode == "train")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        x0, y0 = x.clone(), y.clone()
        x_adv = _attack(name, model, norm)(x, y)
        assert torch.equal(x, x0) and torch.equal(y, y0), "the input was mutated"
        assert all(m.training == (mode == "train") for m in model.modules()), "the model's mode was not restored"
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "weights or buffers changed"
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (_distance(x_adv, x, norm) <= eps + TOL).all()
        assert torch.equal(x_adv[-2:], x[-2:]), "an example misclassified as given was attacked"
        outputs.append(x_adv)
    # a fresh attack with the same seed gives the same points (it runs the model in eval mode whatever
    # mode the model was handed over in)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("name", list_attacks())
def test_an_unknown_norm_is_refused_by_name(setup, name):
    with pytest.raises(ValueError, match="norm"):
        _attack(name, setup[0], "L1")
