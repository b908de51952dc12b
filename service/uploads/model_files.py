"""Which kind of model file an upload is, and the checks every model passes.

The format comes from the bytes, never from the file name: a ZIP holding ``<prefix>/data.pkl``
is a ``torch.save`` archive (:mod:`.torch_model`), 8 bytes of little-endian length then ``{`` is
safetensors (:mod:`.safetensors_model`), anything else is tried as ONNX protobuf
(:mod:`.onnx_model`). Weights need an ``architecture``: a torchvision classifier
(:data:`saliency_audit.service.architectures.TORCHVISION_CLASSIFIERS`) or ``timm:NAME``, whose
syntax is
checked here (the API has no timm; the worker's inspection after the upload says whether timm
has that model). The worker later loads weights with ``torch.load(weights_only=True)`` or
safetensors: this is the early, torch-free check, not the only guard.
"""

from __future__ import annotations

import difflib
from dataclasses import replace
from pathlib import Path
from typing import Any

from saliency_audit.service.architectures import TORCHVISION_CLASSIFIERS
from saliency_audit.workers.engine.contract.architectures import timm_model_name, timm_name_problem
from saliency_audit.workers.engine.errors import NotAClassifierError

from .common import GiB, ModelInfo, UploadRejected, check_file_size, clip
from .onnx_model import inspect_onnx
from .safetensors_model import inspect_safetensors
from .torch_model import inspect_torch_zip

DEFAULT_MAX_MODEL_BYTES = 2 * GiB


def detect_model_format(head: bytes) -> str:
    """``zip``, ``legacy_pickle``, ``safetensors`` or ``onnx`` (the rest), from the first bytes."""
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
    """Refuse a name that is neither a torchvision classifier, suggesting close matches, nor
    ``timm:NAME`` with a name timm's could be."""
    if architecture in TORCHVISION_CLASSIFIERS:
        return
    timm_name = timm_model_name(architecture)
    if timm_name is not None:
        problem = timm_name_problem(timm_name)
        if problem is None:
            return
        raise UploadRejected(
            f"unknown architecture {clip(architecture)!r}: {problem}",
            code="unknown_architecture",
            architecture=clip(architecture),
            suggestions=[],
        )
    lowered = {name.lower(): name for name in TORCHVISION_CLASSIFIERS}
    close = difflib.get_close_matches(architecture.lower(), sorted(lowered), n=5, cutoff=0.6)
    suggestions = [lowered[c] for c in close]
    hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
    raise UploadRejected(
        f"unknown architecture {clip(architecture)!r}: not a torchvision classification "
        f"model, nor timm:NAME{hint}",
        code="unknown_architecture",
        architecture=clip(architecture),
        suggestions=suggestions,
    )


def inspect_model(
    path: Path,
    filename: str,
    *,
    architecture: str | None,
    max_bytes: int,
    output: str | int | None = None,
    input_spec: dict[str, Any] | None = None,
) -> ModelInfo:
    """Validate an uploaded model file and describe it; raise :class:`UploadRejected` if unfit.

    ONNX files carry their own graph (``architecture``, if given, is checked and ignored);
    safetensors files and ``torch.save`` state dicts need an ``architecture`` (torchvision's or
    ``timm:NAME``). The
    model must be a classifier, as the worker's loader requires: the output an audit explains
    (``output``, the input spec's choice, for a graph with several) is [N, C] with C >= 2, or
    a weights file's head has C >= 2 rows. An ONNX graph also passes the worker's graph rules
    (:mod:`saliency_audit.workers.engine.onnx_rules`); ``input_spec`` (the uploader's fields) may
    state what
    the graph's input leaves open.
    """
    size = check_file_size(path, filename, max_bytes)
    with path.open("rb") as fh:
        head = fh.read(16)
    kind = detect_model_format(head)
    if kind == "zip":
        info = inspect_torch_zip(path, filename)
    elif kind == "legacy_pickle":
        raise UploadRejected(
            f"{clip(filename)}: a legacy (non-zip) pickle file; pickles are only accepted in "
            "torch.save's zip format (the default since PyTorch 1.6), holding a state dict: "
            "re-save with torch.save(model.state_dict(), path) or save as .safetensors",
            code="unsafe_pickle",
        )
    elif kind == "safetensors":
        info = inspect_safetensors(path, filename, size)
    else:
        info = inspect_onnx(path, filename, size, output, input_spec)
    if info.format != "onnx" and info.num_classes is not None and info.num_classes < 2:
        layer = info.output or "head"
        raise UploadRejected(
            NotAClassifierError(layer, [None, info.num_classes]).message, code="not_a_classifier"
        )
    if architecture is not None:
        check_architecture(architecture)
    return _with_architecture(info, filename, architecture)


def _with_architecture(info: ModelInfo, filename: str, architecture: str | None) -> ModelInfo:
    """Weights need an (already checked) architecture; an ONNX file notes it is ignored."""
    if info.format == "onnx":
        if architecture is not None:
            note = f"architecture {architecture!r} ignored: an ONNX file carries its own graph"
            info = replace(info, notes=[*info.notes, note])
    elif architecture is None:
        raise UploadRejected(
            f"{clip(filename)}: {info.format} weights need an architecture (a torchvision "
            "classification model name such as resnet18, or timm:NAME for a timm model)",
            code="architecture_required",
        )
    else:
        timm = "that timm has that model and " if timm_model_name(architecture) else ""
        note = f"weights for {architecture}; the worker checks {timm}that the keys match exactly"
        info = replace(info, notes=[*info.notes, note])
    return info
