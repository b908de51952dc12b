"""SmoothGrad, SmoothGrad-squared and VarGrad from one set of noisy samples.

Hand-written: the three methods share the same noisy gradients (Captum's ``NoiseTunnel`` would
draw and differentiate three separate sample sets), and the noise comes from the run's seeded
generator instead of the global RNG. Samples are folded into the batch axis, drawn and
differentiated in chunks of ``SAMPLE_ROWS_PER_PASS`` rows, and reduced to running moments, so
memory stays flat in ``noise_samples``. Checked against Captum's ``NoiseTunnel`` on the same
noise in tests/engine/test_methods_differential.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from ..contract.cost import ROWS_PER_PASS
from ._hooks import as_map, evaluating, input_leaf, target_scores
from .base import MethodContext, MethodFamily, MethodInfo, register

# noisy images per forward/backward: bounds activation memory whatever noise_samples is; a
# multiple of 16 so the chunked noise equals one draw (noise_chunks); the cost estimate counts it
SAMPLE_ROWS_PER_PASS = ROWS_PER_PASS


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
    """Gaussian noise (N, S, C, H, W) drawn on the CPU from ``generator``, on x's device.

    All of it at once: for tests and small callers. The noise family draws the same values
    chunk by chunk (:func:`noise_chunks`), so its memory does not grow with ``samples``.
    """
    n = x.shape[0]
    unit = torch.randn(
        (n, samples, *x.shape[1:]), generator=generator, dtype=x.dtype, device="cpu"
    ).to(x.device)
    return unit * noise_sigma(x, noise_level).unsqueeze(1)


# (first row, stop row) -> the noise of rows [first, stop) of the (image, sample) grid
NoiseRows = Callable[[int, int], torch.Tensor]


def noise_chunks(
    x: torch.Tensor, samples: int, noise_level: float, generator: torch.Generator
) -> NoiseRows:
    """The noise of :func:`draw_noise`, row range by row range, for calls in row order.

    Rows are (image, sample) pairs in the order of the flattened (N, S) grid. torch's CPU
    normal sampler turns its uniform stream into normals in blocks of 16 values, so drawing the
    grid in consecutive pieces whose sizes are multiples of 16 values gives the very values of
    one draw (a test checks it); the noise family's pieces are ``SAMPLE_ROWS_PER_PASS`` rows.
    """
    sigma = noise_sigma(x, noise_level)

    def rows(first: int, stop: int) -> torch.Tensor:
        unit = torch.randn(
            (stop - first, *x.shape[1:]), generator=generator, dtype=x.dtype, device="cpu"
        ).to(x.device)
        image = torch.arange(first, stop, device=x.device) // samples
        return unit * sigma[image]

    return rows


def noisy_gradient_moments(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    noise: torch.Tensor,
    rows_per_pass: int = SAMPLE_ROWS_PER_PASS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`streamed_gradient_moments` of a noise tensor (N, S, C, H, W) held whole."""
    samples = noise.shape[1]
    flat = noise.flatten(0, 1)
    return streamed_gradient_moments(
        model, x, target, samples, lambda first, stop: flat[first:stop], rows_per_pass
    )


def streamed_gradient_moments(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    samples: int,
    noise_rows: NoiseRows,
    rows_per_pass: int = SAMPLE_ROWS_PER_PASS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, mean of squares and variance over samples of ``d y_c / d (x + noise)``.

    ``noise_rows(first, stop)`` gives the noise of rows ``[first, stop)`` of the flattened
    (image, sample) grid; returns three (N, C, H, W) tensors in x's dtype:

    * SmoothGrad (Smilkov et al. 2017, section 3): ``mean_s g_s``
    * SmoothGrad-squared (Hooker et al. 2019, as Captum's ``smoothgrad_sq``): ``mean_s g_s^2``
    * VarGrad (Adebayo et al. 2018, "Local explanation methods for deep neural networks lack
      sensitivity to parameter values", section 2): ``mean_s (g_s - mean g)^2`` (population
      variance, as Captum)

    At most ``rows_per_pass`` noisy images exist at a time, whatever ``samples`` is: each
    chunk's gradients are folded into per-image running moments and dropped. The variance is
    merged chunk by chunk with the pairwise update of Chan, Golub, LeVeque 1979 ("Updating
    formulae and a pairwise algorithm for computing sample variances"), which keeps the
    precision of a two-pass computation, unlike ``E[g^2] - E[g]^2``.
    """
    n = x.shape[0]
    x = x.detach()
    target = target.to(x.device)
    mean = torch.zeros_like(x)
    sum_sq = torch.zeros_like(x)
    m2 = torch.zeros_like(x)
    count = torch.zeros(n, dtype=x.dtype, device=x.device)
    rows = n * samples
    with evaluating(model):
        for first in range(0, rows, rows_per_pass):
            stop = min(first + rows_per_pass, rows)
            image = torch.arange(first, stop, device=x.device) // samples
            leaf = input_leaf(x[image] + noise_rows(first, stop))
            score = target_scores(model(leaf), target[image]).sum()
            (grads,) = torch.autograd.grad(score, [leaf])
            sum_sq.index_add_(0, image, grads * grads)
            # this chunk's own count, mean and sum of squared deviations per image it touches
            lo, hi = first // samples, (stop - 1) // samples + 1
            local = image - lo
            chunk_count = torch.bincount(local, minlength=hi - lo).to(x.dtype)
            chunk_sum = torch.zeros_like(x[lo:hi]).index_add_(0, local, grads)
            shape = (-1, *([1] * (x.dim() - 1)))
            chunk_mean = chunk_sum / chunk_count.view(shape)
            chunk_m2 = torch.zeros_like(chunk_sum).index_add_(
                0, local, (grads - chunk_mean[local]) ** 2
            )
            before = count[lo:hi]
            total = before + chunk_count
            delta = chunk_mean - mean[lo:hi]
            mean[lo:hi] += delta * (chunk_count / total).view(shape)
            m2[lo:hi] += chunk_m2 + delta * delta * (before * chunk_count / total).view(shape)
            count[lo:hi] = total
    return mean, sum_sq / samples, m2 / samples


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
        samples = params.noise_samples
        rows = noise_chunks(x, samples, params.noise_level, ctx.generator)
        mean, mean_sq, variance = streamed_gradient_moments(model, x, target, samples, rows)
        maps = {"smoothgrad": mean, "smoothgrad_sq": mean_sq, "vargrad": variance}
        return {name: as_map(maps[name]) for name in wanted}
