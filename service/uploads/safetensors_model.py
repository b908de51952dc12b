"""safetensors weights: an 8-byte little-endian header length, a JSON header, the raw data.

The header is parsed by hand (no safetensors package in the API process) and checked against
the format's rules: every tensor has a known dtype, a shape and offsets whose span matches its
size, the spans tile the data section exactly (no overlap, no unowned byte), and keys are
unique.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .classifier_head import head_name, num_classes_from_shapes
from .common import ModelInfo, UploadRejected, clip, is_int, no_duplicate_keys

# safetensors' own limit on the JSON header (MAX_HEADER_SIZE in the reference implementation).
SAFETENSORS_MAX_HEADER = 100_000_000
# Bits per element of every dtype the safetensors format defines.
SAFETENSORS_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}


class _Invalid(Exception):
    """A broken rule of the format; :func:`inspect_safetensors` words the refusal."""


def inspect_safetensors(path: Path, filename: str, size: int) -> ModelInfo:
    try:
        return _inspect(path, size)
    except _Invalid as exc:
        raise UploadRejected(
            f"{clip(filename)}: invalid safetensors file: {exc}", code="invalid_safetensors"
        ) from None


def _inspect(path: Path, size: int) -> ModelInfo:
    header, data_size = _read_header(path, size)
    spans: list[tuple[int, int, str]] = []
    shapes: dict[str, tuple[int, ...]] = {}
    parameters = 0
    for key, entry in header.items():
        begin, end, shape = _check_tensor(clip(key), entry, data_size)
        spans.append((begin, end, clip(key)))
        shapes[key] = shape
        parameters += math.prod(shape)
    _check_spans_tile(spans, data_size)
    return ModelInfo(
        format="safetensors",
        opset=None,
        input_shape=None,
        output_shape=None,
        num_classes=num_classes_from_shapes(shapes),
        tensors=len(spans),
        parameters=parameters,
        notes=[],
        output=head_name(shapes),
    )


def _read_header(path: Path, size: int) -> tuple[dict[str, Any], int]:
    """The header's tensor entries (``__metadata__`` checked and dropped), and the size of the
    data section after it."""
    with path.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > SAFETENSORS_MAX_HEADER:
            raise _Invalid(
                f"header length {n} exceeds the format's limit of {SAFETENSORS_MAX_HEADER}"
            )
        if n > size - 8:
            raise _Invalid(f"header length {n} runs past the end of the file ({size} bytes)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _Invalid(f"header is not a JSON object ({clip(str(exc))})") from None
    if not isinstance(header, dict):
        raise _Invalid("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _Invalid("__metadata__ must map strings to strings")
    return header, size - 8 - n


def _check_tensor(tname: str, entry: Any, data_size: int) -> tuple[int, int, tuple[int, ...]]:
    """One header entry's data span and shape, once its dtype, shape and offsets agree."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _Invalid(f"tensor {tname!r} needs dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
        raise _Invalid(f"tensor {tname!r} has unknown dtype {clip(repr(dtype))}")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise _Invalid(f"tensor {tname!r} shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets):
        raise _Invalid(f"tensor {tname!r} data_offsets must be [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise _Invalid(
            f"tensor {tname!r} data_offsets [{begin}, {end}] lie outside the data section "
            f"({data_size} bytes)"
        )
    bits = math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise _Invalid(
            f"tensor {tname!r} is {dtype} of shape {shape} but its data is {end - begin} bytes"
        )
    return begin, end, tuple(shape)


def _check_spans_tile(spans: list[tuple[int, int, str]], data_size: int) -> None:
    """The tensors' data spans cover the data section exactly once, and there is one at least."""
    cursor = 0
    for begin, end, tname in sorted(spans):
        if begin < cursor:
            raise _Invalid(f"tensor {tname!r} overlaps another tensor's data")
        if begin > cursor:
            raise _Invalid(f"bytes {cursor}..{begin} of the data section belong to no tensor")
        cursor = end
    if cursor != data_size:
        raise _Invalid(f"bytes {cursor}..{data_size} of the data section belong to no tensor")
    if not spans:
        raise _Invalid("no tensors")
