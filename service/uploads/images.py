"""Images, masks and ``boxes.json`` inside an image set, checked from bytes in memory.

An image must open as one of :data:`saliency_audit.workers.engine.image_files.ALLOWED_FORMATS`, stay
under
:data:`saliency_audit.workers.engine.image_files.MAX_PIXELS` (read from the header, before decoding)
and decode
fully. ``boxes.json`` maps image names to boxes ``[x0, y0, x1, y1]`` inside the image.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any

from PIL import Image, UnidentifiedImageError

from saliency_audit.workers.engine.image_files import ALLOWED_FORMATS, MAX_PIXELS

from .common import MiB, UploadRejected, _reject, clip, no_duplicate_keys

MAX_BOXES_JSON_BYTES = 16 * MiB
_BOXES_SHAPE = 'expected {"<image name>": [[x0, y0, x1, y1], ...]}'


def probe_image(data: bytes, member: str) -> tuple[int, int, str]:
    """Size and format from the header, the pixel cap, then a verify and a full decode."""
    try:
        with Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as img:
            width, height = img.size
            fmt = str(img.format)
            if width * height > MAX_PIXELS:
                raise _reject(
                    f"{clip(member)}: {width}x{height} pixels exceeds the limit of {MAX_PIXELS}",
                    "image_too_large",
                    member=member,
                    width=width,
                    height=height,
                )
            if width <= 0 or height <= 0:
                raise ValueError("empty image")
            img.verify()
        # verify() leaves the image unusable; a fresh open decodes the first frame for real
        # (verify does not decode pixels, so a truncated JPEG passes it).
        with Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as img:
            img.load()
    except UploadRejected:
        raise
    except Image.DecompressionBombError:
        raise _reject(
            f"{clip(member)}: the image's pixel count exceeds the limit of {MAX_PIXELS}",
            "image_too_large",
            member=member,
        ) from None
    except UnidentifiedImageError:
        raise _reject(
            f"{clip(member)}: not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})",
            "invalid_image",
            member=member,
        ) from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, struct.error...)
        raise _reject(
            f"{clip(member)}: cannot decode the image ({clip(str(exc))})",
            "invalid_image",
            member=member,
        ) from None
    return width, height, fmt


def parse_boxes_json(data: bytes, member: str) -> Any:
    if len(data) > MAX_BOXES_JSON_BYTES:
        raise _reject(
            f"{member}: larger than {MAX_BOXES_JSON_BYTES} bytes", "archive_too_large", status=413
        )
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _reject(
            f"{member}: not valid JSON ({clip(str(exc))})", "invalid_boxes", member=member
        ) from None


def validate_boxes(
    doc: Any, sizes: Mapping[str, tuple[int, int]], member: str
) -> dict[str, list[list[float]]]:
    """The boxes of ``doc`` by image name, each checked against its image's (width, height)."""
    if not isinstance(doc, dict):
        raise _reject(f"{member}: {_BOXES_SHAPE}", "invalid_boxes", member=member)
    out: dict[str, list[list[float]]] = {}
    for key, boxes in doc.items():
        if key not in sizes:
            raise _reject(
                f"{member}: boxes for {clip(key)!r}, which is not an image in the archive "
                "(keys are image names such as 'a.png' or 'cat/a.png')",
                "unknown_image",
                member=member,
                image=clip(key),
            )
        if not isinstance(boxes, list):
            raise _reject(
                f"{member}: {clip(key)!r}: {_BOXES_SHAPE}", "invalid_boxes", member=member
            )
        out[key] = [_check_box(box, key, sizes[key], member) for box in boxes]
    return out


def _check_box(box: Any, key: str, size: tuple[int, int], member: str) -> list[float]:
    width, height = size
    if not (
        isinstance(box, list)
        and len(box) == 4
        and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box
        )
    ):
        raise _reject(
            f"{member}: {clip(key)!r}: a box must be four numbers [x0, y0, x1, y1], "
            f"got {clip(json.dumps(box))}",
            "invalid_boxes",
            member=member,
        )
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise _reject(
            f"{member}: {clip(key)!r}: box {box} is not within the "
            f"{width}x{height} image with x0 < x1 and y0 < y1",
            "invalid_boxes",
            member=member,
        )
    return list(box)
