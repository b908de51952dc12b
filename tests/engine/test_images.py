"""Image decoding refuses what it should and preprocesses by the input spec."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from saliency_audit.workers.engine.errors import ImageDecodeError, SpecError
from saliency_audit.workers.engine.images import (
    decode_image,
    list_image_files,
    preprocess,
    unnormalize,
)
from saliency_audit.workers.engine.spec import InputSpec


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decode_rgb_png_roundtrips_pixels() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    decoded = decode_image(_png(pixels), "a.png")
    assert decoded.pixels.shape == (5, 7, 3)
    np.testing.assert_array_equal(decoded.pixels, pixels)


def test_grayscale_request_gives_one_channel() -> None:
    pixels = np.full((4, 4, 3), 200, dtype=np.uint8)
    assert decode_image(_png(pixels), "a.png", channels=1).pixels.shape == (4, 4)


def test_pixel_limit_is_checked_before_decoding() -> None:
    # 50 megapixels: under Pillow's own bomb limit, over ours; only the header exists
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 40000000"):
        decode_image(_png_header_only(10_000, 5_000), "big.png")
    with pytest.raises(ImageDecodeError, match=r"bomb\.png.*exceeds"):
        decode_image(_png_header_only(50_000, 50_000), "bomb.png")


def test_format_outside_allowlist_is_refused() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PPM")
    with pytest.raises(ImageDecodeError, match="allowed format"):
        decode_image(buf.getvalue(), "x.ppm")


@pytest.mark.parametrize(
    "data", [b"", b"not an image at all", _png(np.zeros((3, 3, 3), np.uint8))[:30]]
)
def test_garbage_and_truncated_files_give_a_named_error(data: bytes) -> None:
    with pytest.raises(ImageDecodeError, match=r"bad\.png"):
        decode_image(data, "bad.png")


def test_list_image_files_filters_and_sorts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name in ("b.png", "a.JPG", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_image_files(tmp_path)] == ["a.JPG", "b.png"]
    with pytest.raises(ImageDecodeError, match="not a directory"):
        list_image_files(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageDecodeError, match="no images"):
        list_image_files(empty)


def test_preprocess_scales_and_normalizes_by_the_spec() -> None:
    pixels = np.zeros((2, 2, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 51)
    spec = InputSpec(height=2, width=2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    x = preprocess([decode_image(_png(pixels), "p.png")], spec)
    assert x.shape == (1, 3, 2, 2) and x.dtype == torch.float32
    expected = torch.tensor([(1.0 - 0.5) / 0.25, (0.0 - 0.5) / 0.5, (0.2 - 0.5) / 1.0])
    torch.testing.assert_close(x[0, :, 0, 0], expected)
    torch.testing.assert_close(unnormalize(x, spec)[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.2]))


def test_preprocess_value_range_0_255_and_resize() -> None:
    pixels = np.full((10, 20, 3), 128, dtype=np.uint8)
    spec = InputSpec(height=4, width=6, mean=(0.0,), std=(1.0,), value_range=(0.0, 255.0))
    x = preprocess([decode_image(_png(pixels), "p.png")], spec)
    assert x.shape == (1, 3, 4, 6)
    torch.testing.assert_close(x, torch.full_like(x, 128.0))


def test_input_spec_validation() -> None:
    with pytest.raises(SpecError):
        InputSpec(channels=2)
    with pytest.raises(SpecError):
        InputSpec(std=(0.0, 1.0, 1.0))
    with pytest.raises(SpecError, match="unknown input spec fields"):
        InputSpec.from_dict({"hieght": 3})
    spec = InputSpec.from_dict({"height": 8, "width": 8, "class_names": ["a", "b"]})
    assert InputSpec.from_dict(spec.to_dict()) == spec
