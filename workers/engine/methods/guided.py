"""Guided Backprop and Guided Grad-CAM from one forward pass.

Hand-written: Captum's ``GuidedBackprop`` hooks ``nn.ReLU`` modules only, so on a network whose
rectifiers are ``nn.ReLU6``, ONNX ``Clip(0, 6)`` or ``F.relu`` calls it silently returns the plain
gradient. Here one forward pass records the CAM layer's activation, and the guided rule is put
on every rectifier node of that pass's autograd graph (:mod:`._graph`), whatever created it.
A network with nonlinearities that have no guided rule (SiLU, GELU, sigmoid gates, LayerNorm,
attention) gets "not applicable" with the list of them, never a partly plain gradient.

* if no rectifier lies between the CAM layer and the output (ResNet's ``layer4``: only pooling
  and the linear head follow), the guided backward already carries the ordinary ``dy/dA`` at
  that layer, so one backward gives both - no extra cost;
* otherwise an ordinary backward from the logits down to the CAM layer only (the cheap top part
  of the network) runs first on the same graph, then the guided backward to the input.

Checked against Captum's ``GuidedBackprop`` and ``GuidedGradCam`` on ``nn.ReLU`` networks in
tests/engine/test_methods_differential.py, and against a ReLU-module rewrite of ReLU6 and
``F.relu`` networks in tests/engine/test_guided_rectifiers.py.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import ClassVar

import torch
from torch import nn

from ..errors import NotApplicableError
from ._graph import RectifierGraph, frozen_parameters
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
            description="Input gradient where every rectifier (ReLU, ReLU6 / Clip(0, c), "
            "LeakyReLU, as module, function or ONNX op) also blocks negative gradients; not "
            "applicable to networks with other nonlinearities (SiLU, GELU, gates, attention).",
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
            stack.enter_context(torch.enable_grad())
            stack.enter_context(evaluating(model))
            stack.enter_context(frozen_parameters(model))
            capture = stack.enter_context(capture_layer(model, layer)) if layer else None
            x_leaf = input_leaf(x)
            score = target_scores(model(x_leaf), target).sum()
        graph = RectifierGraph(score)
        if graph.unsupported:
            raise NotApplicableError(
                "guided backprop has a rule for rectifiers (ReLU, ReLU6 / Clip(0, c), "
                "LeakyReLU) only; this model also computes "
                f"{graph.describe_unsupported()}, where the method would silently fall back "
                "to the plain gradient"
            )
        with torch.enable_grad(), graph.guide():
            if capture is None:
                (guided_grad,) = torch.autograd.grad(score, [x_leaf])
                return {"guided_backprop": as_map(guided_grad)}
            activation_node = capture.activation.grad_fn
            if graph.rectifiers_above(activation_node) == 0:
                guided_grad, a_grad = torch.autograd.grad(score, [x_leaf, capture.activation])
            else:
                graph.guided = False
                (a_grad,) = torch.autograd.grad(score, [capture.activation], retain_graph=True)
                graph.guided = True
                (guided_grad,) = torch.autograd.grad(score, [x_leaf])

        activation = spatial_activation(capture, layer)
        cam = cam_from_weights(gradcam_weights(a_grad), activation)
        cam = upsample_bilinear(cam, (x.shape[-2], x.shape[-1]))
        out = {"guided_gradcam": as_map(guided_grad * cam)}
        if "guided_backprop" in wanted:
            out["guided_backprop"] = as_map(guided_grad)
        return out
