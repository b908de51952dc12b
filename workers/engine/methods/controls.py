"""Model-independent control maps: an edge detector and a seeded random map.

Adebayo et al. 2018 (section 5 and figure 4) show that an edge detector produces maps that look
like many saliency maps although it ignores the model, so it must FAIL the randomization tests;
a random map passes them trivially and must lose on the faithfulness metrics. Neither control
runs the model.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ._hooks import as_map
from .base import MethodContext, MethodFamily, MethodInfo, register


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of each channel, summed over channels: (N, C, H, W) -> (N, 1, H, W).

    Per channel this is ``skimage.filters.sobel`` on a 2-D image: the kernels are the derivative
    ``[1, 0, -1]`` times the smoothing ``[1, 2, 1] / 4`` (so 1/4 of the textbook Sobel kernel) and
    the magnitude is ``sqrt((G_h^2 + G_v^2) / 2)``. Borders repeat the edge pixel, which is what
    scikit-image's default ``mode="reflect"`` (SciPy's half-sample reflection) does for a
    one-pixel pad. Magnitudes are summed over channels so an edge in any colour channel counts
    (summing the channels first would cancel opposite-signed colour edges).
    """
    n, c, h, w = x.shape
    smooth = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device) / 4
    derivative = torch.tensor([1.0, 0.0, -1.0], dtype=x.dtype, device=x.device)
    kernels = torch.stack([torch.outer(derivative, smooth), torch.outer(smooth, derivative)])
    planes = F.pad(x.detach().reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    edges = F.conv2d(planes, kernels.unsqueeze(1))  # (N*C, 2, H, W); the sign is squared away
    magnitude = torch.sqrt((edges * edges).sum(dim=1) / 2)
    return magnitude.view(n, c, h, w).sum(dim=1, keepdim=True)


def random_map(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) noise (N, 1, H, W) drawn on the CPU from ``generator``."""
    n, _, h, w = x.shape
    return torch.rand((n, 1, h, w), generator=generator, dtype=torch.float32).to(x.device)


@register
class ControlFamily(MethodFamily):
    """Controls every audit includes; they never touch the model."""

    name = "controls"
    provides: ClassVar[tuple[MethodInfo, ...]] = (
        MethodInfo(
            name="control_sobel",
            family="controls",
            reference="Adebayo et al. 2018, Sanity Checks for Saliency Maps, NeurIPS, "
            "arXiv:1810.03292 (edge-detector comparison); Sobel operator as in scikit-image",
            description="Sobel gradient magnitude of the input, summed over channels; "
            "ignores the model, so it must fail the randomization tests.",
            is_control=True,
        ),
        MethodInfo(
            name="control_random",
            family="controls",
            reference="Adebayo et al. 2018, Sanity Checks for Saliency Maps, NeurIPS, "
            "arXiv:1810.03292 (random baseline)",
            description="Seeded uniform [0, 1) noise; changes with the seed only, so it "
            "passes randomization trivially and must lose on faithfulness.",
            is_control=True,
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
        out: dict[str, torch.Tensor] = {}
        if "control_sobel" in wanted:
            out["control_sobel"] = as_map(sobel_magnitude(x))
        if "control_random" in wanted:
            out["control_random"] = as_map(random_map(x, ctx.generator))
        return out
