"""Explainers a user writes: plain callables ``(model, inputs, targets) -> maps``, imported by
the plugin tests (``--method-plugin tests.engine.explainers:occlusion``, an entry point)."""

from __future__ import annotations

import torch
from captum.attr import Occlusion
from torch import nn


def occlusion(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Occlusion (Zeiler and Fergus 2014): how much the target score drops when a patch is
    replaced by zeros, with Captum's Occlusion."""
    channels, height, width = inputs.shape[1:]
    window = (channels, max(1, height // 4), max(1, width // 4))
    strides = (channels, max(1, height // 8), max(1, width // 8))
    maps: torch.Tensor = Occlusion(model).attribute(
        inputs, target=targets, sliding_window_shapes=window, strides=strides
    )
    return maps


def wrong_shape(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Returns one number per image: not a map."""
    return torch.zeros(inputs.shape[0])
