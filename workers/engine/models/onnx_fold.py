"""Shape arithmetic at conversion time: what a graph computes from tensor shapes, folded.

Exporters compute shape-dependent arguments inside the graph:

* tf2onnx writes TensorFlow's ``tf.pad(x, paddings)`` with computed paddings (TF-style "same"
  padding done by hand, ``tf.image`` padding) as ``Shape -> Cast -> Gather/Slice ->
  Sub/Mul/Div/Max/Min -> Unsqueeze/Concat`` into a ``(rank, 2)`` paddings tensor, then
  ``Cast(int64) -> Transpose -> Reshape(-1) -> Pad`` (its ``Pad`` handler for opset 11+ and
  non-constant paddings); Keras ``Flatten`` and ``tf.reshape(x, [tf.shape(x)[0], -1])`` as
  ``Shape`` arithmetic into the ``Reshape`` target;
* torch's legacy exporter writes ``nn.ZeroPad2d`` pads as ``ConstantOfShape -> Concat ->
  Reshape -> Slice -> Transpose -> Reshape -> Cast -> Pad`` and ``x.view(x.size(0), -1)`` as
  ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``.

At the model's input size (height and width static, the batch symbolic) every such value is a
constant except what depends on the batch size. :func:`analyze` evaluates these subgraphs
element by element, with the converter's own operator table (``onnx_ops``) on the known values:
each element is known, or is the batch size itself (read from a ``Shape`` and only moved or
cast since), or is unknown (computed from the batch size, or from a dim shape inference could not
determine). Fully known tensors become constants. ONNX shape inference is then run again with
those constants in the graph: its data propagation stops at ``Div``, ``Max``, ``Transpose`` or
``ConstantOfShape``, so a ``Pad`` whose pads it cannot read leaves every shape after it unknown,
and with them the next ``Pad``'s pads, a conv's ``auto_pad`` and the batch dim a fixed-batch
reshape needs. Rounds repeat until nothing new folds.

Only tensors derived from shapes and small constants are evaluated (never the image, never
weights), each at most :data:`MAX_ELEMENTS` elements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx
import torch
from onnx import numpy_helper

from ..errors import ModelLoadError
from .onnx_ops import (
    Alias,
    Emit,
    Fold,
    NodeView,
    PartialValue,
    StaticShape,
    convert_node,
    node_attributes,
    tensor_from_onnx,
)

BATCH = "saliency_audit_batch"  # the symbolic batch dim shape inference runs with
MAX_ELEMENTS = 4096  # larger tensors are data, not shape arithmetic

# Operators that only move elements: the known/batch masks move with them (through the same
# module), as long as their other inputs (indices, axes, target shapes) are fully known.
_MOVING = frozenset(
    {
        "Concat",
        "Expand",
        "Flatten",
        "Gather",
        "Identity",
        "Reshape",
        "Slice",
        "Split",
        "Squeeze",
        "Tile",
        "Transpose",
        "Unsqueeze",
    }
)
# Element-wise operators: an output element is known when its operands are.
_ELEMENTWISE = frozenset(
    {
        "Abs",
        "Add",
        "And",
        "Cast",
        "Ceil",
        "Clip",
        "Div",
        "Equal",
        "Floor",
        "Greater",
        "GreaterOrEqual",
        "Less",
        "LessOrEqual",
        "Max",
        "Mean",
        "Min",
        "Mod",
        "Mul",
        "Neg",
        "Not",
        "Or",
        "Pow",
        "Reciprocal",
        "Round",
        "Sign",
        "Sqrt",
        "Sub",
        "Sum",
        "Where",
        "Xor",
    }
)
_BATCH_REASON = "depend on the batch size, which is only known at run time"


@dataclass
class ShapeFacts:
    """What conversion knows about the graph's tensors before any module is built.

    ``shapes``: static dims (None where dynamic); ``batch_first``: tensors whose first dim is
    the image batch; ``constants``: tensors computed from shapes and constants, folded;
    ``partial``: shape-derived tensors with some elements unknown; ``unevaluated``: why a
    shape-derived tensor could not be evaluated at all.
    """

    shapes: dict[str, StaticShape] = field(default_factory=dict)
    batch_first: set[str] = field(default_factory=set)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    partial: dict[str, PartialValue] = field(default_factory=dict)
    unevaluated: dict[str, str] = field(default_factory=dict)
    rounds: int = 0

    def why_not_constant(self, name: str) -> str:
        """Why tensor ``name`` has no value at conversion time, for error messages."""
        partial = self.partial.get(name)
        if partial is not None:
            elements = partial.unknown_elements()
            shown = ", ".join(str(i) for i in elements[:8]) + (", ..." if len(elements) > 8 else "")
            return f"its element(s) {shown} {partial.dynamic or _BATCH_REASON}"
        return self.unevaluated.get(name, "")


def analyze(skeleton: onnx.ModelProto, opset: int) -> ShapeFacts:
    """Fold the shape arithmetic of ``skeleton`` (the weight-free graph with a symbolic batch,
    see ``onnx_convert._skeleton``; not modified) and infer the static shapes around it.

    Each round after the first re-evaluates only the nodes downstream of a shape that inference
    now knows better (a network with a shape read per block unlocks one block per round).
    """
    work = onnx.ModelProto()
    work.CopyFrom(skeleton)
    facts = ShapeFacts()
    tracked = _initializer_values(work.graph)
    batch_dims: dict[str, tuple[bool, ...]] = {}
    dirty: set[str] | None = None  # None: evaluate every node
    for round_index in range(len(work.graph.node) + 1):
        facts.rounds = round_index + 1
        shapes, dims = _infer(work)
        if dirty is not None:
            dirty = {
                name
                for name in shapes.keys() | facts.shapes.keys()
                if shapes.get(name) != facts.shapes.get(name)
                or dims.get(name) != batch_dims.get(name)
            }
        facts.shapes, batch_dims = shapes, dims
        facts.batch_first = {name for name, d in batch_dims.items() if d and d[0]}
        _evaluate_graph(work.graph, opset, facts, tracked, batch_dims, dirty)
        folded = _fold(work.graph, tracked)
        facts.constants.update(folded)
        if not folded:
            break
        dirty = set()
    facts.partial = {name: p for name, p in tracked.items() if not p.complete}
    return facts


def _infer(model: onnx.ModelProto) -> tuple[dict[str, StaticShape], dict[str, tuple[bool, ...]]]:
    """Static shapes from ONNX shape inference (best effort), and per dim whether it is the
    symbolic batch."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is an optimization; conversion works without it
        inferred = model
    shapes: dict[str, StaticShape] = {}
    batch_dims: dict[str, tuple[bool, ...]] = {}
    g = inferred.graph
    for value in [*g.input, *g.value_info, *g.output]:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        shapes[value.name] = tuple(
            int(d.dim_value) if d.HasField("dim_value") else None for d in dims
        )
        batch_dims[value.name] = tuple(d.dim_param == BATCH for d in dims)
    for tensor in g.initializer:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
        batch_dims[tensor.name] = (False,) * len(tensor.dims)
    return shapes, batch_dims


def _complete(value: torch.Tensor) -> PartialValue:
    return PartialValue(
        value=value,
        known=torch.ones(value.shape, dtype=torch.bool),
        batch=torch.zeros(value.shape, dtype=torch.bool),
    )


def _small(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() <= MAX_ELEMENTS


def _initializer_values(graph: onnx.GraphProto) -> dict[str, PartialValue]:
    tracked: dict[str, PartialValue] = {}
    for tensor in graph.initializer:
        numel = 1
        for d in tensor.dims:
            numel *= int(d)
        if numel <= MAX_ELEMENTS:
            try:
                tracked[tensor.name] = _complete(tensor_from_onnx(tensor))
            except ModelLoadError:
                continue
    return tracked


def _same(a: PartialValue | None, b: PartialValue | None) -> bool:
    if a is None or b is None:
        return a is b
    return (
        a.value.dtype == b.value.dtype
        and a.value.shape == b.value.shape
        and bool(torch.equal(a.known, b.known) and torch.equal(a.batch, b.batch))
        and bool(torch.equal(a.value[a.known], b.value[b.known]))
    )


def _evaluate_graph(
    graph: onnx.GraphProto,
    opset: int,
    facts: ShapeFacts,
    tracked: dict[str, PartialValue],
    batch_dims: dict[str, tuple[bool, ...]],
    dirty: set[str] | None,
) -> None:
    """Update ``tracked`` (values of shape-derived tensors, see the module docstring) and
    ``facts.unevaluated`` (why a shape-derived tensor has none). With ``dirty`` (tensors whose
    shape changed since the last pass), only the nodes that read a changed tensor run; what
    they change is dirty for the nodes after them."""
    for node in graph.node:
        if (node.domain or "") not in ("", "ai.onnx"):
            continue
        if dirty is not None and not any(name in dirty for name in node.input if name):
            continue
        outputs, reason = _evaluate_node(
            node, opset, tracked, facts.unevaluated, facts.shapes, batch_dims
        )
        for k, name in enumerate(node.output):
            if not name:
                continue
            value = outputs[k] if k < len(outputs) else None
            before = tracked.pop(name, None)
            facts.unevaluated.pop(name, None)
            if value is not None:
                tracked[name] = value
            elif reason:
                facts.unevaluated[name] = reason
            if dirty is not None and not _same(before, value):
                dirty.add(name)


def _evaluate_node(
    node: onnx.NodeProto,
    opset: int,
    tracked: dict[str, PartialValue],
    unevaluated: dict[str, str],
    shapes: dict[str, StaticShape],
    batch_dims: dict[str, tuple[bool, ...]],
) -> tuple[Sequence[PartialValue | None], str]:
    """The node's outputs as partial values, or (no values, why) for a shape-derived node that
    cannot be evaluated; ((), "") for a node that does not compute from shapes."""
    if node.op_type in ("Shape", "Size"):
        return _shape_read(node, shapes, batch_dims)
    inputs = [name for name in node.input if name]
    pending = [name for name in inputs if name not in tracked]
    if any(name not in unevaluated for name in pending):
        return (), ""  # reads the image or weights: not shape arithmetic
    if pending:  # reads a shape-derived tensor that could not be evaluated
        return (), unevaluated[pending[0]]
    cannot = f"it is computed from tensor shapes by node {node.name!r} ({node.op_type}), which "
    for name in node.output:
        dims = shapes.get(name)
        if dims is not None and all(d is not None for d in dims):
            numel = 1
            for d in dims:
                numel *= int(d or 0)
            if numel > MAX_ELEMENTS:
                return (), ""
    operands = [tracked[name] if name else None for name in node.input]
    view = NodeView(
        proto=node,
        opset=opset,
        attrs=node_attributes(node),
        inputs=list(node.input),
        consts=[p.value if p is not None else None for p in operands],
        shapes=[shapes.get(name) if name else None for name in node.input],
        batch_first=[bool(batch_dims.get(name, (False,))[:1] == (True,)) for name in node.input],
    )
    try:
        result = convert_node(view)
    except ModelLoadError as exc:
        return (), cannot + f"the converter cannot evaluate: {exc.message}"
    if isinstance(result, Alias):
        source = operands[result.index]
        return ((source,), "") if source is not None else ((), "")
    if isinstance(result, Fold):
        return [_complete(v) if _small(v) else None for v in result.values], ""
    assert isinstance(result, Emit)
    present = [p for p in operands if p is not None]
    try:
        with torch.no_grad():
            module = result.module.eval()
            values = _outputs(
                module(*(p.value for p in (operands[i] for i in result.inputs) if p is not None))
            )
            if all(p.complete for p in present):
                return [_complete(v) if _small(v) else None for v in values], ""
            known, batch, dynamic = _masks(node, result, operands, values)
    except Exception as exc:  # a placeholder made the arithmetic fail (0 / 0, a bad shape)
        return (), cannot + f"fails on the values known at conversion time ({exc})"
    if known is None or batch is None:
        return (), cannot + "needs all of its inputs at conversion time"
    out: list[PartialValue | None] = []
    for value, k, b in zip(values, known, batch, strict=True):
        ok = _small(value) and tuple(k.shape) == tuple(value.shape)
        out.append(PartialValue(value, k, b, dynamic) if ok else None)
    return out, ""


def _masks(
    node: onnx.NodeProto,
    result: Emit,
    operands: Sequence[PartialValue | None],
    values: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None, str]:
    """Known and batch masks of a node's outputs when some operand elements are unknown."""
    reasons = [p.dynamic for p in operands if p is not None and not p.complete and p.dynamic]
    dynamic = reasons[0] if reasons else ""
    op = node.op_type
    if op in _MOVING:
        data = range(len(operands)) if op == "Concat" else (0,)
        others = [p for i, p in enumerate(operands) if i not in data and p is not None]
        if any(not p.complete for p in others):
            return None, None, dynamic  # e.g. a reshape to a target that is itself unknown
        module = result.module
        call = [operands[i] for i in result.inputs]
        if any(p is None for p in call):
            return None, None, dynamic
        known = module(*(p.known for p in call if p is not None))
        batch = module(*(p.batch for p in call if p is not None))
        return _outputs(known), _outputs(batch), dynamic
    if op in _ELEMENTWISE:
        present = [p for p in operands if p is not None]
        known = torch.broadcast_tensors(*(p.known for p in present))
        all_known = known[0]
        for k in known[1:]:
            all_known = all_known & k
        if op == "Cast" and present:
            batch = present[0].batch
        else:
            batch = torch.zeros(all_known.shape, dtype=torch.bool)
        return [all_known for _ in values], [batch for _ in values], dynamic
    return None, None, dynamic


def _outputs(result: torch.Tensor | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


def _shape_read(
    node: onnx.NodeProto,
    shapes: dict[str, StaticShape],
    batch_dims: dict[str, tuple[bool, ...]],
) -> tuple[Sequence[PartialValue | None], str]:
    """``Shape`` and ``Size`` of a tensor: its static dims are known, its batch dim is the batch."""
    source = node.input[0] if node.input else ""
    dims = shapes.get(source)
    if dims is None:
        return (), f"shape inference could not determine the shape of tensor {source!r}"
    is_batch = batch_dims.get(source, (False,) * len(dims))
    if node.op_type == "Size":
        if all(d is not None for d in dims):
            numel = 1
            for d in dims:
                numel *= int(d or 0)
            return (_complete(torch.tensor(numel, dtype=torch.int64)),), ""
        return (), f"the element count of tensor {source!r} is not static"
    start, end = 0, None
    for attr in node.attribute:
        if attr.name == "start":
            start = int(attr.i)
        elif attr.name == "end":
            end = int(attr.i)
    picked = list(range(len(dims)))[start:end]
    value = torch.tensor([dims[d] if dims[d] is not None else 1 for d in picked], dtype=torch.int64)
    known = torch.tensor([dims[d] is not None for d in picked], dtype=torch.bool)
    batch = torch.tensor([bool(is_batch[d]) for d in picked], dtype=torch.bool)
    other = [d for d in picked if dims[d] is None and not is_batch[d]]
    dynamic = (
        f"depend on dim {other[0]} of tensor {source!r}, which shape inference could not determine"
        if other
        else _BATCH_REASON
    )
    return (PartialValue(value, known, batch, dynamic),), ""


def _fold(graph: onnx.GraphProto, tracked: dict[str, PartialValue]) -> dict[str, torch.Tensor]:
    """Replace the nodes whose outputs are all known by initializers; returns the new values."""
    folded: dict[str, torch.Tensor] = {}
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        outputs = [name for name in node.output if name]
        values = [tracked.get(name) for name in outputs]
        if (
            node.op_type == "Constant"
            or not outputs
            or any(v is None or not v.complete for v in values)
        ):
            kept.append(node)
            continue
        for name, value in zip(outputs, values, strict=True):
            assert value is not None
            folded[name] = value.value
            graph.initializer.append(numpy_helper.from_array(value.value.numpy(), name))
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
    return folded
