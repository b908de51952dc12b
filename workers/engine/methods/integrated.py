"""Integrated Gradients with its path steps folded into the batch axis.

Hand-written: Captum's ``IntegratedGradients`` concatenates all steps of all images into one
batch (or loops over ``internal_batch_size`` chunks while re-building them); here the path points
are built chunk by chunk from (image, step) indices so memory stays bounded for any
``ig_steps``, and the family fits the registry's call shape. Same Gauss-Legendre rule as Captum's
default ``method="gausslegendre"``; checked against Captum in
tests/engine/test_methods_differential.py.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from ..contract.cost import ROWS_PER_PASS
from ..errors import SpecError
from ..spec import InputSpec
from ._hooks import as_map, evaluating, input_leaf, target_scores
from .base import MethodContext, MethodFamily, MethodInfo, register

# path points per forward/backward (bounds activation memory); the cost estimate counts them
PATH_ROWS_PER_PASS = ROWS_PER_PASS


def gauss_legendre_on_unit_interval(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``alpha_s`` in (0, 1) and weights ``w_s`` (summing to 1) of the ``steps``-point rule.

    The Legendre rule on [-1, 1] mapped to [0, 1]: ``alpha = (1 + t) / 2``, ``w = v / 2``.
    """
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return 0.5 * (1.0 + nodes), 0.5 * weights


def baseline_for_input_spec(input_spec: InputSpec, kind: Literal["zero", "black"]) -> torch.Tensor:
    """The IG baseline ``kind`` in the model's normalized input space, shaped (1, C, 1, 1).

    For the caller to put in ``MethodContext.baseline``. "zero": zeros, i.e. the data set's mean
    colour. "black": the normalized value of an all-black image, ``(value_range[0] - mean) /
    std`` per channel.
    """
    channels = input_spec.channels
    mean = torch.tensor(input_spec.mean, dtype=torch.float32).expand(channels)
    std = torch.tensor(input_spec.std, dtype=torch.float32).expand(channels)
    if kind == "black":
        value = (input_spec.value_range[0] - mean) / std
    elif kind == "zero":
        value = torch.zeros(channels)
    else:
        raise SpecError(f"unknown ig_baseline {kind!r}; use zero or black")
    return value.view(1, channels, 1, 1)


def ig_baseline(x: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
    """The IG baseline, shaped like ``x``: ``ctx.baseline`` if the caller gave one, else zeros.

    "zero" is zeros in the normalized input space. "black" (the normalized value of a black
    image) depends on the input spec's mean/std, which only the caller knows: it must pass it as
    ``ctx.baseline``.
    """
    if ctx.baseline is not None:
        return ctx.baseline.to(device=x.device, dtype=x.dtype).expand_as(x)
    if ctx.params.ig_baseline == "zero":
        return torch.zeros_like(x)
    raise SpecError(
        f"ig_baseline {ctx.params.ig_baseline!r} needs the baseline tensor built from the "
        "input spec (MethodContext.baseline)"
    )


def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    baseline: torch.Tensor,
    steps: int,
    rows_per_pass: int = PATH_ROWS_PER_PASS,
) -> torch.Tensor:
    """Integrated Gradients (Sundararajan, Taly, Yan 2017, eq. 1), (N, C, H, W).

    ``IG(x) = (x - x') * integral_0^1 dy_c/dx (x' + a (x - x')) da``, the integral taken with
    the ``steps``-point Gauss-Legendre rule (exact for polynomials of degree 2*steps - 1 in
    ``a``, where the paper's eq. 3 uses a Riemann sum).
    """
    x = x.detach()
    delta = x - baseline
    nodes, weights = gauss_legendre_on_unit_interval(steps)
    alphas = torch.as_tensor(nodes, dtype=x.dtype, device=x.device)
    step_weights = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
    target = target.to(x.device)
    integral = torch.zeros_like(x)
    rows = x.shape[0] * steps
    with evaluating(model):
        for start in range(0, rows, rows_per_pass):
            row = torch.arange(start, min(start + rows_per_pass, rows), device=x.device)
            image, step = row // steps, row % steps
            scale = alphas[step].view(-1, 1, 1, 1)
            leaf = input_leaf(baseline[image] + scale * delta[image])
            score = target_scores(model(leaf), target[image]).sum()
            (grad,) = torch.autograd.grad(score, [leaf])
            integral.index_add_(0, image, grad * step_weights[step].view(-1, 1, 1, 1))
    return delta * integral


@register
class IntegratedGradientsFamily(MethodFamily):
    """Path-integrated gradients from a baseline to the input."""

    name = "integrated_gradients"
    provides: ClassVar[tuple[MethodInfo, ...]] = (
        MethodInfo(
            name="integrated_gradients",
            family="integrated_gradients",
            reference="Sundararajan, Taly, Yan 2017, Axiomatic Attribution for Deep Networks, "
            "ICML, arXiv:1703.01365 (eq. 1)",
            description="Input minus baseline times the path-averaged gradient "
            "(ig_steps-point Gauss-Legendre rule, baseline from ig_baseline).",
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
        baseline = ig_baseline(x, ctx)
        ig = integrated_gradients(model, x, target, baseline, ctx.params.ig_steps)
        return {"integrated_gradients": as_map(ig)}
