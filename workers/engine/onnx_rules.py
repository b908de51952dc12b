"""What the worker refuses in an ONNX graph before converting it, decided with ``onnx`` alone.

The converter (``models.onnx_convert``, torch) and the upload check
(``saliency_audit.service.uploads``, no
torch) both call these functions, so an upload is refused with the very message the worker
would give: a graph with more than one image input or a non-float32 one, an IR version or
opset outside what the worker runs, an operator in a custom domain or one the converter has
no entry for, an input whose size or layout only an input spec can tell.

Only ``onnx`` and the engine's torch-free modules are imported here: the API imports this
module (``[tool.importlinter]`` in pyproject.toml).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import onnx

from .errors import ModelLoadError, SpecError, UnsupportedOperatorError

StaticShape = tuple[int | None, ...]

DEFAULT_DOMAINS = ("", "ai.onnx")
# The converter's oldest opset; older graphs use attribute forms it does not read.
MIN_OPSET = 7
# The newest IR version and default-domain opset the pinned ONNX Runtime loads (the fidelity
# check runs every graph in it); tests/engine/test_onnx_rules.py fails when it reads more or
# less, so an upgrade updates these two numbers.
MAX_IR_VERSION = 13
MAX_OPSET = 26

# The default-domain operators ``models.onnx_ops`` has a converter for. ``onnx_ops.converter``
# refuses to register a name missing here and tests/engine/test_onnx_rules.py checks the two
# are equal, so this torch-free list is the converter's table.
SUPPORTED_OPERATORS = frozenset(
    {
        # layers with weights
        "Conv", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
        "LayerNormalization", "PRelu",
        # activations
        "Relu", "LeakyRelu", "Elu", "Celu", "Selu", "Sigmoid", "Tanh", "Softplus", "Softsign",
        "Mish", "Gelu", "HardSigmoid", "HardSwish", "Clip", "Softmax", "LogSoftmax",
        # pooling
        "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
        # elementwise
        "Abs", "Ceil", "Cos", "Erf", "Exp", "Floor", "Log", "Neg", "Not", "Reciprocal", "Round",
        "Sign", "Sin", "Sqrt", "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Equal", "Greater",
        "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "Sum", "Mean", "Max",
        "Min", "Where",
        # pass-through and constants
        "Identity", "Dropout", "Constant", "ConstantOfShape", "Shape", "Size", "Cast",
        # shape and indexing
        "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Gather", "Slice",
        "Split", "Expand", "Tile", "Range", "Pad",
        # reductions
        "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
        "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp", "ArgMax", "ArgMin",
    }
)  # fmt: skip

INPUT_SPEC_METADATA_KEY = "saliency_audit.input_spec"

# Ops whose output is the shape of their input, not its values: what follows them does not
# depend on the image's values (the converter folds it where the shape is static).
_SHAPE_READS = frozenset({"Shape", "Size"})


def opsets(model: onnx.ModelProto) -> dict[str, int]:
    """The model's opset per domain; ``""`` is the default domain (``ai.onnx`` counts as it)."""
    found = {imp.domain or "": int(imp.version) for imp in model.opset_import}
    if "ai.onnx" in found:
        found.setdefault("", found["ai.onnx"])
    return found


def check_versions(model: onnx.ModelProto) -> int:
    """Refuse an IR version or default-domain opset the worker cannot run; the opset."""
    if model.ir_version > MAX_IR_VERSION:
        raise ModelLoadError(
            f"ONNX IR version {model.ir_version} is newer than ONNX Runtime here reads (up to "
            f"{MAX_IR_VERSION}); re-export with IR version {MAX_IR_VERSION} or older"
        )
    opset = opsets(model).get("", 0)
    if opset < MIN_OPSET:
        raise ModelLoadError(f"ONNX opset {opset} is too old; re-export with opset 13 or newer")
    if opset > MAX_OPSET:
        raise ModelLoadError(
            f"ONNX opset {opset} is newer than ONNX Runtime here reads (up to {MAX_OPSET}); "
            f"re-export with opset {MAX_OPSET} or older"
        )
    return opset


def image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The graph's one input that is not an initializer: the image, float32."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise ModelLoadError(f"expected one image input, the graph has {len(inputs)}: {names}")
    value = inputs[0]
    elem_type = value.type.tensor_type.elem_type
    if elem_type != onnx.TensorProto.FLOAT:
        type_name = onnx.TensorProto.DataType.Name(elem_type)
        raise ModelLoadError(f"the image input {value.name!r} must be float32, not {type_name}")
    return value


def static_dims(value_info: onnx.ValueInfoProto) -> StaticShape | None:
    """A value's declared shape, None for each symbolic or unknown dim; None without a shape."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(
        int(d.dim_value) if d.HasField("dim_value") else None for d in tensor_type.shape.dim
    )


def image_dims(model: onnx.ModelProto) -> StaticShape:
    """The image input's shape; refused when the graph declares none."""
    image = image_input(model)
    dims = static_dims(image)
    if dims is None:
        raise SpecError(f"the graph's input {image.name!r} has no shape; pass an input spec")
    return dims


def graph_spec_fields(
    dims: StaticShape, layout: str | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """What the graph input's shape says about the input spec.

    Returns the fields it states (``layout`` where only one reading fits, unless ``layout`` is
    stated elsewhere; ``channels``, ``height`` and ``width`` where static) and, for each field
    it leaves open, why: the message to raise when nobody else states that field.
    """
    if len(dims) != 4:
        raise SpecError(f"expected a 4-D image input, the graph's input has shape {dims}")
    fields: dict[str, Any] = {}
    open_fields: dict[str, str] = {}
    if layout is None:
        nchw = dims[1] in (1, 3)
        nhwc = dims[3] in (1, 3)
        if nchw == nhwc:
            why = "both axis 1 and the last axis" if nchw else "neither axis 1 nor the last axis"
            message = (
                f"cannot tell the layout of input shape {dims}: {why} could hold 1 or 3 "
                "channels; pass an input spec with an explicit layout (NCHW or NHWC)"
            )
            return fields, dict.fromkeys(("layout", "channels", "height", "width"), message)
        layout = "NCHW" if nchw else "NHWC"
        fields["layout"] = layout
    channels = dims[1] if layout == "NCHW" else dims[3]
    height, width = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    for name, value in (("channels", channels), ("height", height), ("width", width)):
        if value is None:
            open_fields[name] = (
                f"the graph's input {name} is dynamic ({dims}); pass an input spec with "
                f"{'height and width' if name != 'channels' else 'channels'}"
            )
        else:
            fields[name] = value
    return fields, open_fields


def metadata_input_spec(props: Mapping[str, str]) -> dict[str, Any]:
    """The input spec our export scripts store in the file's metadata entry, if any."""
    if INPUT_SPEC_METADATA_KEY not in props:
        return {}
    try:
        value = json.loads(props[INPUT_SPEC_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"invalid {INPUT_SPEC_METADATA_KEY} metadata: {exc}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{INPUT_SPEC_METADATA_KEY} metadata must be a JSON object")
    return value


def refuse_open_fields(open_fields: Mapping[str, str], stated: Iterable[str]) -> None:
    """Refuse the first field the model leaves open that no other source states."""
    known = set(stated)
    for name, why in open_fields.items():
        if name not in known:
            raise SpecError(why)


def check_input_spec(model: onnx.ModelProto, given: Mapping[str, Any] | None = None) -> None:
    """Refuse an image input whose size, channels or layout neither the graph, its metadata
    entry nor the caller's input spec (``given``) states: an all-symbolic input needs a spec."""
    given = given or {}
    dims = image_dims(model)
    metadata = metadata_input_spec({p.key: p.value for p in model.metadata_props})
    layout = given.get("layout", metadata.get("layout"))
    graph, open_fields = graph_spec_fields(dims, layout)
    refuse_open_fields(open_fields, [*graph, *metadata, *given])


def check_operator(node: onnx.NodeProto, model_opsets: Mapping[str, int]) -> None:
    """Refuse a node in a custom domain, or a default-domain op the converter cannot convert."""
    domain = node.domain or ""
    if domain not in DEFAULT_DOMAINS:
        raise UnsupportedOperatorError(
            f"{domain}.{node.op_type}", model_opsets.get(domain, 0), node.name
        )
    if node.op_type not in SUPPORTED_OPERATORS:
        raise UnsupportedOperatorError(node.op_type, model_opsets.get("", 0), node.name)


def needed_nodes(graph: onnx.GraphProto, output: str) -> list[onnx.NodeProto]:
    """The nodes the output depends on, in graph order (dangling shape subgraphs dropped)."""
    needed = {output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    return kept


def check_operators(model: onnx.ModelProto, output: str) -> None:
    """Refuse, as the converter would, the first node computing ``output`` from the image
    values that :func:`check_operator` refuses.

    Nodes computing only constants or shapes are left to the worker: it folds them when the
    input size is static, without converting them.
    """
    found = opsets(model)
    image = image_input(model).name
    from_image = {image}
    for node in needed_nodes(model.graph, output):
        if node.op_type in _SHAPE_READS or not any(i in from_image for i in node.input):
            continue
        check_operator(node, found)
        from_image.update(o for o in node.output if o)
