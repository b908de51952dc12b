"""Small modules the model adapters put in the graph so that attribution rules can see them.

Element-wise additions of two tensors (residual connections) become :class:`Add`, whose sum is a
``zennit.layer.Sum`` module: Zennit's ``Norm`` rule then splits relevance between the branches in
proportion to their contributions (Bach et al. 2015, eq. 2 applied to a sum), which keeps LRP
conservative through skip connections. Concatenation is linear and needs no rule.

A per-channel scale and shift that an exporter wrote as constant ``Mul``/``Add`` nodes (a
BatchNorm folded by TensorFlow's graph optimizer, then exported by tf2onnx) becomes
:class:`ChannelAffine`, a BatchNorm again, so that it is randomized, canonized and explained
like the layer it was.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from zennit.layer import Sum


class Add(nn.Module):
    """``a + b (+ ...)`` with broadcasting, computed by a ``zennit.layer.Sum`` over a stack."""

    def __init__(self) -> None:
        super().__init__()
        self.sum = Sum(dim=-1)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        expanded = torch.broadcast_tensors(*inputs)
        return self.sum(torch.stack(expanded, dim=-1))


class Concat(nn.Module):
    """``torch.cat`` along ``dim`` (relevance passes through unchanged)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat(inputs, dim=self.dim)


class ChannelAffine(nn.modules.batchnorm._BatchNorm):
    """``x * weight + bias`` per channel (dim 1): a BatchNorm whose statistics were folded away.

    Exporters that fold an inference BatchNorm into ``Mul`` and ``Add`` by per-channel
    constants (``y = x * gamma / sqrt(var + eps) + (beta - mean * gamma / sqrt(var + eps))``,
    Ioffe and Szegedy 2015, algorithm 2) leave its affine part and nothing else. This module is
    that BatchNorm with running mean 0, running variance 1 and eps 0, so everything that knows
    BatchNorm treats it as one: model randomization resets it with ``reset_parameters``
    (weight 1, bias 0), LRP composites give it BatchNorm's rule, and canonizers merge it into the
    conv or linear layer before it (Zennit's ``MergeBatchNorm``, exact here because eps is 0).
    Unlike BatchNorm it never normalizes with batch statistics, in train mode either: the file
    holds no statistics to update.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        weight = weight.detach().reshape(-1).to(torch.float32)
        bias = bias.detach().reshape(-1).to(torch.float32)
        if weight.shape != bias.shape:
            raise ValueError(f"weight {tuple(weight.shape)} and bias {tuple(bias.shape)} differ")
        super().__init__(weight.numel(), eps=0.0, affine=True, track_running_stats=True)
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(bias)

    def extra_repr(self) -> str:
        return f"{self.num_features} channels"

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an (N, C, ...) input, got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return F.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class PaddedConv2d(nn.Conv2d):
    """A 2-D convolution with its own, possibly asymmetric, zero padding (``pre_pad`` in
    ``F.pad`` order: left, right, top, bottom), as TensorFlow's "SAME" padding and exported
    ``ZeroPad2d`` layers need.

    A separate pad module in front of a conv is the same function, but not the same for LRP:
    a rule that spreads relevance over a neuron's receptive field (the flat rule) would count
    the padded zeros as inputs, and their share is lost when it passes back through the pad
    (a legacy export of EfficientNet-Lite1 kept 0.86-0.91 of its relevance instead of 1.0).
    Inside the module, the rules re-run ``forward`` on modified inputs and pad those, so the
    padding stays padding."""

    pre_pad: tuple[int, int, int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(F.pad(x, self.pre_pad), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pre_pad={self.pre_pad}"


def with_zero_padding(conv: nn.Conv2d, pads: tuple[int, int, int, int]) -> nn.Conv2d:
    """``conv`` preceded by zero padding ``pads`` (left, right, top, bottom) as one module:
    a plain ``nn.Conv2d`` when the total padding is symmetric, else a :class:`PaddedConv2d`.
    The parameters are the same tensors."""
    own = conv.pre_pad if isinstance(conv, PaddedConv2d) else (0, 0, 0, 0)
    height, width = conv.padding if isinstance(conv.padding, tuple) else (0, 0)
    left, right, top, bottom = (
        pads[0] + own[0] + width,
        pads[1] + own[1] + width,
        pads[2] + own[2] + height,
        pads[3] + own[3] + height,
    )
    symmetric = left == right and top == bottom
    merged = nn.utils.skip_init(
        nn.Conv2d if symmetric else PaddedConv2d,
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=(top, left) if symmetric else 0,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    merged.weight = conv.weight
    if conv.bias is not None:
        merged.bias = conv.bias
    if isinstance(merged, PaddedConv2d):
        merged.pre_pad = (left, right, top, bottom)
    return merged
