"""Faithfulness and localization metrics of saliency maps, per image.

The faithfulness metrics ask the model itself whether a map points at what it uses:

- Average Drop and Increase in Confidence (Chattopadhay, Sarkar, Howlader, Balasubramanian,
  "Grad-CAM++", WACV 2018, section 6.1 "Objective evaluation for object recognition"): the
  input is masked by the map, ``E_c = M_c o I``, and the target probability on the
  explanation map (``O``) is compared with the one on the image (``Y``).
- Deletion and insertion (Petsiuk, Das, Saenko, "RISE", BMVC 2018, section 4.1 "causal
  metrics"): pixels are removed from (or revealed on) the input in the order of the map and the
  area under the probability curve is taken.

The localization metrics compare a map with a ground-truth mask: the IoU of the thresholded map
(the Grad-CAM++ / Relevance-CAM localization protocol, DOMAIN.md section 3) and the pointing
game (Zhang, Bargal, Lin, Brandt, Shen, Sclaroff, "Top-down neural attention by excitation
backprop", IJCV 2018).

Conventions shared by every function here:

- The model is a callable ``prob_fn`` from a batch of model inputs (B, C, H, W) to softmax
  probabilities (B, K); nothing here knows about hooks, devices or the model's layers. It is
  called under ``torch.no_grad()`` with at most ``batch_size`` rows at a time.
- ``x`` is the model's input as the model sees it, i.e. already normalized (mean subtracted,
  divided by the standard deviation). Multiplying by 0 therefore sets a pixel to the
  normalization *mean*, not to black. This is what pytorch-grad-cam's metrics do
  (``multiply_tensor_with_cam`` on the normalized tensor) and is the only baseline that does
  not depend on knowing the preprocessing; the metric definitions (:data:`DEFINITIONS`) say so.
- Maps are single-channel (N, H, W) at the input's H x W (upsample CAMs first).
- Results are float64 tensors of shape (N,), one value per image, on the device of the inputs.
  An undefined value is NaN (see each function), never silently 0: the caller reduces with
  :func:`.stats.bootstrap_mean`, which leaves NaNs out and counts them as ``n_undefined``.
- A map containing a non-finite value is undefined for every metric (NaN for that image); the
  model is not run on NaN inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "DEFINITIONS",
    "IOU_THRESHOLD",
    "ProbabilityFn",
    "average_drop",
    "average_increase",
    "boxes_to_mask",
    "definitions",
    "deletion_insertion",
    "localization_iou",
    "masked_confidence",
    "normalize_maps",
    "pixel_counts",
    "pointing_game",
    "target_probabilities",
]

ProbabilityFn = Callable[[Tensor], Tensor]
"""(B, C, H, W) model inputs -> (B, K) softmax probabilities."""

IOU_THRESHOLD = 0.5
"""Default threshold of :func:`localization_iou` on the min-max normalized map."""


def _iou_definition(iou_threshold: float) -> str:
    return (
        "Localization IoU: per image |P and G| / |P or G| in pixels, where P is the set of "
        f"pixels whose saliency, min-max normalized to [0, 1] per image, is >= {iou_threshold} "
        "(a constant map selects no pixel) and G the ground-truth mask (the union of the "
        "annotated boxes, or the segmentation mask) at the map's resolution; undefined when "
        "both P and G are empty; higher is better."
    )


DEFINITIONS: dict[str, str] = {
    "average_drop": (
        "Average Drop (Chattopadhay et al. 2018, Grad-CAM++, section 6.1): per image "
        "100 * max(0, Y - O) / Y, where Y is the softmax probability of the target class "
        "on the model input and O the same probability on the input multiplied pixel by pixel (all "
        "channels) by the saliency map min-max normalized to [0, 1] per image; the denominator "
        "is that image's Y (an image with Y = 0 is undefined and counted, not averaged); a "
        "pixel multiplied by 0 takes the value 0 of the model's normalized input, i.e. the "
        "normalization mean, not black; lower is better."
    ),
    "average_increase": (
        "Increase in Confidence (Chattopadhay et al. 2018, Grad-CAM++, section 6.1): per image "
        "100 if O > Y (strictly) and 0 otherwise, with Y and O as in Average Drop (same "
        "normalized-map masking, same baseline), so the mean over images is the percentage of "
        "images whose target-class probability rises when the input is masked by the map; no "
        "threshold or denominator other than the number of images; higher is better."
    ),
    "deletion_auc": (
        "Deletion (Petsiuk et al. 2018, RISE, section 4.1): pixels are ranked by decreasing "
        "saliency (ties in row-major order) and removed in equal steps, the k-th of S steps "
        "removing the top round(k / S * H * W) pixels by setting them to 0 in the model's "
        "normalized input in all channels (the normalization mean); the score is the area "
        "under the target-class softmax probability as a function of the removed fraction, from 0 "
        "(the intact input) to 1 (the all-zero input), by the trapezoidal rule, with no "
        "division by the initial probability, so it lies in [0, 1]; lower is better."
    ),
    "insertion_auc": (
        "Insertion (Petsiuk et al. 2018, RISE, section 4.1): starting from the all-zero model "
        "input (the normalization mean; RISE itself starts from a blurred image), pixels are "
        "copied from the input in order of decreasing saliency (ties in row-major order), the "
        "k-th of S steps revealing the top round(k / S * H * W) pixels in all channels; the "
        "score is the area under the target-class softmax probability as a function of the "
        "revealed fraction from 0 to 1 by the trapezoidal rule, with no division by any "
        "probability, so it lies in [0, 1]; higher is better."
    ),
    "iou": _iou_definition(IOU_THRESHOLD),
    "pointing_game": (
        "Pointing game (Zhang et al. 2018, excitation backprop, IJCV): per image 1 if the "
        "map's maximum pixel (the first in row-major order when several pixels share it) lies "
        "inside the ground-truth mask and 0 otherwise, with a tolerance of 0 pixels (the paper "
        "accepts hits within 15 pixels of the object at 224 x 224), so the mean is the hit "
        "rate; undefined for a constant map (no maximum) or an empty mask; higher is better."
    ),
}


def definitions(iou_threshold: float = IOU_THRESHOLD) -> dict[str, str]:
    """One sentence per metric, for reports, with the IoU threshold actually used."""
    return {**DEFINITIONS, "iou": _iou_definition(iou_threshold)}


# ---------------------------------------------------------------------------------------------
# validation and batching helpers


def _check_maps(maps: Tensor, name: str = "maps") -> None:
    if maps.dim() != 3:
        raise ValueError(f"{name} must be (N, H, W), got shape {tuple(maps.shape)}")


def _check_inputs(x: Tensor, maps: Tensor | None, target: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if target.shape != (x.shape[0],):
        raise ValueError(f"target must be ({x.shape[0]},), got shape {tuple(target.shape)}")
    if maps is not None:
        _check_maps(maps)
        if maps.shape != (x.shape[0], *x.shape[2:]):
            raise ValueError(
                f"maps must be (N, H, W) = {(x.shape[0], *x.shape[2:])} to match x, got "
                f"{tuple(maps.shape)} (upsample maps to the input size first)"
            )


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _finite_rows(maps: Tensor) -> Tensor:
    """(N,) bool: the maps without a NaN or infinity."""
    return torch.isfinite(maps.reshape(maps.shape[0], -1)).all(dim=1)


def _target_probs(
    prob_fn: ProbabilityFn,
    n_rows: int,
    build: Callable[[int, int], Tensor],
    row_target: Tensor,
    batch_size: int,
    device: torch.device,
) -> Tensor:
    """p_target of ``build(start, stop)`` for rows ``[0, n_rows)``, ``batch_size`` rows per
    call of ``prob_fn``; ``row_target`` gives each row's class. (n_rows,) float64."""
    out = torch.empty(n_rows, dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, n_rows, batch_size):
            stop = min(start + batch_size, n_rows)
            probs = prob_fn(build(start, stop))
            if probs.dim() != 2 or probs.shape[0] != stop - start:
                raise ValueError(
                    f"prob_fn must return (B, K) = ({stop - start}, K) probabilities, got "
                    f"shape {tuple(probs.shape)}"
                )
            if bool(((probs < 0) | (probs > 1)).any()):
                raise ValueError("prob_fn must return softmax probabilities in [0, 1]")
            t = row_target[start:stop].to(device=probs.device, dtype=torch.long)
            picked = probs.gather(1, t.view(-1, 1)).squeeze(1)
            out[start:stop] = picked.detach().to(device=device, dtype=torch.float64)
    return out


# ---------------------------------------------------------------------------------------------
# maps


def normalize_maps(maps: Tensor) -> Tensor:
    """Per-image min-max normalization to [0, 1]: ``(m - min m) / (max m - min m)``.

    This is what Grad-CAM++'s objective evaluation (Chattopadhay et al. 2018, section 6.1)
    and pytorch-grad-cam (``scale_cam_image``) do to a map before masking the input with it.
    A constant map (max = min) becomes all zeros: it marks nothing as salient. A map with a
    non-finite value becomes all NaN. (N, H, W) -> (N, H, W), same dtype and device.
    """
    _check_maps(maps)
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.amin(dim=1, keepdim=True)
    hi = flat.amax(dim=1, keepdim=True)
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    scaled = torch.where(span > 0, (flat - lo) / safe, torch.zeros_like(flat))
    scaled = torch.where(_finite_rows(maps)[:, None], scaled, torch.full_like(flat, float("nan")))
    return scaled.reshape(maps.shape)


def boxes_to_mask(boxes: list[list[float]], height: int, width: int) -> Tensor:
    """Union of pixel boxes ``[x0, y0, x1, y1]`` as a bool (height, width) mask.

    Coordinates are continuous pixel edges: pixel (row r, column c) covers
    [c, c + 1) x [r, r + 1) and belongs to a box when its centre (c + 0.5, r + 0.5) does, with
    x0 <= c + 0.5 < x1 and y0 <= r + 0.5 < y1. For integer boxes that is columns x0 .. x1 - 1
    and rows y0 .. y1 - 1: ``x1`` and ``y1`` are exclusive (COCO's [x, y, w, h] is
    [x, y, x + w, y + h]; Pascal VOC's 1-based inclusive [xmin, ymin, xmax, ymax] is
    [xmin - 1, ymin - 1, xmax, ymax]). Boxes are clipped to the image; a box of zero width or
    height selects nothing; no boxes give an empty mask. Boxes must be given at the map's
    resolution (scale them with the image first).
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height} x {width}")
    cols = torch.arange(width, dtype=torch.float64) + 0.5
    rows = torch.arange(height, dtype=torch.float64) + 0.5
    mask = torch.zeros(height, width, dtype=torch.bool)
    for box in boxes:
        if len(box) != 4:
            raise ValueError(f"a box is [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise ValueError(f"box coordinates must be finite, got {box!r}")
        if x1 < x0 or y1 < y0:
            raise ValueError(f"a box needs x0 <= x1 and y0 <= y1, got {box!r}")
        in_cols = (cols >= x0) & (cols < x1)
        in_rows = (rows >= y0) & (rows < y1)
        mask |= in_rows[:, None] & in_cols[None, :]
    return mask


# ---------------------------------------------------------------------------------------------
# Average Drop and Increase in Confidence (Grad-CAM++)


def target_probabilities(
    prob_fn: ProbabilityFn, x: Tensor, target: Tensor, batch_size: int
) -> Tensor:
    """``Y_i = p_target_i(x_i)``, the softmax probability of each image's target class, as in
    Chattopadhay et al. 2018, section 6.1 (``Y_i^c``). (N,) float64 on ``x``'s device."""
    _check_inputs(x, None, target)
    _check_batch_size(batch_size)
    return _target_probs(prob_fn, x.shape[0], lambda a, b: x[a:b], target, batch_size, x.device)


def masked_confidence(
    prob_fn: ProbabilityFn, x: Tensor, maps: Tensor, target: Tensor, batch_size: int
) -> tuple[Tensor, Tensor]:
    """``(Y, O)``: the target probability on the input and on the input masked by its map.

    Chattopadhay et al. 2018 (Grad-CAM++, WACV), section 6.1 "Objective evaluation for object
    recognition", mask the image by the explanation map, ``E_c = M_c o I`` (Hadamard product),
    and compare ``O_i^c = p_c(E_c)`` with ``Y_i^c = p_c(I)``. Here ``M = normalize_maps(maps)``
    (per-image min-max to [0, 1]) is broadcast over the channels and multiplies ``x``, the
    model's *normalized* input: ``M = 0`` sets a pixel to the normalization mean (0 in input
    space), not to black as ``M o I`` on the raw image would. That is pytorch-grad-cam's
    choice too (``CamMultImageConfidenceChange``) and keeps the metric independent of the
    preprocessing; the paper does not say which it did.

    ``maps`` are (N, H, W) at ``x``'s H x W. Returns two (N,) float64 tensors; ``O`` is NaN
    where the map has a non-finite value.
    """
    _check_inputs(x, maps, target)
    _check_batch_size(batch_size)
    finite = _finite_rows(maps).to(x.device)
    m = normalize_maps(maps).to(device=x.device, dtype=x.dtype)
    m = torch.where(finite[:, None, None], m, torch.zeros_like(m))
    y = target_probabilities(prob_fn, x, target, batch_size)
    o = _target_probs(
        prob_fn, x.shape[0], lambda a, b: x[a:b] * m[a:b, None], target, batch_size, x.device
    )
    o = torch.where(finite.to(o.device), o, torch.full_like(o, float("nan")))
    return y, o


def average_drop(y: Tensor, o: Tensor) -> Tensor:
    """Per-image Average Drop, ``max(0, Y - O) / Y * 100`` (Chattopadhay et al. 2018, section
    6.1: Average Drop % = (1/N) sum_i max(0, Y_i^c - O_i^c) / Y_i^c * 100; the mean over
    images is the paper's number). ``Y = 0`` is undefined (NaN), as is a NaN input.
    Lower is better. (N,) -> (N,) float64."""
    if y.shape != o.shape:
        raise ValueError(f"y and o must have the same shape, got {y.shape} and {o.shape}")
    y, o = y.double(), o.double()
    drop = torch.clamp(y - o, min=0.0) / torch.where(y != 0, y, torch.ones_like(y)) * 100.0
    return torch.where(y != 0, drop, torch.full_like(drop, float("nan")))


def average_increase(y: Tensor, o: Tensor) -> Tensor:
    """Per-image Increase in Confidence, ``100 if O > Y else 0`` (Chattopadhay et al. 2018,
    section 6.1: % Increase in Confidence = (1/N) sum_i 1[Y_i^c < O_i^c] * 100; the mean over
    images is the paper's percentage). NaN where ``Y`` or ``O`` is NaN. Higher is better.
    (N,) -> (N,) float64."""
    if y.shape != o.shape:
        raise ValueError(f"y and o must have the same shape, got {y.shape} and {o.shape}")
    y, o = y.double(), o.double()
    hit = (o > y).double() * 100.0
    return torch.where(torch.isnan(y) | torch.isnan(o), torch.full_like(hit, float("nan")), hit)


# ---------------------------------------------------------------------------------------------
# Deletion and insertion (RISE)


def pixel_counts(n_pixels: int, steps: int) -> list[int]:
    """The number of pixels removed (deletion) or revealed (insertion) after step k = 0..steps:
    ``round(k / steps * n_pixels)``, rounded half up, in exact integer arithmetic."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [(2 * k * n_pixels + steps) // (2 * steps) for k in range(steps + 1)]


def deletion_insertion(
    prob_fn: ProbabilityFn,
    x: Tensor,
    maps: Tensor,
    target: Tensor,
    steps: int,
    batch_size: int,
) -> tuple[Tensor, Tensor]:
    """Per-image deletion AUC (lower is better) and insertion AUC (higher is better).

    Petsiuk, Das, Saenko 2018 (RISE, BMVC), section 4.1 "causal metrics". The pixels of each
    image are ordered by decreasing saliency; ties are broken by row-major pixel index (a
    stable sort), so the result is deterministic, and a constant map removes pixels in raster
    order. After step k = 0..steps the top ``n_k = round(k / steps * H * W)``
    (:func:`pixel_counts`) pixels are

    - deleted: set to the baseline 0 of the model's normalized input (the normalization mean)
      in all channels, starting from ``x``;
    - inserted: copied from ``x`` in all channels into the all-zero input. RISE starts
      insertion from a blurred copy of the image; the zero baseline is used here for both so
      that the two curves share one baseline and need no blur parameter.

    ``p_k`` is the target-class probability after step k, and the AUC is the trapezoidal
    rule over the fraction axis with nodes ``k / steps`` in [0, 1]:
    ``AUC = (p_0 / 2 + p_1 + ... + p_{steps-1} + p_steps / 2) / steps`` (RISE's ``auc``), in
    [0, 1]. No division by ``p_0``. (image, step) pairs are folded into the batch axis, at most
    ``batch_size`` rows per model call per curve. A map with a non-finite value gives NaN.
    Returns two (N,) float64 tensors.
    """
    _check_inputs(x, maps, target)
    _check_batch_size(batch_size)
    n, _, h, w = x.shape
    counts = torch.tensor(pixel_counts(h * w, steps), dtype=torch.long, device=x.device)
    per_image = steps + 1
    finite = _finite_rows(maps).to(x.device)
    flat_maps = maps.reshape(n, h * w).to(x.device)
    flat_maps = torch.where(finite[:, None], flat_maps, torch.zeros_like(flat_maps))
    row_image = torch.arange(n * per_image, device=x.device) // per_image
    row_count = counts.repeat(n)
    row_target = target.to(x.device).repeat_interleave(per_image)

    def kept(start: int, stop: int) -> Tensor:
        """(B, 1, H, W) bool: pixels among the top n_k of the row's image (the changed ones)."""
        first, last = int(row_image[start]), int(row_image[stop - 1])
        order = torch.sort(-flat_maps[first : last + 1], dim=1, stable=True).indices
        ranks = torch.empty_like(order)
        positions = torch.arange(h * w, device=x.device).expand_as(order)
        ranks.scatter_(1, order, positions)
        selected = ranks[row_image[start:stop] - first] < row_count[start:stop, None]
        return selected.view(stop - start, 1, h, w)

    def deleted(start: int, stop: int) -> Tensor:
        return x[row_image[start:stop]] * (~kept(start, stop)).to(x.dtype)

    def inserted(start: int, stop: int) -> Tensor:
        return x[row_image[start:stop]] * kept(start, stop).to(x.dtype)

    curves = []
    for build in (deleted, inserted):
        p = _target_probs(prob_fn, n * per_image, build, row_target, batch_size, x.device)
        p = p.view(n, per_image)
        auc = (p.sum(dim=1) - (p[:, 0] + p[:, -1]) / 2.0) / steps
        curves.append(torch.where(finite, auc, torch.full_like(auc, float("nan"))))
    return curves[0], curves[1]


# ---------------------------------------------------------------------------------------------
# Localization


def _check_masks(maps: Tensor, masks: Tensor) -> None:
    _check_maps(maps)
    if masks.shape != maps.shape:
        raise ValueError(f"masks must match maps {tuple(maps.shape)}, got {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool, got {masks.dtype}")


def localization_iou(maps: Tensor, masks: Tensor, threshold: float = IOU_THRESHOLD) -> Tensor:
    """Per-image IoU of the thresholded map with the ground-truth mask.

    The localization protocol of Grad-CAM++ (Chattopadhay et al. 2018) and Relevance-CAM
    (Lee et al. 2021): ``P = normalize_maps(maps) >= threshold`` (min-max to [0, 1] per image,
    so a constant map selects nothing), ``G = masks`` (bool, (N, H, W)), and
    ``IoU = |P and G| / |P or G|``. An empty union is undefined (NaN), as is a map with a
    non-finite value. ``threshold`` must lie in (0, 1]. (N,) float64 on the maps' device.
    """
    _check_masks(maps, masks)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    masks = masks.to(maps.device)
    predicted = normalize_maps(maps) >= threshold
    inter = (predicted & masks).flatten(1).sum(dim=1).double()
    union = (predicted | masks).flatten(1).sum(dim=1).double()
    iou = inter / torch.where(union > 0, union, torch.ones_like(union))
    defined = (union > 0) & _finite_rows(maps)
    return torch.where(defined, iou, torch.full_like(iou, float("nan")))


def pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Per-image pointing-game hit: 1.0 if the map's maximum lies inside the mask, else 0.0.

    Zhang et al. 2018 ("Top-down neural attention by excitation backprop", IJCV), the
    Pointing Game: a hit when the most salient pixel falls on the annotated object. The
    tolerance here is 0 pixels (the maximum must be a mask pixel); the paper accepts points
    within 15 pixels of the object at 224 x 224 input, so hit rates here are lower or equal.
    Several maxima: the first in row-major order counts. A constant map has no maximum and an
    empty mask no object: both are NaN, as is a map with a non-finite value.
    (N,) float64 on the maps' device.
    """
    _check_masks(maps, masks)
    masks = masks.to(maps.device)
    flat = maps.flatten(1)
    top = flat.argmax(dim=1)  # the first maximal index, row-major
    hit = masks.flatten(1).gather(1, top.view(-1, 1)).squeeze(1).double()
    constant = flat.amax(dim=1) == flat.amin(dim=1)
    defined = ~constant & masks.flatten(1).any(dim=1) & _finite_rows(maps)
    return torch.where(defined, hit, torch.full_like(hit, float("nan")))
