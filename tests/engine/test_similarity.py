"""The similarity measures agree with SciPy and scikit-image, image by image.

Differential tests: every score a report shows is checked against the library the
sanity-check authors used (``scipy.stats.spearmanr``, ``skimage.metrics.structural_similarity``,
``skimage.feature.hog``), on random maps and on the maps that break naive implementations:
ReLU'd CAM-like maps with large tied zero regions, quantized maps, ramps whose gradient points
at exactly 180 degrees, sizes that are not multiples of the HOG cell.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, rankdata, spearmanr
from skimage.feature import hog
from skimage.metrics import structural_similarity

from saliency_audit.workers.engine.errors import SpecError
from saliency_audit.workers.engine.similarity import (
    HOG_PIXELS_PER_CELL,
    MEASURES,
    MIN_MAP_SIDE_PX,
    MapTooSmallError,
    average_ranks,
    hog_features,
    hog_pearson,
    hog_spearman,
    normalize_01,
    reduce_channels,
    spearman,
    spearman_abs,
    ssim,
)

SPEARMAN_TOL = 1e-6
SKIMAGE_TOL = 1e-4

# ------------------------------------------------------------------------------ map makers


def _random(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    return rng.normal(size=(n, h, w))


def _cam_like(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Coarse 7x7 activations upsampled bilinearly, then ReLU: most pixels are exactly 0."""
    coarse = torch.from_numpy(rng.normal(size=(n, 1, 7, 7)) - 0.8)
    up = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return torch.relu(up)[:, 0].numpy()


def _quantized(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Five gray levels: huge tie groups in every rank and many equal-gradient pixels."""
    return np.round(rng.uniform(-2.0, 2.0, size=(n, h, w)))


def _structured(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Blobs, steps, a left-to-right decreasing ramp (gradient at exactly 180 deg), a grid."""
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.empty((n, h, w))
    for i in range(n):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        blob = np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * (0.15 * min(h, w)) ** 2))
        kind = i % 4
        if kind == 0:
            out[i] = blob
        elif kind == 1:
            out[i] = (cols > cx).astype(np.float64) + 0.5 * (rows > cy)
        elif kind == 2:
            out[i] = -cols + 0.0 * rows
        else:
            out[i] = ((rows // 8 + cols // 8) % 2) * blob
    return out


MAKERS: dict[str, Callable[[np.random.Generator, int, int, int], np.ndarray]] = {
    "random": _random,
    "cam_like": _cam_like,
    "quantized": _quantized,
    "structured": _structured,
}


def _pair(kind: str, h: int, w: int, n: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two related batches: b is a perturbed copy of a, so scores spread over (-1, 1)."""
    rng = np.random.default_rng(seed)
    make = MAKERS[kind]
    a = make(rng, n, h, w)
    b = make(rng, n, h, w)
    mix = rng.uniform(0.0, 1.0, size=(n, 1, 1))
    b = mix * a + (1 - mix) * b
    if kind == "quantized":
        b = np.round(b)
    return a, b


def _norm01_reference(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(), x.max()
    return np.zeros_like(x) if hi == lo else (x - lo) / (hi - lo)


def _hog_reference(x: np.ndarray) -> np.ndarray:
    return hog(_norm01_reference(x), pixels_per_cell=HOG_PIXELS_PER_CELL)


# ------------------------------------------------------------------------------ Spearman

SIZES = [(32, 32), (64, 64), (224, 224), (50, 77)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_spearman_matches_scipy_including_ties(
    size: tuple[int, int], kind: str, dtype: type[np.floating]
) -> None:
    a, b = _pair(kind, *size)
    a, b = a.astype(dtype), b.astype(dtype)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    got_signed = spearman(ta, tb).numpy()
    got_abs = spearman_abs(ta, tb).numpy()
    ref_signed = [spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(len(a))]
    ref_abs = [
        spearmanr(np.abs(a[i]).ravel(), np.abs(b[i]).ravel()).statistic for i in range(len(a))
    ]
    np.testing.assert_allclose(got_signed, ref_signed, rtol=0, atol=SPEARMAN_TOL)
    np.testing.assert_allclose(got_abs, ref_abs, rtol=0, atol=SPEARMAN_TOL)


def test_cam_like_maps_really_have_large_tied_regions() -> None:
    """Guards the tie tests above: if the maker stopped producing ties they would prove less."""
    a, _ = _pair("cam_like", 224, 224)
    assert (a == 0).mean() > 0.3


def test_average_ranks_match_scipy_rankdata_on_ties() -> None:
    rng = np.random.default_rng(1)
    x = np.round(rng.normal(size=(5, 300)))  # ~7 distinct values per row
    x[2] = 0.0  # one row entirely tied
    got = average_ranks(torch.from_numpy(x)).numpy()
    ref = np.stack([rankdata(row, method="average") for row in x])
    np.testing.assert_array_equal(got, ref)


def test_spearman_of_a_constant_map_is_nan_like_scipy() -> None:
    a, b = _pair("random", 16, 16, n=3)
    a[1] = 0.0  # e.g. a CAM the randomized model flattened to all zeros
    got = spearman(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = spearmanr(a[1].ravel(), b[1].ravel()).statistic
    assert np.isnan(ref)
    assert np.isnan(got[1])
    assert not np.isnan(got[[0, 2]]).any()


def test_spearman_of_a_map_containing_nan_is_nan() -> None:
    a, b = _pair("random", 16, 16, n=2)
    a[0, 3, 3] = np.nan
    got = spearman_abs(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert np.isnan(got[0])
    assert not np.isnan(got[1])


# ------------------------------------------------------------------------------ SSIM


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("size", [*SIZES, (7, 7)], ids=[f"{h}x{w}" for h, w in [*SIZES, (7, 7)]])
def test_ssim_matches_skimage(size: tuple[int, int], kind: str) -> None:
    a, b = _pair(kind, *size)
    got = ssim(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    ref = [
        structural_similarity(_norm01_reference(a[i]), _norm01_reference(b[i]), data_range=1.0)
        for i in range(len(a))
    ]
    np.testing.assert_allclose(got, ref, rtol=0, atol=SKIMAGE_TOL)


def test_ssim_of_float32_maps_matches_skimage_on_the_same_values() -> None:
    a, b = _pair("cam_like", 64, 64)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    got = ssim(torch.from_numpy(a32), torch.from_numpy(b32)).numpy()
    ref = [
        structural_similarity(
            _norm01_reference(a32[i].astype(np.float64)),
            _norm01_reference(b32[i].astype(np.float64)),
            data_range=1.0,
        )
        for i in range(len(a))
    ]
    np.testing.assert_allclose(got, ref, rtol=0, atol=SKIMAGE_TOL)


def test_ssim_of_two_constant_maps_is_one_like_skimage() -> None:
    a = torch.full((1, 16, 16), 3.0, dtype=torch.float64)
    b = torch.zeros(1, 16, 16, dtype=torch.float64)
    ref = structural_similarity(np.zeros((16, 16)), np.zeros((16, 16)), data_range=1.0)
    assert ssim(a, b).item() == pytest.approx(ref)


# ------------------------------------------------------------------------------ HOG

HOG_SIZES = [(64, 64), (224, 224), (50, 77), (48, 48)]


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("size", HOG_SIZES, ids=[f"{h}x{w}" for h, w in HOG_SIZES])
def test_hog_features_match_skimage(size: tuple[int, int], kind: str) -> None:
    a, _ = _pair(kind, *size)
    got = hog_features(normalize_01(torch.from_numpy(a))).numpy()
    ref = np.stack([_hog_reference(a[i]) for i in range(len(a))])
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=SKIMAGE_TOL)


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("size", HOG_SIZES, ids=[f"{h}x{w}" for h, w in HOG_SIZES])
def test_hog_pearson_matches_scipy_on_skimage_hog(size: tuple[int, int], kind: str) -> None:
    a, b = _pair(kind, *size)
    got = hog_pearson(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    feats = [(_hog_reference(a[i]), _hog_reference(b[i])) for i in range(len(a))]
    ref_pearson = [pearsonr(fa, fb).statistic for fa, fb in feats]
    ref_corrcoef = [np.corrcoef(fa, fb)[0, 1] for fa, fb in feats]
    np.testing.assert_allclose(got, ref_pearson, rtol=0, atol=SKIMAGE_TOL)
    np.testing.assert_allclose(got, ref_corrcoef, rtol=0, atol=SKIMAGE_TOL)


@pytest.mark.parametrize("kind", ["random", "cam_like"])
@pytest.mark.parametrize("size", HOG_SIZES, ids=[f"{h}x{w}" for h, w in HOG_SIZES])
def test_hog_spearman_matches_scipy_on_skimage_hog(size: tuple[int, int], kind: str) -> None:
    a, b = _pair(kind, *size)
    got = hog_spearman(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    ref = [spearmanr(_hog_reference(a[i]), _hog_reference(b[i])).statistic for i in range(len(a))]
    np.testing.assert_allclose(got, ref, rtol=0, atol=SKIMAGE_TOL)


@pytest.mark.parametrize("kind", ["quantized", "structured"])
def test_hog_spearman_on_tied_features_differs_from_skimage_only_by_its_float32_cell_sums(
    kind: str,
) -> None:
    """scikit-image sums each cell in a C float; we sum in float64.

    On quantized or repetitive maps many HOG entries are exactly equal in float64, and the
    float32 rounding in scikit-image turns some of those ties into arbitrary orders, which moves
    a rank correlation by up to ~1e-3 (measured up to 1.0e-3 over 96 such pairs). The features
    themselves still agree to below 1e-6 (test above), and our score is exactly SciPy's Spearman of
    our features, ties kept.
    """
    a, b = _pair(kind, 50, 77)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    got = hog_spearman(ta, tb).numpy()
    ours_a = hog_features(normalize_01(ta)).numpy()
    ours_b = hog_features(normalize_01(tb)).numpy()
    exact = [spearmanr(ours_a[i], ours_b[i]).statistic for i in range(len(a))]
    skimage_based = [
        spearmanr(_hog_reference(a[i]), _hog_reference(b[i])).statistic for i in range(len(a))
    ]
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, skimage_based, rtol=0, atol=2e-3)


def test_hog_of_a_map_pointing_at_180_degrees_votes_like_skimage() -> None:
    """A left-to-right decreasing ramp: arctan2(0, negative) = 180 deg, which folds to bin 0."""
    cols = np.arange(64, dtype=np.float64)
    ramp = np.broadcast_to(-cols, (64, 64)).copy()
    got = hog_features(torch.from_numpy(ramp[None])).numpy()[0]
    ref = hog(ramp, pixels_per_cell=HOG_PIXELS_PER_CELL)
    np.testing.assert_allclose(got, ref, rtol=0, atol=SKIMAGE_TOL)
    assert got.reshape(-1, 9)[:, 0].max() > 0  # the votes went to bin 0, not nowhere


def test_hog_pearson_of_a_constant_map_is_nan() -> None:
    a, b = _pair("random", 64, 64, n=2)
    a[0] = 1.0
    got = hog_pearson(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert np.isnan(got[0])
    assert not np.isnan(got[1])


# ------------------------------------------------------------------------------ properties


@pytest.mark.parametrize("name", list(MEASURES))
@pytest.mark.parametrize("kind", ["random", "cam_like", "structured"])
def test_identical_maps_score_one(name: str, kind: str) -> None:
    a, _ = _pair(kind, 64, 64)
    t = torch.from_numpy(a)
    np.testing.assert_allclose(MEASURES[name](t, t.clone()).numpy(), 1.0, rtol=0, atol=1e-12)


def test_a_map_against_its_negation_is_minus_one_signed_and_one_absolute() -> None:
    a, _ = _pair("random", 32, 32)
    t = torch.from_numpy(a)
    np.testing.assert_allclose(spearman(t, -t).numpy(), -1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(spearman_abs(t, -t).numpy(), 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(MEASURES))
def test_batched_scores_equal_the_per_image_loop(name: str) -> None:
    a, b = _pair("cam_like", 64, 80, n=5)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    batched = MEASURES[name](ta, tb)
    looped = torch.cat([MEASURES[name](ta[i : i + 1], tb[i : i + 1]) for i in range(len(a))])
    assert batched.dtype == torch.float64
    assert batched.shape == (5,)
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-12)


def test_registry_names_the_papers_measures() -> None:
    assert set(MEASURES) == {"spearman_abs", "spearman", "ssim", "hog_pearson", "hog_spearman"}
    assert set(MIN_MAP_SIDE_PX) == set(MEASURES)


# ------------------------------------------------------------------------------ too small


@pytest.mark.parametrize(
    ("name", "size"),
    [("ssim", (6, 6)), ("ssim", (32, 6)), ("hog_pearson", (47, 64)), ("hog_spearman", (28, 28))],
)
def test_maps_smaller_than_the_window_raise_like_skimage(name: str, size: tuple[int, int]) -> None:
    a = torch.rand(2, *size, dtype=torch.float64)
    with pytest.raises(MapTooSmallError) as caught:
        MEASURES[name](a, a)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, SpecError)
    assert caught.value.to_dict()["code"] == "map_too_small"
    assert min(size) < MIN_MAP_SIDE_PX[name]
    x = a[0].numpy()
    with pytest.raises(ValueError):
        if name == "ssim":
            structural_similarity(x, x, data_range=1.0)
        else:
            hog(x, pixels_per_cell=HOG_PIXELS_PER_CELL)


def test_spearman_accepts_any_map_size() -> None:
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert spearman(a, a).item() == pytest.approx(1.0)


def test_mismatched_batches_are_rejected() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(torch.rand(2, 16, 16), torch.rand(2, 16, 17))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        spearman(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16))


# ------------------------------------------------------------------------------ preparation


def test_reduce_channels_sum_and_max_abs() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 5, 6)).astype(np.float32)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(reduce_channels(t, "sum").numpy(), x.sum(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(reduce_channels(t, "max_abs").numpy(), np.abs(x).max(axis=1))
    assert reduce_channels(t, "sum").shape == (2, 5, 6)


def test_reduce_channels_rejects_unknown_reduction_and_wrong_rank() -> None:
    with pytest.raises(SpecError, match="unknown channel reduction"):
        reduce_channels(torch.rand(1, 3, 4, 4), "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        reduce_channels(torch.rand(3, 4, 4))


def test_normalize_01_rescales_each_map_and_zeroes_constant_maps() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 8, 9)) * np.array([1.0, 1e-6, 1e6])[:, None, None]
    x[2] = 7.0
    got = normalize_01(torch.from_numpy(x)).numpy()
    assert got.dtype == np.float64
    for i in range(3):
        np.testing.assert_array_equal(got[i], _norm01_reference(x[i]))
    assert got[0].min() == 0.0 and got[0].max() == 1.0
    assert not got[2].any()


def test_timing_of_a_typical_batch() -> None:
    """Not a benchmark; prints how long each measure takes on 16 maps of 224x224 (CPU)."""
    a, b = _pair("cam_like", 224, 224, n=16)
    ta, tb = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    parts = []
    for name, measure in MEASURES.items():
        start = time.perf_counter()
        scores = measure(ta, tb)
        parts.append(f"{name} {1000 * (time.perf_counter() - start):.0f} ms")
        assert scores.shape == (16,)
    print("similarity on 16 x 224x224:", ", ".join(parts))
