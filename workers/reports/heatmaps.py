"""Heatmap PNGs of saliency maps.

A map with negative values is drawn on a diverging scale (blue - white - red, symmetric about
zero, scaled by the largest |value|), a non-negative map on a sequential one (black - red -
yellow - white, scaled by its maximum), so zero always means "no attribution". Small maps are
enlarged with nearest-neighbour interpolation to at least ``min_side_px`` so that pixels stay
visible. An all-zero (or non-finite) map renders as the colour of zero.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from saliency_audit.workers.engine.contract.report import TRAINED_STAGE

from .content import MODEL_TEST

# anchor colours (position in [0, 1], RGB) of the two scales
_DIVERGING = ((0.0, (33, 102, 172)), (0.5, (247, 247, 247)), (1.0, (178, 24, 43)))
_SEQUENTIAL = (
    (0.0, (0, 0, 0)),
    (0.4, (190, 30, 20)),
    (0.75, (250, 200, 40)),
    (1.0, (255, 255, 255)),
)


def _lookup(anchors: tuple[tuple[float, tuple[int, int, int]], ...]) -> NDArray[np.uint8]:
    positions = np.array([a[0] for a in anchors])
    colours = np.array([a[1] for a in anchors], dtype=np.float64)
    grid = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(grid, positions, colours[:, c]) for c in range(3)], axis=1)
    return np.round(table).astype(np.uint8)


DIVERGING_LUT = _lookup(_DIVERGING)
SEQUENTIAL_LUT = _lookup(_SEQUENTIAL)


def colourize(saliency: NDArray[np.floating]) -> NDArray[np.uint8]:
    """(H, W) map -> (H, W, 3) uint8 RGB on the scale that fits its sign."""
    values = np.nan_to_num(np.asarray(saliency, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if values.ndim != 2:
        raise ValueError(f"a heatmap needs a 2-D map, got shape {values.shape}")
    peak = float(np.abs(values).max()) if values.size else 0.0
    scale = peak if peak > 0 else 1.0
    if (values < 0).any():
        index = np.round((values / scale + 1.0) / 2.0 * 255.0)
        lut = DIVERGING_LUT
    else:
        index = np.round(values / scale * 255.0)
        lut = SEQUENTIAL_LUT
    return lut[np.clip(index, 0, 255).astype(np.intp)]


def heatmap_png(saliency: NDArray[np.floating], min_side_px: int = 128) -> bytes:
    return _png(Image.fromarray(colourize(saliency), mode="RGB"), min_side_px)


def overlay_png(
    saliency: NDArray[np.floating], pixels: NDArray[np.uint8], min_side_px: int = 128
) -> bytes:
    """The heatmap laid over the image it explains: each pixel blends the image with the
    map's colour, the map's weight rising with |value| / max |value| up to 0.7, so where the
    map is zero the image shows through unchanged. ``pixels`` is the decoded image (H0, W0, 3)
    or (H0, W0); it is resized (bilinear, the whole image, like the model's input) to the
    map's size."""
    values = np.nan_to_num(np.asarray(saliency, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    height, width = values.shape
    base = Image.fromarray(np.asarray(pixels, dtype=np.uint8)).convert("RGB")
    if base.size != (width, height):
        base = base.resize((width, height), Image.Resampling.BILINEAR)
    peak = float(np.abs(values).max()) if values.size else 0.0
    weight = (np.abs(values) / peak * 0.7 if peak > 0 else np.zeros_like(values))[..., None]
    blended = np.asarray(base, dtype=np.float64) * (1 - weight) + colourize(values) * weight
    image = Image.fromarray(np.round(blended).astype(np.uint8), mode="RGB")
    return _png(image, min_side_px)


def _png(image: Image.Image, min_side_px: int) -> bytes:
    side = min(image.size)
    if 0 < side < min_side_px:
        factor = -(-min_side_px // side)
        image = image.resize(
            (image.width * factor, image.height * factor), Image.Resampling.NEAREST
        )
    out = io.BytesIO()
    # fixed settings and no metadata: the same map gives the same bytes (and sha256)
    image.save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()


# the pictures an audit's reports show (the worker stores them, `run --report` keeps them in
# memory): the trained model's maps of the first images, and every map a test kept for its
# heatmap grids (the ``layers`` analysis: laid over their images)
HEATMAP_IMAGES = 16


def report_pictures(
    result: Any, images: list[Any]
) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """The heatmap PNGs of an audit result, as report.json's ``artifacts`` entries (kind, test,
    stage, method, image, sha256, media_type, size_bytes) and the PNG bytes by sha256."""
    listed: list[dict[str, Any]] = []
    pngs: dict[str, bytes] = {}
    if getattr(result, "adaptive", None) is not None:
        # an adaptive audit explains the images in its own order (a seeded permutation, cut
        # where it stopped): pair its maps with the images by name
        by_name = {image.name: image for image in images}
        images = [by_name[record.name] for record in result.images]

    def add(test: str, stage: str, method: str, maps: Any, count: int, overlay: bool) -> None:
        for i in range(min(count, len(maps))):
            png = overlay_png(maps[i], images[i].pixels) if overlay else heatmap_png(maps[i])
            sha = hashlib.sha256(png).hexdigest()
            pngs[sha] = png
            listed.append(
                {
                    "kind": "overlay_png" if overlay else "heatmap_png",
                    "test": test,
                    "stage": stage,
                    "method": method,
                    "image": images[i].name,
                    "sha256": sha,
                    "media_type": "image/png",
                    "size_bytes": len(png),
                }
            )

    for method, maps in result.maps.items():
        add(MODEL_TEST, TRAINED_STAGE, method, maps, HEATMAP_IMAGES, overlay=False)
    for test_name, test in result.tests.items():
        for stage, by_method in test.example_maps.items():
            for method, maps in by_method.items():
                add(test_name, stage, method, maps, len(maps), overlay=test_name == "layers")
    return listed, pngs
