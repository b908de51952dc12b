"""Relevance-CAM (Lee et al., CVPR 2021) against the paper's formula computed by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saliency_audit.workers.engine.errors import NotApplicableError, SpecError
from saliency_audit.workers.engine.methods import lrp
from saliency_audit.workers.engine.methods.base import MethodContext, compute_methods, resolve_layer
from saliency_audit.workers.engine.models.onnx_convert import load_onnx
from tests.engine.nets import images, small_cnn, tiny_mlp, torchvision_model
from tests.engine.onnx_exports import export_class_token_net
from tests.engine.test_lrp import (  # one_intra_op_thread: autouse fixture, applies here too
    one_intra_op_thread,  # noqa: F401
    small_cnn_onnx_with_batchnorm,
)


class TinyConvNet(nn.Module):
    """conv-BN-ReLU-conv(stride 2)-ReLU-avgpool-linear, 6x6 inputs: small enough to do by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Conv2d(3, 4, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def tiny_conv_net() -> TinyConvNet:
    torch.manual_seed(3)
    net = TinyConvNet()
    values = {
        "features.1.running_mean": [0.1, -0.2, 0.05],
        "features.1.running_var": [0.8, 1.3, 1.1],
        "features.1.weight": [1.2, 0.7, 0.9],
        "features.1.bias": [0.05, -0.1, 0.2],
        # Biases of both signs, so the b+ term of the z+ rule is exercised.
        "features.3.bias": [0.3, -0.2, 0.1, -0.05],
        "fc.bias": [0.2, -0.3, 0.1],
    }
    state = net.state_dict()  # shares storage with the model
    with torch.no_grad():
        for key, value in values.items():
            state[key].copy_(torch.tensor(value))
    return net.eval()


def conv2d_forward(a: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """(C, H, W) input, (K, C, 3, 3) weights, padding 1."""
    padded = np.pad(a, ((0, 0), (1, 1), (1, 1)))
    out_h = (a.shape[1] + 2 - 3) // stride + 1
    out_w = (a.shape[2] + 2 - 3) // stride + 1
    z = np.zeros((w.shape[0], out_h, out_w))
    for k in range(w.shape[0]):
        for i in range(out_h):
            for j in range(out_w):
                patch = padded[:, i * stride : i * stride + 3, j * stride : j * stride + 3]
                z[k, i, j] = (patch * w[k]).sum() + b[k]
    return z


def conv2d_z_plus(
    a: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, r_out: np.ndarray
) -> np.ndarray:
    """z+ rule with the bias: R_i = sum_k a_i w_ik^+ / (sum_i' a_i' w_i'k^+ + b_k^+) R_k.

    Inputs are post-ReLU (a >= 0), the setting of Montavon et al. 2017's z+ rule.
    """
    assert (a >= 0).all()
    padded = np.pad(a, ((0, 0), (1, 1), (1, 1)))
    r_in = np.zeros_like(padded)
    w_plus = np.clip(w, 0, None)
    for k in range(w.shape[0]):
        for i in range(r_out.shape[1]):
            for j in range(r_out.shape[2]):
                rows = slice(i * stride, i * stride + 3)
                cols = slice(j * stride, j * stride + 3)
                contributions = padded[:, rows, cols] * w_plus[k]
                denominator = contributions.sum() + max(b[k], 0.0)
                if denominator > 0:  # else nothing contributes and no relevance flows
                    r_in[:, rows, cols] += contributions / denominator * r_out[k, i, j]
    return r_in[:, 1:-1, 1:-1]


def relevance_cam_by_hand(net: TinyConvNet, x: np.ndarray, target: int, layer: str) -> np.ndarray:
    """The paper's Relevance-CAM for one image, every LRP step written out."""
    params = {k: v.detach().double().numpy() for k, v in net.state_dict().items()}
    conv1_w, conv1_b = params["features.0.weight"], params["features.0.bias"]
    scale = params["features.1.weight"] / np.sqrt(params["features.1.running_var"] + 1e-5)
    shift = params["features.1.bias"] - params["features.1.running_mean"] * scale
    conv2_w, conv2_b = params["features.3.weight"], params["features.3.bias"]
    fc_w, fc_b = params["fc.weight"], params["fc.bias"]

    z1 = conv2d_forward(x, conv1_w, conv1_b, stride=1)  # conv1 output (6x6)
    a1 = np.maximum(z1 * scale[:, None, None] + shift[:, None, None], 0)
    z2 = conv2d_forward(a1, conv2_w, conv2_b, stride=2)  # conv2 output (3x3)
    a2 = np.maximum(z2, 0)
    pooled = a2.mean(axis=(1, 2))
    logits = fc_w @ pooled + fc_b

    # Contrastive initial relevance of the official code: 1 at the target, -1/C elsewhere.
    r_logits = np.full_like(logits, -1.0 / logits.size)
    r_logits[target] = 1.0
    # Dense layer, z+ with the bias (pooled >= 0).
    fc_plus = np.clip(fc_w, 0, None)
    denominators = fc_plus @ pooled + np.clip(fc_b, 0, None)
    r_pooled = pooled * (fc_plus.T @ (r_logits / denominators))
    # Average pooling: in proportion to each position's share of the sum.
    totals = a2.sum(axis=(1, 2), keepdims=True)
    shares = np.divide(a2, totals, out=np.zeros_like(a2), where=totals > 0)
    r_a2 = shares * r_pooled[:, None, None]
    r_z2 = r_a2  # ReLU passes relevance through
    if layer == "features.3":
        activation, relevance = z2, r_z2
    else:
        r_a1 = conv2d_z_plus(a1, conv2_w, conv2_b, stride=2, r_out=r_z2)
        # ReLU and the (unmerged) BatchNorm pass relevance through to conv1's output.
        activation, relevance = z1, r_a1
    alpha = relevance.mean(axis=(1, 2))
    cam = np.maximum((alpha[:, None, None] * activation).sum(axis=0), 0)
    upsampled = F.interpolate(
        torch.from_numpy(cam)[None, None], size=x.shape[1:], mode="bilinear", align_corners=False
    )
    return upsampled[0, 0].numpy()


@pytest.mark.parametrize("layer", ["features.3", "features.0"])
def test_relevance_cam_matches_the_papers_formula_computed_by_hand(layer: str) -> None:
    net = tiny_conv_net()
    x = images(3, size=6, channels=2, seed=4)
    target = torch.tensor([0, 2, 1])

    maps = lrp.relevance_cam(net, x, target, layer)

    expected = np.stack(
        [relevance_cam_by_hand(net, x[n].double().numpy(), int(target[n]), layer) for n in range(3)]
    )
    assert maps.shape == (3, 1, 6, 6)
    assert maps.dtype == torch.float32
    assert float(np.abs(expected).max()) > 0, "degenerate example: every map is zero"
    scale = np.abs(expected).max()
    np.testing.assert_allclose(maps[:, 0].numpy(), expected, rtol=0, atol=1e-4 * scale)


def test_relevance_cam_initial_relevance_is_one_at_target_and_minus_one_over_c_elsewhere() -> None:
    logits = torch.zeros(2, 4)
    seed = lrp.contrastive_initial_relevance(logits, torch.tensor([1, 3]))
    expected = torch.full((2, 4), -0.25)
    expected[0, 1] = 1.0
    expected[1, 3] = 1.0
    assert torch.equal(seed, expected)


def test_relevance_cam_is_not_applicable_without_a_conv_layer() -> None:
    model = tiny_mlp()
    ctx = MethodContext(layer=resolve_layer(model, None))
    x = torch.randn(2, 3, 8, 8)
    result = compute_methods(model, x, torch.tensor([0, 1]), ["relevance_cam", "lrp"], ctx)
    assert isinstance(result["relevance_cam"], NotApplicableError)
    assert result["relevance_cam"].code == "not_applicable"
    # LRP needs no conv layer and still runs.
    assert isinstance(result["lrp"], torch.Tensor) and result["lrp"].shape == x.shape


def test_relevance_cam_through_the_registry_uses_the_last_conv_by_default() -> None:
    model = small_cnn()
    x = images(2, size=16, seed=2)
    target = torch.tensor([1, 4])
    ctx = MethodContext(layer=resolve_layer(model, None))
    result = compute_methods(model, x, target, ["relevance_cam"], ctx)
    direct = lrp.relevance_cam(model, x, target, "features.3")
    assert ctx.layer == "features.3"
    assert isinstance(result["relevance_cam"], torch.Tensor)
    assert torch.equal(result["relevance_cam"], direct)
    assert direct.shape == (2, 1, 16, 16) and bool((direct >= 0).all())


def test_relevance_cam_rejects_a_layer_without_spatial_output() -> None:
    model = small_cnn()
    with pytest.raises(SpecError, match="spatial"):
        lrp.relevance_cam(model, images(1, size=16), torch.tensor([0]), "classifier")


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_relevance_cam_leaves_the_model_unchanged(arch: str) -> None:
    model = torchvision_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [(name, type(m)) for name, m in model.named_modules()]
    x = images(2, size=64, seed=6)
    layer = resolve_layer(model, None)
    assert layer is not None

    maps = lrp.relevance_cam(model, x, torch.tensor([3, 7]), layer)

    assert maps.shape == (2, 1, 64, 64) and bool(torch.isfinite(maps).all())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [(name, type(m)) for name, m in model.named_modules()] == modules_before
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not m._backward_hooks and not m._backward_pre_hooks
        assert "forward" not in m.__dict__
    assert all(p.grad is None for p in model.parameters())


def test_relevance_cam_on_a_fixed_batch_onnx_graph_matches_one_image_at_a_time(
    artifact_cache: Path,
) -> None:
    """A graph with batch 1 baked into a constant runs a batch as separate calls."""
    net = load_onnx(export_class_token_net(cache_dir=artifact_cache)).module
    assert getattr(net, "fixed_batch", None) == 1
    x = images(3, size=16, seed=7)
    with torch.no_grad():
        target = net(x).argsort(dim=1)[:, -2]  # the runner-up class: not the easy case
    layer = "patchify"

    # The graph runs one image per forward: a direct call runs the batch in chunks of one
    # (each chunk's captured activation is its own), and so does the registry.
    direct = lrp.relevance_cam(net, x, target, layer)
    ctx = MethodContext(layer=layer)
    batch = compute_methods(net, x, target, ["relevance_cam"], ctx)["relevance_cam"]
    assert isinstance(batch, torch.Tensor)
    singles = torch.cat(
        [lrp.relevance_cam(net, x[i : i + 1], target[i : i + 1], layer) for i in range(3)]
    )

    assert float(singles.abs().max()) > 0
    torch.testing.assert_close(batch, singles, rtol=1e-5, atol=1e-6 * float(singles.abs().max()))
    torch.testing.assert_close(direct, singles, rtol=1e-5, atol=1e-6 * float(singles.abs().max()))


def test_relevance_cam_on_an_onnx_graph_with_batchnorm_matches_the_torch_model(
    artifact_cache: Path,
) -> None:
    """The conv's BatchNorm stays unmerged in both, so A is the conv output in both."""
    converted = small_cnn_onnx_with_batchnorm(artifact_cache)
    x = images(3, size=16, seed=18)
    target = torch.tensor([1, 3, 4])
    layer = resolve_layer(converted, None)
    assert layer == "features.3"

    ours = lrp.relevance_cam(converted, x, target, layer)
    reference = lrp.relevance_cam(small_cnn(seed=1), x, target, "features.3")

    assert float(reference.abs().max()) > 0
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
