"""``torch.save`` archives holding a state dict: a ZIP with ``<prefix>/data.pkl`` and one
record per storage under ``<prefix>/data/``.

The pickle is never unpickled: :mod:`.pickle_scan` reads it statically. Here the archive around
it is checked: one pickle of bounded size, only the opcodes torch's weights-only loader
implements, a record of the right size for every storage, and tensors at the dict's top level.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from pathlib import Path

from .classifier_head import head_name, num_classes_from_shapes
from .common import MiB, ModelInfo, UploadRejected, clip
from .pickle_scan import STORAGE_ITEMSIZE, PickleScan, scan_state_dict_pickle

# A state dict's pickle holds names and shapes only (resnet18's is 15 kB); the tensors are
# separate records. Anything this big is not a state dict.
MAX_PICKLE_BYTES = 64 * MiB


class _Invalid(Exception):
    """A broken rule of the archive; :func:`inspect_torch_zip` words the refusal."""


def inspect_torch_zip(path: Path, filename: str) -> ModelInfo:
    name = clip(filename)
    try:
        return _inspect(path, name)
    except _Invalid as exc:
        raise UploadRejected(
            f"{name}: invalid torch.save archive: {exc}", code="invalid_torch_file"
        ) from None


def _inspect(path: Path, name: str) -> ModelInfo:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _Invalid(f"corrupt ZIP ({clip(str(exc))})") from None
    with zf:
        prefix, data = _read_pickle(zf, name)
        try:
            scan = scan_state_dict_pickle(data)
        except ValueError as exc:
            raise _Invalid(f"data.pkl is not a pickled state dict ({clip(str(exc))})") from None
        if scan.unsupported_opcodes:
            raise UploadRejected(
                f"{name}: data.pkl uses pickle protocol {scan.protocol} "
                f"({', '.join(sorted(scan.unsupported_opcodes))}), which "
                "torch.load(weights_only=True) cannot read; save with torch.save's default "
                "protocol (2) or as .safetensors",
                code="unsupported_pickle",
                opcodes=sorted(scan.unsupported_opcodes),
            )
        _check_storage_records(scan, {i.filename: i.file_size for i in zf.infolist()}, prefix)
        if not scan.tensors:
            raise _Invalid(
                "the pickled dict holds no tensors at its top level; upload "
                "model.state_dict() itself, not a checkpoint that wraps it"
            )
    return ModelInfo(
        format="torch",
        opset=None,
        input_shape=None,
        output_shape=None,
        num_classes=num_classes_from_shapes(scan.tensors),
        tensors=scan.n_tensors,
        parameters=scan.parameters,
        notes=[f"torch.save zip archive, pickle protocol {scan.protocol}"],
        output=head_name(scan.tensors),
    )


def _read_pickle(zf: zipfile.ZipFile, name: str) -> tuple[str, bytes]:
    """The archive's record prefix and its one ``data.pkl``, read under a cap."""
    pickles = [
        i for i in zf.infolist() if re.fullmatch(r"[^/]+/data\.pkl", i.filename) and not i.is_dir()
    ]
    if not pickles:
        raise UploadRejected(
            f"{name}: a ZIP archive that is not a torch.save file (no <prefix>/data.pkl); "
            "a model is an ONNX file, a .safetensors file or a torch.save state dict",
            status=415,
            code="unsupported_format",
        )
    if len(pickles) > 1:
        raise _Invalid(f"{len(pickles)} data.pkl records")
    pkl = pickles[0]
    if pkl.file_size > MAX_PICKLE_BYTES:
        raise UploadRejected(
            f"{name}: data.pkl is {pkl.file_size} bytes, more than a state dict's pickle "
            f"({MAX_PICKLE_BYTES})",
            status=413,
            code="file_too_large",
        )
    try:
        with zf.open(pkl) as fh:
            data = fh.read(MAX_PICKLE_BYTES + 1)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as exc:
        raise _Invalid(f"cannot read data.pkl ({clip(str(exc))})") from None
    except RuntimeError as exc:  # encrypted member
        raise _Invalid(clip(str(exc))) from None
    if len(data) > MAX_PICKLE_BYTES:
        raise _Invalid("data.pkl is larger than its declared size")
    return pkl.filename[: -len("data.pkl")], data


def _check_storage_records(scan: PickleScan, sizes: dict[str, int], prefix: str) -> None:
    """Every storage the pickle names has its record, of the size its class and count make."""
    for key, (cls_name, numel) in scan.storages.items():
        record = f"{prefix}data/{key}"
        if record not in sizes:
            raise _Invalid(f"storage {clip(key)!r} has no record {clip(record)!r}")
        expected = numel * STORAGE_ITEMSIZE[cls_name]
        if sizes[record] != expected:
            raise _Invalid(
                f"storage {clip(key)!r} ({cls_name}, {numel} elements) should be "
                f"{expected} bytes, its record is {sizes[record]}"
            )
