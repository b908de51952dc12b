"""Score-CAM: channel weights from the class score of the input masked by each channel.

Hand-written for speed against pytorch-grad-cam's ``ScoreCAM`` (which loops image by image in
batches of 16, materializes every masked input of an image at once and moves each score to
Python): the (image, channel) masked inputs of the whole batch are built chunk by chunk of
``scorecam_batch`` under ``torch.inference_mode`` in channels-last layout, and channels that are
exactly zero (common after a ReLU) are not run at all - their mask is zero, so their score is the
score of a zero image, computed once. The masked forwards dominate both implementations, so the
gain is bounded by the per-forward speed-up. For large jobs on the CPU the masked passes run in
ONNX Runtime on an export of the module as it is at call time, checked against PyTorch's logits
first (``_ort.py``: 2.2x faster forwards on resnet18 at 224 px), and so do small jobs when such
an export of the module with the same weights already exists (the layers analysis makes one for
its metrics), because PyTorch on the CPU can be slower per image at many masked rows than at
one (a converted EfficientNet-Lite1 at 240 px, one thread: 55 to 74 ms per image at batch 32,
25 ms at batch 1). Same weights as pytorch-grad-cam (checked in
tests/engine/test_methods_differential.py); measured speed-ups are in bench/RESULTS.md.

``scorecam_channels = k`` keeps, per image, only the k channels whose activation varies most
over the feature map (the channel selection of Faster Score-CAM, tabayashi0117/Score-CAM on
GitHub, which keeps the ``max_N`` channels of largest standard deviation): only those are
masked, scored and weighted (softmax over the k scores), so the masked passes scale with k
and the map is exactly Score-CAM on those channels alone. A constant channel (variance 0,
dead ones included) normalizes to a zero mask and is the first to go. bench/RESULTS.md
("Score-CAM channel selection") measures what it does to the cascading verdicts.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ._hooks import (
    as_map,
    cam_from_weights,
    cam_layer,
    capture_layer,
    evaluating,
    spatial_activation,
    target_scores,
    upsample_bilinear,
)
from ._ort import Forward, checked_forward, ort_forward, worth_exporting
from .base import MethodContext, MethodFamily, MethodInfo, register

MASK_EPS = 1e-8  # pytorch-grad-cam's stabilizer in the min-max normalization of a mask


def channel_masks(activation: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Score-CAM masks ``H_k = s(Up(A_k))`` (Wang et al. 2020, section 3, eq. 4), (B, 1, H, W).

    ``activation`` is (B, h, w), one channel per row. ``Up`` is bilinear with
    ``align_corners=True`` (pytorch-grad-cam's ``nn.UpsamplingBilinear2d``), ``s`` min-max
    normalizes each mask to [0, 1]: ``(U - min U) / (max U - min U + 1e-8)``.
    """
    up = F.interpolate(activation.unsqueeze(1), size=size, mode="bilinear", align_corners=True)
    low = up.amin(dim=(2, 3), keepdim=True)
    high = up.amax(dim=(2, 3), keepdim=True)
    return (up - low) / (high - low + MASK_EPS)


def top_variance_channels(activation: torch.Tensor, k: int | None) -> torch.Tensor | None:
    """Per image, the indices of the ``k`` channels of largest spatial variance, (N, k).

    ``activation`` is (N, K, h, w). None when ``k`` is None or keeps every channel (``k >= K``):
    then nothing is selected and Score-CAM runs exactly as without a selection. Ties (constant
    channels all have variance 0) go to the lower channel index, so the choice is the same on
    every run and device.
    """
    channels = activation.shape[1]
    if k is None or k >= channels:
        return None
    spread = activation.flatten(2).var(dim=2, unbiased=False)
    order = torch.sort(spread, dim=1, descending=True, stable=True).indices
    return order[:, :k]


def selected_channels(activation: torch.Tensor, k: int | None) -> torch.Tensor:
    """The activation restricted to each image's :func:`top_variance_channels`, (N, k, h, w);
    the activation itself when every channel is kept."""
    chosen = top_variance_channels(activation, k)
    if chosen is None:
        return activation
    return activation.gather(1, chosen[:, :, None, None].expand(-1, -1, *activation.shape[2:]))


def scorecam_scores(
    model: nn.Module | Forward,
    x: torch.Tensor,
    target: torch.Tensor,
    activation: torch.Tensor,
    rows_per_pass: int,
) -> torch.Tensor:
    """Target logit of ``x_n * H_k`` for every image n and channel k, (N, K).

    ``model`` is the module (in eval mode; call under ``torch.inference_mode``) or any forward
    function computing the same logits, such as the ONNX Runtime one from ``_ort``.
    """
    n, k = activation.shape[:2]
    size = (x.shape[-2], x.shape[-1])
    target = target.to(x.device)
    scores = torch.empty((n, k), dtype=x.dtype, device=x.device)
    flat = activation.flatten(2)
    dead = (flat.amax(dim=2) == 0) & (flat.amin(dim=2) == 0)
    if bool(dead.any()):
        # An all-zero channel upsamples to zeros and normalizes to a zero mask (0 / 1e-8).
        zero_logits = model(torch.zeros_like(x[:1]))[0]
        scores[dead] = zero_logits[target].unsqueeze(1).expand(n, k)[dead]
    image, channel = torch.nonzero(~dead, as_tuple=True)
    for start in range(0, image.numel(), rows_per_pass):
        i, c = image[start : start + rows_per_pass], channel[start : start + rows_per_pass]
        masked = x[i] * channel_masks(activation[i, c], size)
        if isinstance(model, nn.Module):
            # NHWC lets oneDNN convolutions skip layout reorders (measured ~1.3x on CPU); ONNX
            # Runtime takes NCHW and would only pay for the conversion back.
            masked = masked.contiguous(memory_format=torch.channels_last)
        scores[i, c] = target_scores(model(masked), target[i])
    return scores


@register
class ScoreCamFamily(MethodFamily):
    """Gradient-free CAM weighted by masked-input class scores."""

    name = "scorecam"
    provides: ClassVar[tuple[MethodInfo, ...]] = (
        MethodInfo(
            name="scorecam",
            family="scorecam",
            reference="Wang et al. 2020, Score-CAM, CVPR workshops, arXiv:1910.01279 (section 3)",
            description="ReLU of the activations weighted by the softmax over channels of "
            "the target logit on the channel-masked input (pytorch-grad-cam's variant); "
            "params.scorecam_channels keeps only each image's k channels of largest spatial "
            "variance (Faster Score-CAM).",
            needs_conv_layer=True,
        ),
    )

    def compute(
        self,
        model: nn.Module,
        x: torch.Tensor,
        target: torch.Tensor,
        wanted: frozenset[str],
        ctx: MethodContext,
    ) -> dict[str, torch.Tensor]:
        layer = cam_layer(ctx)
        x = x.detach()
        with evaluating(model):
            with torch.inference_mode(), capture_layer(model, layer) as capture:
                logits = model(x)
            # the masked passes, the weights and the map all use the selected channels only
            activation = selected_channels(
                spatial_activation(capture, layer), ctx.params.scorecam_channels
            )
            forward: nn.Module | Forward = checked_forward(model, x) or model
            live = int((activation.flatten(2).abs().amax(dim=2) > 0).sum())
            if forward is model and worth_exporting(live, x):
                forward = ort_forward(model, x, logits) or model
            with torch.inference_mode():
                scores = scorecam_scores(forward, x, target, activation, ctx.params.scorecam_batch)
                # pytorch-grad-cam's weights: softmax over channels of the raw target logits
                # (the paper subtracts the baseline score first; softmax is shift-invariant).
                weights = torch.softmax(scores, dim=1)
                cam = cam_from_weights(weights, activation)
                cam = upsample_bilinear(cam, (x.shape[-2], x.shape[-1]))
        # inference_mode tensors cannot join autograd later; hand back an ordinary tensor.
        return {"scorecam": as_map(cam.clone())}
