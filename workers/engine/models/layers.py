"""Small modules the model adapters put in the graph so that attribution rules can see them.

Element-wise additions of two tensors (residual connections) become :class:`Add`, whose sum is a
``zennit.layer.Sum`` module: Zennit's ``Norm`` rule then splits relevance between the branches in
proportion to their contributions (Bach et al. 2015, eq. 2 applied to a sum), which keeps LRP
conservative through skip connections. Concatenation is linear and needs no rule.
"""

from __future__ import annotations

import torch
from torch import nn
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
