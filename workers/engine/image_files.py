"""Torch-free rules about image files: allowed formats, size limits and how folders become labels.

The API process validates uploads with these same rules before a worker ever sees the files, and
it must not import torch, so they live apart from :mod:`workers.engine.images` (which decodes
into tensors). This module imports only the standard library and the engine's errors.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ImageDecodeError

__all__ = ["ALLOWED_FORMATS", "ALLOWED_SUFFIXES", "MAX_IMAGES", "MAX_PIXELS", "class_indices"]

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "WEBP", "TIFF", "GIF")
ALLOWED_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
)
MAX_PIXELS = 40_000_000  # per image, checked before decoding (about 6300 x 6300)
MAX_IMAGES = 10_000


def class_indices(
    folder_names: Sequence[str],
    class_names: Sequence[str] | None,
    *,
    source: str | None = None,
) -> dict[str, int]:
    """The class index of each class folder of a labeled image set.

    When the model names its classes, each folder must be one of those names and gets that
    class's index; otherwise folder names that are all integers are the class indices, and any
    other names are numbered in sorted order. ``source`` (the folder or archive the names come
    from) only prefixes the error message.
    """
    names = list(folder_names)
    if class_names:
        unknown = [n for n in names if n not in class_names]
        if unknown:
            prefix = f"{source}: " if source is not None else ""
            raise ImageDecodeError(
                f"{prefix}class folders {unknown} are not among the model's classes "
                f"{list(class_names)}",
                image=source if source is not None else "",
            )
        return {n: list(class_names).index(n) for n in names}
    if all(n.isdigit() for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(sorted(names))}
