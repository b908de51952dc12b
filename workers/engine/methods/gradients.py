"""Gradient, Gradient x Input, Grad-CAM and Grad-CAM++ from one forward and one backward.

Hand-written: the four methods share one forward pass and one ``torch.autograd.grad`` call over
both the input and the CAM layer's activation (Captum would run four forwards and backwards).
Checked against Captum (``Saliency``, ``InputXGradient``, ``LayerGradCam`` + ``interpolate``)
and pytorch-grad-cam (``GradCAMPlusPlus``) in tests/engine/test_methods_differential.py.
"""

from __future__ import annotations

from contextlib import ExitStack
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
    input_leaf,
    spatial_activation,
    target_scores,
    upsample_bilinear,
)
from .base import MethodContext, MethodFamily, MethodInfo, register

GRADCAM_PP_EPS = 1e-6  # pytorch-grad-cam's stabilizer in the alpha denominator


def gradcam_weights(grad: torch.Tensor) -> torch.Tensor:
    """Grad-CAM channel weights ``alpha_k = mean_ij dy_c/dA_k[i,j]`` (Selvaraju et al. 2017, eq. 1).

    (N, K, h, w) -> (N, K).
    """
    return grad.mean(dim=(2, 3))


def gradcam_pp_weights(grad: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ channel weights (Chattopadhay et al. 2018, eqs. 7 and 19), (N, K).

    With ``g = dy_c/dA_k[i,j]`` (the gradient of the raw class score; the paper's exponential
    output turns the second and third derivatives into ``g^2`` and ``g^3``) and ``S_k`` the
    spatial sum of ``A_k``::

        a_kij = g^2 / (2 g^2 + S_k g^3 + 1e-6),   a_kij = 0 where g == 0
        w_k   = sum_ij a_kij * ReLU(g)

    This is exactly pytorch-grad-cam's ``GradCAMPlusPlus.get_cam_weights`` (same eps, same
    zeroing where the gradient vanishes).
    """
    g2 = grad * grad
    g3 = g2 * grad
    spatial_sum = activation.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + spatial_sum * g3 + GRADCAM_PP_EPS)
    alpha = torch.where(grad != 0, alpha, torch.zeros_like(alpha))
    return (alpha * F.relu(grad)).sum(dim=(2, 3))


@register
class GradientFamily(MethodFamily):
    """Plain-gradient methods and the gradient CAMs, sharing one forward/backward."""

    name = "gradient"
    provides: ClassVar[tuple[MethodInfo, ...]] = (
        MethodInfo(
            name="gradient",
            family="gradient",
            reference="Simonyan, Vedaldi, Zisserman 2014, arXiv:1312.6034 (section 3.1)",
            description="Signed gradient of the target logit w.r.t. the input (Captum "
            "Saliency with abs=False).",
        ),
        MethodInfo(
            name="gradient_x_input",
            family="gradient",
            reference="Shrikumar, Greenside, Shcherbina, Kundaje 2016, arXiv:1605.01713",
            description="Gradient of the target logit times the input, element-wise.",
        ),
        MethodInfo(
            name="gradcam",
            family="gradient",
            reference="Selvaraju et al. 2017, Grad-CAM, ICCV, arXiv:1610.02391 (eqs. 1-2)",
            description="ReLU of the activation map weighted by spatially averaged "
            "gradients at the CAM layer, upsampled bilinearly.",
            needs_conv_layer=True,
        ),
        MethodInfo(
            name="gradcam_pp",
            family="gradient",
            reference="Chattopadhay et al. 2018, Grad-CAM++, WACV, arXiv:1710.11063 (eqs. 7, 19)",
            description="Grad-CAM with pixel-wise weighted positive gradients "
            "(pytorch-grad-cam's formula).",
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
        wants_input_grad = bool(wanted & {"gradient", "gradient_x_input"})
        wants_cam = bool(wanted & {"gradcam", "gradcam_pp"})
        layer = cam_layer(ctx) if wants_cam else None
        with ExitStack() as stack:
            stack.enter_context(evaluating(model))
            capture = stack.enter_context(capture_layer(model, layer)) if layer else None
            # The input always requires grad so the graph exists even for frozen parameters.
            x_leaf = input_leaf(x)
            score = target_scores(model(x_leaf), target).sum()
            # Images are independent in eval mode, so the gradient of the summed target logits
            # is each image's own gradient: one backward serves the whole batch.
            grad_of: list[torch.Tensor] = []
            if wants_input_grad:
                grad_of.append(x_leaf)
            if capture is not None:
                grad_of.append(capture.activation)
            grads = list(torch.autograd.grad(score, grad_of))

        out: dict[str, torch.Tensor] = {}
        if wants_input_grad:
            x_grad = grads.pop(0)
            if "gradient" in wanted:
                out["gradient"] = as_map(x_grad)
            if "gradient_x_input" in wanted:
                out["gradient_x_input"] = as_map(x_grad * x)
        if capture is not None:
            a_grad, activation = grads.pop(0), spatial_activation(capture, layer)
            size = (x.shape[-2], x.shape[-1])
            if "gradcam" in wanted:
                cam = cam_from_weights(gradcam_weights(a_grad), activation)
                out["gradcam"] = as_map(upsample_bilinear(cam, size))
            if "gradcam_pp" in wanted:
                cam = cam_from_weights(gradcam_pp_weights(a_grad, activation), activation)
                out["gradcam_pp"] = as_map(upsample_bilinear(cam, size))
        return out
