"""How alike two saliency maps are: the similarity measures of the sanity checks.

Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018 (arXiv:1810.03292),
compare the map of the trained model with the map of a randomized one, image by image, with
four scores: Spearman rank correlation of the absolute map and of the signed map, SSIM of the
maps rescaled to [0, 1], and the correlation of their HOG features. A method whose scores stay
near 1 under randomization does not depend on what the model learned.

Every measure here takes two batches of single-channel maps ``a`` and ``b`` of shape
(N, H, W) (reduce channels first with :func:`reduce_channels`) and returns a float64 tensor of
shape (N,), one score per image pair, computed on the inputs' device without a Python loop over
images. The numbers are meant to be the ones a reader would get from SciPy and scikit-image on
each pair, so that a report can be checked against the paper's own tooling:
``scipy.stats.spearmanr``, ``skimage.metrics.structural_similarity`` and
``skimage.feature.hog``. The test suite checks that agreement differentially.

All arithmetic runs in float64 whatever the input dtype: SSIM's local variances are
differences of nearly equal moments (E[x^2] - E[x]^2), which lose most of float32's digits.

Undefined scores are NaN, as in SciPy: a correlation of a constant map (zero variance: an
all-zero ReLU'd CAM, a map the randomized model flattened) or of a map containing NaN. The
caller decides what a NaN means for a verdict; nothing here silently turns it into 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import SpecError

__all__ = [
    "HOG_BLOCK_NORM_EPS",
    "HOG_CELLS_PER_BLOCK",
    "HOG_L2_HYS_CLIP",
    "HOG_ORIENTATIONS",
    "HOG_PIXELS_PER_CELL",
    "MEASURES",
    "MIN_MAP_SIDE_PX",
    "SSIM_DATA_RANGE",
    "SSIM_K1",
    "SSIM_K2",
    "SSIM_WIN_SIZE",
    "ChannelReduction",
    "MapTooSmallError",
    "Prepared",
    "SimilarityMeasure",
    "average_ranks",
    "compare",
    "hog_features",
    "hog_pearson",
    "hog_spearman",
    "normalize_01",
    "pearson_rows",
    "prepare",
    "reduce_channels",
    "spearman",
    "spearman_abs",
    "spearman_rows",
    "ssim",
]

SimilarityMeasure = Callable[[Tensor, Tensor], Tensor]
ChannelReduction = Literal["sum", "max_abs"]

# SSIM (Wang et al. 2004) with scikit-image's defaults (the sanity-check notebooks call its
# ``compare_ssim``): a 7x7 uniform window rather than Wang et al.'s 11x11 Gaussian, their
# K1/K2, sample (N-1) covariance.
SSIM_WIN_SIZE = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_DATA_RANGE = 1.0  # maps are rescaled to [0, 1] first

# HOG (Dalal & Triggs 2005) as the sanity-check code called it: ``skimage.feature.hog`` of
# the [0, 1]-normalized map with ``pixels_per_cell=(16, 16)`` and every other parameter left at
# scikit-image's default (9 unsigned orientation bins, 3x3-cell blocks, L2-Hys block norm, no
# gamma compression; scikit-image < 0.15 defaulted to L1 blocks, today's default is L2-Hys,
# Dalal & Triggs' choice). Keeping their parameters keeps our HOG scores comparable with the
# paper's figures; 16-pixel cells also describe the coarse shape of a 224-299 px map rather
# than pixel noise. Checked against scikit-image, whose cell sums are C floats (float32): we
# sum in float64, so features differ from it by under 1e-6 (see the tests).
HOG_ORIENTATIONS = 9
HOG_PIXELS_PER_CELL = (16, 16)
HOG_CELLS_PER_BLOCK = (3, 3)
HOG_BLOCK_NORM_EPS = 1e-5  # scikit-image's L2-Hys epsilon
HOG_L2_HYS_CLIP = 0.2  # Dalal & Triggs' clipping of normalized block values

# Smallest map side each measure accepts; a caller can skip a measure for small inputs (a HOG
# block of 3x3 cells of 16 px needs 48 px, so 28x28 MNIST maps have no HOG score).
_HOG_MIN_SIZE = (
    HOG_PIXELS_PER_CELL[0] * HOG_CELLS_PER_BLOCK[0],
    HOG_PIXELS_PER_CELL[1] * HOG_CELLS_PER_BLOCK[1],
)
MIN_MAP_SIDE_PX: dict[str, int] = {
    "spearman_abs": 1,
    "spearman": 1,
    "ssim": SSIM_WIN_SIZE,
    "hog_pearson": max(_HOG_MIN_SIZE),
    "hog_spearman": max(_HOG_MIN_SIZE),
}


class MapTooSmallError(SpecError, ValueError):
    """The maps are smaller than a measure's window (SSIM window or one HOG block).

    A spec error because the input size the user chose cannot support the measure; also a
    ``ValueError`` because that is what scikit-image raises for the same inputs.
    """

    code = "map_too_small"


# --------------------------------------------------------------------------- preparation


def reduce_channels(maps: Tensor, how: ChannelReduction = "sum") -> Tensor:
    """Reduce (N, C, H, W) attribution maps to one (N, H, W) map per image.

    ``"sum"`` adds the channels, keeping the sign: Adebayo et al. 2018 sum over channels before
    comparing. ``"max_abs"`` takes the largest magnitude over channels, the saliency map of
    Simonyan et al. 2014 (section 3.1); it drops the sign, so ``spearman`` and
    ``spearman_abs`` agree on its output.
    """
    if maps.ndim != 4:
        raise ValueError(f"expected maps of shape (N, C, H, W), got {tuple(maps.shape)}")
    if how == "sum":
        return maps.sum(dim=1)
    if how == "max_abs":
        return maps.abs().amax(dim=1)
    raise SpecError(f"unknown channel reduction {how!r}; use 'sum' or 'max_abs'")


def normalize_01(maps: Tensor) -> Tensor:
    """Rescale each (H, W) map of a (N, H, W) batch to [0, 1] by its own min and max (float64).

    SSIM and HOG depend on the absolute intensity scale, which differs by orders of magnitude
    between a trained and a randomized model; the sanity-check code min-max normalizes each map
    before both. A constant map has no scale: it becomes all zeros (the original code divided
    0 by 0). The subtraction and division are done elementwise in that order so that equal
    inputs stay exactly equal, which keeps zero gradients exactly zero for HOG.
    """
    _check_batch(maps)
    x = maps.to(torch.float64)
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    out = (x - lo) / safe
    # NaN spans (a map containing NaN) propagate NaN instead of becoming zeros.
    return torch.where(span == 0, torch.zeros_like(out), out)


# --------------------------------------------------------------------------- correlations


def average_ranks(x: Tensor) -> Tensor:
    """Ranks (1-based, float64) of each row of a (N, M) tensor, ties given their average rank.

    This is ``scipy.stats.rankdata(method="average")`` row by row, which ``spearmanr`` uses.
    Ties matter here: a ReLU'd CAM map is zero over most of the image, and giving those pixels
    distinct ranks (as ``argsort`` alone would) invents an order that is not in the map.
    """
    if x.ndim != 2:
        raise ValueError(f"expected a (N, M) tensor, got {tuple(x.shape)}")
    n, m = x.shape
    if m == 0:
        return x.to(torch.float64)
    values, order = torch.sort(x, dim=1)
    pos = torch.arange(m, device=x.device).expand(n, m)
    starts = torch.ones(n, m, dtype=torch.bool, device=x.device)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    ends = torch.ones(n, m, dtype=torch.bool, device=x.device)
    ends[:, :-1] = starts[:, 1:]
    # first position of each tie group, carried forward; last position, carried backward
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    last_rev = torch.where(ends, pos, torch.full_like(pos, m)).flip(1).cummin(dim=1).values
    last = last_rev.flip(1)
    avg = (first + last).to(torch.float64) / 2.0 + 1.0
    return torch.empty_like(avg).scatter_(1, order, avg)


def pearson_rows(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of each row pair of two (N, M) tensors, float64, clipped to [-1, 1].

    NaN where a row is constant or contains NaN, like ``scipy.stats.pearsonr``.
    """
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"expected two (N, M) tensors of one shape, got {x.shape} and {y.shape}")
    xd = x.to(torch.float64)
    yd = y.to(torch.float64)
    xc = xd - xd.mean(dim=1, keepdim=True)
    yc = yd - yd.mean(dim=1, keepdim=True)
    num = (xc * yc).sum(dim=1)
    den = xc.square().sum(dim=1).sqrt() * yc.square().sum(dim=1).sqrt()
    r = num / den  # 0 / 0 -> NaN for a constant row, as SciPy reports
    r = torch.where(den > 0, r, torch.full_like(r, math.nan))
    return r.clamp(-1.0, 1.0)


def spearman_rows(x: Tensor, y: Tensor) -> Tensor:
    """Spearman rank correlation of each row pair of two (N, M) tensors (float64).

    Pearson correlation of average ranks, as ``scipy.stats.spearmanr`` computes it. NaN for a
    constant row and for any row containing NaN (SciPy's default ``nan_policy="propagate"``).
    """
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"expected two (N, M) tensors of one shape, got {x.shape} and {y.shape}")
    r = pearson_rows(average_ranks(x), average_ranks(y))
    has_nan = torch.isnan(x).any(dim=1) | torch.isnan(y).any(dim=1)
    return torch.where(has_nan, torch.full_like(r, math.nan), r)


def spearman_abs(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of |a| and |b| per image (Adebayo et al. 2018, "ABS").

    The absolute map asks whether the same pixels matter, whatever the sign a method gives them;
    it is the paper's main similarity score for gradient-type maps.
    """
    _check_pair(a, b)
    return compare(prepare("spearman_abs", a), prepare("spearman_abs", b))


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of the signed maps per image (Adebayo et al. 2018, "diverging").

    Unlike :func:`spearman_abs` it sees a sign flip: a map against its negation scores -1.
    """
    _check_pair(a, b)
    return compare(prepare("spearman", a), prepare("spearman", b))


# --------------------------------------------------------------------------- SSIM


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Mean SSIM of the [0, 1]-normalized maps (Wang et al. 2004, eqs. 13 and 17).

    Adebayo et al. 2018 use SSIM because rank correlation ignores where structure sits, and
    SSIM compares local means, contrasts and correlations window by window. Matches
    ``skimage.metrics.structural_similarity(a01, b01, data_range=1.0)``: 7x7 uniform window,
    K1 = 0.01, K2 = 0.03, sample covariance, and the mean taken only over windows that lie
    fully inside the map (scikit-image crops (win - 1) // 2 pixels at each border, which is
    exactly the "valid" output of a stride-1 7x7 average pool).
    """
    _check_pair(a, b)
    _check_min_size(a, (SSIM_WIN_SIZE, SSIM_WIN_SIZE), "ssim")
    return compare(prepare("ssim", a), prepare("ssim", b))


def _ssim_local_mean(t: Tensor) -> Tensor:
    return F.avg_pool2d(t, kernel_size=SSIM_WIN_SIZE, stride=1)


def _ssim_prepare(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The [0, 1]-normalized maps (N, 1, H, W) with their local means of x and x^2."""
    x = normalize_01(a).unsqueeze(1)
    return x, _ssim_local_mean(x), _ssim_local_mean(x * x)


def _ssim_compare(pa: tuple[Tensor, Tensor, Tensor], pb: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    x, ux, uxx = pa
    y, uy, uyy = pb
    uxy = _ssim_local_mean(x * y)
    n_px = SSIM_WIN_SIZE * SSIM_WIN_SIZE
    cov_norm = n_px / (n_px - 1)  # unbiased window covariance, scikit-image's default
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (SSIM_K1 * SSIM_DATA_RANGE) ** 2
    c2 = (SSIM_K2 * SSIM_DATA_RANGE) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


# --------------------------------------------------------------------------- HOG


def _hog_gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    """Central differences without the 1/2, zero on the border rows/columns (scikit-image)."""
    g_row = torch.zeros_like(x)
    g_col = torch.zeros_like(x)
    g_row[:, 1:-1, :] = x[:, 2:, :] - x[:, :-2, :]
    g_col[:, :, 1:-1] = x[:, :, 2:] - x[:, :, :-2]
    return g_row, g_col


def _unsigned_orientation_deg(g_row: Tensor, g_col: Tensor) -> Tensor:
    """Gradient orientation in degrees folded into [0, 180], bit-compatible with NumPy.

    scikit-image computes ``arctan2(g_row, g_col) * (180 / pi) % 180``. NumPy's float modulo
    adds 180 to negative angles, so an angle a hair below 0 lands on exactly 180.0, which falls
    in no bin; ``torch.remainder`` can round differently, so the fold is spelled out here.
    """
    deg = torch.atan2(g_row, g_col) * (180.0 / math.pi)
    return torch.where(deg < 0, deg + 180.0, torch.where(deg >= 180.0, deg - 180.0, deg))


def hog_features(maps: Tensor) -> Tensor:
    """HOG descriptors (Dalal & Triggs 2005) of a (N, H, W) batch, one row per map, float64.

    Reproduces ``skimage.feature.hog(map, pixels_per_cell=HOG_PIXELS_PER_CELL)`` with its other
    defaults, in its output order (block row, block col, cell row, cell col, orientation):
    unnormalized central-difference gradients, each pixel's magnitude voted wholly into the
    unsigned orientation bin [k * 20, (k + 1) * 20) degrees it falls in (no interpolation),
    cell sums divided by the cell area, cells beyond the last whole cell ignored, and L2-Hys
    normalization of every 3x3-cell block (L2, clip at 0.2, L2 again). The maps are used as
    given; the similarity measures normalize them to [0, 1] first.
    """
    _check_batch(maps)
    _check_min_size(maps, _HOG_MIN_SIZE, "hog")
    x = maps.to(torch.float64)
    n, h, w = x.shape
    c_row, c_col = HOG_PIXELS_PER_CELL
    b_row, b_col = HOG_CELLS_PER_BLOCK
    n_cells_row, n_cells_col = h // c_row, w // c_col

    g_row, g_col = _hog_gradients(x)
    magnitude = torch.hypot(g_row, g_col)
    orientation = _unsigned_orientation_deg(g_row, g_col)
    # Bin edges as scikit-image stores them (C floats); an orientation of exactly 180.0 falls
    # past the last edge and votes nowhere, as there.
    edges = torch.tensor(
        [180.0 / HOG_ORIENTATIONS * (k + 1) for k in range(HOG_ORIENTATIONS)],
        dtype=torch.float32,
    ).to(device=x.device, dtype=torch.float64)
    bins = torch.bucketize(orientation, edges, right=True)

    # only whole cells count
    rows, cols = n_cells_row * c_row, n_cells_col * c_col
    magnitude = magnitude[:, :rows, :cols]
    bins = bins[:, :rows, :cols]
    per_bin = []
    for k in range(HOG_ORIENTATIONS):  # a handful of bins; each step covers the whole batch
        votes = torch.where(bins == k, magnitude, torch.zeros_like(magnitude))
        cells = votes.reshape(n, n_cells_row, c_row, n_cells_col, c_col).sum(dim=(2, 4))
        per_bin.append(cells)
    histogram = torch.stack(per_bin, dim=-1) / (c_row * c_col)  # (N, cells_r, cells_c, O)

    # (N, blocks_r, blocks_c, O, b_row, b_col) -> (N, blocks_r, blocks_c, b_row, b_col, O)
    blocks = histogram.unfold(1, b_row, 1).unfold(2, b_col, 1).permute(0, 1, 2, 4, 5, 3)
    eps2 = HOG_BLOCK_NORM_EPS**2
    dims = (3, 4, 5)
    blocks = blocks / torch.sqrt(blocks.square().sum(dim=dims, keepdim=True) + eps2)
    blocks = blocks.clamp(max=HOG_L2_HYS_CLIP)
    blocks = blocks / torch.sqrt(blocks.square().sum(dim=dims, keepdim=True) + eps2)
    return blocks.reshape(n, -1)


def hog_pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of the HOG features of the [0, 1]-normalized maps.

    Adebayo et al. 2018 add HOG because a randomized model can keep a map's edges (the
    edge-detector failure of Guided Backprop) while shuffling its pixel ranks; correlating
    histograms of gradient orientation scores that shared structure. Pearson is the variant
    this service reports by default; see :func:`hog_spearman` for what the paper's notebooks
    computed. NaN when either map is constant (its descriptor is all zeros).
    """
    _check_pair(a, b)
    return compare(prepare("hog_pearson", a), prepare("hog_pearson", b))


def hog_spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of the HOG features of the [0, 1]-normalized maps.

    What the sanity-check notebooks actually computed ("Rank Correlation of HOG" in their
    plots: ``spearmanr(hog(a01), hog(b01))``), kept so that numbers can be compared with the
    paper's figures.
    """
    _check_pair(a, b)
    return compare(prepare("hog_spearman", a), prepare("hog_spearman", b))


# --------------------------------------------------------------------------- prepared maps
#
# Every measure splits into a per-batch preparation (ranks, the normalized map and its local
# moments, HOG features) and a comparison of two prepared batches. A sanity check compares one
# reference map set with many others (every stage of a cascade with the trained model), so the
# reference side is prepared once per audit instead of once per comparison. The measures above
# run the same two steps, so a prepared comparison is bit-identical to the direct call.


def _ranks_prepare(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Average ranks of each row and whether the row holds a NaN (Spearman's two inputs)."""
    return average_ranks(rows), torch.isnan(rows).any(dim=1)


def _ranks_compare(pa: tuple[Tensor, Tensor], pb: tuple[Tensor, Tensor]) -> Tensor:
    r = pearson_rows(pa[0], pb[0])
    return torch.where(pa[1] | pb[1], torch.full_like(r, math.nan), r)


_PREPARE: dict[str, Callable[[Tensor], object]] = {
    "spearman_abs": lambda a: _ranks_prepare(a.flatten(1).abs()),
    "spearman": lambda a: _ranks_prepare(a.flatten(1)),
    "ssim": _ssim_prepare,
    "hog_pearson": lambda a: hog_features(normalize_01(a)),
    "hog_spearman": lambda a: _ranks_prepare(hog_features(normalize_01(a))),
}
_COMPARE: dict[str, Callable[[Any, Any], Tensor]] = {
    "spearman_abs": _ranks_compare,
    "spearman": _ranks_compare,
    "ssim": _ssim_compare,
    "hog_pearson": pearson_rows,
    "hog_spearman": _ranks_compare,
}


@dataclass(frozen=True)
class Prepared:
    """One map batch prepared for one measure (see :func:`prepare`)."""

    measure: str
    shape: tuple[int, ...]
    value: object


def prepare(measure: str, maps: Tensor) -> Prepared:
    """The part of ``measure`` that depends on one map batch (N, H, W) only."""
    _check_batch(maps)
    if measure == "ssim":
        _check_min_size(maps, (SSIM_WIN_SIZE, SSIM_WIN_SIZE), "ssim")
    return Prepared(measure, tuple(maps.shape), _PREPARE[measure](maps))


def compare(a: Prepared, b: Prepared) -> Tensor:
    """``MEASURES[measure](a, b)`` from two prepared batches: (N,) float64."""
    if a.measure != b.measure:
        raise ValueError(f"prepared for different measures: {a.measure} vs {b.measure}")
    if a.shape != b.shape:
        raise ValueError(f"map batches differ in shape: {a.shape} vs {b.shape}")
    return _COMPARE[a.measure](a.value, b.value)


MEASURES: dict[str, SimilarityMeasure] = {
    "spearman_abs": spearman_abs,
    "spearman": spearman,
    "ssim": ssim,
    "hog_pearson": hog_pearson,
    "hog_spearman": hog_spearman,
}


# --------------------------------------------------------------------------- checks


def _check_batch(maps: Tensor) -> None:
    if maps.ndim != 3:
        raise ValueError(
            f"expected maps of shape (N, H, W), got {tuple(maps.shape)}; "
            "reduce channels first with reduce_channels"
        )


def _check_pair(a: Tensor, b: Tensor) -> None:
    _check_batch(a)
    if a.shape != b.shape:
        raise ValueError(f"map batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"map batches are on different devices: {a.device} vs {b.device}")


def _check_min_size(maps: Tensor, min_size: tuple[int, int], measure: str) -> None:
    h, w = maps.shape[-2:]
    need_h, need_w = min_size
    if h < need_h or w < need_w:
        raise MapTooSmallError(
            f"{measure} needs maps of at least {need_h}x{need_w} pixels, got {h}x{w}",
            measure=measure,
            height=h,
            width=w,
            min_height=need_h,
            min_width=need_w,
        )
