"""ONNX model files: a protobuf read with ``onnx`` alone, never run.

Refused when any tensor points at external data (only the uploaded file is read, never a path
the model names), when the ONNX checker refuses the graph, when the output an audit would
explain is not a classifier's [N, C >= 2], or when one of the worker's own graph rules
(:mod:`saliency_audit.workers.engine.onnx_rules`: one float32 image input, IR version and opset
range, an input
spec for what the input's shape leaves open, operators the converter supports) refuses it, with
the worker's message. Files above :data:`ONNX_IN_PROCESS_MAX_BYTES` are
checked in a child process (``python -m saliency_audit.service.uploads``), so the API process's
memory does
not grow with the upload.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx

from saliency_audit.workers.engine import onnx_rules
from saliency_audit.workers.engine.errors import (
    EMBED_WEIGHTS_FIX,
    EngineError,
    ModelLoadError,
    NotAClassifierError,
    OutputRequiredError,
    UnknownOutputError,
)
from saliency_audit.workers.engine.spec import resolve_output

from .common import ModelInfo, UploadRejected, clip

# A serialized ONNX ModelProto cannot exceed protobuf's 2 GiB message limit.
ONNX_MAX_BYTES = (1 << 31) - 1
# onnx.load and onnx.checker hold the whole protobuf in memory. Above this size the check runs
# in a child process, so the API process's memory does not grow with the upload (the child's
# is returned to the system when it exits).
ONNX_IN_PROCESS_MAX_BYTES = 64 * 1024 * 1024
ONNX_CHECK_TIMEOUT_S = 600


def inspect_onnx(
    path: Path,
    filename: str,
    size: int,
    output: str | int | None = None,
    input_spec: dict[str, Any] | None = None,
) -> ModelInfo:
    """Check an ONNX file in this process, or in a child one when it is large.

    ``input_spec``: the uploader's input spec fields, which may state what the graph's input
    leaves open (its size, channels or layout).
    """
    if size < ONNX_IN_PROCESS_MAX_BYTES:
        return _inspect_in_process(path, filename, size, output, input_spec)
    return _inspect_isolated(path, filename, size, output, input_spec)


def _inspect_isolated(
    path: Path,
    filename: str,
    size: int,
    output: str | int | None = None,
    input_spec: dict[str, Any] | None = None,
) -> ModelInfo:
    """:func:`_inspect_in_process` in a child Python process; the same answers, as JSON."""
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "saliency_audit.service.uploads",
                str(path),
                filename,
                str(size),
                json.dumps(output),
                json.dumps(input_spec),
            ],
            capture_output=True,
            text=True,
            timeout=ONNX_CHECK_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise UploadRejected(
            f"{clip(filename)}: checking the ONNX file took longer than {ONNX_CHECK_TIMEOUT_S} s",
            code="invalid_onnx",
        ) from None
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise UploadRejected(
            f"{clip(filename)}: the ONNX file could not be checked (the checker exited with "
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


def check_in_child(argv: list[str]) -> int:
    """The child side of :func:`_inspect_isolated`: one JSON answer on stdout."""
    path, filename, size = Path(argv[0]), argv[1], int(argv[2])
    output = json.loads(argv[3]) if len(argv) > 3 else None
    input_spec = json.loads(argv[4]) if len(argv) > 4 else None
    try:
        info = _inspect_in_process(path, filename, size, output, input_spec)
        answer: dict[str, Any] = {"info": info.to_dict()}
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


def _inspect_in_process(
    path: Path,
    filename: str,
    size: int,
    output: str | int | None = None,
    input_spec: dict[str, Any] | None = None,
) -> ModelInfo:
    name = clip(filename)
    if size > ONNX_MAX_BYTES:
        raise UploadRejected(
            f"{name}: {size} bytes exceeds protobuf's 2 GiB limit for an ONNX file",
            status=413,
            code="file_too_large",
        )
    model = _load(path, name)
    _refuse_external_data(model, name)
    tensors, parameters = _count_initializers(model)
    _worker_rule(lambda: onnx_rules.check_versions(model), "unsupported_onnx_version")
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as exc:  # ValidationError mostly; the C++ checker can raise others
        raise UploadRejected(
            f"{name}: the ONNX checker refuses the model: {clip(str(exc), 500)}",
            code="invalid_onnx",
        ) from None
    _worker_rule(lambda: onnx_rules.image_input(model), "unsupported_inputs")
    _worker_rule(lambda: onnx_rules.check_input_spec(model, input_spec), "input_spec_required")
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    input_shape = _value_shape(onnx_rules.image_input(model))
    chosen, output_shape, num_classes = _classifier_output(model, output)
    _worker_rule(lambda: onnx_rules.check_operators(model, chosen), "unsupported_operator")
    notes = [f"ir_version {model.ir_version}, producer {clip(model.producer_name or '?')}"]
    if any(p.key == "saliency_audit.input_spec" for p in model.metadata_props):
        notes.append("carries its input spec (metadata saliency_audit.input_spec)")
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


def _worker_rule(check: Callable[[], object], code: str) -> None:
    """Run one of the worker's rules (:mod:`saliency_audit.workers.engine.onnx_rules`); its refusal,
    with the
    worker's own message, becomes a 422."""
    try:
        check()
    except EngineError as exc:
        raise UploadRejected(clip(exc.message, 1000), code=code) from None


def _load(path: Path, name: str) -> onnx.ModelProto:
    """The parsed protobuf; refused when it does not parse, or parses to no graph."""
    with path.open("rb") as fh:
        first = fh.read(1)
    try:
        # load_external_data=False: never open a file the model names (it could be any path).
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, but hostile bytes find others
        if first == b"\x08":  # starts like an ONNX ModelProto (ir_version): a damaged one
            raise UploadRejected(
                f"{name}: truncated or corrupt ONNX protobuf ({clip(str(exc))})",
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
    return model


def _refuse_external_data(model: onnx.ModelProto, name: str) -> None:
    for tensor, where in _model_tensors(model):
        if _tensor_is_external(tensor):
            locations = [e.value for e in tensor.external_data if e.key == "location"]
            raise UploadRejected(
                f"{name}: {clip(where)} stores its data outside the file "
                f"(external data {clip(repr(locations))}), and only the uploaded file is read. "
                f"{EMBED_WEIGHTS_FIX}",
                code="onnx_external_data",
                tensor=clip(where),
            )


def _count_initializers(model: onnx.ModelProto) -> tuple[int, int]:
    """The graph's initializers, dense and sparse: how many, and their elements in all."""
    tensors = 0
    parameters = 0
    for t in model.graph.initializer:
        tensors += 1
        parameters += math.prod(int(d) for d in t.dims)
    for st in model.graph.sparse_initializer:
        tensors += 1
        parameters += math.prod(int(d) for d in st.dims)
    return tensors, parameters


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
        raise UploadRejected(clip(exc.message, 1000), code="not_a_classifier") from None
    except OutputRequiredError as exc:
        raise UploadRejected(clip(exc.message, 1000), code="output_required") from None
    except UnknownOutputError as exc:
        raise UploadRejected(clip(exc.message, 1000), code="unknown_output") from None
    except ModelLoadError as exc:  # no float output at all
        raise UploadRejected(clip(exc.message, 1000), code="not_a_classifier") from None
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
