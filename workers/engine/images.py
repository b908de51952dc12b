"""Decoding and preprocessing of audit images.

Images come from users, so decoding is defensive: Pillow only opens an allowlist of formats,
the pixel count is checked from the header before any pixel is decoded (a decompression bomb
never gets allocated), and every failure is an :class:`ImageDecodeError` naming the file.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import ImageDecodeError
from .image_files import ALLOWED_FORMATS, ALLOWED_SUFFIXES, MAX_IMAGES, MAX_PIXELS, class_indices
from .spec import InputSpec, Interpolation

# The limits and the labeling rule live in the torch-free image_files module (the API process
# applies them to uploads); they stay importable from here for existing callers.
__all__ = [
    "ALLOWED_FORMATS",
    "ALLOWED_SUFFIXES",
    "MAX_IMAGES",
    "MAX_PIXELS",
    "DecodedImage",
    "class_indices",
    "decode_image",
    "decode_mask",
    "list_image_files",
    "load_image_folder",
    "load_labeled_folder",
    "load_mask_folder",
    "masks_tensor",
    "preprocess",
    "unnormalize",
]

# the input spec's interpolation -> Pillow's filter
RESAMPLING: dict[Interpolation, Image.Resampling] = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclass(frozen=True)
class DecodedImage:
    name: str
    pixels: np.ndarray  # uint8, (H, W, 3) RGB or (H, W) for one channel


def decode_image(
    data: bytes, name: str, channels: int = 3, max_pixels: int = MAX_PIXELS
) -> DecodedImage:
    """Decode one image with Pillow; RGB (or L when ``channels == 1``), first frame only."""
    try:
        with Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"{name}: {width}x{height} pixels exceeds the limit of {max_pixels}",
                    image=name,
                )
            img.seek(0)
            converted = img.convert("L" if channels == 1 else "RGB")
            pixels = np.asarray(converted, dtype=np.uint8).copy()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"{name}: not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})",
            image=name,
        ) from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{name}: cannot decode image: {exc}", image=name) from None
    return DecodedImage(name=name, pixels=pixels)


def list_image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (by suffix, sorted by name; hidden files ignored)."""
    if not folder.is_dir():
        raise ImageDecodeError(f"{folder}: not a directory", image=str(folder))
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in ALLOWED_SUFFIXES
    )
    if not files:
        raise ImageDecodeError(
            f"{folder}: no images (allowed suffixes: {', '.join(sorted(ALLOWED_SUFFIXES))})",
            image=str(folder),
        )
    if len(files) > MAX_IMAGES:
        raise ImageDecodeError(f"{folder}: {len(files)} images exceeds the limit of {MAX_IMAGES}")
    return files


def load_image_folder(folder: Path, channels: int = 3) -> list[DecodedImage]:
    return [decode_image(p.read_bytes(), p.name, channels) for p in list_image_files(folder)]


def preprocess(
    images: Sequence[DecodedImage] | Iterable[DecodedImage], spec: InputSpec
) -> torch.Tensor:
    """Resize, scale and normalize decoded images into the model's NCHW float32 input.

    Resizing is a plain resize to ``spec.height`` x ``spec.width`` (no crop) with Pillow's
    ``spec.interpolation`` filter (bilinear unless the spec says bicubic), so the whole image
    is explained; the channels are put in ``spec.channel_order`` (BGR reverses the
    decoded RGB), pixel values are mapped linearly from [0, 255] onto ``spec.value_range`` and
    then normalized with ``(x - mean) / std`` per channel, mean and std being in the model's
    channel order.
    """
    lo, hi = spec.value_range
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    batch = []
    for image in images:
        mode = "L" if spec.channels == 1 else "RGB"
        pil = Image.fromarray(image.pixels).convert(mode)
        if pil.size != (spec.width, spec.height):
            pil = pil.resize((spec.width, spec.height), RESAMPLING[spec.interpolation])
        arr = np.asarray(pil, dtype=np.float32)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if spec.channel_order == "BGR":
            arr = arr[::-1]
        arr = arr / 255.0 * (hi - lo) + lo
        batch.append((arr - mean) / std)
    if not batch:
        raise ImageDecodeError("no images to preprocess")
    return torch.from_numpy(np.stack(batch).astype(np.float32))


def unnormalize(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Invert the normalization: back to ``spec.value_range`` pixel scale, in the model's
    channel order (for display)."""
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x * std + mean


def load_labeled_folder(
    root: Path, channels: int = 3, class_names: Sequence[str] | None = None
) -> tuple[list[DecodedImage], list[int], tuple[str, ...]]:
    """A training set laid out as one sub-folder of images per class.

    Labels: when the model names its classes, each folder must be one of those names and gets
    that class's index; otherwise folder names that are all integers are the class indices, and
    any other names are numbered in sorted order. Returns the images, their labels and the class
    name of each label used.
    """
    if not root.is_dir():
        raise ImageDecodeError(f"{root}: not a directory", image=str(root))
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise ImageDecodeError(
            f"{root}: a training set needs one sub-folder of images per class (found "
            f"{len(folders)} sub-folders)",
            image=str(root),
        )
    names = [f.name for f in folders]
    index = class_indices(names, class_names, source=str(root))
    images: list[DecodedImage] = []
    labels: list[int] = []
    for folder in folders:
        for path in list_image_files(folder):
            images.append(decode_image(path.read_bytes(), f"{folder.name}/{path.name}", channels))
            labels.append(index[folder.name])
        if len(images) > MAX_IMAGES * 10:
            raise ImageDecodeError(f"{root}: more than {MAX_IMAGES * 10} training images")
    return images, labels, tuple(names)


def decode_mask(data: bytes, name: str) -> np.ndarray:
    """A ground-truth mask image (any allowed format): nonzero pixels are the object."""
    decoded = decode_image(data, name, channels=1)
    return decoded.pixels > 0


def masks_tensor(masks: Sequence[np.ndarray], spec: InputSpec) -> torch.Tensor:
    """Boolean (H0, W0) masks at the images' own sizes -> (N, H, W) at the model's input size,
    resized like the images (the whole image, no crop) with nearest-neighbour sampling so a
    mask stays a set of pixels."""
    out = []
    for mask in masks:
        pil = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, mode="L")
        if pil.size != (spec.width, spec.height):
            pil = pil.resize((spec.width, spec.height), Image.Resampling.NEAREST)
        out.append(np.asarray(pil) > 127)
    return torch.from_numpy(np.stack(out))


def load_mask_folder(folder: Path, image_names: Sequence[str]) -> list[np.ndarray]:
    """One mask per image from ``folder``, matched by file stem (``cat_1.png`` for
    ``cat_1.jpg``); every image needs one."""
    by_stem = {p.stem: p for p in list_image_files(folder)}
    missing = [n for n in image_names if Path(n).stem not in by_stem]
    if missing:
        raise ImageDecodeError(
            f"{folder}: no mask for {len(missing)} images ({', '.join(missing[:5])}); masks are "
            "matched to images by file stem",
            image=str(folder),
        )
    return [
        decode_mask(by_stem[Path(n).stem].read_bytes(), by_stem[Path(n).stem].name)
        for n in image_names
    ]
