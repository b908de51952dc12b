"""ONNX file -> differentiable torch module (the ONNX model adapter).

Saliency methods need gradients and module hooks, which ONNX Runtime cannot give, so an uploaded
ONNX classifier is rebuilt as a torch ``nn.Module`` graph (:class:`OnnxGraphModule`): one module
per ONNX node, of the ``torch.nn`` class the attribution libraries recognize (``nn.Conv2d``,
``nn.Linear``, ``nn.BatchNorm2d``, ``nn.ReLU``, ...; the op table is in ``onnx_ops``). The
converted logits are then checked against ONNX Runtime (``fidelity``), because the model audited
must be the model shipped.

What the converter takes care of, beyond the op table:

* **Module names.** Randomization stages are grouped by module hierarchy, so the hierarchy of
  the original network is rebuilt where the file carries it: the TorchScript ("legacy") exporter
  names nodes ``/layer1/layer1.0/conv1/Conv``; the dynamo exporter stores
  ``pkg.torch.onnx.name_scopes`` metadata per node and names initializers after the parameters
  (``layer1.0.conv1.weight``), which is preferred for layers with weights because its optimizer
  fuses BatchNorm into the conv and leaves the BatchNorm's scope on the fused node. Files from
  other producers get flat names (``conv_0``, ``relu_3``). Modules are registered in execution
  order, and the hierarchy is only kept when a depth-first walk of it visits the modules in
  execution order, so "the last ``nn.Conv2d`` of ``named_modules()``" is the last conv run.
* **Constants.** Initializers shared through ``Identity`` nodes (legacy exports deduplicate equal
  tensors this way) are copied into each module, so randomizing one layer never touches another.
  Weights become ``nn.Parameter``; other constants become buffers; subgraphs that only compute
  constants are evaluated once at conversion time, and so is shape arithmetic wherever its
  values are known at the input size (``onnx_fold``: tf2onnx's computed pads, legacy
  ``ZeroPad2d`` pads); only the batch size may stay a run-time value.
* **Folded BatchNorm.** A per-channel constant ``Mul`` then ``Add`` (or a lone one right after a
  conv) becomes a :class:`~.layers.ChannelAffine` with parameters, a BatchNorm again, so model
  randomization resets it and canonizers merge it like one.
* **Layout.** The module always takes NCHW; for an NHWC graph it permutes inside ``forward``.
* **Batch.** Shape inference runs with a symbolic batch, so ``Shape`` reads of the batch stay
  run-time ops (reads of static dims fold), and reshapes to ``(batch, ...)``, whether the
  batch is read from a shape or baked in by a fixed-batch export, keep the batch per image. A
  graph whose input fixes the batch is then probed once with a larger batch; if that fails or
  differs from running the images one fixed-size group at a time (a constant with the batch
  size baked in, like a transformer's class token), the module runs fixed-size groups and
  says so in ``fixed_batch`` and the notes.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import external_data_helper
from torch import nn

from ..contract.report import SoftmaxHead
from ..errors import EMBED_WEIGHTS_FIX, ModelLoadError, SpecError
from ..onnx_rules import (
    DEFAULT_DOMAINS,
    check_operator,
    check_versions,
    graph_spec_fields,
    image_dims,
    image_input,
    needed_nodes,
    opsets,
    static_dims,
)
from ..spec import (
    GRAY_MEAN,
    GRAY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputSpec,
    Layout,
    SpecSource,
    resolve_output,
)
from .base import SPEC_FIELDS, LoadedModel, ModelOutput, input_spec_note
from .layers import ChannelAffine, with_zero_padding
from .onnx_fold import BATCH, analyze
from .onnx_ops import (
    Alias,
    Emit,
    Fold,
    NodeView,
    Pad,
    StaticShape,
    convert_node,
    node_attributes,
    tensor_from_onnx,
)

# Grayscale version of the ImageNet statistics, for 1-channel inputs without a given spec.
_GRAY_MEAN = GRAY_MEAN
_GRAY_STD = GRAY_STD

_WEIGHTED_OPS = frozenset(
    {
        "Conv",
        "Gemm",
        "MatMul",
        "BatchNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "PRelu",
    }
)
# "<module path>.weight"; torch module names may hold any character but "." (regnet: block4-11)
_PARAM_NAME = re.compile(r"^[^.:/\s]+(\.[^.:/\s]+)*\.weight$")


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


class OnnxScope(nn.Module):
    """A container that only groups converted modules (a block of the original network)."""

    def forward(self, *args: Any) -> Any:  # pragma: no cover - never called by the graph
        raise RuntimeError("an OnnxScope only groups modules; call the OnnxGraphModule")


@dataclass(frozen=True)
class _Step:
    """One module call of the forward pass: module name, input and output tensor names."""

    module: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    release: tuple[str, ...] = ()  # tensors no later step reads, freed after this one

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.module.split("."))


class OnnxGraphModule(nn.Module):
    """A converted ONNX graph: NCHW float32 images in, the graph's (first) output out.

    ``forward`` runs the recorded steps in the ONNX graph's order, looking each module up by
    name on every call, so a module replaced with ``set_submodule`` (e.g. by a canonizer) is
    the one called.
    """

    def __init__(
        self,
        *,
        input_name: str,
        output_name: str,
        layout: Layout,
        onnx_input_shape: StaticShape,
    ) -> None:
        super().__init__()
        self._input_name = input_name
        self._output_name = output_name
        self._layout: Layout = layout
        self._onnx_input_shape = onnx_input_shape
        self._steps: list[_Step] = []
        self._paths: list[tuple[str, ...]] = []  # step.path of each step, split once
        self._const_inputs: dict[str, str] = {}  # tensor name -> buffer attribute name
        self._fixed_batch: int | None = None
        self._sources: dict[str, str] = {}  # module name -> ONNX node name
        self._pairs: list[tuple[str, str]] = []
        # the graph output computed and the softmax head left out of it (set by convert_graph)
        self.model_output: ModelOutput | None = None

    @property
    def layout(self) -> Layout:
        """The layout the ONNX graph expects (``forward`` always takes NCHW)."""
        return self._layout

    @property
    def fixed_batch(self) -> int | None:
        """Batch size the graph must be run with, or None when any batch size works."""
        return self._fixed_batch

    @property
    def onnx_input_shape(self) -> StaticShape:
        """The graph input's static shape in the file's layout (None for dynamic dims)."""
        return self._onnx_input_shape

    def linear_bn_pairs(self) -> list[tuple[str, str]]:
        """(conv or linear module name, BatchNorm module name) pairs a canonizer may merge.

        A pair is listed when the BatchNorm's only input is the layer's output and nothing else
        reads that output, so folding the BatchNorm into the layer changes no other path.
        """
        return list(self._pairs)

    def onnx_node(self, module_name: str) -> str:
        """The name of the ONNX node a module was converted from (for messages)."""
        return self._sources[module_name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        batch = self._fixed_batch
        if batch is None or x.shape[0] == batch:
            return self._run(x)
        outputs = []
        for start in range(0, x.shape[0], batch):
            chunk = x[start : start + batch]
            short = batch - chunk.shape[0]
            if short:  # pad the last chunk with copies of its last image, then drop them
                chunk = torch.cat([chunk, chunk[-1:].expand(short, *chunk.shape[1:])])
            out = self._run(chunk)
            outputs.append(out[: batch - short] if short else out)
        return torch.cat(outputs)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {self._input_name: x}
        for tensor_name, attr in self._const_inputs.items():
            env[tensor_name] = getattr(self, attr)
        for step, path in zip(self._steps, self._paths, strict=True):
            module: nn.Module | None = self
            for part in path:  # get_submodule without its checks: 10x less overhead per step
                module = module._modules[part] if module is not None else None
            if module is None:
                raise RuntimeError(f"module {step.module!r} was removed from the graph")
            result = module(*(env[name] for name in step.inputs))
            if len(step.outputs) == 1:
                env[step.outputs[0]] = result
            else:
                for name, value in zip(step.outputs, result, strict=True):
                    if name:
                        env[name] = value
            for name in step.release:
                del env[name]
        return env[self._output_name]


# --------------------------------------------------------------------------------------------
# Parsing and checks
# --------------------------------------------------------------------------------------------


def _parse(data: bytes) -> onnx.ModelProto:
    """Decode an ONNX file; refuse external data (only the uploaded bytes are read)."""
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"not a readable ONNX file: {exc}") from exc
    if not model.HasField("graph") or not model.graph.node:
        raise ModelLoadError("not an ONNX model: no graph nodes")
    for tensor in _all_tensors(model.graph):
        if external_data_helper.uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            raise ModelLoadError(
                f"tensor {tensor.name!r} is stored as external data"
                + (f" in a side file ({location!r})" if location else "")
                + f", and only the uploaded file is read. {EMBED_WEIGHTS_FIX}",
                tensor=tensor.name,
                location=location,
            )
    return model


def _check(skeleton: onnx.ModelProto) -> None:
    """``onnx.checker`` on the weight-free skeleton: the same graph checks, without copying
    hundreds of megabytes of weights (their sizes are checked when they are read)."""
    try:
        onnx.checker.check_model(skeleton)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelLoadError(f"invalid ONNX model: {exc}") from exc


def _all_tensors(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_tensors(sub)


def _skeleton(model: onnx.ModelProto, input_name: str) -> onnx.ModelProto:
    """The model without its large weights, and with a symbolic batch dim on the image input.

    Large initializers become typed graph inputs, so checking and shape inference do not copy
    the weights; small ones stay, because shape inference propagates their values. The batch dim
    is made symbolic so that ``Shape`` ops depending on it stay run-time ops instead of baking in
    the exported batch size.
    """
    graph = model.graph
    skeleton_graph = onnx.GraphProto(name=graph.name or "graph")
    skeleton_graph.node.extend(graph.node)
    skeleton_graph.output.extend(graph.output)
    for value in graph.input:
        copy = skeleton_graph.input.add()
        copy.CopyFrom(value)
        dims = copy.type.tensor_type.shape.dim
        if value.name == input_name and len(dims) > 0:
            dims[0].Clear()
            dims[0].dim_param = BATCH
    listed = {v.name for v in graph.input}
    for tensor in graph.initializer:
        numel = 1
        for d in tensor.dims:
            numel *= int(d)
        if numel <= 64 or (tensor.data_type == onnx.TensorProto.INT64 and numel <= 4096):
            skeleton_graph.initializer.append(tensor)
        elif tensor.name not in listed:
            skeleton_graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
    skeleton = onnx.helper.make_model(
        skeleton_graph, opset_imports=model.opset_import, ir_version=model.ir_version
    )
    skeleton.functions.extend(model.functions)
    return skeleton


# --------------------------------------------------------------------------------------------
# Input spec
# --------------------------------------------------------------------------------------------


def _derive_spec(dims: StaticShape) -> InputSpec:
    """An input spec from the graph input's shape; the layout only where it is unambiguous."""
    fields, open_fields = graph_spec_fields(dims)
    if open_fields:
        raise SpecError(next(iter(open_fields.values())))
    gray = fields["channels"] == 1
    return InputSpec(
        **fields,
        mean=_GRAY_MEAN if gray else IMAGENET_MEAN,
        std=_GRAY_STD if gray else IMAGENET_STD,
    )


def _check_spec(spec: InputSpec, dims: StaticShape) -> None:
    if len(dims) != 4:
        raise SpecError(f"expected a 4-D image input, the graph's input has shape {dims}")
    if spec.layout == "NCHW":
        expected = (spec.channels, spec.height, spec.width)
    else:
        expected = (spec.height, spec.width, spec.channels)
    for name, want, have in zip(("dim 1", "dim 2", "dim 3"), expected, dims[1:], strict=True):
        if have is not None and have != want:
            raise SpecError(
                f"the input spec ({spec.layout}, {spec.channels}x{spec.height}x{spec.width}) "
                f"does not fit the graph's input shape {dims}: {name} is {have}, not {want}"
            )


# --------------------------------------------------------------------------------------------
# Module names
# --------------------------------------------------------------------------------------------


def _label(text: str) -> str:
    cleaned = re.sub(r"\W", "_", text).strip("_").lower()
    return cleaned or "op"


def _naming_style(model: onnx.ModelProto) -> str:
    nodes = model.graph.node
    if any(p.key == "pkg.torch.onnx.name_scopes" for n in nodes for p in n.metadata_props):
        return "dynamo"
    if model.producer_name == "pytorch" and any(n.name.startswith("/") for n in nodes):
        return "legacy"
    return "flat"


def _node_scope(
    node: onnx.NodeProto, style: str, own_initializers: set[str]
) -> tuple[tuple[str, ...], str] | None:
    """(module path, op label) of a node as the exporter recorded it, or None if unknown.

    ``own_initializers``: initializers no other node reads (their names name their layer).
    """
    if style == "dynamo":
        if node.op_type in _WEIGHTED_OPS and len(node.input) > 1:
            weight = node.input[1]
            if weight in own_initializers and _PARAM_NAME.match(weight):
                path = tuple(weight[: -len(".weight")].split("."))
                return path, path[-1]
        meta = {p.key: p.value for p in node.metadata_props}
        raw = meta.get("pkg.torch.onnx.name_scopes")
        if raw is None:
            return None
        try:
            scopes = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return None
        if (
            not isinstance(scopes, list)
            or not scopes
            or not all(isinstance(s, str) for s in scopes)
        ):
            return None
        module_path = scopes[-2] if len(scopes) >= 2 else ""
        if module_path.startswith("_empty_nn_module_stack"):
            module_path = ""  # ops torch.export adds outside any module (input shape reads)
        return (tuple(module_path.split(".")) if module_path else ()), scopes[-1]
    if style == "legacy" and node.name.startswith("/"):
        parts = node.name.strip("/").split("/")
        # Children of containers appear as "layer1.0" under "layer1": keep the last component.
        return tuple(p.rsplit(".", 1)[-1] for p in parts[:-1]), parts[-1]
    return None


@dataclass
class _Entry:
    """A module-producing node waiting for its name."""

    module: nn.Module
    node: onnx.NodeProto
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    scope: tuple[str, ...] | None
    label: str
    # A ChannelAffine from a constant Mul that a following constant Add may still give a bias
    # (``affine_open``), and the module the node is instead if nothing makes it a scale-and-shift
    # layer (``fallback``: a lone Mul that does not follow a conv stays a Mul).
    affine_open: bool = False
    fallback: nn.Module | None = None


def _adopt_unscoped(entries: Sequence[_Entry]) -> None:
    """Place nodes the exporter left without a scope in the block that uses their output.

    Optimizer-made nodes (dynamo's ``Split`` for ``x.chunk``) and input shape reads carry no
    scope. At the root they would break the tree's execution order; inside the innermost
    block enclosing all their consumers they run where that block runs. A node never joins a
    leaf scope (that would rename the layer living there), only a block or the root.
    """
    readers: dict[str, list[int]] = defaultdict(list)
    for i, entry in enumerate(entries):
        for name in entry.inputs:
            readers[name].append(i)
    recorded = [e.scope for e in entries if e.scope is not None]
    blocks = {s[:k] for s in recorded for k in range(1, len(s))}
    for i in reversed(range(len(entries))):  # consumers first: chains adopt transitively
        entry = entries[i]
        if entry.scope is not None:
            continue
        scopes = [
            entries[j].scope
            for name in entry.outputs
            for j in readers[name]
            if entries[j].scope is not None
        ]
        prefix: tuple[str, ...] = ()
        if scopes:
            first = scopes[0]
            assert first is not None
            length = min(len(s) for s in scopes if s is not None)
            while length and any(s is not None and s[:length] != first[:length] for s in scopes):
                length -= 1
            prefix = first[:length]
            if prefix and prefix not in blocks:
                prefix = prefix[:-1]
        entry.scope = prefix


def _hierarchical_paths(entries: Sequence[_Entry]) -> list[tuple[str, ...]]:
    """Module paths from the scopes the exporter recorded."""
    scopes = [e.scope or () for e in entries]
    containers = {s[:k] for s in scopes for k in range(1, len(s))}
    members: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, scope in enumerate(scopes):
        members[scope].append(i)
    paths: list[tuple[str, ...]] = []
    for i, (entry, scope) in enumerate(zip(entries, scopes, strict=True)):
        group = members[scope]
        if scope and scope not in containers and len(group) == 1:
            paths.append(scope)
        elif scope and scope not in containers and _reused_module(entries, group):
            # One torch module called several times (resnet's block.relu): siblings relu,
            # relu_1, ... as the legacy exporter names them.
            k = group.index(i)
            paths.append((*scope[:-1], scope[-1] if k == 0 else f"{scope[-1]}_{k}"))
        else:
            # Exporter-wide counters ("Add_3", "add_17") say nothing within a block; siblings
            # are numbered again when names are made unique.
            paths.append((*scope, _label(re.sub(r"_\d+$", "", entry.label))))
    return paths


def _reused_module(entries: Sequence[_Entry], group: Sequence[int]) -> bool:
    """True when the nodes of one leaf scope are separate calls of one module."""
    if len({entries[i].node.op_type for i in group}) != 1:
        return False
    produced = {name for i in group for name in entries[i].outputs}
    return not any(name in produced for i in group for name in entries[i].inputs)


def _flat_paths(entries: Sequence[_Entry]) -> list[tuple[str, ...]]:
    counters: Counter[str] = Counter()
    paths: list[tuple[str, ...]] = []
    for entry in entries:
        kind = "channel_affine" if isinstance(entry.module, ChannelAffine) else entry.node.op_type
        base = _label(kind)
        paths.append((f"{base}_{counters[base]}",))
        counters[base] += 1
    return paths


def _unique_paths(
    paths: Sequence[tuple[str, ...]], reserved_root: set[str]
) -> list[tuple[str, ...]]:
    """Make leaf names unique among siblings and distinct from containers and attributes."""
    containers = {p[:k] for p in paths for k in range(1, len(p))}
    taken: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for c in containers:
        taken[c[:-1]].add(c[-1])
    reserved_scope = set(dir(OnnxScope))
    out = []
    for path in paths:
        parent, name = path[:-1], path[-1]
        reserved = reserved_root if not parent else reserved_scope
        candidate, k = name, 0
        while candidate in taken[parent] or candidate in reserved:
            k += 1
            candidate = f"{name}_{k}"
        taken[parent].add(candidate)
        out.append((*parent, candidate))
    return out


def _visits_in_order(paths: Sequence[tuple[str, ...]]) -> bool:
    """True when a depth-first walk of the tree meets the leaves in execution order."""
    tree: dict[str, Any] = {}
    for index, path in enumerate(paths):
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                return False
            node = child
        node[path[-1]] = index
    order: list[int] = []

    def walk(node: dict[str, Any]) -> None:
        for value in node.values():
            if isinstance(value, dict):
                walk(value)
            else:
                order.append(value)

    walk(tree)
    return order == list(range(len(paths)))


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _logits_output(
    graph: onnx.GraphProto,
    shapes: dict[str, StaticShape],
    opset: int,
    choice: str | int | None,
    notes: list[str],
) -> ModelOutput:
    """The output to explain and the softmax head to drop from it, if any.

    ``choice`` (the input spec's ``output``) names it; without one the graph must have one
    float output (:func:`~saliency_audit.workers.engine.spec.resolve_output`). ``num_classes`` is
    left None
    here when the shape does not tell it (the caller probes the module).
    """
    if not graph.output:
        raise ModelLoadError("the graph has no output")
    described = [
        (
            o.name,
            shapes.get(o.name) or static_dims(o),
            onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type),
        )
        for o in graph.output
    ]
    index = resolve_output(choice, described)
    name, shape, _ = described[index]
    if len(graph.output) > 1:
        how = "named in the input spec" if choice is not None else "its only float32 output"
        notes.append(
            f"the graph has {len(graph.output)} outputs; auditing {name!r} (index {index}, {how})"
        )
    head = _softmax_head(graph, name, shapes, opset)
    if head is not None:
        own = "its output" if head.op_type == "Softmax" else "exp of its output"
        notes.append(
            f"the graph ends in {head.op_type} ({head.name or head.output[0]!r}), left out of "
            f"the converted module: saliency explains the pre-softmax scores {head.input[0]!r}, "
            f"and the probabilities reported are the graph's own ({own})"
        )
    classes = shape[1] if shape is not None and len(shape) == 2 else None
    head_op: SoftmaxHead | None = None
    if head is not None:
        head_op = "Softmax" if head.op_type == "Softmax" else "LogSoftmax"
    return ModelOutput(
        name=name,
        index=index,
        shape=(None, *shape[1:]) if shape else None,  # any batch: the module takes any
        num_classes=classes,
        head_removed=head_op,
        scores=head.input[0] if head is not None else name,
    )


# Ops that only rearrange their first input, which may sit between a softmax head and the output.
_SHAPE_ONLY_OPS = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def _softmax_head(
    graph: onnx.GraphProto, output: str, shapes: dict[str, StaticShape], opset: int
) -> onnx.NodeProto | None:
    """The Softmax or LogSoftmax node that ``output`` is, up to shape-only ops, when it
    normalizes over the class axis; None otherwise.

    The class axis: of the softmax's input shape, the one non-batch dim that is not 1 ([N, C],
    or [N, C, 1, 1] as a 1x1-conv head leaves it). Opset 13 normalizes along ``axis``; older
    opsets flatten the dims from ``axis`` on, which is the class softmax when ``axis`` is 1 or
    any axis up to the class axis. With no shape known, ``axis`` 1 or -1 is taken as the class
    axis; the fidelity check then confirms that the graph's output is the softmax of the scores.
    """
    producers = {o: n for n in graph.node for o in n.output if o}
    node = producers.get(output)
    while node is not None and node.op_type in _SHAPE_ONLY_OPS and node.domain in DEFAULT_DOMAINS:
        node = producers.get(node.input[0])
    if node is None or node.op_type not in ("Softmax", "LogSoftmax"):
        return None
    if node.domain not in DEFAULT_DOMAINS:
        return None
    axis = next(
        (int(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == "axis"),
        -1 if opset >= 13 else 1,
    )
    shape = shapes.get(node.input[0]) or shapes.get(node.output[0])
    if shape is None:
        return node if axis in (1, -1) else None
    rank = len(shape)
    if not -rank <= axis < rank:
        return None
    axis %= rank
    class_axes = [i for i in range(1, rank) if shape[i] != 1]
    if len(class_axes) != 1:
        return None
    class_axis = class_axes[0]
    ok = axis == class_axis if opset >= 13 else 1 <= axis <= class_axis
    return node if ok else None


def _fuse_bias(
    view: NodeView, producer: _Entry | None, consumers: Counter[str], out_rank: int | None
) -> bool:
    """Fold ``Add(layer_output, constant)`` into the layer's bias when the layer has none.

    MatMul-then-Add is how exporters write a Linear with a bias on inputs of rank > 2, and some
    converters write Conv-then-Add; as one module with a bias, randomization tests reset the
    bias with the layer. Returns True when the bias was absorbed.
    """
    if producer is None:
        return False
    runtime = [i for i in (0, 1) if view.const(i) is None]
    if len(runtime) != 1:
        return False
    bias = view.const(1 - runtime[0])
    layer = producer.module
    name = view.inputs[runtime[0]]
    if bias is None or consumers[name] != 1 or not bias.is_floating_point():
        return False
    if isinstance(layer, nn.Linear) and layer.bias is None:
        n_out = layer.out_features
        ok = bias.numel() == n_out and bias.dim() >= 1 and bias.shape[-1] == n_out
        ok = ok and bias.dim() <= (out_rank if out_rank is not None else 1)
    elif isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d) and layer.bias is None:
        n_out = layer.out_channels
        rank = layer.weight.dim()  # = rank of the batched output
        channel_axis = bias.dim() - (rank - 1)
        ok = bias.dim() <= rank and channel_axis >= 0 and bias.numel() == n_out
        ok = ok and bias.shape[channel_axis] == n_out
    else:
        return False
    if ok:
        layer.bias = nn.Parameter(bias.detach().to(torch.float32).reshape(-1).clone())
    return ok


def _channel_operand(view: NodeView) -> tuple[str, torch.Tensor] | None:
    """(run-time input, (C,) vector) when a ``Mul``, ``Add`` or ``Sub`` node scales or shifts
    each channel (dim 1) of one run-time tensor by a constant: the constant broadcasts along
    dim 1 only, over C > 1 channels (a scalar, an activation's ``x * sigmoid(x)``, a gating
    product or a residual sum never qualify). ``Sub`` only as ``x - constant`` (shift by -c).
    """
    if len(view.inputs) != 2:
        return None
    runtime = [i for i in (0, 1) if view.const(i) is None]
    if len(runtime) != 1 or (view.op_type == "Sub" and runtime != [0]):
        return None
    i = runtime[0]
    value, shape = view.const(1 - i), view.shapes[i]
    if value is None or shape is None or not value.is_floating_point():
        return None
    rank = len(shape)
    if rank < 2 or value.dim() > rank:
        return None
    aligned = (1,) * (rank - value.dim()) + tuple(value.shape)
    channels = aligned[1]
    if aligned[0] != 1 or channels < 2 or any(d != 1 for d in aligned[2:]):
        return None
    if shape[1] is not None and shape[1] != channels:
        return None
    vector = value.detach().reshape(-1).to(torch.float32)
    return view.inputs[i], -vector if view.op_type == "Sub" else vector


def _zero_pad_entry(entry: _Entry | None) -> tuple[_Entry, tuple[int, int, int, int]] | None:
    """The entry and its (left, right, top, bottom) pads when ``entry`` zero-pads only the
    two spatial dims of a 4-D tensor; None otherwise."""
    if entry is None or not isinstance(entry.module, Pad) or len(entry.inputs) != 1:
        return None
    pad = entry.module
    if pad.mode != "constant" or pad.value != 0.0 or len(pad.pads) != 4 or min(pad.pads) < 0:
        return None
    left, right, top, bottom = pad.pads
    return entry, (left, right, top, bottom)


def _conv_or_linear(module: nn.Module, name: str) -> str | None:
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
        return name
    if isinstance(module, nn.Sequential) and len(module) and isinstance(module[-1], nn.Conv2d):
        return f"{name}.{len(module) - 1}"  # explicit pad + conv
    return None


def _untie(module: nn.Module) -> None:
    """Give every parameter and buffer its own storage.

    Legacy exports deduplicate equal initializers (zero biases, say) and route the copies
    through ``Identity`` nodes; in the source network those were separate parameters, and a
    randomization test that re-initializes one layer must leave the others alone.
    """
    seen: set[int] = set()
    for owner in module.modules():
        for kind in ("_parameters", "_buffers"):
            tensors: dict[str, torch.Tensor | None] = getattr(owner, kind)
            for name, tensor in tensors.items():
                if tensor is None:
                    continue
                key = tensor.untyped_storage().data_ptr()
                if key in seen and tensor.numel():
                    copy = tensor.detach().clone()
                    if isinstance(tensor, nn.Parameter):
                        tensors[name] = nn.Parameter(copy, requires_grad=tensor.requires_grad)
                    else:
                        tensors[name] = copy
                else:
                    seen.add(key)


def convert_graph(
    model: onnx.ModelProto,
    layout: Layout,
    *,
    skeleton: onnx.ModelProto | None = None,
    output: str | int | None = None,
) -> tuple[OnnxGraphModule, list[str]]:
    """Build the torch module of an ONNX model; returns it with notes for the user.

    ``skeleton`` is ``_skeleton(model, ...)`` when the caller already built and checked it.
    ``output`` names the graph output to compute (see ``_logits_output``); the module's
    ``model_output`` says which one it is and which softmax head was left out.
    """
    notes: list[str] = []
    graph = model.graph
    model_opsets = opsets(model)
    opset = check_versions(model)
    image = image_input(model)
    if skeleton is None:
        skeleton = _skeleton(model, image.name)
        _check(skeleton)
    facts = analyze(skeleton, opset)
    shapes, batch_first = facts.shapes, facts.batch_first
    chosen = _logits_output(graph, shapes, opset, output, notes)
    output = chosen.name
    head = chosen.scores if chosen.head_removed else None  # the softmax head's input tensor
    input_dims = static_dims(image) or ()
    fixed_batch = input_dims[0] if input_dims else None

    constants: dict[str, torch.Tensor] = {
        t.name: tensor_from_onnx(t) for t in graph.initializer if t.name != image.name
    }
    alias: dict[str, str] = {}
    runtime: dict[str, _Entry | None] = {image.name: None}  # tensor -> entry that computes it
    entries: list[_Entry] = []
    const_inputs: dict[str, torch.Tensor] = {}
    after_layer: set[str] = set()  # run-time tensors computed through a layer with weights
    style = _naming_style(model)
    # Initializers read by one node only: the dynamo optimizer deduplicates equal tensors (a
    # LayerNorm's ones and zeros), so a shared initializer's name says nothing about its user.
    reads = Counter(i for n in graph.node for i in n.input if i)
    own_initializers = {t.name for t in graph.initializer if reads[t.name] == 1}
    nodes = needed_nodes(graph, output)
    consumers: Counter[str] = Counter(i for n in nodes for i in n.input if i)
    consumers[output] += 1

    def resolve(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    for node in nodes:
        if all(o in facts.constants for o in node.output if o):
            for name in node.output:
                if name:
                    constants[name] = facts.constants[name]  # shape arithmetic, folded
            continue
        check_operator(node, model_opsets)
        names = [resolve(i) if i else "" for i in node.input]
        for name in names:
            if name and name not in constants and name not in runtime:
                raise ModelLoadError(f"node {node.name!r} reads undefined tensor {name!r}")
        if head is not None and node.op_type in ("Softmax", "LogSoftmax") and node.input[0] == head:
            alias[node.output[0]] = names[0]  # the head is left out: the module returns scores
            continue
        view = NodeView(
            proto=node,
            opset=opset,
            attrs=node_attributes(node),
            inputs=names,
            consts=[constants.get(n) if n else None for n in names],
            shapes=[shapes.get(i) if i else None for i in node.input],
            fixed_batch=fixed_batch,
            batch_first=[i in batch_first for i in node.input],
            partials=[facts.partial.get(i) if i else None for i in node.input],
            dynamic=[facts.why_not_constant(i) if i else "" for i in node.input],
        )
        if node.op_type == "Add":
            producer = next((runtime.get(n) for n in names if n in runtime), None)
            out_rank = len(shapes[node.output[0]]) if node.output[0] in shapes else None
            if _fuse_bias(view, producer, consumers, out_rank):
                alias[node.output[0]] = next(n for n in names if n in runtime)
                continue
        affine = _channel_operand(view) if node.op_type in ("Mul", "Add", "Sub") else None
        if affine is not None:
            data, vector = affine
            producer = runtime.get(data)
            sole = consumers[data] == 1
            if node.op_type != "Mul" and producer is not None and producer.affine_open and sole:
                # Mul then Add: the shift of the scale-and-shift layer the Mul started
                assert isinstance(producer.module, ChannelAffine)
                with torch.no_grad():
                    producer.module.bias.copy_(vector)
                producer.affine_open, producer.fallback = False, None
                alias[node.output[0]] = data
                continue
        result = convert_node(view)
        if node.op_type == "Conv" and isinstance(result, Emit) and consumers[node.input[0]] == 1:
            padded = _zero_pad_entry(runtime.get(names[0]))
            if padded is not None and isinstance(result.module, nn.Conv2d):
                # a zero Pad feeding only this conv becomes the conv's own padding
                entry, pads = padded
                entries.remove(entry)
                del runtime[names[0]]
                names = [entry.inputs[0], *names[1:]]
                result = Emit(with_zero_padding(result.module, pads), result.inputs)
        affine_open, fallback = False, None
        if affine is not None and isinstance(result, Emit):
            data, vector = affine
            producer = runtime.get(data)
            after_conv = (
                producer is not None
                and consumers[data] == 1
                and _conv_or_linear(producer.module, "") is not None
            )
            if node.op_type == "Mul" and (after_conv or data in after_layer):
                affine_open, fallback = True, None if after_conv else result.module
                scale = ChannelAffine(vector, torch.zeros_like(vector))
                result = Emit(scale, (names.index(data),))
            elif node.op_type != "Mul" and after_conv:
                result = Emit(ChannelAffine(torch.ones_like(vector), vector), (names.index(data),))
        if isinstance(result, Alias):
            source = names[result.index]
            if source in constants:
                constants[node.output[0]] = constants[source]
            else:
                alias[node.output[0]] = source
            continue
        if isinstance(result, Fold):
            for name, value in zip(node.output, result.values, strict=False):
                if name:
                    constants[name] = value
            continue
        assert isinstance(result, Emit)
        inputs = [names[i] for i in result.inputs]
        outputs = tuple(node.output[: result.n_outputs])
        extra = [o for o in node.output[result.n_outputs :] if o and consumers[o]]
        if extra:
            raise view.error(f"outputs {extra} are not supported")
        if all(name in constants for name in inputs):
            with torch.no_grad():
                value = result.module.eval()(*(constants[name] for name in inputs))
            values = value if isinstance(value, tuple) else (value,)
            for name, v in zip(outputs, values, strict=True):
                if name:
                    constants[name] = v
            continue
        for name in inputs:
            if name in constants:  # a constant the module takes as an argument at run time
                const_inputs[name] = constants[name]
        entry = _Entry(
            module=result.module,
            node=node,
            inputs=tuple(inputs),
            outputs=outputs,
            scope=None,
            label=node.op_type,
            affine_open=affine_open,
            fallback=fallback,
        )
        if style != "flat":
            scoped = _node_scope(node, style, own_initializers)
            if scoped is not None:
                entry.scope, entry.label = scoped
        entries.append(entry)
        weighted = any(True for _ in entry.module.parameters())
        for name in outputs:
            if name:
                runtime[name] = entry
                if weighted or any(i in after_layer for i in inputs):
                    after_layer.add(name)

    for entry in entries:
        if entry.fallback is not None:  # a Mul by a channel vector that no Add completed
            entry.module, entry.fallback, entry.affine_open = entry.fallback, None, False

    final = resolve(output)
    if final in constants or final not in runtime:
        raise ModelLoadError(f"the graph output {output!r} does not depend on the input image")

    module = OnnxGraphModule(
        input_name=image.name, output_name=final, layout=layout, onnx_input_shape=input_dims
    )
    module.model_output = chosen
    reserved_root = set(dir(module)) | set(module.__dict__)
    if style != "flat":
        _adopt_unscoped(entries)
    paths = _hierarchical_paths(entries) if style != "flat" else None
    if paths is not None:
        paths = _unique_paths(paths, reserved_root)
        if not _visits_in_order(paths):
            notes.append(
                "the exporter's module hierarchy does not follow execution order; "
                "modules are named flat (conv_0, relu_1, ...)"
            )
            paths = None
    if paths is None:
        paths = _unique_paths(_flat_paths(entries), reserved_root)
    else:
        notes.append(f"module hierarchy recovered from the {style} exporter's names")
    _install(module, entries, paths, const_inputs, output_name=final)
    _untie(module)
    return module, notes


def _install(
    module: OnnxGraphModule,
    entries: Sequence[_Entry],
    paths: Sequence[tuple[str, ...]],
    const_inputs: dict[str, torch.Tensor],
    *,
    output_name: str,
) -> None:
    """Register the modules (in execution order) and record the forward steps."""
    names = []
    for entry, path in zip(entries, paths, strict=True):
        parent: nn.Module = module
        for part in path[:-1]:
            child = parent._modules.get(part)
            if child is None:
                child = OnnxScope()
                parent.add_module(part, child)
            parent = child
        parent.add_module(path[-1], entry.module)
        name = ".".join(path)
        names.append(name)
        module._sources[name] = entry.node.name
    for k, (tensor_name, value) in enumerate(const_inputs.items()):
        attr = f"_onnx_constant_{k}"
        module.register_buffer(attr, value)
        module._const_inputs[tensor_name] = attr

    last_use: dict[str, int] = {}
    for i, entry in enumerate(entries):
        for name in entry.inputs:
            last_use[name] = i
    releasable = defaultdict(list)
    for name, i in last_use.items():
        if name != output_name and name not in const_inputs:
            releasable[i].append(name)
    module._steps = [
        _Step(
            module=name,
            inputs=entry.inputs,
            outputs=entry.outputs,
            release=tuple(dict.fromkeys(releasable[i])),
        )
        for i, (entry, name) in enumerate(zip(entries, names, strict=True))
    ]
    module._paths = [step.path for step in module._steps]

    producers = {o: i for i, e in enumerate(entries) for o in e.outputs if o}
    uses = Counter(n for e in entries for n in e.inputs)
    uses[output_name] += 1
    for i, entry in enumerate(entries):
        if not isinstance(
            entry.module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d | ChannelAffine
        ):
            continue
        source = entry.inputs[0]
        j = producers.get(source)
        if j is None or uses[source] != 1:
            continue
        layer = _conv_or_linear(entries[j].module, names[j])
        if layer is not None:
            module._pairs.append((layer, names[i]))


def _settle_batch(module: OnnxGraphModule, spec: InputSpec, notes: list[str]) -> None:
    """Decide whether a graph exported with a fixed batch size can run any batch size."""
    fixed = module.onnx_input_shape[0] if module.onnx_input_shape else None
    if fixed is None:
        return
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(fixed + 1, spec.channels, spec.height, spec.width, generator=generator)
    try:
        with torch.no_grad():
            batched = module(probe)
            module._fixed_batch = fixed
            chunked = module(probe)
        scale = max(float(chunked.abs().max()), 1.0)
        if batched.shape == chunked.shape and torch.allclose(
            batched, chunked, rtol=1e-4, atol=1e-5 * scale
        ):
            module._fixed_batch = None
            return
    except Exception:  # a constant reshape that bakes in the batch size fails loudly here
        pass
    module._fixed_batch = fixed
    notes.append(
        f"the graph was exported with a fixed batch size of {fixed}; images run {fixed} at a "
        "time (re-export with a dynamic batch axis for speed)"
    )


def graph_input_dims(data: bytes) -> tuple[StaticShape, dict[str, str]]:
    """The image input's shape (None for dynamic dims) and the file's metadata entries, from
    one read of the file, without converting the graph."""
    model = _parse(data)
    check_versions(model)
    return image_dims(model), {p.key: p.value for p in model.metadata_props}


def load_onnx(
    data: bytes,
    input_spec: InputSpec | None = None,
    *,
    sha256: str | None = None,
    sources: dict[str, SpecSource] | None = None,
) -> LoadedModel:
    """Convert an ONNX graph (the file's bytes) into a differentiable ``LoadedModel``.

    Without ``input_spec`` the spec is derived from the graph's input shape (size, channels
    and NCHW/NHWC where unambiguous; ImageNet normalization assumed, which the notes say).
    With one, it must agree with the graph's static input dims; ``sources`` says where each of
    its fields came from (default: all given). ``input_spec.output`` picks the graph output;
    a softmax head on it is left out of the module (``LoadedModel.output`` says so). Any output
    shape converts; :func:`~saliency_audit.workers.engine.models.loader.load_model` admits
    classifiers only.
    """
    model = _parse(data)
    image = image_input(model)
    skeleton = _skeleton(model, image.name)
    _check(skeleton)
    check_versions(model)
    dims = image_dims(model)
    notes: list[str] = []
    used: dict[str, SpecSource]
    if input_spec is None:
        input_spec = _derive_spec(dims)
        stated = graph_spec_fields(dims)[0]
        used = {name: "graph" if name in stated else "assumed" for name in SPEC_FIELDS}
    else:
        _check_spec(input_spec, dims)
        used = dict.fromkeys(SPEC_FIELDS, "given")
        used.update(sources or {})
    if input_spec.output is None:
        used["output"] = "graph"  # the graph's one float output
    note = input_spec_note(input_spec, used)
    if note is not None:
        notes.append(note)
    module, convert_notes = convert_graph(
        model, input_spec.layout, skeleton=skeleton, output=input_spec.output
    )
    notes += convert_notes
    module.eval()
    _settle_batch(module, input_spec, notes)
    output = module.model_output
    assert output is not None
    if output.shape is None or None in output.shape[1:]:
        output = _probe_output(module, input_spec, output)
    opset = opsets(model).get("", 0)
    return LoadedModel(
        module=module,
        input_spec=input_spec,
        source="onnx",
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        architecture=None,
        onnx_bytes=data,
        opset=opset,
        notes=notes,
        output=output,
        input_spec_sources=used,
    )


def _probe_output(module: OnnxGraphModule, spec: InputSpec, output: ModelOutput) -> ModelOutput:
    """``output`` with the shape the module actually returns, where the graph's shapes left it
    open (one forward pass on a blank batch)."""
    batch = module.fixed_batch or 1
    try:
        with torch.no_grad():
            scores = module(torch.zeros(batch, spec.channels, spec.height, spec.width))
    except Exception as exc:  # any op's own error: the message says which
        raise ModelLoadError(
            f"the converted graph does not run on a blank {spec.channels}x{spec.height}x"
            f"{spec.width} image, so its output shape is unknown: {exc}"
        ) from exc
    shape = (None, *(int(d) for d in scores.shape[1:]))
    classes = shape[1] if len(shape) == 2 else None
    return dataclasses.replace(output, shape=shape, num_classes=classes)
