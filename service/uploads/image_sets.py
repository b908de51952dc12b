"""Validation of uploaded model files and image-set archives, before anything is stored.

Everything here is a pure function of a file that is already on local disk (Flask has spooled
the upload to a temporary file). The API process runs it, so it imports only the standard
library, Pillow, ``onnx`` and the torch-free :mod:`workers.engine.image_files`: never torch.
Nothing uploaded is unpickled, executed or extracted to disk. Every refusal is one
:class:`UploadRejected` carrying an HTTP status, a short code and a human-readable detail.

Models (:func:`inspect_model`)
    The format comes from the bytes, never from the file name: a ZIP holding
    ``<prefix>/data.pkl`` is a ``torch.save`` archive (its pickle is scanned statically against
    the globals a weights-only load of a state dict needs), 8 bytes of little-endian length then
    ``{`` is safetensors (its header is parsed by hand), anything else is tried as ONNX protobuf
    (refused when a tensor points at external data, then run through the ONNX checker). Weights
    need a torchvision ``architecture`` (:data:`service.architectures.TORCHVISION_CLASSIFIERS`).
    The worker later loads weights with ``torch.load(weights_only=True)`` or safetensors: this
    is the early, torch-free check, not the only guard.

Image sets (:func:`read_dataset_archive`)
    A ZIP or a tar (plain, gzip, bzip2 or xz), recognised by its magic bytes. Members are read
    into memory one at a time with a hard cap and never extracted. Layout, after ignoring
    directories, hidden files (any path segment starting with ``.``), ``__MACOSX/`` and
    ``Thumbs.db``, and after stripping a single top-level folder that wraps everything::

        a.png, b.jpg, ...            unlabeled set (images at the root) ...
        images/a.png, ...            ... or in images/ (not both)
        cat/a.png, dog/b.png, ...    labeled set: two or more class folders, label = folder
                                     name; class names = the sorted folder names (the worker maps
                                     them to the model's classes with ``class_indices``)
        masks/<image stem>.png       optional: one mask per image, same size, nonzero = object
        boxes.json                   optional: {"<image name>": [[x0, y0, x1, y1], ...]} in
                                     pixel coordinates, 0 <= x0 < x1 <= width (same for y)

    Image names are paths relative to the set's root without ``images/`` (``a.png``,
    ``cat/a.png``); ``boxes.json`` keys are those names, and masks match an image by the stem of
    its file name (``masks/a.png`` is the mask of ``a.png`` or of ``cat/a.png``), so when masks
    are present image stems must be unique. ``images`` and ``masks`` are never class names.
    A boxes.json entry may be ``[]`` (no object); images it does not name have no boxes. Any
    other file is refused (``unexpected_member``); so are links, devices, duplicate names,
    unsafe paths (absolute, ``..``, backslashes, drive letters, NUL) and nested archives.
    Only when the whole archive validates is each image and mask handed to ``sink``, in a second
    pass over the archive, so a refusal never stores anything.
"""

from __future__ import annotations

import bz2
import difflib
import gzip
import hashlib
import io
import json
import lzma
import math
import pickletools
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

import onnx
from PIL import Image, UnidentifiedImageError

from service.architectures import TORCHVISION_CLASSIFIERS
from workers.engine.errors import (
    EMBED_WEIGHTS_FIX,
    ModelLoadError,
    NotAClassifierError,
    OutputRequiredError,
    UnknownOutputError,
)
from workers.engine.image_files import ALLOWED_FORMATS, ALLOWED_SUFFIXES, MAX_IMAGES, MAX_PIXELS
from workers.engine.spec import resolve_output

__all__ = [
    "DEFAULT_MAX_MODEL_BYTES",
    "TORCHVISION_CLASSIFIERS",
    "ArchiveLimits",
    "DatasetManifest",
    "ManifestImage",
    "ModelInfo",
    "UploadRejected",
    "check_architecture",
    "inspect_model",
    "read_dataset_archive",
    "scan_state_dict_pickle",
]

MiB = 1 << 20
GiB = 1 << 30

# A serialized ONNX ModelProto cannot exceed protobuf's 2 GiB message limit; weights files may be
# larger in principle, but a torchvision classifier's state dict stays well under it.
ONNX_MAX_BYTES = (1 << 31) - 1
DEFAULT_MAX_MODEL_BYTES = 2 * GiB
# safetensors' own limit on the JSON header (MAX_HEADER_SIZE in the reference implementation).
SAFETENSORS_MAX_HEADER = 100_000_000
# A state dict's pickle holds names and shapes only (resnet18's is 15 kB); the tensors are
# separate records. Anything this big is not a state dict.
MAX_PICKLE_BYTES = 64 * MiB
MAX_BOXES_JSON_BYTES = 16 * MiB


class UploadRejected(Exception):
    """An upload refused, with what the HTTP layer needs to answer.

    ``status`` is 400, 413 (a size limit exceeded), 415 (format not recognized) or 422 (the
    right kind of file, but malformed or unsafe); ``code`` is a short stable slug; ``detail`` a
    sentence for a human; ``extra`` JSON-able fields such as the offending ``member``.
    """

    def __init__(
        self, detail: str, *, status: int = 422, code: str = "invalid_upload", **extra: Any
    ) -> None:
        if status not in (400, 413, 415, 422):
            raise ValueError(f"UploadRejected status must be 400, 413, 415 or 422, not {status}")
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.code = code
        self.extra: dict[str, Any] = extra

    def to_dict(self) -> dict[str, Any]:
        """``{"status", "code", "detail", **extra}``, ready for a problem+json body."""
        return {"status": self.status, "code": self.code, "detail": self.detail, **self.extra}

    def __repr__(self) -> str:
        return f"UploadRejected({self.status}, {self.code!r}, {self.detail!r})"


def _clip(text: str, limit: int = 200) -> str:
    """Names from a hostile file go into messages: keep them printable and short."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

ModelFormat = Literal["onnx", "safetensors", "torch"]


@dataclass(frozen=True)
class ModelInfo:
    """What an accepted model file is. Shapes are ONNX's (a dim is an int, a name or None);
    ``output`` and ``output_shape`` are those of the graph output an audit explains."""

    format: ModelFormat
    opset: int | None
    input_shape: list[int | str | None] | None
    output_shape: list[int | str | None] | None
    num_classes: int | None
    tensors: int
    parameters: int  # elements over all tensors, buffers included
    notes: list[str] = field(default_factory=list)
    output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _file_size(path: Path, filename: str, max_bytes: int) -> int:
    size = path.stat().st_size
    if size == 0:
        raise UploadRejected(f"{_clip(filename)}: the file is empty", code="empty_file")
    if size > max_bytes:
        raise UploadRejected(
            f"{_clip(filename)}: {size} bytes exceeds the limit of {max_bytes} bytes",
            status=413,
            code="file_too_large",
            size=size,
            limit=max_bytes,
        )
    return size


def _detect_model_format(head: bytes) -> str:
    """``torch_zip``, ``zip``-like, ``legacy_pickle``, ``safetensors`` or ``onnx`` (the rest)."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    # torch.save's legacy (pre-1.6, non-zip) format is a bare pickle: PROTO opcode + version.
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "legacy_pickle"
    # safetensors: u64 LE header length, then the JSON object. A protobuf ModelProto written by
    # onnx starts with ir_version (0x08) and never has '{' as its ninth byte in practice.
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "onnx"


def check_architecture(architecture: str) -> None:
    """Refuse a name that is not a torchvision classifier, suggesting close matches."""
    if architecture in TORCHVISION_CLASSIFIERS:
        return
    lowered = {name.lower(): name for name in TORCHVISION_CLASSIFIERS}
    close = difflib.get_close_matches(architecture.lower(), sorted(lowered), n=5, cutoff=0.6)
    suggestions = [lowered[c] for c in close]
    hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
    raise UploadRejected(
        f"unknown architecture {_clip(architecture)!r}: not a torchvision classification "
        f"model{hint}",
        code="unknown_architecture",
        architecture=_clip(architecture),
        suggestions=suggestions,
    )


def inspect_model(
    path: Path,
    filename: str,
    *,
    architecture: str | None,
    max_bytes: int,
    output: str | int | None = None,
) -> ModelInfo:
    """Validate an uploaded model file and describe it; raise :class:`UploadRejected` if unfit.

    ONNX files carry their own graph (``architecture``, if given, is checked and ignored);
    safetensors files and ``torch.save`` state dicts need a torchvision ``architecture``. The
    model must be a classifier, as the worker's loader requires: the output an audit explains
    (``output``, the input spec's choice, for a graph with several) is [N, C] with C >= 2, or
    a weights file's head has C >= 2 rows.
    """
    size = _file_size(path, filename, max_bytes)
    with path.open("rb") as fh:
        head = fh.read(16)
    kind = _detect_model_format(head)
    if kind == "zip":
        info = _inspect_torch_zip(path, filename)
    elif kind == "legacy_pickle":
        raise UploadRejected(
            f"{_clip(filename)}: a legacy (non-zip) pickle file; pickles are only accepted in "
            "torch.save's zip format (the default since PyTorch 1.6), holding a state dict: "
            "re-save with torch.save(model.state_dict(), path) or save as .safetensors",
            code="unsafe_pickle",
        )
    elif kind == "safetensors":
        info = _inspect_safetensors(path, filename, size)
    else:
        info = (
            _inspect_onnx(path, filename, size, output)
            if size < ONNX_IN_PROCESS_MAX_BYTES
            else _inspect_onnx_isolated(path, filename, size, output)
        )
    if info.format != "onnx" and info.num_classes is not None and info.num_classes < 2:
        layer = info.output or "head"
        raise UploadRejected(
            NotAClassifierError(layer, [None, info.num_classes]).message, code="not_a_classifier"
        )
    if architecture is not None:
        check_architecture(architecture)
    if info.format == "onnx":
        if architecture is not None:
            note = f"architecture {architecture!r} ignored: an ONNX file carries its own graph"
            info = replace(info, notes=[*info.notes, note])
    elif architecture is None:
        raise UploadRejected(
            f"{_clip(filename)}: {info.format} weights need an architecture (a torchvision "
            "classification model name such as resnet18)",
            code="architecture_required",
        )
    else:
        note = f"weights for {architecture}; the worker checks that the keys match exactly"
        info = replace(info, notes=[*info.notes, note])
    return info


# ---- ONNX ----------------------------------------------------------------------------------


def _tensor_is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0


def _sparse_tensors(sparse: onnx.SparseTensorProto, where: str) -> Iterator[tuple[Any, str]]:
    yield sparse.values, f"{where} (values)"
    yield sparse.indices, f"{where} (indices)"


def _node_tensors(node: onnx.NodeProto, where: str) -> Iterator[tuple[onnx.TensorProto, str]]:
    for attr in node.attribute:
        at = f"{where} node {node.name or node.op_type!r} attribute {attr.name!r}"
        if attr.HasField("t"):
            yield attr.t, at
        for t in attr.tensors:
            yield t, at
        if attr.HasField("sparse_tensor"):
            yield from _sparse_tensors(attr.sparse_tensor, at)
        for st in attr.sparse_tensors:
            yield from _sparse_tensors(st, at)
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g, f"{at} subgraph")
        for g in attr.graphs:
            yield from _graph_tensors(g, f"{at} subgraph")


def _graph_tensors(graph: onnx.GraphProto, where: str) -> Iterator[tuple[onnx.TensorProto, str]]:
    for t in graph.initializer:
        yield t, f"{where} initializer {t.name!r}"
    for st in graph.sparse_initializer:
        yield from _sparse_tensors(st, f"{where} sparse initializer {st.values.name!r}")
    for node in graph.node:
        yield from _node_tensors(node, where)


def _model_tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every tensor a model holds: initializers and attribute tensors, subgraphs included."""
    yield from _graph_tensors(model.graph, "graph")
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node, f"function {function.name!r}")
    for i, training in enumerate(model.training_info):
        yield from _graph_tensors(training.initialization, f"training_info[{i}] initialization")
        yield from _graph_tensors(training.algorithm, f"training_info[{i}] algorithm")


def _value_shape(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


# onnx.load and onnx.checker hold the whole protobuf in memory. Above this size the check runs
# in a child process, so the API process's memory does not grow with the upload (the child's
# is returned to the system when it exits).
ONNX_IN_PROCESS_MAX_BYTES = 64 * 1024 * 1024
ONNX_CHECK_TIMEOUT_S = 600


def _inspect_onnx_isolated(
    path: Path, filename: str, size: int, output: str | int | None = None
) -> ModelInfo:
    """:func:`_inspect_onnx` in a child Python process; the same answers, as JSON."""
    import subprocess
    import sys

    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "service.uploads",
                str(path),
                filename,
                str(size),
                json.dumps(output),
            ],
            capture_output=True,
            text=True,
            timeout=ONNX_CHECK_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise UploadRejected(
            f"{_clip(filename)}: checking the ONNX file took longer than {ONNX_CHECK_TIMEOUT_S} s",
            code="invalid_onnx",
        ) from None
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise UploadRejected(
            f"{_clip(filename)}: the ONNX file could not be checked (the checker exited with "
            f"code {done.returncode})",
            code="invalid_onnx",
        ) from None
    if "rejected" in answer:
        rejected = answer["rejected"]
        raise UploadRejected(
            rejected["detail"],
            status=rejected["status"],
            code=rejected["code"],
            **rejected["extra"],
        )
    return ModelInfo(**answer["info"])


def _check_in_child(argv: list[str]) -> int:
    """The child side of :func:`_inspect_onnx_isolated`: one JSON answer on stdout."""
    path, filename, size = Path(argv[0]), argv[1], int(argv[2])
    output = json.loads(argv[3]) if len(argv) > 3 else None
    try:
        answer: dict[str, Any] = {"info": _inspect_onnx(path, filename, size, output).to_dict()}
    except UploadRejected as exc:
        answer = {
            "rejected": {
                "detail": exc.detail,
                "status": exc.status,
                "code": exc.code,
                "extra": exc.extra,
            }
        }
    print(json.dumps(answer))
    return 0


def _inspect_onnx(
    path: Path, filename: str, size: int, output: str | int | None = None
) -> ModelInfo:
    name = _clip(filename)
    if size > ONNX_MAX_BYTES:
        raise UploadRejected(
            f"{name}: {size} bytes exceeds protobuf's 2 GiB limit for an ONNX file",
            status=413,
            code="file_too_large",
        )
    with path.open("rb") as fh:
        first = fh.read(1)
    try:
        # load_external_data=False: never open a file the model names (it could be any path).
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, but hostile bytes find others
        if first == b"\x08":  # starts like an ONNX ModelProto (ir_version): a damaged one
            raise UploadRejected(
                f"{name}: truncated or corrupt ONNX protobuf ({_clip(str(exc))})",
                code="invalid_onnx",
            ) from None
        raise UploadRejected(
            f"{name}: not a recognized model format (expected an ONNX protobuf, a .safetensors "
            "file or a torch.save zip archive)",
            status=415,
            code="unsupported_format",
        ) from None
    if not model.HasField("graph") and model.ir_version == 0:
        # Some garbage parses as an empty protobuf message.
        raise UploadRejected(
            f"{name}: not a recognized model format (no ONNX graph)",
            status=415,
            code="unsupported_format",
        )
    tensors = 0
    parameters = 0
    for tensor, where in _model_tensors(model):
        if _tensor_is_external(tensor):
            locations = [e.value for e in tensor.external_data if e.key == "location"]
            raise UploadRejected(
                f"{name}: {_clip(where)} stores its data outside the file "
                f"(external data {_clip(repr(locations))}), and only the uploaded file is read. "
                f"{EMBED_WEIGHTS_FIX}",
                code="onnx_external_data",
                tensor=_clip(where),
            )
    for t in model.graph.initializer:
        tensors += 1
        parameters += math.prod(int(d) for d in t.dims)
    for st in model.graph.sparse_initializer:
        tensors += 1
        parameters += math.prod(int(d) for d in st.dims)
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as exc:  # ValidationError mostly; the C++ checker can raise others
        raise UploadRejected(
            f"{name}: the ONNX checker refuses the model: {_clip(str(exc), 500)}",
            code="invalid_onnx",
        ) from None
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    initializer_names = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializer_names]
    input_shape = _value_shape(inputs[0]) if inputs else None
    chosen, output_shape, num_classes = _classifier_output(model, output)
    notes = [f"ir_version {model.ir_version}, producer {_clip(model.producer_name or '?')}"]
    if any(p.key == "saliency_audit.input_spec" for p in model.metadata_props):
        notes.append("carries its input spec (metadata saliency_audit.input_spec)")
    if len(inputs) > 1:
        notes.append(f"{len(inputs)} graph inputs; the first is the image")
    return ModelInfo(
        format="onnx",
        opset=opset,
        input_shape=input_shape,
        output_shape=output_shape,
        num_classes=num_classes,
        tensors=tensors,
        parameters=parameters,
        notes=notes,
        output=chosen,
    )


def _classifier_output(
    model: onnx.ModelProto, choice: str | int | None
) -> tuple[str, list[int | str | None] | None, int | None]:
    """The graph output an audit would explain, its shape and its class count; refused as the
    worker's loader refuses it, with the engine's own messages (several float outputs and none
    named, a named output that does not exist, an output that is not [N, C >= 2]).

    ``choice`` is the uploader's input spec ``output``, else the file's own metadata entry's.
    Shapes are the declared ones; ONNX shape inference fills in an output declared without a
    shape. A class count that only running the graph can tell (a symbolic C) passes here and
    is checked by the worker.
    """
    if choice is None:
        choice = _metadata_output(model)
    shapes = [_value_shape(o) for o in model.graph.output]
    if any(s is None or not all(isinstance(d, int) for d in s[1:]) for s in shapes):
        shapes = _with_inferred_dims(model, shapes)
    outputs = [
        (o.name, shape, onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type))
        for o, shape in zip(model.graph.output, shapes, strict=True)
    ]
    try:
        index = resolve_output(choice, outputs)
        name, shape, _ = outputs[index]
        classes = NotAClassifierError.check(name, shape)
    except NotAClassifierError as exc:
        raise UploadRejected(_clip(exc.message, 1000), code="not_a_classifier") from None
    except OutputRequiredError as exc:
        raise UploadRejected(_clip(exc.message, 1000), code="output_required") from None
    except UnknownOutputError as exc:
        raise UploadRejected(_clip(exc.message, 1000), code="unknown_output") from None
    except ModelLoadError as exc:  # no float output at all
        raise UploadRejected(_clip(exc.message, 1000), code="not_a_classifier") from None
    return name, shape, classes


def _with_inferred_dims(
    model: onnx.ModelProto, shapes: list[list[int | str | None] | None]
) -> list[list[int | str | None] | None]:
    """The declared output shapes with the dims they leave symbolic filled in by ONNX shape
    inference where it knows them (best effort: the worker checks the shape it runs)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for value in probe.graph.output:
        value.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(probe)
    except Exception:  # hostile or unusual graphs: keep what is declared
        return shapes
    merged: list[list[int | str | None] | None] = []
    for declared, value in zip(shapes, inferred.graph.output, strict=True):
        found = _value_shape(value)
        if declared is None or found is None or len(found) != len(declared):
            merged.append(declared if declared is not None else found)
        else:
            merged.append(
                [d if isinstance(d, int) else f for d, f in zip(declared, found, strict=True)]
            )
    return merged


def _metadata_output(model: onnx.ModelProto) -> str | int | None:
    """The ``output`` of the file's ``saliency_audit.input_spec`` metadata entry, if any (the
    worker reports an unreadable entry)."""
    for prop in model.metadata_props:
        if prop.key == "saliency_audit.input_spec":
            try:
                value = json.loads(prop.value)
            except json.JSONDecodeError:
                return None
            chosen = value.get("output") if isinstance(value, dict) else None
            return (
                chosen if isinstance(chosen, str | int) and not isinstance(chosen, bool) else None
            )
    return None


# ---- classifier size from weights ------------------------------------------------------------

_HEAD_KEYS = ("heads.head.weight", "head.weight", "fc.weight", "classifier.weight")
_CLASSIFIER_N = re.compile(r"classifier\.(\d+)\.weight")


def _num_classes_from_shapes(shapes: dict[str, tuple[int, ...]]) -> int | None:
    head = _head_from_shapes(shapes)
    return head[1] if head else None


def _head_name(shapes: dict[str, tuple[int, ...]]) -> str | None:
    head = _head_from_shapes(shapes)
    return head[0] if head else None


def _head_from_shapes(shapes: dict[str, tuple[int, ...]]) -> tuple[str, int] | None:
    """A torchvision classifier's last layer (its module name) and its output size, from its
    weight's first dim.

    torchvision names the head ``fc`` (ResNet family, RegNet, GoogLeNet, Inception,
    ShuffleNet), ``classifier`` (DenseNet), ``head`` (Swin), ``heads.head`` (ViT), or the last
    layer of a ``classifier`` Sequential (VGG, AlexNet, MobileNet, EfficientNet, ConvNeXt,
    MaxViT, SqueezeNet's 1x1 conv). Anything else: None rather than a guess.
    """
    for key in _HEAD_KEYS:
        if key in shapes and len(shapes[key]) in (2, 4):
            return key.removesuffix(".weight"), shapes[key][0]
    best: tuple[int, int] | None = None
    for key, shape in shapes.items():
        match = _CLASSIFIER_N.fullmatch(key)
        if match and len(shape) in (2, 4) and (best is None or int(match.group(1)) > best[0]):
            best = (int(match.group(1)), shape[0])
    return (f"classifier.{best[0]}", best[1]) if best else None


# ---- safetensors ---------------------------------------------------------------------------

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


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_clip(key)!r}")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _inspect_safetensors(path: Path, filename: str, size: int) -> ModelInfo:
    name = _clip(filename)

    def bad(why: str) -> UploadRejected:
        return UploadRejected(
            f"{name}: invalid safetensors file: {why}", code="invalid_safetensors"
        )

    with path.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > SAFETENSORS_MAX_HEADER:
            raise bad(f"header length {n} exceeds the format's limit of {SAFETENSORS_MAX_HEADER}")
        if n > size - 8:
            raise bad(f"header length {n} runs past the end of the file ({size} bytes)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"header is not a JSON object ({_clip(str(exc))})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_size = size - 8 - n
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise bad("__metadata__ must map strings to strings")
    spans: list[tuple[int, int, str]] = []
    shapes: dict[str, tuple[int, ...]] = {}
    parameters = 0
    for key, entry in header.items():
        tname = _clip(key)
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise bad(f"tensor {tname!r} needs dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
            raise bad(f"tensor {tname!r} has unknown dtype {_clip(repr(dtype))}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {tname!r} shape must be a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
        ):
            raise bad(f"tensor {tname!r} data_offsets must be [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise bad(
                f"tensor {tname!r} data_offsets [{begin}, {end}] lie outside the data section "
                f"({data_size} bytes)"
            )
        numel = math.prod(shape)
        bits = numel * SAFETENSORS_DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            raise bad(
                f"tensor {tname!r} is {dtype} of shape {shape} but its data is {end - begin} bytes"
            )
        spans.append((begin, end, tname))
        shapes[key] = tuple(shape)
        parameters += numel
    cursor = 0
    for begin, end, tname in sorted(spans):
        if begin < cursor:
            raise bad(f"tensor {tname!r} overlaps another tensor's data")
        if begin > cursor:
            raise bad(f"bytes {cursor}..{begin} of the data section belong to no tensor")
        cursor = end
    if cursor != data_size:
        raise bad(f"bytes {cursor}..{data_size} of the data section belong to no tensor")
    if not spans:
        raise bad("no tensors")
    return ModelInfo(
        format="safetensors",
        opset=None,
        input_shape=None,
        output_shape=None,
        num_classes=_num_classes_from_shapes(shapes),
        tensors=len(spans),
        parameters=parameters,
        notes=[],
        output=_head_name(shapes),
    )


# ---- torch.save zip: static pickle scan ---------------------------------------------------

# Bytes per element of the storage classes torch.save writes for a dense state dict; an
# UntypedStorage counts bytes. Names as they appear in the pickle (module.name).
_STORAGE_ITEMSIZE: dict[str, int] = {
    "torch.DoubleStorage": 8,
    "torch.FloatStorage": 4,
    "torch.HalfStorage": 2,
    "torch.BFloat16Storage": 2,
    "torch.LongStorage": 8,
    "torch.IntStorage": 4,
    "torch.ShortStorage": 2,
    "torch.CharStorage": 1,
    "torch.ByteStorage": 1,
    "torch.BoolStorage": 1,
    "torch.ComplexDoubleStorage": 16,
    "torch.ComplexFloatStorage": 8,
    "torch.storage.UntypedStorage": 1,
}
# dtypes that _rebuild_tensor_v3 names (those without a legacy storage class), as torch.save
# writes them; every one is also in torch.load(weights_only=True)'s allowlist.
_TORCH_DTYPES: frozenset[str] = frozenset(
    f"torch.{d}"
    for d in (
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
        "uint16",
        "uint32",
        "uint64",
        "complex32",
        "bits8",
        "bits16",
        "bits1x8",
        "bits2x4",
        "bits4x2",
    )
)
_REBUILD_TENSOR = frozenset({"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3"})
_REBUILD_PARAMETER = frozenset(
    {"torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"}
)
_ORDERED_DICT = "collections.OrderedDict"
# What a state dict saved by torch.save may name, and nothing else: a strict subset of what
# torch.load(weights_only=True) accepts (a test checks that), so the API never accepts a file
# the worker's loader would refuse for its globals.
ALLOWED_PICKLE_GLOBALS: frozenset[str] = frozenset(
    {_ORDERED_DICT, *_REBUILD_TENSOR, *_REBUILD_PARAMETER, *_STORAGE_ITEMSIZE, *_TORCH_DTYPES}
)
# The only callables the pickle may invoke (REDUCE) or instantiate (NEWOBJ).
_CALLABLE_GLOBALS = frozenset({_ORDERED_DICT, *_REBUILD_TENSOR, *_REBUILD_PARAMETER})
# Opcodes torch's weights-only unpickler implements (torch/_weights_only_unpickler.py, torch
# 2.14): the protocol-2 subset torch.save writes. A pickle using others (protocol 4's FRAME,
# MEMOIZE, STACK_GLOBAL ...) is not necessarily unsafe, but the worker could not load it.
_TORCH_OPCODES = frozenset(
    {
        "APPEND", "APPENDS", "BINFLOAT", "BINGET", "BININT", "BININT1", "BININT2",
        "BINPERSID", "BINPUT", "BINUNICODE", "BUILD", "EMPTY_DICT", "EMPTY_LIST",
        "EMPTY_SET", "EMPTY_TUPLE", "GLOBAL", "LONG1", "LONG_BINGET", "LONG_BINPUT",
        "MARK", "NEWFALSE", "NEWOBJ", "NEWTRUE", "NONE", "PROTO", "REDUCE", "SETITEM",
        "SETITEMS", "SHORT_BINSTRING", "STOP", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    }
)  # fmt: skip


# Symbolic values of the scan: just enough of each object to check what is called on it.
@dataclass(frozen=True)
class _Global:
    name: str


@dataclass(frozen=True)
class _Str:
    value: str


@dataclass(frozen=True)
class _Int:
    value: int


@dataclass(frozen=True)
class _Tuple:
    items: tuple[object, ...]


@dataclass(frozen=True)
class _Storage:
    cls: str
    key: str
    numel: int


@dataclass(frozen=True)
class _Tensor:
    shape: tuple[int, ...]


class _Dict:
    """A dict or OrderedDict; remembers which string keys hold tensors (the state dict)."""

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self.tensors: dict[str, tuple[int, ...]] = {}


class _List:
    pass


class _Set:
    pass


class _Other:
    """A plain value (None, bool, float, bytes, ...) that no opcode can call into."""


_OTHER = _Other()


@dataclass(frozen=True)
class PickleScan:
    """What a state dict's pickle references, from :func:`scan_state_dict_pickle`."""

    protocol: int
    globals: frozenset[str]
    storages: dict[str, tuple[str, int]]  # record key -> (storage class, numel)
    tensors: dict[str, tuple[int, ...]]  # top-level state-dict key -> shape
    n_tensors: int
    parameters: int
    unsupported_opcodes: frozenset[str]


class _Unsafe(Exception):
    pass


class _Malformed(Exception):
    pass


def _shape_of(value: object) -> tuple[int, ...]:
    if not isinstance(value, _Tuple) or not all(
        isinstance(v, _Int) and v.value >= 0 for v in value.items
    ):
        raise _Malformed("a tensor's size is not a tuple of non-negative integers")
    return tuple(v.value for v in value.items if isinstance(v, _Int))


def scan_state_dict_pickle(data: bytes) -> PickleScan:
    """Walk a pickle's opcodes with a symbolic stack, never unpickling; refuse anything unsafe.

    Only the globals in :data:`ALLOWED_PICKLE_GLOBALS` may be referenced (GLOBAL or
    STACK_GLOBAL), only OrderedDict and torch's tensor rebuild functions may be called (REDUCE,
    NEWOBJ), BUILD only sets an OrderedDict's attributes, items go only into dicts, lists and
    sets, and persistent ids must be storage records. INST, OBJ, EXT* and out-of-band buffers
    are refused outright. Raises ``ValueError`` (malformed) or :class:`UploadRejected`
    (``unsafe_pickle``).
    """
    stack: list[object] = []
    metastack: list[list[object]] = []
    memo: dict[int, object] = {}
    globals_seen: set[str] = set()
    storages: dict[str, tuple[str, int]] = {}
    unsupported: set[str] = set()
    protocol = 0
    n_tensors = 0
    parameters = 0
    result: object = None

    # As in pickle itself, MARK moves the current stack onto ``metastack`` and starts an empty
    # one; pop_mark() returns the items pushed since and restores the outer stack.
    def pop() -> object:
        if not stack:
            raise _Malformed("stack underflow")
        return stack.pop()

    def pop_mark() -> list[object]:
        nonlocal stack
        if not metastack:
            raise _Malformed("no MARK to pop to")
        items = stack
        stack = metastack.pop()
        return items

    def top() -> object:
        if not stack:
            raise _Malformed("stack underflow")
        return stack[-1]

    def check_global(name: str) -> _Global:
        globals_seen.add(name)
        if name not in ALLOWED_PICKLE_GLOBALS:
            raise _Unsafe(
                f"references the global {name}, which a state dict never needs (allowed: "
                "collections.OrderedDict, torch._utils tensor rebuild functions, torch storage "
                "classes and dtypes)"
            )
        return _Global(name)

    def setitem(target: object, key: object, value: object) -> None:
        if not isinstance(target, _Dict):
            raise _Unsafe("sets items on an object that is not a dict")
        if isinstance(key, _Str) and isinstance(value, _Tensor):
            target.tensors[key.value] = value.shape

    position: int | None = 0
    try:
        for opcode, raw_arg, pos in pickletools.genops(data):
            position = pos  # for the error message of a malformed pickle
            op = opcode.name
            arg: Any = raw_arg  # typed per opcode by pickletools (int, str, bytes, ...)
            if op not in _TORCH_OPCODES:
                unsupported.add(op)
            if op == "PROTO":
                protocol = int(arg)
            elif op in ("FRAME", "MARK"):
                if op == "MARK":
                    metastack.append(stack)
                    stack = []
            elif op == "STOP":
                result = pop()
                break
            elif op in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                full = f"{module}.{name}"
                if op == "INST":
                    globals_seen.add(full)
                    raise _Unsafe(f"instantiates {full} with the INST opcode")
                stack.append(check_global(full))
            elif op == "STACK_GLOBAL":
                name_v, module_v = pop(), pop()
                if not isinstance(name_v, _Str) or not isinstance(module_v, _Str):
                    raise _Unsafe("STACK_GLOBAL with a computed name")
                stack.append(check_global(f"{module_v.value}.{name_v.value}"))
            elif op == "OBJ":
                obj_items = pop_mark()
                cls = obj_items[0] if obj_items else None
                label = cls.name if isinstance(cls, _Global) else "an object"
                raise _Unsafe(f"instantiates {label} with the OBJ opcode")
            elif op in ("EXT1", "EXT2", "EXT4"):
                raise _Unsafe(f"uses the copyreg extension registry ({op} {arg})")
            elif op in ("NEXT_BUFFER", "READONLY_BUFFER", "PERSID"):
                raise _Unsafe(f"uses the {op} opcode, which a state dict never needs")
            elif op == "REDUCE":
                args, func = pop(), pop()
                if not isinstance(func, _Global) or func.name not in _CALLABLE_GLOBALS:
                    what = func.name if isinstance(func, _Global) else "a non-global object"
                    raise _Unsafe(f"calls {what} (REDUCE), which a state dict never needs")
                if not isinstance(args, _Tuple):
                    raise _Malformed("REDUCE arguments are not a tuple")
                if func.name == _ORDERED_DICT:
                    stack.append(_Dict(ordered=True))
                elif func.name in _REBUILD_TENSOR:
                    if len(args.items) < 4 or not isinstance(args.items[0], _Storage):
                        raise _Malformed("a tensor rebuilt without a storage")
                    shape = _shape_of(args.items[2])
                    n_tensors += 1
                    parameters += math.prod(shape)
                    stack.append(_Tensor(shape))
                else:  # _rebuild_parameter*: wraps a tensor already counted
                    if not args.items or not isinstance(args.items[0], _Tensor):
                        raise _Malformed("a parameter rebuilt from something not a tensor")
                    stack.append(args.items[0])
            elif op in ("NEWOBJ", "NEWOBJ_EX"):
                if op == "NEWOBJ_EX":
                    pop()  # kwargs
                pop()  # args
                cls = pop()
                if not isinstance(cls, _Global) or cls.name != _ORDERED_DICT:
                    what = cls.name if isinstance(cls, _Global) else "a non-global object"
                    raise _Unsafe(f"instantiates {what} (NEWOBJ), which a state dict never needs")
                stack.append(_Dict(ordered=True))
            elif op == "BUILD":
                pop()  # the state
                target = top()
                if not (isinstance(target, _Dict) and target.ordered):
                    what = target.name if isinstance(target, _Global) else type(target).__name__
                    raise _Unsafe(f"sets the state of {what.lstrip('_')} (BUILD)")
            elif op == "BINPERSID":
                pid = pop()
                fields = pid.items if isinstance(pid, _Tuple) else ()
                storage_cls = fields[1] if len(fields) == 5 else None
                record = fields[2] if len(fields) == 5 else None
                count = fields[4] if len(fields) == 5 else None
                if not (
                    fields[:1] == (_Str("storage"),)
                    and isinstance(storage_cls, _Global)
                    and storage_cls.name in _STORAGE_ITEMSIZE
                    and isinstance(record, _Str)
                    and isinstance(count, _Int)
                ):
                    raise _Unsafe("loads a persistent object that is not a tensor storage")
                cls_name, key, numel = storage_cls.name, record.value, count.value
                storages[key] = (cls_name, numel)
                stack.append(_Storage(cls_name, key, numel))
            elif op in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = top()
            elif op == "MEMOIZE":
                memo[len(memo)] = top()
            elif op in ("GET", "BINGET", "LONG_BINGET"):
                if int(arg) not in memo:
                    raise _Malformed(f"memo key {arg} read before it is written")
                stack.append(memo[int(arg)])
            elif op in (
                "UNICODE",
                "SHORT_BINUNICODE",
                "BINUNICODE",
                "BINUNICODE8",
                "STRING",
                "BINSTRING",
                "SHORT_BINSTRING",
            ):
                stack.append(_Str(str(arg)))
            elif op in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"):
                stack.append(_Int(int(arg)) if not isinstance(arg, bool) else _OTHER)
            elif op in ("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE"):
                if op == "TUPLE":
                    # pop_mark() rebinds ``stack``: take the items before naming the list.
                    marked = _Tuple(tuple(pop_mark()))
                    stack.append(marked)
                else:
                    n = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}[op]
                    items_t = [pop() for _ in range(n)][::-1]
                    stack.append(_Tuple(tuple(items_t)))
            elif op in ("EMPTY_DICT", "DICT"):
                new = _Dict(ordered=False)
                if op == "DICT":
                    pairs = pop_mark()
                    if len(pairs) % 2:
                        raise _Malformed("DICT with an odd number of items")
                    for k, v in zip(pairs[::2], pairs[1::2], strict=True):
                        setitem(new, k, v)
                stack.append(new)
            elif op == "SETITEM":
                value, key_v = pop(), pop()
                setitem(top(), key_v, value)
            elif op == "SETITEMS":
                pairs = pop_mark()
                if len(pairs) % 2:
                    raise _Malformed("SETITEMS with an odd number of items")
                target_d = top()
                for k, v in zip(pairs[::2], pairs[1::2], strict=True):
                    setitem(target_d, k, v)
            elif op in ("EMPTY_LIST", "LIST"):
                if op == "LIST":
                    pop_mark()
                stack.append(_List())
            elif op in ("APPEND", "APPENDS"):
                if op == "APPEND":
                    pop()
                else:
                    pop_mark()
                if not isinstance(top(), _List):
                    raise _Unsafe("appends to an object that is not a list")
            elif op in ("EMPTY_SET", "FROZENSET"):
                if op == "FROZENSET":
                    pop_mark()
                stack.append(_Set())
            elif op == "ADDITEMS":
                pop_mark()
                if not isinstance(top(), _Set):
                    raise _Unsafe("adds items to an object that is not a set")
            elif op == "POP":
                if stack:
                    pop()
                else:
                    pop_mark()  # POP right after a MARK discards the mark, as pickle does
            elif op == "POP_MARK":
                pop_mark()
            elif op == "DUP":
                stack.append(top())
            elif op in (
                "NONE",
                "NEWTRUE",
                "NEWFALSE",
                "FLOAT",
                "BINFLOAT",
                "BINBYTES",
                "SHORT_BINBYTES",
                "BINBYTES8",
                "BYTEARRAY8",
            ):
                stack.append(_OTHER)
            else:  # an opcode this scanner does not model: refuse rather than guess
                raise _Unsafe(f"uses the {op} opcode, which a state dict never needs")
        else:
            raise _Malformed("no STOP opcode")
    except _Unsafe as exc:
        raise UploadRejected(
            f"unsafe pickle: {exc}; only plain state dicts (torch.save(model.state_dict(), f)) "
            "are accepted",
            code="unsafe_pickle",
            globals=sorted(globals_seen - ALLOWED_PICKLE_GLOBALS),
        ) from None
    except _Malformed as exc:
        raise ValueError(f"{exc} at byte {position}") from None
    if not isinstance(result, _Dict):
        raise ValueError("the pickle does not hold a dict (a state dict)")
    return PickleScan(
        protocol=protocol,
        globals=frozenset(globals_seen),
        storages=storages,
        tensors=dict(result.tensors),
        n_tensors=n_tensors,
        parameters=parameters,
        unsupported_opcodes=frozenset(unsupported),
    )


def _inspect_torch_zip(path: Path, filename: str) -> ModelInfo:
    name = _clip(filename)

    def bad(why: str) -> UploadRejected:
        return UploadRejected(
            f"{name}: invalid torch.save archive: {why}", code="invalid_torch_file"
        )

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise bad(f"corrupt ZIP ({_clip(str(exc))})") from None
    with zf:
        infos = zf.infolist()
        pickles = [
            i for i in infos if re.fullmatch(r"[^/]+/data\.pkl", i.filename) and not i.is_dir()
        ]
        if not pickles:
            raise UploadRejected(
                f"{name}: a ZIP archive that is not a torch.save file (no <prefix>/data.pkl); "
                "a model is an ONNX file, a .safetensors file or a torch.save state dict",
                status=415,
                code="unsupported_format",
            )
        if len(pickles) > 1:
            raise bad(f"{len(pickles)} data.pkl records")
        pkl = pickles[0]
        prefix = pkl.filename[: -len("data.pkl")]
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
            raise bad(f"cannot read data.pkl ({_clip(str(exc))})") from None
        except RuntimeError as exc:  # encrypted member
            raise bad(_clip(str(exc))) from None
        if len(data) > MAX_PICKLE_BYTES:
            raise bad("data.pkl is larger than its declared size")
        try:
            scan = scan_state_dict_pickle(data)
        except ValueError as exc:
            raise bad(f"data.pkl is not a pickled state dict ({_clip(str(exc))})") from None
        if scan.unsupported_opcodes:
            raise UploadRejected(
                f"{name}: data.pkl uses pickle protocol {scan.protocol} "
                f"({', '.join(sorted(scan.unsupported_opcodes))}), which "
                "torch.load(weights_only=True) cannot read; save with torch.save's default "
                "protocol (2) or as .safetensors",
                code="unsupported_pickle",
                opcodes=sorted(scan.unsupported_opcodes),
            )
        sizes = {i.filename: i.file_size for i in infos}
        for key, (cls_name, numel) in scan.storages.items():
            record = f"{prefix}data/{key}"
            if record not in sizes:
                raise bad(f"storage {_clip(key)!r} has no record {_clip(record)!r}")
            expected = numel * _STORAGE_ITEMSIZE[cls_name]
            if sizes[record] != expected:
                raise bad(
                    f"storage {_clip(key)!r} ({cls_name}, {numel} elements) should be "
                    f"{expected} bytes, its record is {sizes[record]}"
                )
        if not scan.tensors:
            raise bad(
                "the pickled dict holds no tensors at its top level; upload "
                "model.state_dict() itself, not a checkpoint that wraps it"
            )
    return ModelInfo(
        format="torch",
        opset=None,
        input_shape=None,
        output_shape=None,
        num_classes=_num_classes_from_shapes(scan.tensors),
        tensors=scan.n_tensors,
        parameters=scan.parameters,
        notes=[f"torch.save zip archive, pickle protocol {scan.protocol}"],
        output=_head_name(scan.tensors),
    )


# --------------------------------------------------------------------------------------------
# Image-set archives
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on an image-set archive; every one is checked before the bytes it bounds are read.

    ``max_ratio`` bounds uncompressed / compressed size per ZIP member and for the whole archive
    (a tar's stream), judged only above ``ratio_floor_bytes`` (small files compress arbitrarily
    well, and cannot hurt). ``max_depth`` counts folders in a member's path. ``max_images``
    defaults to an audit set's limit; a training set may raise it (e.g. 100_000).
    """

    max_members: int = 20_000
    max_member_bytes: int = 50 * MiB
    max_total_bytes: int = 2 * GiB
    max_ratio: float = 200.0
    ratio_floor_bytes: int = 1 * MiB
    max_depth: int = 4
    max_images: int = MAX_IMAGES


@dataclass(frozen=True)
class ManifestImage:
    name: str  # path in the set: "a.png" or "<class>/a.png"
    sha256: str  # as returned by the sink
    label: str | None
    width: int
    height: int
    mask_sha256: str | None = None
    boxes: list[list[float]] | None = None


@dataclass
class DatasetManifest:
    """What an accepted image-set archive holds; images sorted by name."""

    images: list[ManifestImage]
    labeled: bool
    class_names: list[str] | None
    n_images: int
    has_masks: bool
    has_boxes: bool
    total_bytes: int  # uncompressed bytes handed to the sink (images and masks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Magic numbers of archive and compressed formats: a member carrying one is refused.
_NESTED_MAGIC: tuple[bytes, ...] = (
    b"PK\x03\x04",
    b"PK\x05\x06",
    b"PK\x07\x08",
    b"\x1f\x8b",  # gzip
    b"BZh",  # bzip2
    b"\xfd7zXZ\x00",  # xz
    b"7z\xbc\xaf\x27\x1c",
    b"Rar!\x1a\x07",
    b"\x28\xb5\x2f\xfd",  # zstd
)
_NESTED_SUFFIXES = frozenset(
    {".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz", ".7z", ".rar", ".zst"}
)
_DRIVE = re.compile(r"^[A-Za-z]:")


def _is_nested_archive(name: str, data: bytes) -> bool:
    if data.startswith(_NESTED_MAGIC) or data[257:262] == b"ustar":
        return True
    return PurePosixPath(name).suffix.lower() in _NESTED_SUFFIXES


def _reject(
    detail: str, code: str, *, status: int = 422, member: str | None = None, **extra: Any
) -> UploadRejected:
    if member is not None:
        extra["member"] = _clip(member)
    return UploadRejected(detail, status=status, code=code, **extra)


def _normalize_name(raw: str) -> tuple[str, ...]:
    """A member's path as segments; refuse anything that could point outside the archive."""
    why = None
    if "\x00" in raw:
        why = "contains a NUL byte"
    elif "\\" in raw:
        why = "contains a backslash"
    elif raw.startswith("/"):
        why = "is absolute"
    elif _DRIVE.match(raw):
        why = "starts with a drive letter"
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if why is None and ".." in parts:
        why = "contains a '..' segment"
    if why is not None:
        raise _reject(
            f"archive member {_clip(raw)!r} {why}; member names must be relative paths inside "
            "the archive",
            "unsafe_path",
            member=raw,
        )
    return tuple(parts)


def _is_ignored(parts: tuple[str, ...]) -> bool:
    return (
        any(p.startswith(".") for p in parts)
        or parts[0] == "__MACOSX"
        or parts[-1].lower() == "thumbs.db"
    )


@dataclass
class _Member:
    """One entry of an archive as both readers see it."""

    name: str
    kind: Literal["file", "dir", "link", "special"]
    size: int
    compressed: int | None  # ZIP only
    encrypted: bool
    read: Callable[[int], bytes]


class _CountingReader(io.RawIOBase):
    """A decompressed stream that refuses to yield more than a cap or a compression ratio."""

    def __init__(self, inner: IO[bytes], compressed_size: int, limits: ArchiveLimits) -> None:
        self.inner = inner
        self.compressed_size = max(compressed_size, 1)
        self.limits = limits
        self.count = 0
        # Headers and padding are on top of the member data the caps count.
        self.cap = limits.max_total_bytes + 1536 * (limits.max_members + 16) + MiB

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.inner.read(len(view))
        n = len(data)
        view[:n] = data
        self.count += n
        if self.count > self.cap:
            raise _reject(
                f"the archive decompresses to more than {self.limits.max_total_bytes} bytes",
                "archive_too_large",
                status=413,
            )
        if (
            self.count > self.limits.ratio_floor_bytes
            and self.count > self.limits.max_ratio * self.compressed_size
        ):
            raise _reject(
                f"the archive decompresses more than {self.limits.max_ratio:g} times its size "
                f"({self.compressed_size} bytes): a decompression bomb",
                "decompression_bomb",
            )
        return n


def _archive_kind(head: bytes) -> str | None:
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gz"
    if head.startswith(b"BZh"):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head[257:262] == b"ustar":
        return "tar"
    return None


_ARCHIVE_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    EOFError,
    OSError,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,  # an unsupported ZIP compression method
    UnicodeDecodeError,
    ValueError,
)


def _decompressor(kind: str, raw: IO[bytes]) -> IO[bytes]:
    if kind == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if kind == "bz2":
        return bz2.BZ2File(raw, mode="rb")
    if kind == "xz":
        return lzma.LZMAFile(raw, mode="rb")
    return raw


def _iter_members(path: Path, kind: str, limits: ArchiveLimits) -> Iterator[_Member]:
    """Every entry of the archive in order; a member's ``read`` is valid until the next one."""
    if kind == "zip":
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > limits.max_members:
                raise _reject(
                    f"the archive has {len(infos)} members, more than {limits.max_members}",
                    "archive_too_large",
                    status=413,
                )
            for info in infos:
                mode = info.external_attr >> 16
                fmt = stat.S_IFMT(mode)
                entry_kind: Literal["file", "dir", "link", "special"]
                if fmt == stat.S_IFLNK:
                    entry_kind = "link"
                elif info.is_dir() or fmt == stat.S_IFDIR:
                    entry_kind = "dir"
                elif fmt in (0, stat.S_IFREG):
                    entry_kind = "file"
                else:
                    entry_kind = "special"

                def read(cap: int, info: zipfile.ZipInfo = info) -> bytes:
                    with zf.open(info) as fh:
                        return fh.read(cap)

                yield _Member(
                    name=info.filename,
                    kind=entry_kind,
                    size=info.file_size,
                    compressed=info.compress_size,
                    encrypted=bool(info.flag_bits & 0x1),
                    read=read,
                )
        return
    compressed_size = path.stat().st_size
    with path.open("rb") as raw:
        stream: IO[bytes] = _decompressor(kind, raw)
        with stream:
            counted = _CountingReader(stream, compressed_size, limits)
            # Stream mode ("r|"): strictly sequential reads through the counting reader, so the
            # caps bound every byte tarfile decompresses, headers and skipped members included.
            with tarfile.open(fileobj=counted, mode="r|") as tar:
                for n, member in enumerate(tar, start=1):
                    if n > limits.max_members:
                        raise _reject(
                            f"the archive has more than {limits.max_members} members",
                            "archive_too_large",
                            status=413,
                        )
                    t_kind: Literal["file", "dir", "link", "special"]
                    if member.issym() or member.islnk():
                        t_kind = "link"
                    elif member.isdir():
                        t_kind = "dir"
                    elif member.isreg() and not member.issparse():
                        t_kind = "file"
                    else:
                        t_kind = "special"

                    def read_tar(cap: int, member: tarfile.TarInfo = member) -> bytes:
                        fh = tar.extractfile(member)
                        if fh is None:
                            raise tarfile.ReadError(f"cannot read {member.name}")
                        return fh.read(cap)

                    yield _Member(
                        name=member.name,
                        kind=t_kind,
                        size=member.size,
                        compressed=None,
                        encrypted=False,
                        read=read_tar,
                    )


@dataclass
class _Entry:
    """A member kept after pass 1: what it is and the hash of the bytes that were checked."""

    parts: tuple[str, ...]
    digest: str
    size: int
    width: int = 0
    height: int = 0
    image_format: str | None = None
    boxes_json: Any = None


def _probe_image(data: bytes, member: str) -> tuple[int, int, str]:
    """Size and format from the header, the pixel cap, then a verify and a full decode."""
    try:
        with Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as img:
            width, height = img.size
            fmt = str(img.format)
            if width * height > MAX_PIXELS:
                raise _reject(
                    f"{_clip(member)}: {width}x{height} pixels exceeds the limit of {MAX_PIXELS}",
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
            f"{_clip(member)}: the image's pixel count exceeds the limit of {MAX_PIXELS}",
            "image_too_large",
            member=member,
        ) from None
    except UnidentifiedImageError:
        raise _reject(
            f"{_clip(member)}: not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})",
            "invalid_image",
            member=member,
        ) from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, struct.error...)
        raise _reject(
            f"{_clip(member)}: cannot decode the image ({_clip(str(exc))})",
            "invalid_image",
            member=member,
        ) from None
    return width, height, fmt


def _parse_boxes_json(data: bytes, member: str) -> Any:
    if len(data) > MAX_BOXES_JSON_BYTES:
        raise _reject(
            f"{member}: larger than {MAX_BOXES_JSON_BYTES} bytes", "archive_too_large", status=413
        )
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _reject(
            f"{member}: not valid JSON ({_clip(str(exc))})", "invalid_boxes", member=member
        ) from None


def _validate_boxes(
    doc: Any, images: dict[str, _Entry], member: str
) -> dict[str, list[list[float]]]:
    shape_hint = 'expected {"<image name>": [[x0, y0, x1, y1], ...]}'
    if not isinstance(doc, dict):
        raise _reject(f"{member}: {shape_hint}", "invalid_boxes", member=member)
    out: dict[str, list[list[float]]] = {}
    for key, boxes in doc.items():
        if key not in images:
            raise _reject(
                f"{member}: boxes for {_clip(key)!r}, which is not an image in the archive "
                "(keys are image names such as 'a.png' or 'cat/a.png')",
                "unknown_image",
                member=member,
                image=_clip(key),
            )
        entry = images[key]
        if not isinstance(boxes, list):
            raise _reject(f"{member}: {_clip(key)!r}: {shape_hint}", "invalid_boxes", member=member)
        checked: list[list[float]] = []
        for box in boxes:
            if not (
                isinstance(box, list)
                and len(box) == 4
                and all(
                    isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                    for v in box
                )
            ):
                raise _reject(
                    f"{member}: {_clip(key)!r}: a box must be four numbers [x0, y0, x1, y1], "
                    f"got {_clip(json.dumps(box))}",
                    "invalid_boxes",
                    member=member,
                )
            x0, y0, x1, y1 = box
            if not (0 <= x0 < x1 <= entry.width and 0 <= y0 < y1 <= entry.height):
                raise _reject(
                    f"{member}: {_clip(key)!r}: box {box} is not within the "
                    f"{entry.width}x{entry.height} image with x0 < x1 and y0 < y1",
                    "invalid_boxes",
                    member=member,
                )
            checked.append(list(box))
        out[key] = checked
    return out


def read_dataset_archive(
    path: Path,
    filename: str,
    *,
    sink: Callable[[str, bytes], str],
    limits: ArchiveLimits = ArchiveLimits(),  # frozen, so one shared default is safe
) -> DatasetManifest:
    """Validate an image-set archive (layout in the module docstring) and store its files.

    Pass 1 reads each member once, under the caps, and checks everything, keeping only names,
    sizes and hashes. Only if the whole archive is acceptable does pass 2 read it again and call
    ``sink(name, data)`` once per image (``name`` as in the manifest) and per mask
    (``masks/<file>``); ``sink`` returns the stored bytes' sha256, which the manifest records.
    Raises :class:`UploadRejected`; ``sink`` is then never called. An exception from ``sink``
    itself propagates, and what it already stored stays stored (content-addressed, so harmless).
    """
    fname = _clip(filename)
    size = path.stat().st_size
    if size == 0:
        raise _reject(f"{fname}: the file is empty", "empty_file")
    with path.open("rb") as fh:
        head = fh.read(512)
    kind = _archive_kind(head)
    if kind is None:
        raise _reject(
            f"{fname}: not a ZIP or tar archive (plain, .gz, .bz2 or .xz)",
            "unsupported_format",
            status=415,
        )
    entries = _first_pass(path, kind, limits, size)
    plan, manifest_fields = _plan(entries, limits)
    return _second_pass(path, kind, limits, plan, manifest_fields, sink)


def _corrupt(exc: BaseException) -> UploadRejected:
    return _reject(
        f"corrupt or truncated archive ({type(exc).__name__}: {_clip(str(exc))})",
        "corrupt_archive",
    )


def _first_pass(path: Path, kind: str, limits: ArchiveLimits, size: int) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    seen: set[str] = set()
    total = 0
    n_images = 0
    try:
        for m in _iter_members(path, kind, limits):
            parts = _normalize_name(m.name)
            if not parts:
                continue  # the archive root itself ("./")
            key = "/".join(parts)
            if m.kind == "dir":
                continue
            if m.kind == "link":
                raise _reject(
                    f"archive member {_clip(m.name)!r} is a link; links are not accepted",
                    "link_member",
                    member=m.name,
                )
            if m.kind == "special":
                raise _reject(
                    f"archive member {_clip(m.name)!r} is not a regular file (device, fifo or "
                    "sparse file)",
                    "special_member",
                    member=m.name,
                )
            if key in seen:
                raise _reject(
                    f"archive member {_clip(key)!r} appears more than once",
                    "duplicate_member",
                    member=key,
                )
            seen.add(key)
            if _is_ignored(parts):
                continue
            if len(parts) - 1 > limits.max_depth:
                raise _reject(
                    f"archive member {_clip(key)!r} is {len(parts) - 1} folders deep, more than "
                    f"{limits.max_depth}",
                    "too_deep",
                    member=key,
                )
            if m.encrypted:
                raise _reject(
                    f"archive member {_clip(key)!r} is encrypted", "encrypted_member", member=key
                )
            if m.size > limits.max_member_bytes:
                raise _reject(
                    f"archive member {_clip(key)!r} is {m.size} bytes uncompressed, more than "
                    f"{limits.max_member_bytes}",
                    "archive_too_large",
                    status=413,
                    member=key,
                )
            if (
                m.compressed is not None
                and m.size > limits.ratio_floor_bytes
                and m.size > limits.max_ratio * max(m.compressed, 1)
            ):
                raise _reject(
                    f"archive member {_clip(key)!r} expands {m.size / max(m.compressed, 1):.0f} "
                    f"times (limit {limits.max_ratio:g}): a decompression bomb",
                    "decompression_bomb",
                    member=key,
                )
            total += m.size
            if total > limits.max_total_bytes:
                raise _reject(
                    f"the archive holds more than {limits.max_total_bytes} bytes uncompressed",
                    "archive_too_large",
                    status=413,
                )
            if total > limits.ratio_floor_bytes and total > limits.max_ratio * size:
                raise _reject(
                    f"the archive expands more than {limits.max_ratio:g} times its size: a "
                    "decompression bomb",
                    "decompression_bomb",
                )
            data = m.read(limits.max_member_bytes + 1)
            if len(data) > limits.max_member_bytes:
                raise _reject(
                    f"archive member {_clip(key)!r} is larger than {limits.max_member_bytes} bytes",
                    "archive_too_large",
                    status=413,
                    member=key,
                )
            if _is_nested_archive(key, data):
                raise _reject(
                    f"archive member {_clip(key)!r} is itself an archive or compressed file; "
                    "nested archives are not accepted",
                    "nested_archive",
                    member=key,
                )
            entry = _Entry(parts=parts, digest=hashlib.sha256(data).hexdigest(), size=len(data))
            suffix = PurePosixPath(parts[-1]).suffix.lower()
            if parts[-1] == "boxes.json":
                entry.boxes_json = _parse_boxes_json(data, key)
            elif suffix in ALLOWED_SUFFIXES:
                n_images += 1
                # Masks are images too: stop early well past any acceptable count.
                if n_images > 2 * limits.max_images:
                    raise _reject(
                        f"the archive holds more than {limits.max_images} images",
                        "too_many_images",
                        status=413,
                    )
                entry.width, entry.height, entry.image_format = _probe_image(data, key)
            else:
                raise _reject(
                    f"archive member {_clip(key)!r} is not an image "
                    f"({', '.join(sorted(ALLOWED_SUFFIXES))}), a mask or boxes.json",
                    "unexpected_member",
                    member=key,
                )
            entries[key] = entry
    except UploadRejected:
        raise
    except _ARCHIVE_ERRORS as exc:
        raise _corrupt(exc) from None
    return entries


@dataclass
class _Plan:
    """What pass 2 stores: each kept member's sink name, and how images relate to masks."""

    entries: dict[str, _Entry]  # member key -> what pass 1 checked
    images: dict[str, _Entry]  # manifest name -> entry
    masks: dict[str, str]  # manifest image name -> mask member key
    member_roles: dict[str, str]  # member key -> sink name (images and masks only)
    label_of: dict[str, str | None]


def _plan(entries: dict[str, _Entry], limits: ArchiveLimits) -> tuple[_Plan, dict[str, Any]]:
    """Apply the layout rules to the members pass 1 kept."""
    keys = list(entries)
    strip = 0
    if keys:
        firsts = {entries[k].parts[0] for k in keys}
        # "masks" alone at the top is a set without images, not a wrapper to strip.
        if (
            len(firsts) == 1
            and firsts != {"masks"}
            and all(len(entries[k].parts) >= 2 for k in keys)
        ):
            strip = 1
    root_images: dict[str, _Entry] = {}
    folder_images: dict[str, _Entry] = {}
    labeled_images: dict[str, tuple[str, _Entry]] = {}
    masks: dict[str, tuple[str, _Entry]] = {}  # stem -> (member key, entry)
    boxes_doc: tuple[str, Any] | None = None
    for key in keys:
        entry = entries[key]
        parts = entry.parts[strip:]
        if parts == ("boxes.json",):
            boxes_doc = (key, entry.boxes_json)
        elif len(parts) == 1 and entry.image_format:
            root_images[parts[0]] = entry
        elif len(parts) == 2 and parts[0] == "masks" and entry.image_format:
            if entry.image_format != "PNG" or not parts[1].lower().endswith(".png"):
                raise _reject(
                    f"{_clip(key)}: masks must be PNG files named <image stem>.png",
                    "invalid_mask",
                    member=key,
                )
            stem = PurePosixPath(parts[1]).stem
            if stem in masks:
                raise _reject(
                    f"{_clip(key)}: a second mask for {_clip(stem)!r}", "invalid_mask", member=key
                )
            masks[stem] = (key, entry)
        elif len(parts) == 2 and parts[0] == "images" and entry.image_format:
            folder_images[parts[1]] = entry
        elif len(parts) == 2 and entry.image_format:
            labeled_images["/".join(parts)] = (parts[0], entry)
        else:
            raise _reject(
                f"archive member {_clip(key)!r} does not fit the layout (images at the root or "
                "in images/, or in one folder per class; masks/<stem>.png; boxes.json)",
                "unexpected_member",
                member=key,
            )
    layouts = [bool(root_images), bool(folder_images), bool(labeled_images)]
    if sum(layouts) > 1:
        raise _reject(
            "the archive mixes layouts: put unlabeled images either at the root or in images/, "
            "or labeled images in one folder per class, not several of these",
            "invalid_layout",
        )
    class_names: list[str] | None = None
    if labeled_images:
        class_names = sorted({label for label, _ in labeled_images.values()})
        if len(class_names) < 2:
            raise _reject(
                f"only one class folder ({_clip(class_names[0])!r}): a labeled set needs two or "
                "more class folders; unlabeled images go at the root or in images/",
                "invalid_layout",
            )
    images: dict[str, _Entry] = {
        **root_images,
        **folder_images,
        **{name: e for name, (_, e) in labeled_images.items()},
    }
    label_of: dict[str, str | None] = {name: None for name in images}
    label_of.update({name: label for name, (label, _) in labeled_images.items()})
    if not images:
        raise _reject("the archive holds no images", "no_images")
    if len(images) > limits.max_images:
        raise _reject(
            f"the archive holds {len(images)} images, more than {limits.max_images}",
            "too_many_images",
            status=413,
        )
    member_roles: dict[str, str] = {}
    for key in keys:
        parts = entries[key].parts[strip:]
        if entries[key].image_format and not (len(parts) == 2 and parts[0] == "masks"):
            name = parts[-1] if parts[0] == "images" and len(parts) == 2 else "/".join(parts)
            member_roles[key] = name
    mask_of: dict[str, str] = {}
    if masks:
        by_stem: dict[str, list[str]] = {}
        for name in images:
            by_stem.setdefault(PurePosixPath(name).stem, []).append(name)
        for stem, (key, mask) in masks.items():
            owners = by_stem.get(stem, [])
            if not owners:
                raise _reject(
                    f"{_clip(key)}: a mask for {_clip(stem)!r}, but no image has that stem",
                    "unknown_image",
                    member=key,
                    image=_clip(stem),
                )
            if len(owners) > 1:
                raise _reject(
                    f"{_clip(key)}: several images have the stem {_clip(stem)!r} "
                    f"({', '.join(_clip(o) for o in owners[:5])}); with masks, stems must be "
                    "unique",
                    "invalid_mask",
                    member=key,
                )
            image = images[owners[0]]
            if (mask.width, mask.height) != (image.width, image.height):
                raise _reject(
                    f"{_clip(key)}: the mask is {mask.width}x{mask.height}, its image "
                    f"{_clip(owners[0])} is {image.width}x{image.height}",
                    "invalid_mask",
                    member=key,
                )
            mask_of[owners[0]] = key
            member_roles[key] = "masks/" + entries[key].parts[-1]
    boxes: dict[str, list[list[float]]] = {}
    if boxes_doc is not None:
        boxes = _validate_boxes(boxes_doc[1], images, boxes_doc[0])
    fields = {
        "labeled": bool(labeled_images),
        "class_names": class_names,
        "has_masks": bool(masks),
        "has_boxes": boxes_doc is not None,
        "boxes": boxes,
    }
    plan = _Plan(
        entries=entries,
        images=images,
        masks=mask_of,
        member_roles=member_roles,
        label_of=label_of,
    )
    return plan, fields


def _second_pass(
    path: Path,
    kind: str,
    limits: ArchiveLimits,
    plan: _Plan,
    fields: dict[str, Any],
    sink: Callable[[str, bytes], str],
) -> DatasetManifest:
    stored: dict[str, str] = {}
    total = 0
    for m in _iter_members(path, kind, limits):
        if m.kind != "file":
            continue
        key = "/".join(_normalize_name(m.name))
        if key not in plan.member_roles:
            continue
        data = m.read(limits.max_member_bytes + 1)
        # The bytes stored must be the bytes checked; an untouched temp file guarantees it.
        if hashlib.sha256(data).hexdigest() != plan.entries[key].digest:
            raise RuntimeError(f"{key}: archive changed between the two passes")
        stored[key] = sink(plan.member_roles[key], data)
        total += len(data)
    name_to_key = {name: key for key, name in plan.member_roles.items()}
    images = [
        ManifestImage(
            name=name,
            sha256=stored[name_to_key[name]],
            label=plan.label_of[name],
            width=entry.width,
            height=entry.height,
            mask_sha256=stored[plan.masks[name]] if name in plan.masks else None,
            boxes=fields["boxes"].get(name),
        )
        for name, entry in sorted(plan.images.items())
    ]
    return DatasetManifest(
        images=images,
        labeled=fields["labeled"],
        class_names=fields["class_names"],
        n_images=len(images),
        has_masks=fields["has_masks"],
        has_boxes=fields["has_boxes"],
        total_bytes=total,
    )
