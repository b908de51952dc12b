"""Machinery the hand-written method families share: eval mode, layer capture, CAM weights.

Every context manager here undoes what it did on exit (hooks removed, training flags restored),
so a family leaves the model exactly as it found it. Gradients are taken with
``torch.autograd.grad`` with respect to the input and the captured activation only, which prunes
the weight gradients from the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NotApplicableError, SpecError
from .base import MethodContext, get_module


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (BatchNorm uses running stats, so images stay independent).

    Restores every submodule's own ``training`` flag on exit.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def target_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The logit of each image's target class, shape (N,)."""
    return logits.gather(1, target.to(logits.device).view(-1, 1)).squeeze(1)


def input_leaf(x: torch.Tensor) -> torch.Tensor:
    """A fresh leaf copy of ``x`` that requires grad (the caller's tensor is left alone).

    Requiring grad on the input builds the graph even when the model's parameters are frozen.
    """
    return x.detach().clone().requires_grad_(True)


class LayerCapture:
    """The output ``A`` of one module during a forward pass (the CAM methods' activation).

    ``activation`` is a private copy of the module's output that nothing downstream sees:
    its values cannot be changed by later in-place ops, and ``torch.autograd.grad`` with
    respect to it gives the ordinary ``d y / d A`` even when hooks sit on the module's own
    output tensor (a guided ReLU that produced ``A``). ``on_capture`` runs when it is taken.
    """

    def __init__(self, layer: str, on_capture: Callable[[], None] | None = None) -> None:
        self.layer = layer
        self._activation: torch.Tensor | None = None
        self._on_capture = on_capture

    @property
    def activation(self) -> torch.Tensor:
        if self._activation is None:
            raise RuntimeError("the captured layer did not run in the forward pass")
        return self._activation

    def reset(self) -> None:
        """Forget the activation before the next forward pass (a model run in chunks)."""
        self._activation = None

    def hook(self, _module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"the captured layer must return one tensor, got {type(output)!r}")
        if self._activation is not None:
            raise NotApplicableError(
                f"layer {self.layer!r} runs more than once per forward pass (a shared module, "
                "e.g. a ReLU reused inside a block); a CAM needs one activation, pick another "
                "layer",
                layer=self.layer,
            )
        self._activation = output.clone()
        if self._on_capture is not None:
            self._on_capture()
        # Downstream gets a second copy, free to be modified in place (Captum also clones).
        return self._activation.clone()


def cam_layer(ctx: MethodContext) -> str:
    """The CAM layer; ``compute_methods`` never calls a CAM method without one."""
    if ctx.layer is None:
        raise RuntimeError("a CAM method was called without ctx.layer")
    return ctx.layer


def spatial_activation(capture: LayerCapture, layer: str | None) -> torch.Tensor:
    """The captured activation, detached; a CAM needs it shaped (N, K, h, w)."""
    activation = capture.activation.detach()
    if activation.dim() != 4:
        raise SpecError(
            f"CAM methods need a layer with a spatial (N, K, h, w) output; {layer!r} returns "
            f"shape {tuple(activation.shape)}"
        )
    return activation


@contextmanager
def capture_layer(
    model: nn.Module, layer: str, on_capture: Callable[[], None] | None = None
) -> Iterator[LayerCapture]:
    """Record the output of module ``layer`` while the context is open.

    A module that runs more than once per forward has no single activation: that raises
    ``NotApplicableError``, which ``compute_methods`` reports as the methods' result (Captum
    would silently keep the last call). Costs two copies of one activation tensor.
    """
    capture = LayerCapture(layer, on_capture)
    handle = get_module(model, layer).register_forward_hook(capture.hook)
    try:
        yield capture
    finally:
        handle.remove()


def upsample_bilinear(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, K, h, w) maps to ``size`` with half-pixel centres.

    ``align_corners=False`` is what ``F.interpolate`` (hence Captum's
    ``LayerAttribution.interpolate``) and OpenCV's ``cv2.resize`` (pytorch-grad-cam) use.
    """
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def cam_from_weights(weights: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """``ReLU(sum_k w_k A_k)`` (Selvaraju et al. 2017, eq. 2), (N, K, h, w) -> (N, 1, h, w).

    The ReLU is applied at the layer's resolution, before any upsampling, as Captum
    (``LayerGradCam(relu_attributions=True)`` then ``interpolate``) and pytorch-grad-cam do.
    """
    return F.relu((weights[:, :, None, None] * activation).sum(dim=1, keepdim=True))


def as_map(t: torch.Tensor) -> torch.Tensor:
    """Maps leave a family detached and float32."""
    return t.detach().to(torch.float32)
