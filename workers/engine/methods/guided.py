"""Guided Backprop and Guided Grad-CAM from one forward pass.

Hand-written: Captum's ``GuidedGradCam`` runs Grad-CAM and Guided Backprop separately (two
forwards, two full backwards). Here one forward records the CAM layer's activation while every
``nn.ReLU`` carries a switchable guided-gradient hook, and:

* if no ``nn.ReLU`` runs after the CAM layer (ResNet's ``layer4``: only pooling and the linear
  head follow), the guided backward already carries the ordinary ``dy/dA`` at that layer, so
  one backward gives both - no extra cost;
* otherwise an ordinary backward from the logits down to the CAM layer only (the cheap top part
  of the network) runs first on the same graph, then the guided backward to the input.

Checked against Captum's ``GuidedBackprop`` and ``GuidedGradCam`` in
tests/engine/test_methods_differential.py.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import ClassVar

import torch
from torch import nn

from ._hooks import (
    as_map,
    cam_from_weights,
    cam_layer,
    capture_layer,
    evaluating,
    guided_relus,
    input_leaf,
    spatial_activation,
    target_scores,
    upsample_bilinear,
)
from .base import MethodContext, MethodFamily, MethodInfo, register
from .gradients import gradcam_weights


@register
class GuidedFamily(MethodFamily):
    """Guided-backprop methods (ReLU gradients clamped at zero on the way back)."""

    name = "guided"
    provides: ClassVar[tuple[MethodInfo, ...]] = (
        MethodInfo(
            name="guided_backprop",
            family="guided",
            reference="Springenberg, Dosovitskiy, Brox, Riedmiller 2015, Striving for "
            "Simplicity, ICLR workshop, arXiv:1412.6806 (section 3.4, figure 1)",
            description="Input gradient where every ReLU also blocks negative gradients "
            "(nn.ReLU modules, as Captum).",
        ),
        MethodInfo(
            name="guided_gradcam",
            family="guided",
            reference="Selvaraju et al. 2017, Grad-CAM, ICCV, arXiv:1610.02391 (section 3.1)",
            description="Guided Backprop times the bilinearly upsampled Grad-CAM map.",
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
        layer = cam_layer(ctx) if "guided_gradcam" in wanted else None
        with ExitStack() as stack:
            stack.enter_context(evaluating(model))
            # Guided hooks first: if the CAM layer is itself a ReLU, its capture then sees the
            # already-hooked output and the private copy it keeps stays unhooked.
            relus = stack.enter_context(guided_relus(model))
            capture = (
                stack.enter_context(capture_layer(model, layer, on_capture=relus.mark))
                if layer
                else None
            )
            x_leaf = input_leaf(x)
            score = target_scores(model(x_leaf), target).sum()
            if capture is None:
                (guided_grad,) = torch.autograd.grad(score, [x_leaf])
                return {"guided_backprop": as_map(guided_grad)}
            if relus.relus_after_mark == 0:
                guided_grad, a_grad = torch.autograd.grad(score, [x_leaf, capture.activation])
            else:
                relus.guided = False
                (a_grad,) = torch.autograd.grad(score, [capture.activation], retain_graph=True)
                relus.guided = True
                (guided_grad,) = torch.autograd.grad(score, [x_leaf])

        activation = spatial_activation(capture, layer)
        cam = cam_from_weights(gradcam_weights(a_grad), activation)
        cam = upsample_bilinear(cam, (x.shape[-2], x.shape[-1]))
        out = {"guided_gradcam": as_map(guided_grad * cam)}
        if "guided_backprop" in wanted:
            out["guided_backprop"] = as_map(guided_grad)
        return out
