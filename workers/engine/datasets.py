"""The reference benchmark's data: procedurally drawn shapes with known masks, and sklearn digits.

Why shapes: localization metrics (IoU of a thresholded map against the object, Relevance-CAM's
evaluation) need the true object region, and sanity checks need a model that certainly learned
something. A generator gives both with no download: the object mask is known exactly, and the
only thing that tells the classes apart is the object's outline, so a model that reaches high
accuracy must look at the object. Everything a model could otherwise cheat on is random and
independent of the class: position, scale, rotation, object colour, background texture (smooth
noise, stripes or checkerboard) and background colours.

Why digits: the paper's data randomization test uses MNIST; scikit-learn ships a small
handwritten-digit set (1797 images, 8x8) that stands in for it offline.

Everything here is a pure function of its arguments (numpy ``Generator`` streams derived from
the ``seed`` argument, nothing global): same seed, same arrays. Bit for bit across machines only
with the same numpy build: float32 trigonometry may differ in the last bit between CPU
instruction sets, which can move a pixel that lies exactly on an outline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import NDArray

SHAPE_CLASSES: tuple[str, ...] = ("circle", "ring", "square", "triangle", "cross", "star")
BACKGROUND_KINDS: tuple[str, ...] = ("smooth_noise", "stripes", "checker")

# Object size: circumradius as a fraction of the image side. Every outline below fits inside its
# unit circumcircle, so a centre at least one radius from each border keeps the object whole.
MIN_RADIUS_FRACTION = 0.22
MAX_RADIUS_FRACTION = 0.36
# Minimum Euclidean RGB distance (0..255 scale) between the object colour and every colour the
# background can take; with PIXEL_NOISE_MAX this keeps object and background pixels apart, so
# the mask is the set of pixels that look like the object, nothing more and nothing less.
MIN_OBJECT_CONTRAST = 80.0
# Background colours: the second texture colour is the first plus an offset of at most this
# length, which leaves room in the RGB cube for a contrasting object colour (see _object_colours).
MAX_BACKGROUND_SPREAD = 100.0
# Per-pixel sensor noise, Gaussian truncated at +-PIXEL_NOISE_MAX so bounds stay exact.
PIXEL_NOISE_SIGMA = 4.0
PIXEL_NOISE_MAX = 10.0
_COLOUR_CANDIDATES = 16
_CHUNK_PIXELS = 1 << 20  # pixels rendered at once; bounds memory, does not change the result


@dataclass(frozen=True)
class ShapesDataset:
    """Images with one object each, its class, its pixel mask and its bounding box.

    ``images`` uint8 (N, H, W, 3) RGB; ``labels`` int64 (N,) indexing ``class_names``;
    ``masks`` bool (N, H, W), True where the object was drawn; ``boxes`` int64 (N, 4) as
    ``x0, y0, x1, y1`` with the end exclusive (``masks[i, y0:y1, x0:x1]`` holds the whole
    object, and the box is tight); ``object_colours`` uint8 (N, 3), the colour the object was
    filled with before noise.
    """

    images: NDArray[np.uint8]
    labels: NDArray[np.int64]
    masks: NDArray[np.bool_]
    boxes: NDArray[np.int64]
    object_colours: NDArray[np.uint8]
    class_names: tuple[str, ...] = SHAPE_CLASSES

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: NDArray[np.int64]) -> ShapesDataset:
        """The images at ``index`` (e.g. one side of :func:`stratified_split`)."""
        return ShapesDataset(
            images=self.images[index],
            labels=self.labels[index],
            masks=self.masks[index],
            boxes=self.boxes[index],
            object_colours=self.object_colours[index],
            class_names=self.class_names,
        )


# --- outlines, in object coordinates (u, v) with circumradius 1 ---------------------------------


def _circle(u: NDArray[np.float32], v: NDArray[np.float32]) -> NDArray[np.bool_]:
    return np.asarray(u * u + v * v <= 0.85**2)


def _ring(u: NDArray[np.float32], v: NDArray[np.float32]) -> NDArray[np.bool_]:
    r2 = u * u + v * v
    return np.asarray((r2 <= 0.95**2) & (r2 >= 0.5**2))


def _square(u: NDArray[np.float32], v: NDArray[np.float32]) -> NDArray[np.bool_]:
    return np.asarray(np.maximum(np.abs(u), np.abs(v)) <= 0.7)


def _triangle(u: NDArray[np.float32], v: NDArray[np.float32]) -> NDArray[np.bool_]:
    # Equilateral: three half-planes at distance 0.5 (the inradius) from the centre.
    inside = np.ones(u.shape, dtype=bool)
    for k in range(3):
        a = np.pi / 2 + 2 * np.pi * k / 3
        inside &= u * np.cos(a) + v * np.sin(a) <= 0.5
    return inside


def _cross(u: NDArray[np.float32], v: NDArray[np.float32]) -> NDArray[np.bool_]:
    au, av = np.abs(u), np.abs(v)
    half_width, half_length = 0.28, 0.95
    return np.asarray(
        ((au <= half_width) & (av <= half_length)) | ((av <= half_width) & (au <= half_length))
    )


def _star(u: NDArray[np.float32], v: NDArray[np.float32]) -> NDArray[np.bool_]:
    # Five-pointed star: fold the angle into one half spike, [0, pi/5], and test against the edge
    # from the tip (1, 0) to the inner vertex at radius 0.45 and angle pi/5.
    rho = np.sqrt(u * u + v * v)
    sector = 2 * np.pi / 5
    phi = np.mod(np.arctan2(v, u), sector)
    phi = np.abs(phi - sector * (phi > sector / 2))
    x, y = rho * np.cos(phi), rho * np.sin(phi)
    inner = 0.45
    bx, by = inner * np.cos(np.pi / 5), inner * np.sin(np.pi / 5)
    # The point is inside when it lies on the centre's side of the tip-to-inner-vertex line.
    side = (bx - 1.0) * y - by * (x - 1.0)
    return np.asarray(side >= 0)


_OUTLINES: dict[str, Callable[[NDArray[np.float32], NDArray[np.float32]], NDArray[np.bool_]]] = {
    "circle": _circle,
    "ring": _ring,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "star": _star,
}


# --- backgrounds: a pattern t in [0, 1] that mixes two colours ------------------------------------


def _bilinear_matrix(n_out: int, n_in: int) -> NDArray[np.float32]:
    """(n_out, n_in) weights that resample a 1-D signal bilinearly, ends aligned."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


@dataclass(frozen=True)
class _Backgrounds:
    """Every random number the backgrounds need, drawn for the whole set before rendering.

    Drawing up front (rather than per rendered chunk) keeps the images independent of how
    rendering is chunked. Each image gets parameters for every kind; only its own kind's are used.
    """

    kind: NDArray[np.int64]  # index into BACKGROUND_KINDS
    angle: NDArray[np.float64]  # stripe direction / checker rotation, [0, pi)
    scale: NDArray[np.float64]  # [0, 1): stripe period or checker cell within its range
    phase: NDArray[np.float64]  # stripe phase, [0, 2 pi)
    offset: NDArray[np.float64]  # (n, 2) checker offset in cells, [0, 2)
    coarse: NDArray[np.float32]  # (n, 4, 4) smooth-noise grid
    fine: NDArray[np.float32]  # (n, 8, 8) smooth-noise grid, half weight

    @classmethod
    def draw(cls, rng: np.random.Generator, n: int) -> _Backgrounds:
        return cls(
            kind=rng.integers(0, len(BACKGROUND_KINDS), n),
            angle=rng.uniform(0, np.pi, n),
            scale=rng.random(n),
            phase=rng.uniform(0, 2 * np.pi, n),
            offset=rng.uniform(0, 2, (n, 2)),
            coarse=rng.random((n, 4, 4), dtype=np.float32),
            fine=rng.random((n, 8, 8), dtype=np.float32),
        )

    def take(self, index: NDArray[np.int64]) -> _Backgrounds:
        return _Backgrounds(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _smooth_noise(p: _Backgrounds, size: int) -> NDArray[np.float32]:
    """Two octaves of bilinearly upsampled uniform noise (a coarse 4x4 and a finer 8x8 grid)."""
    t = np.zeros((p.kind.shape[0], size, size), dtype=np.float32)
    for grid, weight in ((p.coarse, 1.0), (p.fine, 0.5)):
        m = _bilinear_matrix(size, grid.shape[1])
        t += weight * np.einsum("hi,nij,wj->nhw", m, grid, m)
    lo = t.min(axis=(1, 2), keepdims=True)
    hi = t.max(axis=(1, 2), keepdims=True)
    return (t - lo) / np.maximum(hi - lo, 1e-6)


def _rotated_grid(
    angle: NDArray[np.float64], size: int
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    c = np.cos(angle).astype(np.float32)[:, None, None]
    s = np.sin(angle).astype(np.float32)[:, None, None]
    return xs * c + ys * s, -xs * s + ys * c


def _stripes(p: _Backgrounds, size: int) -> NDArray[np.float32]:
    """Sinusoidal stripes, random direction, period 1/8 to 1/3 of the image, random phase."""
    period = (size / 8 + p.scale * (size / 3 - size / 8)).astype(np.float32)[:, None, None]
    phase = p.phase.astype(np.float32)[:, None, None]
    along, _ = _rotated_grid(p.angle, size)
    return np.asarray(0.5 + 0.5 * np.sin(2 * np.pi * along / period + phase), dtype=np.float32)


def _checker(p: _Backgrounds, size: int) -> NDArray[np.float32]:
    """A rotated checkerboard with cells 1/8 to 1/4 of the image side, random offset."""
    cell = (size / 8 + p.scale * (size / 4 - size / 8)).astype(np.float32)[:, None, None]
    offset = p.offset.astype(np.float32)[:, :, None, None]
    a, b = _rotated_grid(p.angle, size)
    parity = np.floor(a / cell + offset[:, 0]) + np.floor(b / cell + offset[:, 1])
    return np.mod(parity, 2).astype(np.float32)


_BACKGROUNDS: dict[str, Callable[[_Backgrounds, int], NDArray[np.float32]]] = {
    "smooth_noise": _smooth_noise,
    "stripes": _stripes,
    "checker": _checker,
}


def _distance_to_segment(
    p: NDArray[np.float64], a: NDArray[np.float64], b: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Euclidean distance of points p (..., 3) to the segments a-b (..., 3)."""
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-9), 0.0, 1.0)
    return np.asarray(np.linalg.norm(p - (a + t[..., None] * ab), axis=-1))


def _object_colours(
    rng: np.random.Generator, c1: NDArray[np.float64], c2: NDArray[np.float64]
) -> NDArray[np.float64]:
    """A uniformly random colour per image that is far from every background colour.

    The background only takes colours on the segment c1-c2, so the distance to that segment is
    the contrast. Draw candidates and keep the first far enough; if none is (rare), take the
    cube corner opposite the segment's midpoint, which is at least 220 - 50 = 170 away.
    """
    n = c1.shape[0]
    candidates = rng.uniform(0, 255, (n, _COLOUR_CANDIDATES, 3))
    far = _distance_to_segment(candidates, c1[:, None], c2[:, None]) >= MIN_OBJECT_CONTRAST
    first = np.argmax(far, axis=1)
    chosen = candidates[np.arange(n), first]
    corner = np.where((c1 + c2) / 2 < 127.5, 255.0, 0.0)
    found: NDArray[np.bool_] = np.asarray(far.any(axis=1))
    return np.where(found[:, None], chosen, corner)


def _render(
    noise_rng: np.random.Generator,
    labels: NDArray[np.int64],
    centre: NDArray[np.float64],
    radius: NDArray[np.float64],
    angle: NDArray[np.float64],
    backgrounds: _Backgrounds,
    c1: NDArray[np.float64],
    c2: NDArray[np.float64],
    colour: NDArray[np.float64],
    class_names: tuple[str, ...],
    size: int,
) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    n = labels.shape[0]
    pattern = np.empty((n, size, size), dtype=np.float32)
    for k, kind in enumerate(BACKGROUND_KINDS):
        chosen = np.flatnonzero(backgrounds.kind == k)
        if chosen.size:
            pattern[chosen] = _BACKGROUNDS[kind](backgrounds.take(chosen), size)
    f1 = c1.astype(np.float32)[:, None, None, :]
    f2 = c2.astype(np.float32)[:, None, None, :]
    image = f1 + pattern[..., None] * (f2 - f1)

    # Pixel centres in object coordinates: translate, rotate by -angle, scale to radius 1.
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    dx = xs - centre[:, 0].astype(np.float32)[:, None, None]
    dy = ys - centre[:, 1].astype(np.float32)[:, None, None]
    c = np.cos(angle).astype(np.float32)[:, None, None]
    s = np.sin(angle).astype(np.float32)[:, None, None]
    r = radius.astype(np.float32)[:, None, None]
    u = (dx * c + dy * s) / r
    v = (-dx * s + dy * c) / r
    masks = np.zeros((n, size, size), dtype=bool)
    for k, name in enumerate(class_names):
        chosen = np.flatnonzero(labels == k)
        if chosen.size:
            masks[chosen] = _OUTLINES[name](u[chosen], v[chosen])

    image = np.where(masks[..., None], colour.astype(np.float32)[:, None, None, :], image)
    # The only draw made while rendering: a stream of its own, consumed in image order, so
    # drawing it chunk by chunk gives the same numbers as drawing it at once.
    noise = PIXEL_NOISE_SIGMA * noise_rng.standard_normal(image.shape, dtype=np.float32)
    image += np.clip(noise, -PIXEL_NOISE_MAX, PIXEL_NOISE_MAX)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), masks


def _tight_boxes(masks: NDArray[np.bool_]) -> NDArray[np.int64]:
    rows: NDArray[np.bool_] = np.asarray(masks.any(axis=2))
    cols: NDArray[np.bool_] = np.asarray(masks.any(axis=1))
    size_y, size_x = masks.shape[1], masks.shape[2]
    y0 = np.argmax(rows, axis=1)
    y1 = size_y - np.argmax(rows[:, ::-1], axis=1)
    x0 = np.argmax(cols, axis=1)
    x1 = size_x - np.argmax(cols[:, ::-1], axis=1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)


def make_shapes(
    n: int, seed: int, size: int = 32, classes: Sequence[str] = SHAPE_CLASSES
) -> ShapesDataset:
    """``n`` images of ``size`` x ``size`` pixels, one shape each, deterministic in ``seed``.

    ``classes`` picks (and orders) the outlines from :data:`SHAPE_CLASSES`; labels index it.

    Classes are balanced (counts differ by at most one) and in random order. All parameters are
    drawn for the whole set first and pixel noise comes from a separate stream, so rendering in
    chunks (to bound memory) does not change the result: it depends on (n, seed, size, classes)
    only. A different ``n`` gives a different set, not a prefix of it.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    unknown = [c for c in classes if c not in _OUTLINES]
    if unknown or len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be distinct names from {SHAPE_CLASSES}, got {classes}")
    class_names = tuple(classes)
    param_seed, noise_seed = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(param_seed)
    noise_rng = np.random.default_rng(noise_seed)
    n_classes = len(class_names)
    labels = rng.permutation(np.arange(n, dtype=np.int64) % n_classes)
    radius = rng.uniform(MIN_RADIUS_FRACTION, MAX_RADIUS_FRACTION, n) * size
    # Centre at least one radius (plus a pixel) from every border: the whole object is visible.
    margin = radius + 1.0
    centre = margin[:, None] + rng.random((n, 2)) * (size - 1.0 - 2 * margin)[:, None]
    angle = rng.uniform(0, 2 * np.pi, n)
    backgrounds = _Backgrounds.draw(rng, n)
    c1 = rng.uniform(0, 255, (n, 3))
    direction = rng.normal(size=(n, 3))
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-9)
    spread = rng.uniform(0.3, 1.0, n) * MAX_BACKGROUND_SPREAD
    c2 = np.clip(c1 + direction * spread[:, None], 0, 255)
    colour = _object_colours(rng, c1, c2)

    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=bool)
    chunk = max(1, _CHUNK_PIXELS // (size * size))
    for start in range(0, n, chunk):
        part = slice(start, min(start + chunk, n))
        images[part], masks[part] = _render(
            noise_rng,
            labels[part],
            centre[part],
            radius[part],
            angle[part],
            backgrounds.take(np.arange(part.start, part.stop)),
            c1[part],
            c2[part],
            colour[part],
            class_names,
            size,
        )
    return ShapesDataset(
        images=images,
        labels=labels,
        masks=masks,
        boxes=_tight_boxes(masks),
        object_colours=np.rint(colour).astype(np.uint8),
        class_names=class_names,
    )


def load_digits_images(size: int = 32) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """scikit-learn's digits (8x8, values 0..16) as uint8 ``size`` x ``size`` images.

    Bilinear upsampling (Pillow), as the reference models in ``examples/reference`` were trained, so
    that saliency maps are not blocky 4x4 squares. Returns (images (N, H, W), labels (N,)).
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    big = np.stack(
        [
            np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR))
            for im in small
        ]
    )
    return big.astype(np.uint8), digits.target.astype(np.int64)


def stratified_split(
    labels: NDArray[np.int64], test_fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Train and test indices, each class split in the same proportion, deterministic in seed.

    Per class, ``round(count * test_fraction)`` images go to the test side; both index arrays are
    sorted, so the split is a pure function of (labels, test_fraction, seed).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test_parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_test = round(members.size * test_fraction)
        test_parts.append(rng.permutation(members)[:n_test])
    test = np.sort(np.concatenate(test_parts)).astype(np.int64) if test_parts else np.empty(0, int)
    is_test = np.zeros(labels.shape[0], dtype=bool)
    is_test[test] = True
    return np.flatnonzero(~is_test).astype(np.int64), test.astype(np.int64)
