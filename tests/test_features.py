"""Feature access for zoo and foreign models, and the α·(Wz+b)+c check."""
import pytest
import torch
from torch import nn

from sirobust.features import FeatureAccessError, forward_with_features, find_head
from sirobust.losses import get_loss
from sirobust.models import ScaledLogits, build_model


def test_zoo_model_features_are_direct():
    model = build_model("cnn-small", num_classes=10, in_channels=1).eval()
    x = torch.rand(3, 1, 28, 28)
    out = forward_with_features(model, x)
    assert out.features.shape == (3, model.feature_dim)
    assert out.weight is model.head.weight
    torch.testing.assert_close(out.logits, out.features @ out.weight.t() + out.bias)


def test_foreign_model_features_come_from_the_last_linear(tiny_net):
    x = torch.rand(4, 1, 12, 12)
    out = forward_with_features(tiny_net, x)
    assert out.features.shape == (4, 32)
    assert out.weight is tiny_net.fc2.weight
    torch.testing.assert_close(out.logits, tiny_net(x))
    torch.testing.assert_close(out.logits, out.features @ out.weight.t() + out.bias)


@pytest.mark.parametrize("alpha", [1e-3, 1.0, 1e3])
def test_rescaled_wrapper_keeps_working_and_cosines_are_unchanged(tiny_net, alpha):
    x = torch.rand(4, 1, 12, 12)
    y = torch.tensor([0, 1, 2, 3])
    base = get_loss("si")(forward_with_features(tiny_net, x), y)
    scaled = get_loss("si")(forward_with_features(ScaledLogits(tiny_net, alpha), x), y)
    torch.testing.assert_close(scaled, base)


def test_output_that_is_not_a_positive_rescaling_is_refused(tiny_net):
    class Negated(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return -self.m(x)

    class Squared(Negated):
        def forward(self, x):
            return self.m(x) ** 2

    for bad in (Negated(tiny_net), Squared(tiny_net)):
        with pytest.raises(FeatureAccessError, match="not a positive multiple"):
            forward_with_features(bad, torch.rand(4, 1, 12, 12))


def test_model_without_linear_layer_is_refused():
    conv_only = nn.Sequential(nn.Conv2d(1, 10, 12), nn.Flatten())
    with pytest.raises(FeatureAccessError, match="no nn.Linear"):
        forward_with_features(conv_only, torch.rand(2, 1, 12, 12))


def test_a_named_head_is_used_and_a_wrong_name_lists_the_linear_layers(tiny_net):
    name, mod = find_head(tiny_net, "fc2")
    assert mod is tiny_net.fc2
    with pytest.raises(FeatureAccessError, match=r"fc1.*fc2"):
        find_head(tiny_net, "classifier")
    # naming the *inner* linear as head fails the affine check: its output is not the logits
    with pytest.raises(FeatureAccessError):
        forward_with_features(tiny_net, torch.rand(2, 1, 12, 12), head="fc1")


def test_gradient_flows_to_the_input_through_captured_features(tiny_net):
    x = torch.rand(2, 1, 12, 12, requires_grad=True)
    loss = get_loss("si")(forward_with_features(tiny_net, x), torch.tensor([1, 2])).sum()
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
