"""Each hand-written saliency method agrees with its reference implementation.

References: Captum (Saliency, InputXGradient, IntegratedGradients, NoiseTunnel, GuidedBackprop,
LayerGradCam + LayerAttribution.interpolate, GuidedGradCam), pytorch-grad-cam (GradCAMPlusPlus,
ScoreCAM) and scikit-image (sobel). Models: torchvision resnet18 (64x64 inputs, ``layer4`` and
the default last conv ``layer4.1.conv2``) and ``small_cnn`` (``features.3``, the default, and
``features.0``), several images with a different target each. Float32 throughout, the dtype the
engine runs in.

Tolerance (``assert_agrees``): ``rtol=1e-5`` plus ``atol = 1e-5 * max|reference|``, i.e. 1e-5
relative to the map's own scale, so near-zero pixels are not held to a relative bound that
float32 summation order cannot meet. pytorch-grad-cam returns maps min-max normalized to [0, 1]
per image; ours are compared after the same normalization (atol = 1e-5, the map's scale is 1).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from captum.attr import (
    GuidedBackprop,
    GuidedGradCam,
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)
from pytorch_grad_cam import GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from skimage.filters import sobel
from torch import nn

from saliency_audit.workers.engine.errors import SpecError
from saliency_audit.workers.engine.methods.base import (
    MethodContext,
    compute_methods,
    get_module,
    resolve_layer,
)
from saliency_audit.workers.engine.methods.gradients import gradcam_pp_weights
from saliency_audit.workers.engine.methods.integrated import baseline_for_input_spec
from saliency_audit.workers.engine.methods.noise import noisy_gradient_moments
from saliency_audit.workers.engine.methods.scorecam import scorecam_scores
from saliency_audit.workers.engine.spec import InputSpec, MethodParams
from tests.engine.nets import images, small_cnn, torchvision_model

RTOL = 1e-5
SCALED_ATOL = 1e-5


@functools.cache
def net(name: str) -> nn.Module:
    return torchvision_model("resnet18") if name == "resnet18" else small_cnn()


# (model, input size, one target per image); each image explains a different class.
CASES = {
    "resnet18": (64, (7, 512, 999)),
    "small_cnn": (32, (3, 0, 4)),
}
SCORECAM_SIZE = {"resnet18": 48, "small_cnn": 32}
LAYERS = [
    ("resnet18", "layer4"),
    ("resnet18", None),  # default: last conv, layer4.1.conv2 (BN, add and ReLU follow it)
    ("small_cnn", None),  # default: features.3 (BN and ReLU follow it)
    ("small_cnn", "features.0"),
]


def inputs(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    size, targets = CASES[name]
    return net(name), images(len(targets), size, seed=3), torch.tensor(targets)


def assert_agrees(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float32 and not actual.requires_grad
    expected = expected.detach().to(torch.float32)
    atol = SCALED_ATOL * float(expected.abs().max())
    assert atol > 0, "a reference map that is all zero cannot tell methods apart"
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol)


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Per-image [0, 1] scaling, (N, 1, H, W) -> (N, H, W) (pytorch-grad-cam's output)."""
    flat = maps.flatten(1).double()
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / flat.max(dim=1, keepdim=True).values
    return flat.view(maps.shape[0], *maps.shape[2:]).float()


def ours(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, names: list[str], **ctx_kwargs: Any
) -> dict[str, torch.Tensor]:
    ctx = MethodContext(**ctx_kwargs)
    out = compute_methods(model, x, t, names, ctx)
    assert all(isinstance(v, torch.Tensor) for v in out.values()), out
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.fixture(autouse=True)
def _quiet_reference_warnings() -> Iterator[None]:
    # Captum warns on every GuidedBackprop call that it hooks ReLUs; pytorch-grad-cam uses tqdm.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


# --- gradient family (one forward, one backward) ----------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_and_gradient_x_input_match_captum(name: str) -> None:
    model, x, t = inputs(name)
    out = ours(model, x, t, ["gradient", "gradient_x_input"])
    assert_agrees(out["gradient"], Saliency(model).attribute(x, target=t, abs=False))
    assert_agrees(out["gradient_x_input"], InputXGradient(model).attribute(x, target=t))


@pytest.mark.parametrize(("name", "layer"), LAYERS)
def test_gradcam_matches_captum_layer_gradcam_upsampled_bilinearly(
    name: str, layer: str | None
) -> None:
    model, x, t = inputs(name)
    layer = resolve_layer(model, layer)
    assert layer is not None
    out = ours(model, x, t, ["gradcam"], layer=layer)["gradcam"]
    low = LayerGradCam(model, get_module(model, layer)).attribute(
        x, target=t, relu_attributions=True
    )
    expected = LayerAttribution.interpolate(low, tuple(x.shape[2:]), interpolate_mode="bilinear")
    assert out.shape == (len(t), 1, *x.shape[2:])
    assert_agrees(out, expected)


def test_gradcam_on_a_layer_modified_in_place_downstream_matches_captum() -> None:
    # layer4.1.bn2's output is updated in place by the residual ``out += identity`` and then
    # by ReLU(inplace=True); Captum clones the layer output, and so must we.
    model, x, t = inputs("resnet18")
    out = ours(model, x, t, ["gradcam"], layer="layer4.1.bn2")["gradcam"]
    low = LayerGradCam(model, get_module(model, "layer4.1.bn2")).attribute(
        x, target=t, relu_attributions=True
    )
    expected = LayerAttribution.interpolate(low, tuple(x.shape[2:]), interpolate_mode="bilinear")
    assert_agrees(out, expected)


@pytest.mark.parametrize(("name", "layer"), LAYERS)
def test_gradcam_pp_matches_pytorch_grad_cam(name: str, layer: str | None) -> None:
    model, x, t = inputs(name)
    layer = resolve_layer(model, layer)
    assert layer is not None
    out = ours(model, x, t, ["gradcam_pp"], layer=layer)["gradcam_pp"]
    with GradCAMPlusPlus(model, [get_module(model, layer)]) as cam:
        expected = cam(x, [ClassifierOutputTarget(int(c)) for c in t])
    torch.testing.assert_close(
        min_max(out), torch.from_numpy(expected), rtol=RTOL, atol=SCALED_ATOL
    )


def test_gradcam_pp_weights_follow_pytorch_grad_cam_formula_exactly() -> None:
    # The map comparison above is scale-free; this pins the weights themselves, including the
    # zeroed alphas where the gradient vanishes.
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 6, 4, 5, generator=g, dtype=torch.float64)
    grads[grads.abs() < 0.3] = 0
    acts = torch.relu(torch.randn(3, 6, 4, 5, generator=g, dtype=torch.float64))
    expected = GradCAMPlusPlus.get_cam_weights(
        None,
        None,
        None,
        None,
        acts.numpy(),
        grads.numpy(),
    )
    actual = gradcam_pp_weights(grads, acts)
    torch.testing.assert_close(actual, torch.from_numpy(expected), rtol=1e-12, atol=0.0)


# --- noise family -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_smoothgrad_sq_and_vargrad_match_captum_noise_tunnel_on_the_same_noise(name: str) -> None:
    model, x, t = inputs(name)
    samples, level = 6, 0.15
    # Captum draws from the global RNG, one image at a time here because its stdev is one
    # number per call while ours is per image. Re-seed and redraw its noise to feed ours.
    references: dict[str, list[torch.Tensor]] = {
        "smoothgrad": [],
        "smoothgrad_sq": [],
        "vargrad": [],
    }
    noise = []
    for i in range(len(t)):
        xi = x[i : i + 1]
        sigma = level * float(xi.max() - xi.min())
        torch.manual_seed(100 + i)
        noise.append(torch.normal(0, torch.tensor(sigma).repeat((samples, *xi.shape[1:]))))
        for kind, refs in references.items():
            torch.manual_seed(100 + i)
            refs.append(
                NoiseTunnel(Saliency(model)).attribute(
                    xi,
                    nt_type=kind,
                    nt_samples=samples,
                    stdevs=sigma,
                    target=t[i : i + 1],
                    abs=False,
                )
            )
    mean, mean_sq, variance = noisy_gradient_moments(model, x, t, torch.stack(noise))
    assert_agrees(mean.float(), torch.cat(references["smoothgrad"]))
    assert_agrees(mean_sq.float(), torch.cat(references["smoothgrad_sq"]))
    # Captum computes E[g^2] - E[g]^2, which can cancel in float32; ours is two-pass. Both
    # agree here at the common bound (the float64 test below checks the variance itself).
    assert_agrees(variance.float(), torch.cat(references["vargrad"]))


def test_vargrad_is_the_float64_variance_of_the_noisy_gradients() -> None:
    # VarGrad at the 1e-5 bound: against the same noise, differentiated by Captum in float64.
    model = small_cnn().double()
    x, t = images(2, 32, seed=4).double(), torch.tensor([1, 2])
    noise = 0.3 * torch.randn(2, 5, *x.shape[1:], generator=torch.Generator().manual_seed(5))
    noise = noise.double()
    _, _, variance = noisy_gradient_moments(model, x, t, noise)
    noisy = (x.unsqueeze(1) + noise).flatten(0, 1)
    grads = Saliency(model).attribute(noisy, target=t.repeat_interleave(5), abs=False)
    expected = grads.view(2, 5, *x.shape[1:]).var(dim=1, unbiased=False)
    assert_agrees(variance.float(), expected)


def test_noise_family_draws_sigma_as_noise_level_times_each_images_range() -> None:
    model, x, t = inputs("small_cnn")
    params = MethodParams(noise_samples=4, noise_level=0.2)
    out = ours(
        model,
        x,
        t,
        ["smoothgrad", "smoothgrad_sq", "vargrad"],
        params=params,
        generator=torch.Generator().manual_seed(9),
    )
    unit = torch.randn(len(t), 4, *x.shape[1:], generator=torch.Generator().manual_seed(9))
    ranges = torch.stack([xi.max() - xi.min() for xi in x])
    mean, mean_sq, variance = noisy_gradient_moments(
        model, x, t, unit * (0.2 * ranges).view(-1, 1, 1, 1, 1)
    )
    for got, expected in zip(
        (out["smoothgrad"], out["smoothgrad_sq"], out["vargrad"]),
        (mean, mean_sq, variance),
        strict=True,
    ):
        assert_agrees(got, expected)


# --- integrated gradients ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_integrated_gradients_matches_captum_gauss_legendre_zero_baseline(name: str) -> None:
    model, x, t = inputs(name)
    out = ours(model, x, t, ["integrated_gradients"], params=MethodParams(ig_steps=12))
    expected = IntegratedGradients(model).attribute(x, target=t, n_steps=12)
    assert_agrees(out["integrated_gradients"], expected)


def test_integrated_gradients_black_baseline_from_the_input_spec_matches_captum() -> None:
    model, x, t = inputs("small_cnn")
    spec = InputSpec(height=32, width=32)
    baseline = baseline_for_input_spec(spec, "black")
    expected_black = (0.0 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    torch.testing.assert_close(baseline.flatten(), expected_black)
    params = MethodParams(ig_steps=9, ig_baseline="black")
    out = ours(model, x, t, ["integrated_gradients"], params=params, baseline=baseline)
    expected = IntegratedGradients(model).attribute(
        x, baselines=baseline.expand_as(x).contiguous(), target=t, n_steps=9
    )
    assert_agrees(out["integrated_gradients"], expected)


def test_integrated_gradients_black_baseline_without_the_tensor_is_a_spec_error() -> None:
    model, x, t = inputs("small_cnn")
    with pytest.raises(SpecError, match="baseline"):
        ours(model, x, t, ["integrated_gradients"], params=MethodParams(ig_baseline="black"))


# --- guided family ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "layer"), LAYERS)
def test_guided_backprop_and_guided_gradcam_match_captum(name: str, layer: str | None) -> None:
    # resnet18 layer4 takes the one-backward path (no ReLU after it); the others need the extra
    # ordinary backward down to the layer because a ReLU follows it.
    model, x, t = inputs(name)
    layer = resolve_layer(model, layer)
    assert layer is not None
    out = ours(model, x, t, ["guided_backprop", "guided_gradcam"], layer=layer)
    assert_agrees(out["guided_backprop"], GuidedBackprop(model).attribute(x, target=t))
    expected = GuidedGradCam(model, get_module(model, layer)).attribute(
        x, target=t, interpolate_mode="bilinear"
    )
    assert_agrees(out["guided_gradcam"], expected)


def test_guided_backprop_alone_needs_no_layer() -> None:
    model, x, t = inputs("resnet18")
    out = ours(model, x, t, ["guided_backprop"])
    assert_agrees(out["guided_backprop"], GuidedBackprop(model).attribute(x, target=t))


# --- score-cam --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layer", "n_images"),
    [("resnet18", "layer4", 2), ("resnet18", None, 1), ("small_cnn", None, 3)],
)
def test_scorecam_matches_pytorch_grad_cam(name: str, layer: str | None, n_images: int) -> None:
    # Each resnet18 image costs 512 masked forwards per implementation, hence fewer and smaller
    # images (48x48 still gives layer4 a 2x2 map).
    model, _, t = inputs(name)
    x, t = images(n_images, SCORECAM_SIZE[name], seed=3), t[:n_images]
    layer = resolve_layer(model, layer)
    assert layer is not None
    out = ours(model, x, t, ["scorecam"], layer=layer, params=MethodParams(scorecam_batch=50))
    with ScoreCAM(model, [get_module(model, layer)]) as cam:
        cam.batch_size = 64
        expected = cam(x, [ClassifierOutputTarget(int(c)) for c in t])
    torch.testing.assert_close(
        min_max(out["scorecam"]), torch.from_numpy(expected), rtol=RTOL, atol=SCALED_ATOL
    )


def test_scorecam_weights_match_pytorch_grad_cam_including_dead_channels() -> None:
    # The map comparison is scale-free; this pins the softmax weights. Zeroing channels
    # exercises the shortcut for all-zero activations (their score is the zero image's).
    model, x, t = inputs("small_cnn")
    layer = get_module(model, "features.3")
    with torch.no_grad():
        acts = torch.empty(0)

        def keep(_m: nn.Module, _i: object, o: torch.Tensor) -> None:
            nonlocal acts
            acts = o.detach().clone()

        handle = layer.register_forward_hook(keep)
        model(x)
        handle.remove()
    acts[:, ::3] = 0
    with ScoreCAM(model, [layer]) as cam:
        expected = cam.get_cam_weights(
            x,
            layer,
            [ClassifierOutputTarget(int(c)) for c in t],
            acts.numpy(),
            None,
        )
    with torch.inference_mode():
        weights = torch.softmax(scorecam_scores(model, x, t, acts, rows_per_pass=7), dim=1)
    torch.testing.assert_close(weights, torch.from_numpy(expected), rtol=RTOL, atol=1e-7)


# --- controls ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [17, 32])
def test_control_sobel_is_skimage_sobel_summed_over_channels(size: int) -> None:
    x = images(3, size, seed=8)
    out = ours(small_cnn(), x, torch.zeros(3, dtype=torch.long), ["control_sobel"])
    expected = torch.from_numpy(
        np.stack([sum(sobel(channel) for channel in image) for image in x.numpy()])
    ).unsqueeze(1)
    assert out["control_sobel"].shape == (3, 1, size, size)
    assert_agrees(out["control_sobel"], expected)
