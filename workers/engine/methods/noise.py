"""SmoothGrad, SmoothGrad-squared and VarGrad from one set of noisy samples.

Hand-written: the three methods share the same noisy gradients (Captum's ``NoiseTunnel`` would
draw and differentiate three separate sample sets), and the noise comes from the run's seeded
generator instead of the global RNG. Samples are folded into the batch axis and differentiated
in chunks. Checked against Captum's ``NoiseTunnel`` on the same noise in
tests/engine/test_methods_differential.py.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ._hooks import as_map, evaluating, input_leaf, target_scores
from .base import MethodContext, MethodFamily, MethodInfo, register

SAMPLE_ROWS_PER_PASS = 32  # noisy images per forward/backward (bounds activation memory)


def noise_sigma(x: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Per-image noise standard deviation, (N,) -> broadcastable (N, 1, 1, 1).

    Smilkov et al. 2017 (section 3) set ``sigma = noise_level * (max(x) - min(x))`` for each
    image; Captum users do the same by passing that product as ``stdevs``. We take the range
    over all channels and pixels of the preprocessed (normalized) image.
    """
    flat = x.detach().flatten(1)
    value_range = flat.max(dim=1).values - flat.min(dim=1).values
    return (noise_level * value_range).view(-1, 1, 1, 1)


def draw_noise(
    x: torch.Tensor, samples: int, noise_level: float, generator: torch.Generator
) -> torch.Tensor:
    """Gaussian noise (N, S, C, H, W) drawn on the CPU from ``generator``, on x's device."""
    n = x.shape[0]
    unit = torch.randn(
        (n, samples, *x.shape[1:]), generator=generator, dtype=x.dtype, device="cpu"
    ).to(x.device)
    return unit * noise_sigma(x, noise_level).unsqueeze(1)


def noisy_gradient_moments(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    noise: torch.Tensor,
    rows_per_pass: int = SAMPLE_ROWS_PER_PASS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, mean of squares and variance over samples of ``d y_c / d (x + noise)``.

    ``noise`` is (N, S, C, H, W); returns three (N, C, H, W) tensors in x's dtype:

    * SmoothGrad (Smilkov et al. 2017, section 3): ``mean_s g_s``
    * SmoothGrad-squared (Hooker et al. 2019, as Captum's ``smoothgrad_sq``): ``mean_s g_s^2``
    * VarGrad (Adebayo et al. 2018, "Local explanation methods for deep neural networks lack
      sensitivity to parameter values", section 2): ``mean_s (g_s - mean g)^2`` (population
      variance, as Captum;
      computed in two passes, so it does not lose precision like ``E[g^2] - E[g]^2``)
    """
    n, s = noise.shape[:2]
    noisy = (x.detach().unsqueeze(1) + noise).flatten(0, 1)
    row_target = target.to(x.device).repeat_interleave(s)
    grads = torch.empty_like(noisy)
    with evaluating(model):
        for start in range(0, noisy.shape[0], rows_per_pass):
            stop = start + rows_per_pass
            leaf = input_leaf(noisy[start:stop])
            score = target_scores(model(leaf), row_target[start:stop]).sum()
            (grads[start:stop],) = torch.autograd.grad(score, [leaf])
    grads = grads.view(n, s, *x.shape[1:])
    mean = grads.mean(dim=1)
    mean_sq = (grads * grads).mean(dim=1)
    variance = ((grads - mean.unsqueeze(1)) ** 2).mean(dim=1)
    return mean, mean_sq, variance


@register
class NoiseFamily(MethodFamily):
    """Gradient statistics over Gaussian-perturbed copies of each input."""

    name = "noise"
    provides: ClassVar[tuple[MethodInfo, ...]] = (
        MethodInfo(
            name="smoothgrad",
            family="noise",
            reference="Smilkov, Thorat, Kim, Viegas, Wattenberg 2017, SmoothGrad, "
            "arXiv:1706.03825 (section 3)",
            description="Mean gradient over noisy copies of the input "
            "(sigma = noise_level * (max - min) per image).",
        ),
        MethodInfo(
            name="smoothgrad_sq",
            family="noise",
            reference="Smilkov et al. 2017, arXiv:1706.03825; squared variant as in Hooker "
            "et al. 2019, arXiv:1806.10758",
            description="Mean squared gradient over the same noisy copies.",
            scale_power=2,
        ),
        MethodInfo(
            name="vargrad",
            family="noise",
            reference="Adebayo, Gilmer, Goodfellow, Kim 2018, arXiv:1810.03307; "
            "Adebayo et al. 2018, Sanity Checks, arXiv:1810.03292",
            description="Variance of the gradient over the same noisy copies.",
            scale_power=2,
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
        params = ctx.params
        noise = draw_noise(x, params.noise_samples, params.noise_level, ctx.generator)
        mean, mean_sq, variance = noisy_gradient_moments(model, x, target, noise)
        maps = {"smoothgrad": mean, "smoothgrad_sq": mean_sq, "vargrad": variance}
        return {name: as_map(maps[name]) for name in wanted}
