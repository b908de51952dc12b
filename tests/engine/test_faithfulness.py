"""Faithfulness and localization metrics: hand-computed on a linear model, differential against
pytorch-grad-cam's confidence metrics, and the properties the definitions promise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_grad_cam.metrics.cam_mult_image import (
    CamMultImageConfidenceChange,
    DropInConfidence,
    IncreaseInConfidence,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
from torch import nn

from saliency_audit.workers.engine.faithfulness import (
    DEFINITIONS,
    ProbabilityFn,
    average_drop,
    average_increase,
    boxes_to_mask,
    deletion_insertion,
    localization_iou,
    masked_confidence,
    normalize_maps,
    pixel_counts,
    pointing_game,
    target_probabilities,
)
from saliency_audit.workers.engine.stats import bootstrap_mean
from tests.engine.nets import small_cnn

nan = float("nan")

# ---------------------------------------------------------------------------------------------
# a 2-class linear model on a 1 x 2 x 2 input whose probabilities are written out by hand.
# Pixels are numbered row-major: v = (v0, v1, v2, v3) = ((0, 0), (0, 1), (1, 0), (1, 1)).
#   z0(v) =  0.8 v0 - 0.3 v1 + 0.5 v2 + 1.2 v3 + 0.1
#   z1(v) = -0.2 v0 + 0.4 v1 + 0.3 v2 - 0.6 v3 - 0.1
#   p0(v) = exp(z0) / (exp(z0) + exp(z1))
W0 = (0.8, -0.3, 0.5, 1.2)
W1 = (-0.2, 0.4, 0.3, -0.6)
B0, B1 = 0.1, -0.1
X = (1.0, 2.0, -1.0, 0.5)  # a normalized input: negative values are allowed


def p0_by_hand(v: tuple[float, float, float, float]) -> float:
    z0 = W0[0] * v[0] + W0[1] * v[1] + W0[2] * v[2] + W0[3] * v[3] + B0
    z1 = W1[0] * v[0] + W1[1] * v[1] + W1[2] * v[2] + W1[3] * v[3] + B1
    return math.exp(z0) / (math.exp(z0) + math.exp(z1))


def linear_prob_fn() -> tuple[nn.Module, ProbabilityFn]:
    linear = nn.Linear(4, 2).double()
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([W0, W1], dtype=torch.float64))
        linear.bias.copy_(torch.tensor([B0, B1], dtype=torch.float64))
    model = nn.Sequential(nn.Flatten(), linear)
    return model, lambda x: torch.softmax(model(x), dim=1)


def as_input(v: tuple[float, ...], n: int = 1) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64).view(1, 1, 2, 2).repeat(n, 1, 1, 1)


# map A: [[0.2, 1.0], [0.6, 0.2]] -> min-max M = [[0, 1], [0.5, 0]]; pixels 0 and 3 tie at 0.2
MAP_A = ((0.2, 1.0), (0.6, 0.2))
# map B: [[1, 0], [0, 1]] -> M = [[1, 0], [0, 1]]
MAP_B = ((1.0, 0.0), (0.0, 1.0))


def test_average_drop_matches_hand_computation_on_a_linear_model() -> None:
    _, prob_fn = linear_prob_fn()
    x = as_input(X, 2)
    maps = torch.tensor([MAP_A, MAP_B], dtype=torch.float64)
    y, o = masked_confidence(prob_fn, x, maps, torch.tensor([0, 0]), batch_size=64)

    # Y = p0(x): z0 = 0.8 - 0.6 - 0.5 + 0.6 + 0.1 = 0.4, z1 = -0.2 + 0.8 - 0.3 - 0.3 - 0.1 = -0.1
    y_hand = p0_by_hand(X)
    assert y_hand == pytest.approx(1 / (1 + math.exp(-0.5)))
    # image A: x * M = (1 * 0, 2 * 1, -1 * 0.5, 0.5 * 0) = (0, 2, -0.5, 0)
    o_a = p0_by_hand((0.0, 2.0, -0.5, 0.0))
    # image B: x * M = (1, 0, 0, 0.5)
    o_b = p0_by_hand((1.0, 0.0, 0.0, 0.5))
    assert o_a < y_hand < o_b  # A loses confidence, B gains it

    np.testing.assert_allclose(y.numpy(), [y_hand, y_hand], rtol=1e-12)
    np.testing.assert_allclose(o.numpy(), [o_a, o_b], rtol=1e-12)
    drop_hand = [max(0.0, y_hand - o_a) / y_hand * 100.0, max(0.0, y_hand - o_b) / y_hand * 100]
    np.testing.assert_allclose(average_drop(y, o).numpy(), drop_hand, rtol=1e-12)
    assert drop_hand[0] == pytest.approx(65.6, abs=0.1) and drop_hand[1] == 0.0


def test_average_increase_is_one_hundred_exactly_when_the_masked_confidence_rises() -> None:
    _, prob_fn = linear_prob_fn()
    maps = torch.tensor([MAP_A, MAP_B], dtype=torch.float64)
    y, o = masked_confidence(prob_fn, as_input(X, 2), maps, torch.tensor([0, 0]), batch_size=1)
    assert average_increase(y, o).tolist() == [0.0, 100.0]
    # equal confidences are no increase (strict O > Y)
    same = torch.tensor([0.3, 0.7], dtype=torch.float64)
    assert average_increase(same, same.clone()).tolist() == [0.0, 0.0]


def test_deletion_and_insertion_auc_match_hand_computation_on_a_linear_model() -> None:
    _, prob_fn = linear_prob_fn()
    maps = torch.tensor([MAP_A], dtype=torch.float64)
    deletion, insertion = deletion_insertion(
        prob_fn, as_input(X), maps, torch.tensor([0]), steps=4, batch_size=64
    )
    # order by decreasing saliency: pixel 1 (1.0), pixel 2 (0.6), then the tie at 0.2 in
    # row-major order: pixel 0 before pixel 3. Steps 0..4 remove/reveal 0, 1, 2, 3, 4 pixels.
    deleted = [
        (1.0, 2.0, -1.0, 0.5),
        (1.0, 0.0, -1.0, 0.5),
        (1.0, 0.0, 0.0, 0.5),
        (0.0, 0.0, 0.0, 0.5),
        (0.0, 0.0, 0.0, 0.0),
    ]
    inserted = [
        (0.0, 0.0, 0.0, 0.0),
        (0.0, 2.0, 0.0, 0.0),
        (0.0, 2.0, -1.0, 0.0),
        (1.0, 2.0, -1.0, 0.0),
        (1.0, 2.0, -1.0, 0.5),
    ]

    def trapezoid(points: list[tuple[float, float, float, float]]) -> float:
        p = [p0_by_hand(v) for v in points]
        return (p[0] / 2 + p[1] + p[2] + p[3] + p[4] / 2) / 4  # nodes 0, 1/4, ..., 1

    assert deletion.item() == pytest.approx(trapezoid(deleted), rel=1e-12)
    assert insertion.item() == pytest.approx(trapezoid(inserted), rel=1e-12)
    # the same with numpy's trapezoid over the fraction axis
    p_del = [p0_by_hand(v) for v in deleted]
    assert deletion.item() == pytest.approx(np.trapezoid(p_del, np.linspace(0, 1, 5)), rel=1e-12)


def test_deletion_rounds_the_pixel_count_of_each_step_half_up() -> None:
    assert pixel_counts(4, 3) == [0, 1, 3, 4]  # 4/3 -> 1, 8/3 -> 3
    assert pixel_counts(4, 8) == [0, 1, 1, 2, 2, 3, 3, 4, 4]  # 0.5 -> 1, 1.5 -> 2, ...
    assert pixel_counts(50176, 1) == [0, 50176]
    _, prob_fn = linear_prob_fn()
    deletion, _ = deletion_insertion(
        prob_fn,
        as_input(X),
        torch.tensor([MAP_A], dtype=torch.float64),
        torch.tensor([0]),
        steps=3,
        batch_size=2,
    )
    # steps 0..3 remove 0, 1, 3, 4 pixels in the order 1, 2, 0, 3
    p = [
        p0_by_hand((1.0, 2.0, -1.0, 0.5)),
        p0_by_hand((1.0, 0.0, -1.0, 0.5)),
        p0_by_hand((0.0, 0.0, 0.0, 0.5)),
        p0_by_hand((0.0, 0.0, 0.0, 0.0)),
    ]
    assert deletion.item() == pytest.approx((p[0] / 2 + p[1] + p[2] + p[3] / 2) / 3, rel=1e-12)
    with pytest.raises(ValueError, match="steps"):
        pixel_counts(4, 0)


def test_one_step_deletion_and_insertion_both_average_the_input_and_the_zero_baseline() -> None:
    model = small_cnn(seed=2)
    prob_fn = lambda x: torch.softmax(model(x), dim=1)  # noqa: E731
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 3, 4])
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    deletion, insertion = deletion_insertion(prob_fn, x, maps, target, steps=1, batch_size=8)
    y = target_probabilities(prob_fn, x, target, batch_size=8)
    p_zero = target_probabilities(prob_fn, torch.zeros_like(x), target, batch_size=8)
    torch.testing.assert_close(deletion, (y + p_zero) / 2)
    torch.testing.assert_close(insertion, (y + p_zero) / 2)


# ---------------------------------------------------------------------------------------------
# differential: pytorch-grad-cam's CamMultImageConfidenceChange / DropInConfidence /
# IncreaseInConfidence (pytorch_grad_cam/metrics/cam_mult_image.py).
# It multiplies the *normalized* input tensor by the cam (so its baseline is also 0 in input
# space) and returns O - Y per image. Where it differs from Grad-CAM++'s definition:
#   - DropInConfidence is max(0, Y - O): not divided by Y and not times 100, so it is our
#     Average Drop times Y / 100;
#   - IncreaseInConfidence is 1.0 / 0.0, ours is 100.0 / 0.0;
#   - it does not normalize the cam: it must be given maps already in [0, 1] (we pass ours).


def test_confidence_change_agrees_with_pytorch_grad_cam_on_a_random_conv_net() -> None:
    model = small_cnn(seed=5)
    prob_fn = lambda x: torch.softmax(model(x), dim=1)  # noqa: E731
    gen = torch.Generator().manual_seed(3)
    n = 24
    x = torch.randn(n, 3, 16, 16, generator=gen)
    maps = torch.rand(n, 16, 16, generator=gen) ** 3
    maps[0] = 0.4  # a constant map: M = 0, the all-zero input
    target = torch.randint(0, 5, (n,), generator=gen)

    y, o = masked_confidence(prob_fn, x, maps, target, batch_size=7)
    cams = normalize_maps(maps).numpy()
    targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in target]
    change = CamMultImageConfidenceChange()(x, cams, targets, model)
    np.testing.assert_allclose((o - y).numpy(), change, atol=1e-6)

    drop = average_drop(y, o).numpy()
    ref_drop = DropInConfidence()(x, cams, targets, model)
    np.testing.assert_allclose(drop * y.numpy() / 100.0, ref_drop, atol=1e-6)
    dropped = ref_drop > 1e-3
    assert dropped.any()
    # not the same number: the reference is not divided by Y
    assert not np.allclose(drop[dropped], 100.0 * ref_drop[dropped], rtol=1e-3)

    increase = average_increase(y, o).numpy()
    ref_increase = IncreaseInConfidence()(x, cams, targets, model)
    np.testing.assert_array_equal(increase / 100.0, ref_increase)
    assert 0 < ref_increase.sum() < n  # both outcomes occur, so the comparison can fail


# ---------------------------------------------------------------------------------------------
# properties


def linear_margin_model(seed: int) -> tuple[ProbabilityFn, torch.Tensor, torch.Tensor]:
    """A 2-class linear model on a 1 x 4 x 4 input, an input, and each pixel's true
    contribution to the margin z0 - z1 (w0_j - w1_j) * x_j, shaped as a (1, 4, 4) map."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(2, 16, generator=gen, dtype=torch.float64)
    x = torch.randn(1, 1, 4, 4, generator=gen, dtype=torch.float64)
    contribution = ((weight[0] - weight[1]) * x.flatten()).view(1, 4, 4)
    return (lambda v: torch.softmax(v.flatten(1) @ weight.T, dim=1)), x, contribution


@pytest.mark.parametrize("seed", range(5))
def test_deleting_the_truly_important_pixels_first_gives_a_lower_deletion_auc(seed: int) -> None:
    prob_fn, x, contribution = linear_margin_model(seed)
    target = torch.tensor([0])
    # removing the largest contributions first lowers the margin, hence p0, fastest at every
    # step: no ordering has a lower deletion curve, and the reversed one is the highest
    good_del, good_ins = deletion_insertion(prob_fn, x, contribution, target, 16, 64)
    bad_del, bad_ins = deletion_insertion(prob_fn, x, -contribution, target, 16, 64)
    assert good_del.item() < bad_del.item()
    assert good_ins.item() > bad_ins.item()
    assert 0.0 <= good_del.item() <= 1.0 and 0.0 <= bad_ins.item() <= 1.0


def test_a_constant_map_deletes_in_raster_order_deterministically() -> None:
    prob_fn, x, _ = linear_margin_model(7)
    target = torch.tensor([0])
    constant = torch.full((1, 4, 4), 0.3, dtype=torch.float64)
    raster = -torch.arange(16, dtype=torch.float64).view(1, 4, 4)  # decreasing in index order
    first = deletion_insertion(prob_fn, x, constant, target, 16, 64)
    again = deletion_insertion(prob_fn, x, constant, target, 16, 5)
    by_index = deletion_insertion(prob_fn, x, raster, target, 16, 64)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert torch.equal(first[0], by_index[0]) and torch.equal(first[1], by_index[1])


class RowIndependentNet(nn.Module):
    """Per-row arithmetic only (no batched matmul or conv kernels whose blocking depends on the
    batch size), so results must not depend on how rows are batched."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(11)
        self.weight = nn.Parameter(torch.randn(4, 3, 6, 6, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x)[:, None] * self.weight[None]).sum(dim=(2, 3, 4))


def test_results_do_not_depend_on_the_batch_size_and_batches_respect_it() -> None:
    net = RowIndependentNet()
    calls: list[int] = []

    def prob_fn(v: torch.Tensor) -> torch.Tensor:
        calls.append(v.shape[0])
        return torch.softmax(net(v), dim=1)

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 6, 6, generator=gen)
    maps = torch.rand(5, 6, 6, generator=gen)
    target = torch.tensor([0, 1, 2, 3, 1])

    results = {}
    for batch_size in (1, 3, 64):
        calls.clear()
        y, o = masked_confidence(prob_fn, x, maps, target, batch_size)
        deletion, insertion = deletion_insertion(prob_fn, x, maps, target, 4, batch_size)
        assert max(calls) <= batch_size
        # Y and O: 5 rows each; deletion and insertion: 5 images x 5 steps each
        assert sum(calls) == 5 + 5 + 25 + 25
        results[batch_size] = (y, o, deletion, insertion)
    for batch_size in (3, 64):
        for ours, one_at_a_time in zip(results[batch_size], results[1], strict=True):
            assert torch.equal(ours, one_at_a_time)


def test_a_conv_net_gives_the_same_scores_one_image_at_a_time_and_batched() -> None:
    model = small_cnn(seed=1)
    prob_fn = lambda v: torch.softmax(model(v), dim=1)  # noqa: E731
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 3, 8, 8, generator=gen)
    maps = torch.rand(6, 8, 8, generator=gen)
    target = torch.randint(0, 5, (6,), generator=gen)
    one = deletion_insertion(prob_fn, x, maps, target, 8, 1)
    many = deletion_insertion(prob_fn, x, maps, target, 8, 64)
    # conv kernels may block differently by batch size: equal up to float32 rounding
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# maps, masks, localization


def test_normalize_maps_rescales_each_map_to_the_unit_interval_and_zeroes_constant_maps() -> None:
    maps = torch.tensor(
        [[[2.0, 4.0], [6.0, 10.0]], [[-1.0, -1.0], [-1.0, -1.0]], [[0.0, -3.0], [3.0, 0.0]]]
    )
    out = normalize_maps(maps)
    expected = torch.tensor(
        [[[0.0, 0.25], [0.5, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.5, 0.0], [1.0, 0.5]]]
    )
    torch.testing.assert_close(out, expected)
    assert out.dtype == maps.dtype
    with_nan = torch.tensor([[[1.0, nan], [0.0, 2.0]]])
    assert torch.isnan(normalize_maps(with_nan)).all()


def test_localization_iou_counts_pixels_of_the_thresholded_normalized_map() -> None:
    # map -> normalized (min 0, max 8): [[0, .25, .5, 1], [0, .75, .5, .125]]; >= 0.5 selects
    # (0,2), (0,3), (1,1), (1,2)
    maps = torch.tensor([[[0.0, 2.0, 4.0, 8.0], [0.0, 6.0, 4.0, 1.0]]])
    mask = torch.tensor([[[False, False, True, True], [False, False, False, True]]])
    # intersection {(0,2), (0,3)} = 2, union {(0,2), (0,3), (1,1), (1,2), (1,3)} = 5
    assert localization_iou(maps, mask).item() == pytest.approx(2 / 5)
    # threshold 0.7: selects (0,3), (1,1); intersection 1, union {(0,2),(0,3),(1,1),(1,3)} = 4
    assert localization_iou(maps, mask, threshold=0.7).item() == pytest.approx(1 / 4)
    assert localization_iou(maps, maps >= 4.0).item() == 1.0
    with pytest.raises(ValueError, match="threshold"):
        localization_iou(maps, mask, threshold=0.0)


def test_localization_iou_is_nan_for_an_empty_union_and_zero_for_a_constant_map() -> None:
    maps = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]], [[0.0, 1.0], [0, 0]]])
    masks = torch.tensor(
        [[[False, False], [False, False]], [[True, False], [False, False]], [[True, False]] * 2]
    )
    iou = localization_iou(maps, masks)
    assert math.isnan(iou[0].item())  # nothing predicted, nothing annotated
    assert iou[1].item() == 0.0  # a constant map selects nothing
    assert iou[2].item() == 0.0  # predicted (0,1), annotated (0,0) and (1,0)


def test_pointing_game_hits_when_the_first_maximum_lies_in_the_mask() -> None:
    maps = torch.tensor(
        [
            [[0.1, 0.9, 0.2], [0.3, 0.4, 0.5]],  # max at (0, 1)
            [[0.1, 0.2, 0.2], [0.3, 0.4, 0.9]],  # max at (1, 2)
            [[0.9, 0.2, 0.2], [0.3, 0.4, 0.9]],  # tied maxima: (0, 0) counts, not (1, 2)
        ]
    )
    mask = torch.tensor([[False, True, False], [False, False, True]])
    masks = torch.stack([mask, torch.zeros_like(mask), ~mask])
    # image 0: (0,1) in mask; image 1: empty mask -> NaN; image 2: (0,0) in ~mask -> hit
    hits = pointing_game(maps, masks)
    assert hits[0].item() == 1.0 and math.isnan(hits[1].item()) and hits[2].item() == 1.0
    # image 2 against the mask itself: (1, 2) would hit, the first maximum (0, 0) does not
    assert pointing_game(maps[2:], mask[None]).item() == 0.0


def test_pointing_game_is_undefined_for_a_constant_map() -> None:
    maps = torch.zeros(1, 3, 3)
    masks = torch.ones(1, 3, 3, dtype=torch.bool)
    assert math.isnan(pointing_game(maps, masks).item())


def test_boxes_to_mask_is_the_union_of_boxes_with_exclusive_far_edges() -> None:
    mask = boxes_to_mask([[1, 0, 3, 2]], height=3, width=4)
    expected = torch.tensor(
        [[False, True, True, False], [False, True, True, False], [False, False, False, False]]
    )
    assert torch.equal(mask, expected)
    # fractional box: a pixel belongs when its centre does (centres at 0.5, 1.5, ...)
    frac = boxes_to_mask([[0.4, 0.4, 1.6, 1.2]], height=3, width=4)
    assert frac.nonzero().tolist() == [[0, 0], [0, 1]]
    # union, clipping, empty and zero-width boxes
    union = boxes_to_mask([[1, 0, 3, 2], [-5, 2.0, 100, 9], [3, 0, 3, 3]], height=3, width=4)
    assert torch.equal(union, expected | torch.tensor([False, False, True])[:, None])
    assert not boxes_to_mask([], height=2, width=2).any()
    assert mask.dtype == torch.bool
    with pytest.raises(ValueError):
        boxes_to_mask([[3, 0, 1, 2]], height=3, width=4)
    with pytest.raises(ValueError):
        boxes_to_mask([[0, 0, 1]], height=3, width=4)


# ---------------------------------------------------------------------------------------------
# undefined values and misuse


def test_average_drop_is_undefined_when_the_original_confidence_is_zero() -> None:
    y = torch.tensor([0.0, 0.5, nan, 0.4], dtype=torch.float64)
    o = torch.tensor([0.0, 0.25, 0.1, 0.6], dtype=torch.float64)
    drop = average_drop(y, o)
    assert math.isnan(drop[0].item()) and math.isnan(drop[2].item())
    assert drop[1].item() == 50.0 and drop[3].item() == 0.0
    increase = average_increase(y, o)
    assert increase[0].item() == 0.0 and math.isnan(increase[2].item())
    assert increase[3].item() == 100.0
    estimate = bootstrap_mean(drop.numpy(), seed=0)
    assert (estimate.mean, estimate.n, estimate.n_undefined) == (25.0, 2, 2)


def test_a_map_with_a_non_finite_value_is_undefined_and_never_fed_to_the_model() -> None:
    model = small_cnn(seed=0)

    def prob_fn(v: torch.Tensor) -> torch.Tensor:
        assert torch.isfinite(v).all()
        return torch.softmax(model(v), dim=1)

    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(3))
    maps[1, 2, 2] = nan
    maps[2, 0, 0] = float("inf")
    target = torch.tensor([1, 1, 1])
    y, o = masked_confidence(prob_fn, x, maps, target, 4)
    assert torch.isfinite(y).all()
    assert math.isfinite(o[0].item()) and torch.isnan(o[1:]).all()
    assert torch.isnan(average_drop(y, o)[1:]).all()
    deletion, insertion = deletion_insertion(prob_fn, x, maps, target, 4, 4)
    assert math.isfinite(deletion[0].item()) and torch.isnan(deletion[1:]).all()
    assert torch.isnan(insertion[1:]).all()
    masks = torch.ones(3, 8, 8, dtype=torch.bool)
    assert torch.isnan(localization_iou(maps, masks)[1:]).all()
    assert torch.isnan(pointing_game(maps, masks)[1:]).all()
    assert pointing_game(maps, masks)[0].item() == 1.0


def test_logits_instead_of_probabilities_and_mismatched_shapes_are_rejected() -> None:
    model = small_cnn(seed=0)
    x = torch.randn(2, 3, 8, 8)
    target = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="probabilities"):
        target_probabilities(lambda v: model(v) * 100.0, x, target, 2)
    prob_fn = lambda v: torch.softmax(model(v), dim=1)  # noqa: E731
    with pytest.raises(ValueError, match="upsample"):
        masked_confidence(prob_fn, x, torch.rand(2, 4, 4), target, 2)
    with pytest.raises(ValueError, match="batch_size"):
        deletion_insertion(prob_fn, x, torch.rand(2, 8, 8), target, 4, 0)
    with pytest.raises(ValueError, match="bool"):
        pointing_game(torch.rand(2, 8, 8), torch.ones(2, 8, 8))


def test_every_metric_has_a_definition_for_reports() -> None:
    assert set(DEFINITIONS) == {
        "average_drop",
        "average_increase",
        "deletion_auc",
        "insertion_auc",
        "iou",
        "pointing_game",
    }
    assert "denominator is that image's Y" in DEFINITIONS["average_drop"]
    assert ">= 0.5" in DEFINITIONS["iou"]
    assert "0 pixels" in DEFINITIONS["pointing_game"]
