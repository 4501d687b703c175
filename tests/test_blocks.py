"""Network blocks and SmallCNN: shapes, padding, and the max-norm constraints."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightrainer.modules.blocks import (
    Conv,
    Conv2dWithConstraint,
    ConvWithConstraint,
    DWConvWithConstraint,
    LinearWithConstraint,
    SeparableConv,
    apply_constraints_,
    autopad,
)
from lightrainer.modules.nets import SmallCNN


def unit_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output unit's weights, in float64."""
    return weight.detach().double().flatten(1).norm(dim=1)


@pytest.mark.parametrize("k,d,expected", [(1, 1, 0), (3, 1, 1), (5, 1, 2), (3, 2, 2), ((3, 5), 1, [1, 2])])
def test_autopad(k, d, expected):
    assert autopad(k, None, d) == expected
    assert autopad(k, 4, d) == 4


def test_conv_keeps_size_and_applies_bn_and_silu():
    torch.manual_seed(0)
    block = Conv(3, 8, 3).eval()
    x = torch.randn(2, 3, 9, 7)
    y = block(x)
    assert y.shape == (2, 8, 9, 7)
    bn = block.bn
    z = block.conv(x)
    ref = (z - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps)
    ref = ref * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    torch.testing.assert_close(y, ref * torch.sigmoid(ref))
    assert Conv(3, 8, 3, s=2)(x).shape == (2, 8, 5, 4)
    assert isinstance(Conv(3, 8, act=False).act, nn.Identity)
    assert isinstance(Conv(3, 8, act=nn.ReLU()).act, nn.ReLU)


@pytest.mark.parametrize("layer", [
    Conv2dWithConstraint(2, 6, 3, max_norm=0.5),
    LinearWithConstraint(10, 4, max_norm=0.5),
])
def test_constrained_layers_project_weights_onto_the_max_norm_ball(layer):
    assert isinstance(layer, (nn.Conv2d, nn.Linear))  # quantization swaps them as plain layers
    with torch.no_grad():
        layer.weight.mul_(10)
        layer.weight[0].mul_(1e-3)  # one unit stays inside the ball and must be left untouched
    before = layer.weight.detach().clone()
    norms = unit_norms(before)
    assert (norms[1:] > 0.5).all() and norms[0] < 0.5
    x = torch.randn(3, 2, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(3, 10)
    out = layer(x)
    after = unit_norms(layer.weight)
    torch.testing.assert_close(after[1:], torch.full_like(after[1:], 0.5))
    torch.testing.assert_close(layer.weight[0], before[0])
    # Projection keeps directions: w * max_norm / ||w|| (independent formula, float64).
    expected = before.double().flatten(1)[1:] * (0.5 / norms[1:, None])
    torch.testing.assert_close(layer.weight.detach().double().flatten(1)[1:], expected, rtol=1e-5, atol=1e-6)
    # The forward pass used the projected weights.
    reference = nn.functional.conv2d(x, layer.weight, layer.bias, padding=layer.padding) \
        if isinstance(layer, nn.Conv2d) else nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(out, reference)


def test_constraint_holds_after_optimizer_steps():
    torch.manual_seed(0)
    layer = LinearWithConstraint(8, 3, max_norm=0.25)
    opt = torch.optim.SGD(layer.parameters(), lr=5.0)
    for _ in range(3):
        loss = layer(torch.randn(16, 8)).pow(2).sum().neg()  # pushes weights outwards
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer(torch.randn(1, 8))
    assert (unit_norms(layer.weight) <= 0.25 + 1e-6).all()


def test_conv_with_constraint_and_depthwise():
    block = ConvWithConstraint(4, 8, 3, max_norm=1.0)
    with torch.no_grad():
        block.conv.weight.mul_(100)
    assert block(torch.randn(2, 4, 6, 6)).shape == (2, 8, 6, 6)
    assert (unit_norms(block.conv.weight) <= 1.0 + 1e-6).all()
    # EEGNet spatial filter: (channels, 1) kernel, no padding, groups = gcd(c1, c2).
    dw = DWConvWithConstraint(4, 8, max_norm=1.0, k=(22, 1))
    assert dw.conv.groups == math.gcd(4, 8) == 4
    assert dw(torch.randn(2, 4, 22, 50)).shape == (2, 8, 1, 50)


def test_separable_conv():
    block = SeparableConv(4, 6, 3, s=2)
    assert block.dw.groups == 4 and block.pw.kernel_size == (1, 1)
    assert block(torch.randn(2, 4, 8, 8)).shape == (2, 6, 4, 4)  # stride applied once


@pytest.mark.parametrize("size,channels", [(28, 1), (8, 1), (32, 3)])
def test_small_cnn_shapes(size, channels):
    net = SmallCNN(num_classes=7, in_channels=channels, width=8)
    assert net(torch.randn(3, channels, size, size)).shape == (3, 7)
    net.eval()
    assert net(torch.randn(1, channels, size, size)).shape == (1, 7)


def test_apply_constraints_before_export_and_no_renorm_in_the_graph():
    model = nn.Sequential(ConvWithConstraint(2, 4, 3, max_norm=0.1), nn.Flatten(), LinearWithConstraint(64, 3, max_norm=0.2))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(50)
    assert apply_constraints_(model) == 2
    assert (unit_norms(model[0].conv.weight) <= 0.1 + 1e-6).all()
    assert (unit_norms(model[2].weight) <= 0.2 + 1e-6).all()
    model.eval()
    x = torch.randn(2, 2, 4, 4)
    traced = torch.jit.trace(model, x)  # its check re-runs the eager model: they must agree
    assert "renorm" not in str(traced.graph)
    torch.testing.assert_close(traced(x), model(x))


class NonNegativeLinear(nn.Linear):
    """A user's own constraint, weights >= 0, kept by projection (the Constrained protocol)."""

    def apply_constraint_(self) -> None:
        with torch.no_grad():
            self.weight.clamp_(min=0)


def test_export_projects_any_constrained_layer_through_the_protocol(tmp_path):
    pytest.importorskip("onnxruntime")
    from onnx import load, numpy_helper

    from lightrainer.constraints import Constrained
    from lightrainer.export import export_onnx

    assert isinstance(Conv2dWithConstraint(1, 1, 1), Constrained) and isinstance(NonNegativeLinear(1, 1), Constrained)
    torch.manual_seed(0)
    net = nn.Sequential(NonNegativeLinear(4, 3))
    assert (net[0].weight < 0).any()
    x = torch.randn(5, 4)
    path = export_onnx(net, x, tmp_path / "nonneg.onnx", verify=[x])
    (w,) = [numpy_helper.to_array(t) for t in load(str(path)).graph.initializer if len(t.dims) == 2]
    assert (w >= 0).all() and (w == 0).any()  # projected before tracing: the file holds the clamped weights
