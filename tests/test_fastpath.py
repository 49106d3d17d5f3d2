"""The fast path (sirobust.fastpath): faster, never weaker, never touching the user's model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sirobust
import sirobust.attacks.loop as loop
from sirobust import PGD
from sirobust.fastpath import attack_model, frozen_parameters, resolve_precision, restore_deterministic, \
    set_deterministic
from sirobust.features import ModelOutput


@pytest.fixture(scope="module")
def data(fmnist_test):
    x, y = fmnist_test
    return x[:200], y[:200], torch.arange(200)


def assert_a_new_copy_follows(model, fast, x, old) -> None:
    """After the model's weights changed, the attack's copy is a new one that computes the new function."""
    again, _ = attack_model(model, fast, probe=x)
    assert again is not old
    with torch.no_grad():
        assert torch.allclose(again(fast.inputs(x)), model(x), atol=1e-4)


def robust(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


@pytest.mark.parametrize("loss", ["ce", "si"])
def test_fast_path_agrees_with_fp32_and_never_leaves_the_ball(trained_cnn, data, loss):
    x, y, keys = data
    x0 = x.clone()
    results = {}
    for precision in ("fp32", "fp32-fast", "bf16"):
        atk = PGD(trained_cnn, eps=0.05, steps=10, loss=loss, precision=precision)
        x_adv = atk(x, y, keys=keys)
        assert (x_adv - x).abs().max() <= 0.05 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        assert x_adv.is_contiguous() and x_adv.dtype == x.dtype
        results[precision] = robust(trained_cnn, x_adv, y)
        assert atk.ran_as["precision"] == precision
    assert torch.equal(x, x0)
    ref = results["fp32"]
    assert 0 < ref.sum() < len(y) - 20  # the attack breaks a good share, not everything
    # folding and channels_last change only the rounding: the same examples survive
    assert (results["fp32-fast"] != ref).sum() <= 1
    # bf16 autocast: robust accuracy within 0.5 points of fp32 (1 of 200), or lower
    assert results["bf16"].sum() <= ref.sum() + 1


def test_sync_free_loop_gives_the_same_points_as_checking_every_step(trained_cnn, data, monkeypatch):
    """The GPU form of the early-stop loop (frozen rows, host sync every few steps) returns exactly what
    the per-step form returns: a fooled example is kept at its first fooling iterate either way."""
    x, y, keys = data
    out = {}
    for every in (1, 3):
        monkeypatch.setitem(loop.SYNC_EVERY, "cpu", every)
        for precision in ("fp32", "bf16"):
            out[every, precision] = PGD(trained_cnn, eps=0.05, steps=7, precision=precision)(x, y, keys=keys)
    assert torch.equal(out[1, "fp32"], out[3, "fp32"])
    assert (robust(trained_cnn, out[3, "bf16"], y).sum() <= robust(trained_cnn, out[1, "fp32"], y).sum() + 1)


def test_a_nan_gradient_is_still_caught_when_checks_are_deferred(monkeypatch):
    monkeypatch.setitem(loop.SYNC_EVERY, "cpu", 4)

    class Sqrt(nn.Module):  # d/dx sqrt(x) at 0 is inf
        def forward(self, x):
            return torch.stack([x.flatten(1).sqrt().sum(1), -x.flatten(1).sum(1)], 1)

    x = torch.zeros(3, 1, 2, 2)
    with pytest.raises(loop.NonFiniteGradientError):
        PGD(Sqrt(), eps=0.1, steps=2, random_start=False, precision="fp32")(x, torch.zeros(3, dtype=torch.long))


def test_folded_copy_computes_the_same_function_and_leaves_the_model_alone(trained_cnn, data):
    x = data[0][:32]
    model = trained_cnn.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    fast = resolve_precision("fp32-fast", "cpu")
    copy, note = attack_model(model, fast, probe=x)
    assert copy is not model and "batch norm folded" in note
    assert not any(isinstance(m, nn.BatchNorm2d) for m in copy.modules())  # every BN was folded away
    assert not any(p.requires_grad for p in copy.parameters())  # input gradients only
    with torch.no_grad():
        assert torch.allclose(copy(fast.inputs(x)), model(x), atol=1e-4)
    assert attack_model(model, fast, probe=x)[0] is copy  # cached while the weights do not change
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.is_contiguous() for p in model.parameters())  # the user's model keeps its memory format
    with torch.no_grad():  # an in-place change of the weights makes a new copy
        model.head.bias.add_(1.0)
    try:
        assert_a_new_copy_follows(model, fast, x, copy)
    finally:
        with torch.no_grad():
            model.head.bias.sub_(1.0)


def _values_and_input_grads(model, x):
    xa = x.clone().requires_grad_(True)
    out = model(xa)
    finite = torch.nan_to_num(out, posinf=0.0, neginf=0.0)
    g, = torch.autograd.grad(finite.sum() + (finite * torch.linspace(-1, 1, out.shape[1])).pow(2).sum(), xa)
    return out.detach(), g


def test_pool_before_relu_and_the_identity_pool_change_no_bit(trained_cnn, data, monkeypatch):
    """The copy's graph passes (max-pool before ReLU; cnn-small's adaptive pool skipped at 28×28) are exact:
    the same logits and input gradients, bit for bit, as the folded copy without them; and the pool still
    pools an input of another size."""
    import sirobust.fastpath as fp
    body = trained_cnn.eval().body
    simplified = fp._fold(body)
    order = " ".join(type(simplified.get_submodule(n.target)).__name__ for n in simplified.graph.nodes
                     if n.op == "call_module")
    assert order.count("MaxPool2d ReLU") == 2 and "ReLU MaxPool2d" not in order  # cnn-small's two pools
    assert any(isinstance(m, fp._SameSizeIdentity) for m in simplified.modules())
    monkeypatch.setattr(fp, "_pool_before_relu", lambda *a: None)
    monkeypatch.setattr(fp, "_skip_identity_pools", lambda *a: None)
    plain = fp._fold(body)
    for x in (data[0][:48], torch.nn.functional.interpolate(data[0][:8], size=32)):  # 32×32: 5×5 pooled to 4×4
        for fmt in (torch.contiguous_format, torch.channels_last):
            a = _values_and_input_grads(simplified.to(memory_format=fmt), x.contiguous(memory_format=fmt))
            b = _values_and_input_grads(plain.to(memory_format=fmt), x.contiguous(memory_format=fmt))
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            assert a[1].abs().sum() > 0


class _Graph(nn.Module):
    """Small bodies whose in-place writes the graph passes must not disturb (each ``forward`` below)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv, self.id = nn.Conv2d(1, 4, 3), nn.Identity()
        self.relu, self.pool = nn.ReLU(inplace=True), nn.MaxPool2d(2)
        self.avg, self.after, self.clip = nn.AdaptiveAvgPool2d(4), nn.ReLU(inplace=True), nn.Hardtanh(inplace=True)
        self.padded, self.plain = nn.MaxPool2d(2, stride=1, padding=1, dilation=4), nn.ReLU()

    def forward(self, x):
        c = self.conv(x)
        if self.kind == "relu on a tensor read again":    # c is rectified in place, then read
            return self.pool(self.relu(c)).flatten(1) + c.amin((1, 2, 3))[:, None]
        if self.kind == "relu on an alias":                # the same through an Identity
            return self.pool(self.relu(self.id(c))).flatten(1) + c.amin((1, 2, 3))[:, None]
        if self.kind == "in-place op after the pool":      # a moved ReLU would keep what Hardtanh overwrites
            return self.clip(self.pool(self.relu(c))).flatten(1)
        if self.kind == "relu_ after the identity pool":   # the identity would hand sigmoid's output (which its
            return torch.relu_(self.avg(torch.sigmoid(self.pool(c)))).flatten(1)  # backward needs) to relu_
        if self.kind == "in-place relu behind a view":
            return self.after(self.avg(torch.sigmoid(self.pool(c))).flatten(1))
        return self.padded(self.plain(x))                   # "padded pool": a window of padding alone is -inf


@pytest.mark.parametrize("kind", ["relu on a tensor read again", "relu on an alias", "in-place op after the pool",
                                  "relu_ after the identity pool", "in-place relu behind a view", "padded pool"])
def test_the_graph_passes_leave_what_they_cannot_prove_alone(kind):
    """Where an in-place write could reach what the passes move, or a pool pads, the copy computes the model's
    values and input gradients exactly (the passes are not applied), and its backward runs."""
    import sirobust.fastpath as fp
    torch.manual_seed(0)
    model = _Graph(kind).eval()
    x = torch.randn(6, 1, 3, 3) if kind == "padded pool" else torch.randn(6, 1, 10, 10)
    folded = fp._fold(model)
    assert not any(isinstance(m, fp._SameSizeIdentity) for m in folded.modules())
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))
    a, b = _values_and_input_grads(folded, x), _values_and_input_grads(model, x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    if kind == "padded pool":
        assert torch.isinf(a[0]).any()  # the case it guards: -inf, which a ReLU moved after the pool makes 0


def test_models_that_cannot_be_folded_safely_are_attacked_as_given(trained_cnn, data):
    x = data[0][:8]
    fast = resolve_precision("fp32-fast", "cpu")
    trained_cnn.train()
    try:
        assert attack_model(trained_cnn, fast, probe=x) == (trained_cnn, "as given (train mode: batch norm is not "
                                                                          "an affine map)")
    finally:
        trained_cnn.eval()

    seen = []

    class Users(nn.Module):  # a user's model: folded where its structure shows it, never run with proxies
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.conv, self.bn, self.fc = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 24 * 24, 10)

        def forward(self, x):
            seen.append(type(x))
            h = self.bn(self.conv(self.block(x)))
            if h.mean() > 0:  # data-dependent control flow: torch.fx could not trace it anyway
                h = h.relu()
            return self.fc(h.flatten(1))

    model = Users().eval()
    with torch.no_grad():
        model.block[1].running_mean.uniform_(-1, 1)  # statistics a fold must carry over
    got, note = attack_model(model, fast, probe=x)
    assert got is not model and note == "private copy: batch norm folded, channels_last"
    assert set(seen) == {torch.Tensor}
    assert isinstance(got.block[1], nn.Identity) and isinstance(got.bn, nn.BatchNorm2d)  # attribute pairs stay
    with torch.no_grad():
        assert torch.allclose(got(fast.inputs(x)), model(x), atol=1e-4)
    handle = trained_cnn.head.register_forward_hook(lambda *_: None)
    try:
        assert attack_model(trained_cnn, fast, probe=x)[0] is trained_cnn  # hooks would be lost on a copy
    finally:
        handle.remove()


def test_losses_see_fp32_logits_under_autocast(trained_cnn, data):
    x = data[0][:4]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sirobust.forward_with_features(trained_cnn, x)
        raw = trained_cnn(x)
    assert raw.dtype == torch.bfloat16  # the model did run in bf16
    assert out.logits.dtype == torch.float32 and out.features.dtype == torch.float32
    assert ModelOutput(raw).logits.dtype == torch.float32


def test_frozen_parameters_restores_each_flag():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].weight.requires_grad_(False)
    with frozen_parameters(model):
        assert not any(p.requires_grad for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, True]


def test_trades_computes_the_clean_output_for_its_attack_once_per_batch(trained_cnn, data):
    """Not once per attack step (as the reference code does): 10 steps, 1 clean pass for the attack,
    then the training objective's clean and adversarial passes."""
    from sirobust.defenses import InnerAttack, build_defense
    calls = []
    handle = trained_cnn.body.register_forward_hook(lambda *_: calls.append(1))
    try:
        defense = build_defense("trades", attack=InnerAttack(eps=0.1, steps=10))
        defense(trained_cnn, data[0][:8], data[1][:8])
    finally:
        handle.remove()
    assert len(calls) == 10 + 1 + 2


def test_precision_names_are_checked_and_recorded(trained_cnn, fmnist_test):
    with pytest.raises(ValueError, match="precision"):
        PGD(trained_cnn, eps=0.1, precision="fp8")
    assert resolve_precision("auto", "cpu").precision == "fp32-fast"
    assert resolve_precision("auto", "cuda").precision == "bf16"
    assert resolve_precision("fp32", "cuda") == resolve_precision("fp32", "cpu")
    report = sirobust.evaluate(trained_cnn, fmnist_test, attacks=["pgd"], steps=2, n=16, progress=False,
                               precision="fp32")
    assert report.config["precision"] == "fp32"
    assert report.provenance["fast_path"]["precision"] == "fp32"
    assert report.attacks["pgd"].params["ran_as"]["model"] == "as given"


def test_deterministic_switches_and_restores_the_global_settings():
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
              torch.are_deterministic_algorithms_enabled())
    prev = set_deterministic(True)
    try:
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        restore_deterministic(prev)
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
            torch.are_deterministic_algorithms_enabled()) == before


def test_training_records_its_precision_and_old_runs_resume_as_fp32(tmp_path):
    from helpers import small_config
    from sirobust.train import NEWER_FIELDS, fit, recorded_config
    summary = fit(small_config(tmp_path / "run", epochs=1, precision="bf16"), log=lambda *_: None)
    assert summary["identity"]["precision"] == "bf16"
    assert summary["provenance"]["fast_path"]["autocast"] is True
    assert NEWER_FIELDS["precision"] == "fp32"  # a run recorded before the field existed ran plain fp32
    assert recorded_config(tmp_path / "run")["precision"] == "bf16"


def test_weights_changed_behind_autograds_back_make_a_new_copy(trained_cnn, data):
    x = data[0][:16]
    fast = resolve_precision("fp32-fast", "cpu")
    first, _ = attack_model(trained_cnn, fast, probe=x)
    trained_cnn.head.weight.data.mul_(-1)  # no version bump, same storage: the probe check sees it
    try:
        assert_a_new_copy_follows(trained_cnn, fast, x, first)
    finally:
        trained_cnn.head.weight.data.mul_(-1)


def test_a_head_given_as_a_module_is_found_in_the_private_copy(trained_cnn, data):
    x, y, keys = data[0][:32], data[1][:32], data[2][:32]
    fast = PGD(trained_cnn, eps=0.05, steps=3, loss="si", head=trained_cnn.head)(x, y, keys=keys)
    plain = PGD(trained_cnn, eps=0.05, steps=3, loss="si", head=trained_cnn.head, precision="fp32")(x, y, keys=keys)
    assert (robust(trained_cnn, fast, y) != robust(trained_cnn, plain, y)).sum() <= 1


def test_the_si_cosine_is_fp32_under_autocast(trained_cnn, data):
    from sirobust.losses import cosine_logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos = cosine_logits(sirobust.forward_with_features(trained_cnn, data[0][:4]))
    assert cos.dtype == torch.float32


def test_compile_is_applied_to_the_private_copy_and_to_the_training_model(trained_cnn, fmnist_test, tmp_path,
                                                                          monkeypatch):
    """--compile's plumbing (compiling for real takes minutes on a CPU): what torch.compile is given."""
    compiled = []

    def fake_compile(fn, **kw):
        compiled.append((getattr(fn, "__self__", fn), kw))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    sirobust.evaluate(trained_cnn, fmnist_test, attacks=["pgd"], steps=2, n=8, progress=False, compile=True)
    (target, kw), = compiled
    assert kw == {"dynamic": True} and target is not trained_cnn.body  # the copy's body, not the user's
    assert isinstance(target, nn.Module)
    compiled.clear()
    from helpers import small_config
    from sirobust.train import fit
    fit(small_config(tmp_path / "run", epochs=1, compile=True), log=lambda *_: None)
    assert len(compiled) == 1 and isinstance(compiled[0][0], nn.Module)


BF16_SETTINGS = {"apgd-ce": {"steps": 10}, "apgd-t": {"steps": 10, "n_targets": 2}, "square": {"queries": 100}}


@pytest.mark.slow  # 60 s; bf16 is the GPU path (the PGD loop's bf16 test stays in the default run)
@pytest.mark.parametrize("name", list(BF16_SETTINGS))
def test_under_bf16_each_stage_decides_near_the_boundary_in_fp32(trained_cnn, data, name):
    x, y, keys = data
    out = {}
    for precision in ("fp32", "bf16"):
        atk = sirobust.build_attack(name, trained_cnn, eps=0.05, precision=precision, **BF16_SETTINGS[name])
        out[precision] = robust(trained_cnn, atk(x, y, keys=keys), y)
        assert atk.ran_as["autocast"] is (precision == "bf16")
    assert out["bf16"].sum() <= out["fp32"].sum() + 1  # within 0.5 points of fp32 (1 of 200), or lower


def test_square_margins_under_bf16_take_their_sign_from_fp32(trained_cnn, data):
    from sirobust.attacks.loop import margin_checked
    from sirobust.losses import margin
    x, y, _ = data
    x = (x + 0.08 * torch.randn_like(x)).clamp(0, 1)  # some points near or past the boundary
    with torch.no_grad():
        exact = margin(trained_cnn(x), y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = trained_cnn(x)
            checked = margin_checked(trained_cnn, x, logits, y)
    rough = margin(logits.float(), y)
    assert (rough < 0.03 * logits.float().abs().amax(1)).sum() >= 5  # the fp32 path is taken on these points
    assert torch.equal(checked > 0, exact > 0)  # every sign is fp32's
    sure = checked == rough
    assert (rough[sure] > 0).all()  # only clearly positive bf16 margins are kept as they are


# each attack's own step count, as overrides: a `steps=` among the shared settings is dropped by both (SPSA ran its
# 100 iterations of 128 directions here: 9.3 s)
@pytest.mark.parametrize("name, settings", [("spsa", {"iterations": 2, "samples": 16}),
                                            ("fab-t", {"steps": 2, "n_targets": 1})])
def test_an_attack_that_never_autocasts_reports_fp32_arithmetic(trained_cnn, data, name, settings):
    atk = sirobust.build_attack(name, trained_cnn, overrides=settings, eps=0.05, precision="bf16")
    atk(data[0][:8], data[1][:8], keys=data[2][:8])
    assert atk.ran_as == {"precision": "fp32-fast", "autocast": False,
                          "model": "private copy: batch norm folded, channels_last"}


def test_the_inference_form_computes_the_copys_function_on_any_batch_size(trained_cnn, data):
    """Square's queries on a CPU run the private copy traced, frozen and optimised for inference: the same
    logits (float rounding aside) on a batch size it was not traced on; made once per copy."""
    from sirobust.fastpath import inference_copy
    x = data[0]
    copy, _ = attack_model(trained_cnn.eval(), resolve_precision("fp32-fast", "cpu"), probe=x[:8])
    frozen = inference_copy(copy, x[:8])
    assert isinstance(frozen, torch.jit.ScriptModule)
    assert inference_copy(copy, x[:8]) is frozen
    with torch.no_grad():
        assert torch.allclose(frozen(x[:37]), trained_cnn(x[:37]), atol=1e-4)


def test_the_inference_form_is_never_made_of_a_users_model_or_a_failed_trace(data):
    from sirobust import fastpath
    x = data[0][:8]

    class FixedBatch(nn.Module):  # int() of a size: the trace bakes in the batch size it saw
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(784, 10)

        def forward(self, z):
            return self.lin(z.reshape(int(z.shape[0]), -1))

    users = FixedBatch().eval()
    assert fastpath.inference_copy(users, x) is users          # not a private copy: never traced
    fastpath._PRIVATE.add(users)                               # as if it were one: its trace fails the probe
    assert fastpath.inference_copy(users, x) is users


def test_square_with_the_inference_form_breaks_what_the_copy_breaks(trained_cnn, data, monkeypatch):
    import sirobust.attacks.square as square
    x, y, keys = data
    robust_by = {}
    for form in ("inference", "copy"):
        if form == "copy":
            monkeypatch.setattr(square, "inference_copy", lambda model, probe: model)
        x_adv = sirobust.attacks.build_attack("square", trained_cnn, eps=0.05, queries=100)(x, y, keys=keys)
        assert (x_adv - x).abs().max() <= 0.05 + 1e-6
        robust_by[form] = robust(trained_cnn, x_adv, y)
    assert (robust_by["inference"] != robust_by["copy"]).sum() <= 1
    assert robust_by["copy"].sum() < (trained_cnn(x).argmax(1) == y).sum()  # Square breaks some points


def test_a_randomised_model_evaluates_alike_whether_or_not_its_copy_was_checked_before(data):
    """The check that a private copy reproduces the model runs two forwards on the first call only (then the
    verdict is cached): with a model that draws noise, that moved every later draw, so the first evaluation after
    torch.manual_seed differed from the second (26 against 24 of 64 robust). The check forks the generators."""
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

        def forward(self, x):
            return self.net((x + 0.3 * torch.randn_like(x)).clamp(0, 1))

    torch.manual_seed(0)
    model = Noisy().eval()
    x = data[0][:64]
    with torch.no_grad():
        y = model.net(x).argmax(1)
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        rep = sirobust.evaluate(model, (x, y), attacks=["pgd"], eps=0.02, steps=3, progress=False)
        runs.append((rep.worst_case_robust, torch.randn(1).item()))
    assert runs[0] == runs[1]
