"""Contract tests for the model zoo, run over every registered model (as timm does).

Big models (WRNs, ResNet-50) run on batch 2 at 32×32 only, to keep CPU time low.
"""
import pytest
import torch
import torch.nn.functional as F

from sirobust.models import ImageClassifier, Normalize, build_model, list_models, register_model
from sirobust.models.wide_resnet import WideResNet

MODELS = list_models()
BIG = {"wrn-34-10", "wrn-28-10", "resnet50"}
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]


def _sizes(name):
    """Input resolutions a model must accept: cnn-small is for 28×28 but must take 32×32 too."""
    return [28, 32] if name == "cnn-small" else [32]


def _batch(name):
    return 2 if name in BIG else 4


def _input(name, in_channels=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(_batch(name), in_channels, size, size, generator=g)


def _build(name, num_classes=10, in_channels=3, mean=None, std=None, seed=0):
    torch.manual_seed(seed)
    return build_model(name, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)


def test_registry_has_the_zoo():
    assert {"cnn-small", "resnet18", "resnet50", "preact-resnet18", "wrn-34-10", "wrn-28-10"} <= set(MODELS)
    assert MODELS == sorted(MODELS)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_shape_and_finite(name, num_classes, in_channels):
    model = _build(name, num_classes, in_channels).eval()
    assert isinstance(model, ImageClassifier)
    for size in _sizes(name):
        x = _input(name, in_channels, size)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (x.shape[0], num_classes)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_features_head_and_forward_agree(name):
    model = _build(name, num_classes=10).eval()
    assert model.head.in_features == model.feature_dim
    assert model.head.out_features == model.num_classes == 10
    x = _input(name)
    with torch.no_grad():
        z = model.features(x)
        assert z.shape == (x.shape[0], model.feature_dim)
        assert torch.equal(model(x), model.head(z))
        assert torch.equal(model.forward_features(x), z)
    assert model.get_classifier() is model.head


# the big models' backward passes take seconds each on a CPU: those run with the slow tests (make test-all)
BIG = {"resnet50", "wrn-34-10", "wrn-28-10"}
MODELS_FAST_BIG_SLOW = [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in MODELS]


@pytest.mark.parametrize("name", MODELS_FAST_BIG_SLOW)
def test_every_parameter_gets_a_gradient(name):
    model = _build(name, num_classes=10).train()
    x = _input(name)
    y = torch.arange(x.shape[0]) % 10
    F.cross_entropy(model(x), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", MODELS_FAST_BIG_SLOW)
def test_normalization_inside_model(name):
    in_channels = 1 if name == "cnn-small" else 3
    mean, std = ([0.2860], [0.3530]) if in_channels == 1 else (CIFAR_MEAN, CIFAR_STD)
    model = _build(name, in_channels=in_channels, mean=mean, std=std).eval()
    plain = _build(name, in_channels=in_channels, seed=1).eval()  # mean 0 / std 1, other init
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    assert set(missing) == {"normalize.mean", "normalize.std"} and not unexpected
    assert torch.equal(plain.normalize.mean, torch.zeros_like(plain.normalize.mean))
    assert torch.equal(plain.normalize.std, torch.ones_like(plain.normalize.std))

    x = _input(name, in_channels, _sizes(name)[0])
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain((x - m) / s), rtol=1e-5, atol=1e-5)


def test_normalize_module():
    norm = Normalize([0.5, 0.25], [0.5, 2.0])
    x = torch.rand(3, 2, 4, 4)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 2.0], dim=1)
    torch.testing.assert_close(norm(x), expected)
    assert {k for k, _ in norm.named_buffers()} == {"mean", "std"}
    assert not list(norm.parameters())


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        build_model("resnet19")
    msg = str(exc.value)
    assert "resnet19" in msg
    for name in MODELS:
        assert name in msg


@pytest.mark.parametrize("kwargs", [
    dict(num_classes=1), dict(num_classes=0), dict(in_channels=0),
    dict(mean=[0.5, 0.5]), dict(std=[0.2] * 4), dict(in_channels=1, mean=CIFAR_MEAN, std=CIFAR_STD),
    dict(std=[0.2, 0.0, 0.2]),
])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        build_model("cnn-small", **kwargs)


def test_register_twice_raises():
    with pytest.raises(ValueError):
        register_model("resnet18")(lambda **kw: None)


@pytest.mark.parametrize("depth,widen", [(33, 10), (4, 10), (28, 0)])
def test_wide_resnet_bad_config(depth, widen):
    with pytest.raises(ValueError):
        WideResNet(depth, widen)


# Reference counts (10 classes, 3 channels) of the CIFAR codes these follow.
PARAM_COUNTS = {
    "resnet18": 11.17e6, "preact-resnet18": 11.17e6, "resnet50": 23.52e6,
    "wrn-34-10": 46.16e6, "wrn-28-10": 36.48e6,
}


@pytest.mark.parametrize("name,expected", sorted(PARAM_COUNTS.items()))
def test_parameter_count(name, expected):
    n = sum(p.numel() for p in _build(name, num_classes=10).parameters())
    assert abs(n - expected) / expected < 0.02, f"{name}: {n} parameters, expected ≈ {expected:.0f}"


@pytest.mark.parametrize("name,dim", [("cnn-small", 128), ("resnet18", 512), ("preact-resnet18", 512),
                                      ("resnet50", 2048), ("wrn-34-10", 640), ("wrn-28-10", 640)])
def test_feature_dims(name, dim):
    assert _build(name).feature_dim == dim


def test_wrn_head_bias_starts_at_zero():
    model = _build("wrn-28-10")
    assert torch.equal(model.head.bias, torch.zeros(10))


def test_preact_variants_follow_their_reference_codes():
    """Wong et al.'s and Andriushchenko & Flammarion's PreActResNet-18 feed the projection shortcut the block's
    raw input; GradAlign's has no final BN-ReLU. Same parameter names (except that BN), different functions."""
    from sirobust.models import build_model
    from sirobust.models.preact_resnet import PreActBlock
    seen = {}

    def record(name):
        def hook(module, args, _out):
            seen.setdefault(name, []).append(args[0])
        return hook

    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    for name, raw, final_bn in (("preact-resnet18", False, True), ("preact-resnet18-wong", True, True),
                                ("preact-resnet18-gradalign", True, False)):
        model = build_model(name).eval()
        block = next(b for b in model.modules() if isinstance(b, PreActBlock) and b.shortcut is not None)
        seen.clear()
        block.register_forward_hook(record("block_in"))   # PreActBlock's input is args[0] of its forward
        block.shortcut.register_forward_hook(record("shortcut_in"))
        model(x)
        block_in, shortcut_in = seen["block_in"][0], seen["shortcut_in"][0]
        pre = torch.relu(block.bn1(block_in))
        assert torch.equal(shortcut_in, block_in if raw else pre), name
        assert (model.body.bn is not None) == final_bn, name
    keys = {n: set(build_model(n).state_dict()) for n in ("preact-resnet18", "preact-resnet18-wong")}
    assert keys["preact-resnet18"] == keys["preact-resnet18-wong"]
