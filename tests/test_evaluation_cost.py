"""The cost an evaluation logs before it starts (sirobust.evaluation_cost): each attack's count of forward
passes per example (Attack.forward_passes, a backward counted as two) bounds what it really runs, and is
not loose: the passes are counted on the model with hooks, every example taking every step."""
import pytest
import torch

from sirobust import evaluate
from sirobust.attacks import build_attack
from sirobust.evaluation_cost import cost_line

# FAB at its default steps (a per-step pass left out shows only with many steps: 24 % under at 100, once);
# not SI-PGD or APGD-SI: their backward starts at the features, past the hook on the model's top
SMALL = {"pgd": dict(steps=5), "apgd-ce": dict(steps=5), "apgd-t": dict(steps=5), "fab": dict(),
         "fab-t": dict(steps=50), "square": dict(queries=40), "spsa": dict(samples=4, iterations=5),
         "rays": dict(queries=40), "rfgsm": dict(steps=3), "apgd-t1": dict(steps=10, n_targets=1),
         "aa": dict(stage_params={"apgd-ce": {"steps": 5}, "apgd-t": {"steps": 5}, "fab-t": {"steps": 5},
                                  "square": {"queries": 40}})}


def counted(model):
    """Forward passes per example so far: forwards, and backwards through the model counted as two each."""
    spent = {"f": 0, "b": 0}
    model.register_forward_hook(lambda m, i, o: spent.__setitem__("f", spent["f"] + i[0].shape[0]))
    model.register_full_backward_hook(lambda m, gi, go: spent.__setitem__("b", spent["b"] + go[0].shape[0]))
    return spent


@pytest.mark.parametrize("name", list(SMALL))
def test_each_attacks_count_of_forward_passes_bounds_what_it_runs(tiny_net, image_batch, name):
    x, _ = image_batch
    with torch.no_grad():
        y = tiny_net(x).argmax(1)  # every example correct, so every one is attacked
    spent = counted(tiny_net)
    # ε this small fools no example: every one takes every step of every restart (of every stage)
    atk = build_attack(name.rstrip("1"), tiny_net, eps=1e-4, overrides=SMALL[name], precision="fp32", restarts=2,
                       seed=0)
    spent.update(f=0, b=0)
    atk(x, y)
    per_example = (spent["f"] + 2 * spent["b"]) / len(y)
    bound = atk.forward_passes(10)
    assert per_example <= bound <= 1.3 * per_example, (per_example, bound)


def test_the_count_follows_the_settings_and_the_classes(tiny_net):
    pgd = build_attack("pgd", tiny_net, eps=0.1, steps=7, restarts=3)
    assert pgd.forward_passes(10) == 3 * (3 * 7 + 2) + 2
    apgd_t = build_attack("apgd-t", tiny_net, eps=0.1)
    per_target = (apgd_t.forward_passes(10) - 1) / 9  # targets: at most K − 1, + the pass that orders them
    assert apgd_t.forward_passes(4) == 3 * per_target + 1
    aa = build_attack("aa", tiny_net, eps=0.1)
    assert aa.forward_passes(10) == 1 + sum(a.forward_passes(10) + 1 for _, a in aa.stages)
    # with 3 classes the targeted DLR stages do not run, and are not counted
    assert aa.forward_passes(3) < aa.forward_passes(10) - apgd_t.forward_passes(3)
    spsa = build_attack("spsa", tiny_net, eps=0.1, overrides={"samples": 8, "iterations": 10})
    assert spsa.forward_passes(10) == (2 * 8 + 1) * 10 + 4


def test_the_evaluation_logs_the_bound_before_the_attacks(tiny_net, image_batch):
    x, _ = image_batch
    with torch.no_grad():
        y = tiny_net(x).argmax(1)
    y[:3] = (y[:3] + 1) % 10  # 5 of 8 correct: only those are attacked
    lines = []
    evaluate(tiny_net, (x, y), attacks=["pgd", ("mine", lambda xx, yy: xx)], eps=0.1, steps=4, progress=False,
             log=lines.append)
    cost = [line for line in lines if line.startswith("cost: at most about")]
    assert len(cost) == 1 and lines.index(cost[0]) == 0  # before the first attack's line
    assert "on 5 examples" in cost[0] and "pgd 16" in cost[0] and "not counted: mine" in cost[0]
    line = cost_line(tiny_net, [], x, 5, 10, torch.device("cpu"))
    assert line is None  # nothing to attack, nothing said


def test_the_forward_pass_is_timed_in_the_attacks_precision(tiny_net, image_batch):
    """bf16 attacks make a forward pass several times cheaper on a GPU: the bound is timed under their autocast
    (checked here on the CPU's autocast, which the same context manager turns on)."""
    from sirobust.evaluation_cost import forward_seconds
    from sirobust.fastpath import resolve_precision
    x, _ = image_batch
    seen = []
    hook = tiny_net.register_forward_pre_hook(lambda _m, _i: seen.append(torch.is_autocast_enabled("cpu")))
    try:
        forward_seconds(tiny_net, x, torch.device("cpu"), resolve_precision("bf16", "cpu"))
        forward_seconds(tiny_net, x, torch.device("cpu"), resolve_precision("fp32", "cpu"))
    finally:
        hook.remove()
    assert seen == [True, True, False, False]
