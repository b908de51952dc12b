"""Guided Backprop applies its rule at every rectifier, and says "not applicable" where a network
has nonlinearities without one.

The reference is Captum's ``GuidedBackprop``, which guides ``nn.ReLU`` modules only: a ReLU6
network is rewritten as ``nn.ReLU`` followed by ``min(6)`` (the same function), where Captum's
rule at the ReLU and the plain gradient of the ``min`` give ``relu(g) * [0 < x < 6]``, our rule
at the ReLU6. A functional-ReLU network is compared with its ``nn.ReLU`` twin.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from captum.attr import GuidedBackprop, GuidedGradCam
from torch import nn

from saliency_audit.workers.engine.errors import NotApplicableError
from saliency_audit.workers.engine.methods import MethodContext, compute_methods
from saliency_audit.workers.engine.models.onnx_convert import load_onnx
from tests.engine.nets import images
from tests.engine.onnx_exports import export_module

RTOL = 1e-4


class _Net(nn.Module):
    """conv -> act -> conv -> act -> pool -> linear, the activation chosen by name."""

    def __init__(self, activation: str, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.activation = activation
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = self._module()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = self._module()
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():  # some activations above 6, so that ReLU6 saturates somewhere
            self.conv1.weight.mul_(4.0)

    def _module(self) -> nn.Module:
        return {
            "relu": nn.ReLU(),
            "relu6": nn.ReLU6(),
            "relu_min6": _ReluMin6(),
            "silu": nn.SiLU(),
            "gelu": nn.GELU(),
            "functional_relu": nn.Identity(),
        }[self.activation]

    def _act(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.activation == "functional_relu" else module(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(self.act1, self.conv1(x))
        x = self._act(self.act2, self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


class _ReluMin6(nn.Module):
    """ReLU6 written as nn.ReLU then min(6): what Captum can guide."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.relu(x), max=6.0)


def _twin(activation: str, twin_activation: str) -> tuple[nn.Module, nn.Module]:
    net, twin = _Net(activation).eval(), _Net(twin_activation).eval()
    twin.load_state_dict(net.state_dict())
    return net, twin


def _maps(model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: str | None = "conv2"):
    out = compute_methods(
        model, x, t, ["gradient", "guided_backprop", "guided_gradcam"], MethodContext(layer=layer)
    )
    return out


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Captum's "hooks ReLUs" notice
        yield


def test_guided_backprop_differs_from_the_gradient_on_a_relu6_network_and_matches_captum() -> None:
    net, twin = _twin("relu6", "relu_min6")
    x = images(3, 16, seed=1)
    t = torch.tensor([0, 2, 4])
    out = _maps(net, x, t)
    guided, gradient = out["guided_backprop"], out["gradient"]
    assert isinstance(guided, torch.Tensor) and isinstance(gradient, torch.Tensor)
    assert not torch.allclose(guided, gradient), "guided backprop fell back to the gradient"
    expected = GuidedBackprop(twin).attribute(x, target=t)
    torch.testing.assert_close(guided, expected, rtol=RTOL, atol=RTOL * float(expected.abs().max()))
    expected_gradcam = GuidedGradCam(twin, twin.conv2).attribute(
        x, target=t, interpolate_mode="bilinear"
    )
    torch.testing.assert_close(
        out["guided_gradcam"],
        expected_gradcam,
        rtol=RTOL,
        atol=RTOL * float(expected_gradcam.abs().max()),
    )


def test_guided_backprop_guides_functional_relu_calls() -> None:
    net, twin = _twin("functional_relu", "relu")
    x = images(2, 16, seed=2)
    t = torch.tensor([1, 3])
    guided = _maps(net, x, t)["guided_backprop"]
    expected = GuidedBackprop(twin).attribute(x, target=t)
    assert isinstance(guided, torch.Tensor)
    torch.testing.assert_close(guided, expected, rtol=RTOL, atol=RTOL * float(expected.abs().max()))


def test_guided_backprop_on_an_onnx_clip_graph_equals_the_relu6_network(tmp_path: Path) -> None:
    net = _Net("relu6").eval()
    data = export_module(net, torch.zeros(1, 3, 16, 16), exporter="legacy", opset=13)
    assert b"Clip" in data  # ReLU6 is exported as Clip(0, 6)
    converted = load_onnx(data).module
    x = images(3, 16, seed=4)
    t = torch.tensor([2, 0, 1])
    ours = _maps(converted, x, t, layer=None)["guided_backprop"]
    reference = _maps(net, x, t, layer=None)["guided_backprop"]
    gradient = _maps(converted, x, t, layer=None)["gradient"]
    assert isinstance(ours, torch.Tensor) and isinstance(reference, torch.Tensor)
    torch.testing.assert_close(ours, reference, rtol=1e-3, atol=1e-4 * float(reference.abs().max()))
    assert not torch.allclose(ours, gradient)


@pytest.mark.parametrize(("activation", "named"), [("silu", "SiLU"), ("gelu", "GELU")])
def test_guided_methods_are_not_applicable_where_an_activation_has_no_guided_rule(
    activation: str, named: str
) -> None:
    net = _Net(activation).eval()
    out = _maps(net, images(2, 16), torch.tensor([0, 1]))
    for name in ("guided_backprop", "guided_gradcam"):
        value = out[name]
        assert isinstance(value, NotApplicableError), name
        assert named in value.message and "rectifier" in value.message
    assert isinstance(out["gradient"], torch.Tensor)  # the other methods are unaffected


class _Gated(nn.Module):
    """A ReLU network with a squeeze-excitation gate (sigmoid times features)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.squeeze = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv(x))
        gate = torch.sigmoid(self.squeeze(x.mean(dim=(2, 3))))[:, :, None, None]
        return self.fc((x * gate).mean(dim=(2, 3)))


def test_a_sigmoid_gate_in_a_relu_network_makes_guided_backprop_not_applicable() -> None:
    out = _maps(_Gated().eval(), images(2, 8), torch.tensor([0, 1]), layer=None)
    value = out["guided_backprop"]
    assert isinstance(value, NotApplicableError)
    assert "Sigmoid" in value.message and "product of two activations" in value.message


def test_leaky_relu_gets_the_guided_rule_clamped_gradient_then_its_own_slope() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    head = nn.Linear(3, 2)
    model = nn.Sequential(nn.Flatten(), linear, nn.LeakyReLU(0.1), head).eval()
    x = torch.randn(1, 1, 2, 2)
    out = compute_methods(model, x, torch.tensor([1]), ["guided_backprop"], MethodContext())
    with torch.no_grad():
        pre = linear(x.flatten(1))[0]
    arriving = F.relu(head.weight[1])  # gradient at the activation's output, clamped
    slope = torch.where(pre > 0, 1.0, 0.1)
    expected = (arriving * slope) @ linear.weight
    torch.testing.assert_close(out["guided_backprop"].flatten(), expected, rtol=1e-5, atol=1e-6)
