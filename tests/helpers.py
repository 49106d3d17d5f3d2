"""Small helpers shared by the test modules (imported as ``helpers``; pytest puts tests/ on sys.path)."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from sirobust.train import TrainConfig


def small_config(out, **kw) -> TrainConfig:
    """A training run that takes a second or two on a CPU: AT on 384 bundled images."""
    base = dict(dataset="fashion-mnist-mini", model="cnn-small", defense="at", epochs=2, train_n=384, val_n=64,
                val_steps=2, attack_steps=2, batch_size=64, out=str(out), progress=False)
    return TrainConfig(**{**base, **kw})


def tensors(path) -> dict:
    return load_file(str(path))


def assert_same_weights(a, b) -> None:
    """Two weights files hold the same tensors, bit for bit."""
    wa, wb = tensors(a), tensors(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# Budgets that keep every registered attack to a second or two on a CPU (tests only: the
# defaults are the papers' and stay untouched). An attack missing here must be cheap by default.
CHEAP = {"apgd-ce": {"steps": 8}, "apgd-dlr": {"steps": 8}, "apgd-si": {"steps": 8},
         "apgd-t": {"steps": 5, "n_targets": 2}, "fab": {"steps": 5}, "fab-t": {"steps": 5, "n_targets": 2},
         "square": {"queries": 30}, "spsa": {"samples": 8, "iterations": 5}, "rays": {"queries": 60}}
CHEAP_BY_DEFAULT = {"pgd", "pgd-cw", "pgd-dlr", "si-pgd", "fgsm", "fgsm-rs", "rfgsm"}


def cheap_attack(name, model, budgets=None, **kw):
    """``build_attack(name, model, **kw)`` with a small budget; ensembles get small stages."""
    from sirobust.attacks import AutoAttack, build_attack
    budgets = {**CHEAP, **(budgets or {})}
    if name.startswith("aa"):
        version = {"aa": "standard", "aa-plus": "plus", "aa-rand": "rand", "aa-si": "si"}[name]
        stages = AutoAttack(model, eps=kw.get("eps", 0.1), norm=kw.get("norm", "Linf"), version=version).stage_names
        params = {k: budgets[k] for k in stages if k in budgets}
        if version == "rand":
            params = {k: {**v, "eot_iter": 2} for k, v in params.items()}
        return build_attack(name, model, overrides={"stage_params": params}, **kw)
    assert name in budgets or name in CHEAP_BY_DEFAULT, f"give {name} a cheap budget in tests/helpers.py"
    return build_attack(name, model, overrides=budgets.get(name), **kw)
