"""The noise family and Integrated Gradients run in bounded chunks whatever the parameters
(issue 18, item 1): the same maps as one unchunked computation, and a peak memory that does
not grow with ``noise_samples`` or ``ig_steps``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from saliency_audit.workers.engine.methods.noise import (
    SAMPLE_ROWS_PER_PASS,
    draw_noise,
    noise_chunks,
    streamed_gradient_moments,
)
from tests.engine.nets import images, small_cnn

ROOT = Path(__file__).resolve().parents[2]


def two_pass_moments(
    model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unchunked computation the noise family ran before: every noisy gradient at once."""
    n, s = noise.shape[:2]
    noisy = (x.unsqueeze(1) + noise).flatten(0, 1).requires_grad_(True)
    score = model(noisy).gather(1, t.repeat_interleave(s).view(-1, 1)).sum()
    (grads,) = torch.autograd.grad(score, [noisy])
    grads = grads.view(n, s, *x.shape[1:])
    mean = grads.mean(dim=1)
    return mean, (grads * grads).mean(dim=1), ((grads - mean.unsqueeze(1)) ** 2).mean(dim=1)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 5, 5), (3, 7, 7)])
def test_the_chunked_noise_is_the_noise_of_one_draw(shape: tuple[int, ...]) -> None:
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    whole = draw_noise(x, 50, 0.15, torch.Generator().manual_seed(7)).flatten(0, 1)
    rows = noise_chunks(x, 50, 0.15, torch.Generator().manual_seed(7))
    pieces = [rows(a, min(a + SAMPLE_ROWS_PER_PASS, 150)) for a in range(0, 150, 32)]
    assert torch.equal(torch.cat(pieces), whole)


@pytest.mark.parametrize("rows_per_pass", [1, 3, 7, 32, 1000])
def test_streamed_moments_equal_the_unchunked_moments(rows_per_pass: int) -> None:
    # float64, so the comparison sees the merge's algebra and not float32 rounding
    model = small_cnn().double()
    x, t = images(3, 16, seed=2).double(), torch.tensor([0, 3, 1])
    noise = draw_noise(x, 11, 0.2, torch.Generator().manual_seed(3))
    expected = two_pass_moments(model.eval(), x, t, noise)
    flat = noise.flatten(0, 1)
    got = streamed_gradient_moments(
        model, x, t, 11, lambda a, b: flat[a:b], rows_per_pass=rows_per_pass
    )
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-14)


def test_noise_family_maps_equal_the_unchunked_maps_on_the_same_seed() -> None:
    from saliency_audit.workers.engine.methods.base import MethodContext
    from saliency_audit.workers.engine.methods.noise import NoiseFamily
    from saliency_audit.workers.engine.spec import MethodParams

    model = small_cnn()
    x, t = images(2, 32, seed=5), torch.tensor([2, 4])
    params = MethodParams(noise_samples=40, noise_level=0.15)  # 80 rows: 3 chunks
    ctx = MethodContext(params=params, generator=torch.Generator().manual_seed(11))
    wanted = frozenset({"smoothgrad", "smoothgrad_sq", "vargrad"})
    maps = NoiseFamily().compute(model, x, t, wanted, ctx)
    noise = draw_noise(x, 40, 0.15, torch.Generator().manual_seed(11))
    mean, mean_sq, variance = two_pass_moments(model.eval(), x, t, noise)
    for name, expected in (("smoothgrad", mean), ("smoothgrad_sq", mean_sq), ("vargrad", variance)):
        torch.testing.assert_close(maps[name], expected, rtol=1e-4, atol=1e-7)


PEAK = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from tests.engine.nets import images, small_cnn
    from saliency_audit.workers.engine.methods.base import MethodContext
    from saliency_audit.workers.engine.methods.integrated import IntegratedGradientsFamily
    from saliency_audit.workers.engine.methods.noise import NoiseFamily
    from saliency_audit.workers.engine.spec import MethodParams

    torch.set_num_threads(1)
    family, count = sys.argv[1], int(sys.argv[2])
    model, x, t = small_cnn(), images(4, 64, seed=1), torch.tensor([0, 1, 2, 3])
    if family == "noise":
        params = MethodParams(noise_samples=count)
        compute, wanted = NoiseFamily().compute, {"smoothgrad", "vargrad"}
    else:
        params = MethodParams(ig_steps=count)
        compute, wanted = IntegratedGradientsFamily().compute, {"integrated_gradients"}
    ctx = MethodContext(params=params, generator=torch.Generator().manual_seed(0))
    compute(model, x, t, frozenset(wanted), ctx)  # warm up the allocator and the kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    compute(model, x, t, frozenset(wanted), ctx)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_kib": after - before, "peak_kib": after}))
    """
)


def peak_rss_kib(family: str, count: int) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PEAK, family, str(count)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    peak: int = json.loads(done.stdout.strip().splitlines()[-1])["peak_kib"]
    return peak


@pytest.mark.parametrize("family", ["noise", "integrated"])
def test_peak_memory_does_not_grow_with_samples_or_steps(family: str) -> None:
    # Max RSS of a fresh process (getrusage): an honest whole-process measure on the CPU,
    # where torch has no allocator statistics. 4 images of 3 x 64 x 64 with 512 samples
    # held at once would be 2048 x 48 KiB = 96 MiB per copy (the unchunked noise family held
    # three: the noise, the noisy inputs and their gradients); chunked, 512 samples cost what
    # 32 do, up to the allocator's noise.
    small = peak_rss_kib(family, 32)
    large = peak_rss_kib(family, 512)
    assert large - small < 48 * 1024, (small, large)
