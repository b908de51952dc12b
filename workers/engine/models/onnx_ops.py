"""The ONNX operator table of the converter: one function per operator, each returning a module.

A converter sees one node (:class:`NodeView`: attributes, the constant value of each input that
is known at conversion time, the static shapes ONNX shape inference found) and answers with one
of three things:

* :class:`Emit`: a torch module and which node inputs it takes at run time. Inputs that are
  constants are baked into the module (as ``nn.Parameter`` for weights, buffers for other
  tensors, plain Python values for shapes and axes), so a module's ``forward`` only takes
  tensors that depend on the image.
* :class:`Fold`: the node's outputs are constants (``Shape`` of a tensor with a static shape,
  ``Constant``); no module is created.
* :class:`Alias`: the output is one of the inputs (``Identity``, ``Dropout`` at inference).

The converter loop (``onnx_convert``) folds any emitted module whose run-time inputs all turn
out to be constants by running it once, so shape subgraphs of legacy exports disappear when the
input size is static.

Why modules and not functions: saliency methods hook modules. Captum's Guided Backprop and
Zennit's rules find ``nn.ReLU``, ``nn.Conv2d``, ``nn.Linear`` and ``nn.BatchNorm2d`` instances,
and LRP needs each module to be called once per forward pass, so every node gets its own
instance of the matching ``torch.nn`` class wherever one exists.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn import functional as F

from ..errors import ModelLoadError, UnsupportedOperatorError
from ..onnx_rules import SUPPORTED_OPERATORS
from .layers import Add, Concat, with_zero_padding

StaticShape = tuple[int | None, ...]

_INT64_MAX = 2**63 - 1


def tensor_from_onnx(proto: onnx.TensorProto) -> torch.Tensor:
    """An ONNX tensor as a torch tensor (copied, so it owns its memory and is writable)."""
    try:
        array = numpy_helper.to_array(proto)
    except Exception as exc:  # malformed raw data, unknown element type
        raise ModelLoadError(f"cannot read ONNX tensor {proto.name!r}: {exc}") from exc
    if array.dtype == np.float16:
        return torch.from_numpy(array.astype(np.float32))
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ModelLoadError(f"ONNX tensor {proto.name!r} has unsupported type {array.dtype}")
    return torch.from_numpy(np.array(array, copy=True))


def node_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes as Python values (tensors as torch tensors, strings decoded)."""
    attrs: dict[str, Any] = {}
    for attr in node.attribute:
        if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            continue  # control flow: its op_type is unsupported and reported as such
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        elif isinstance(value, onnx.TensorProto):
            value = tensor_from_onnx(value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode("utf-8", errors="replace") for v in value]
        attrs[attr.name] = value
    return attrs


# ONNX TensorProto element types (onnx.TensorProto.DataType) -> torch dtypes, for Cast.
_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.BOOL: torch.bool,
}


@dataclass(frozen=True)
class PartialValue:
    """A tensor computed from tensor shapes, element by element (see ``onnx_fold``).

    ``value`` holds every element known at conversion time (other elements hold a
    placeholder); ``known`` marks those elements, ``batch`` the elements that are exactly the
    image batch size (read from a ``Shape`` and moved, never computed with). ``dynamic`` says in
    words why the rest is not known, for error messages.
    """

    value: torch.Tensor
    known: torch.Tensor
    batch: torch.Tensor
    dynamic: str = ""

    @property
    def complete(self) -> bool:
        return bool(self.known.all())

    def unknown_elements(self) -> list[int]:
        return [int(i) for i in torch.nonzero(~self.known.reshape(-1)).reshape(-1).tolist()]


@dataclass
class NodeView:
    """One ONNX node as the converter functions see it."""

    proto: onnx.NodeProto
    opset: int
    attrs: dict[str, Any]
    inputs: list[str]
    consts: list[torch.Tensor | None]
    shapes: list[StaticShape | None]
    # For graphs exported with a fixed batch size: that size, and which inputs carry the image
    # batch as their first dim (shape inference runs with a symbolic batch).
    fixed_batch: int | None = None
    batch_first: list[bool] = field(default_factory=list)
    # Per input: what shape arithmetic knows of an input it could not fold (None for constants
    # and for tensors not computed from shapes alone), and why a non-constant input has no value
    # at conversion time ("" when it is computed from the image values).
    partials: list[PartialValue | None] = field(default_factory=list)
    dynamic: list[str] = field(default_factory=list)

    @property
    def op_type(self) -> str:
        return self.proto.op_type

    @property
    def name(self) -> str:
        return self.proto.name

    def error(self, reason: str) -> ModelLoadError:
        """A load error for an operator variant the converter does not handle."""
        return ModelLoadError(
            f"ONNX {self.op_type} at opset {self.opset} (node {self.name!r}): {reason}",
            op_type=self.op_type,
            opset=self.opset,
            node=self.name,
        )

    def has(self, i: int) -> bool:
        return i < len(self.inputs) and self.inputs[i] != ""

    def const(self, i: int) -> torch.Tensor | None:
        return self.consts[i] if self.has(i) else None

    def partial(self, i: int) -> PartialValue | None:
        return self.partials[i] if self.has(i) and i < len(self.partials) else None

    def need_const(self, i: int, what: str) -> torch.Tensor:
        value = self.const(i)
        if value is None:
            why = self.dynamic[i] if i < len(self.dynamic) and self.dynamic[i] else ""
            raise self.error(
                f"{what} (input {i}, tensor {self.inputs[i]!r}) must be known when the model is "
                f"converted, but {why or 'it is computed from the image values'}"
            )
        return value

    def const_ints(self, i: int, what: str) -> list[int] | None:
        """An optional constant integer input (axes, pads, shape) as a list; None if absent."""
        if not self.has(i):
            return None
        return [int(v) for v in self.need_const(i, what).reshape(-1).tolist()]

    def rank(self, i: int = 0) -> int | None:
        shape = self.shapes[i] if i < len(self.shapes) else None
        if shape is not None:
            return len(shape)
        value = self.const(i)
        return value.dim() if value is not None else None

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def ints(self, name: str, default: Sequence[int]) -> list[int]:
        return [int(v) for v in self.attrs.get(name, default)]


@dataclass(frozen=True)
class Emit:
    """Run ``module`` on the node inputs listed in ``inputs`` (indices, in call order)."""

    module: nn.Module
    inputs: tuple[int, ...] = (0,)
    n_outputs: int = 1


@dataclass(frozen=True)
class Fold:
    """The node's outputs are known at conversion time."""

    values: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Alias:
    """The node's (first) output is its input ``index``."""

    index: int = 0


Converted = Emit | Fold | Alias
Converter = Callable[[NodeView], Converted]

CONVERTERS: dict[str, Converter] = {}


def converter(*op_types: str) -> Callable[[Converter], Converter]:
    """Register a converter for the ONNX operators (default domain) named."""

    def register(fn: Converter) -> Converter:
        for op_type in op_types:
            if op_type in CONVERTERS:
                raise RuntimeError(f"converter for {op_type} registered twice")
            if op_type not in SUPPORTED_OPERATORS:  # the upload check reads that list
                raise RuntimeError(f"{op_type} is missing from onnx_rules.SUPPORTED_OPERATORS")
            CONVERTERS[op_type] = fn
        return fn

    return register


def supported_operators() -> list[str]:
    """The ONNX operators (default domain) the converter handles, sorted."""
    return sorted(CONVERTERS)


def convert_node(view: NodeView) -> Converted:
    fn = CONVERTERS.get(view.op_type)
    if fn is None:
        raise UnsupportedOperatorError(view.op_type, view.opset, view.name)
    return fn(view)


def _param(value: torch.Tensor) -> nn.Parameter:
    # No copy here: the converter unties parameters that share storage once the graph is built
    # (``onnx_convert._untie``), so weights are copied only when an initializer is shared.
    return nn.Parameter(value.detach().to(torch.float32).contiguous())


def _normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --------------------------------------------------------------------------------------------
# Small modules for operators without a torch.nn class. Constants are buffers.
# --------------------------------------------------------------------------------------------

_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Abs": torch.abs,
    "Ceil": torch.ceil,
    "Cos": torch.cos,
    "Erf": torch.erf,
    "Exp": torch.exp,
    "Floor": torch.floor,
    "Log": torch.log,
    "Neg": torch.neg,
    "Not": torch.logical_not,
    "Reciprocal": torch.reciprocal,
    "Round": torch.round,  # half to even, as ONNX specifies
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Sqrt": torch.sqrt,
}


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ONNX integer division truncates (ONNX Runtime follows C); float division is true division.
    if a.is_floating_point() or b.is_floating_point():
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


def _mod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.remainder(a, b)


def _fmod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.fmod(a, b)


_BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _div,
    "Pow": torch.pow,
    "Max": torch.maximum,
    "Min": torch.minimum,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
    "Mod": _mod,
    "Fmod": _fmod,
}


class Unary(nn.Module):
    """An element-wise function of one tensor (``Exp``, ``Sqrt``, ``Erf``, ...)."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _UNARY[self.op](x)

    def extra_repr(self) -> str:
        return self.op


class Binary(nn.Module):
    """An element-wise function of two tensors with ONNX (numpy) broadcasting.

    With ``constant`` set, the module takes one tensor and the constant (a buffer) is the other
    operand, first or second as in the graph (``Sub`` and ``Div`` are not symmetric).
    """

    constant: torch.Tensor | None

    def __init__(
        self, op: str, constant: torch.Tensor | None = None, constant_first: bool = False
    ) -> None:
        super().__init__()
        self.op = op
        self.constant_first = constant_first
        self.register_buffer("constant", constant)

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        fn = _BINARY[self.op]
        if self.constant is None:
            if b is None:
                raise TypeError(f"{self.op} needs two operands")
            return fn(a, b)
        if self.constant_first:
            return fn(self.constant, a)
        return fn(a, self.constant)

    def extra_repr(self) -> str:
        if self.constant is None:
            return self.op
        side = "constant first" if self.constant_first else "constant second"
        return f"{self.op}, {side}, shape={tuple(self.constant.shape)}"


class Variadic(nn.Module):
    """``Max``/``Min``/``Mean``/``Sum`` of any number of tensors, with broadcasting."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = inputs[0]
        for other in inputs[1:]:
            if self.op == "Max":
                out = torch.maximum(out, other)
            elif self.op == "Min":
                out = torch.minimum(out, other)
            else:
                out = out + other
        if self.op == "Mean":
            out = out / len(inputs)
        return out

    def extra_repr(self) -> str:
        return self.op


class Where(nn.Module):
    """``Where(condition, x, y)``; any operand may be a constant buffer."""

    def __init__(self, constants: Sequence[torch.Tensor | None]) -> None:
        super().__init__()
        self.runtime_slots = [i for i, c in enumerate(constants) if c is None]
        for i, c in enumerate(constants):
            self.register_buffer(f"operand_{i}", c)

    def forward(self, *runtime: torch.Tensor) -> torch.Tensor:
        operands: list[torch.Tensor] = []
        supplied = iter(runtime)
        for i in range(3):
            buffer = getattr(self, f"operand_{i}")
            operands.append(next(supplied) if buffer is None else buffer)
        return torch.where(operands[0].bool(), operands[1], operands[2])


class MatMul(nn.Module):
    """``torch.matmul`` of two tensors, or of one tensor and a constant (a buffer)."""

    constant: torch.Tensor | None

    def __init__(self, constant: torch.Tensor | None = None, constant_first: bool = False):
        super().__init__()
        self.constant_first = constant_first
        self.register_buffer("constant", constant)

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self.constant is None:
            if b is None:
                raise TypeError("MatMul needs two operands")
            return torch.matmul(a, b)
        if self.constant_first:
            return torch.matmul(self.constant, a)
        return torch.matmul(a, self.constant)


class Gemm(nn.Module):
    """General ``alpha * A' B' + beta * C`` for the cases ``nn.Linear`` cannot express."""

    def __init__(
        self,
        alpha: float,
        beta: float,
        trans_a: bool,
        trans_b: bool,
        constants: Sequence[torch.Tensor | None],
    ) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.trans_a, self.trans_b = trans_a, trans_b
        self.runtime_slots = [i for i, c in enumerate(constants) if c is None]
        for i, c in enumerate(constants):
            self.register_buffer(f"operand_{i}", c)
        self.has_c = len(constants) > 2

    def forward(self, *runtime: torch.Tensor) -> torch.Tensor:
        supplied = iter(runtime)
        ops = []
        for i in range(3 if self.has_c else 2):
            buffer = getattr(self, f"operand_{i}")
            ops.append(next(supplied) if buffer is None else buffer)
        a = ops[0].t() if self.trans_a else ops[0]
        b = ops[1].t() if self.trans_b else ops[1]
        out = self.alpha * (a @ b)
        if self.has_c:
            out = out + self.beta * ops[2]
        return out


class Clamp(nn.Module):
    """``Clip`` with one bound only or bounds other than ReLU6's."""

    def __init__(self, low: float | None, high: float | None) -> None:
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.low, self.high)

    def extra_repr(self) -> str:
        return f"min={self.low}, max={self.high}"


class HardSigmoid(nn.Module):
    """``max(0, min(1, alpha * x + beta))`` for the (alpha, beta) that ``nn.Hardsigmoid`` lacks."""

    def __init__(self, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.alpha * x + self.beta, 0.0, 1.0)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


class Reshape(nn.Module):
    """ONNX ``Reshape``: a 0 copies the input dim unless ``allowzero`` (then it is a real 0).

    ``shape`` is the constant target shape; when the graph computes it at run time the module
    takes it as a second input instead. ``keep_batch`` replaces the target's first dim with the
    input's: a graph exported for a fixed batch writes that batch size into its reshapes, and
    reshaping each image's slice alike is what running the images one by one would do.
    """

    def __init__(
        self, shape: Sequence[int] | None, allowzero: bool, keep_batch: bool = False
    ) -> None:
        super().__init__()
        self.shape = tuple(shape) if shape is not None else None
        self.allowzero = allowzero
        self.keep_batch = keep_batch

    def forward(self, x: torch.Tensor, shape: torch.Tensor | None = None) -> torch.Tensor:
        target = self.shape if shape is None else tuple(int(v) for v in shape.tolist())
        if target is None:
            raise TypeError("Reshape needs a target shape")
        if not self.allowzero:
            target = tuple(x.shape[i] if s == 0 else s for i, s in enumerate(target))
        if self.keep_batch:
            target = (x.shape[0], *target[1:])
        return x.reshape(target)

    def extra_repr(self) -> str:
        keep = ", keep_batch=True" if self.keep_batch else ""
        return f"shape={self.shape}, allowzero={self.allowzero}{keep}"


class Flatten(nn.Module):
    """ONNX ``Flatten``: always 2-D, split before ``axis`` (``nn.Flatten`` covers axis 1)."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = _normalize_axis(self.axis, x.dim())
        outer = math.prod(x.shape[:axis])
        return x.reshape(outer, -1) if x.numel() else x.reshape(outer, math.prod(x.shape[axis:]))

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


class Transpose(nn.Module):
    def __init__(self, perm: Sequence[int] | None) -> None:
        super().__init__()
        self.perm = tuple(perm) if perm is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        perm = self.perm if self.perm is not None else tuple(reversed(range(x.dim())))
        return x.permute(perm)

    def extra_repr(self) -> str:
        return f"perm={self.perm}"


class Squeeze(nn.Module):
    def __init__(self, axes: Sequence[int] | None) -> None:
        super().__init__()
        self.axes = tuple(axes) if axes is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.axes is None:
            return x.squeeze()
        return x.squeeze(tuple(_normalize_axis(a, x.dim()) for a in self.axes))

    def extra_repr(self) -> str:
        return f"axes={self.axes}"


class Unsqueeze(nn.Module):
    def __init__(self, axes: Sequence[int]) -> None:
        super().__init__()
        self.axes = tuple(axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = x.dim() + len(self.axes)
        for axis in sorted(_normalize_axis(a, rank) for a in self.axes):
            x = x.unsqueeze(axis)
        return x

    def extra_repr(self) -> str:
        return f"axes={self.axes}"


class ConcatWithConstants(nn.Module):
    """``Concat`` where some pieces are constants (buffers), e.g. ``[batch, -1]`` shapes."""

    def __init__(self, axis: int, pieces: Sequence[torch.Tensor | None]) -> None:
        super().__init__()
        self.axis = axis
        self.n_pieces = len(pieces)
        for i, piece in enumerate(pieces):
            self.register_buffer(f"piece_{i}", piece)

    def forward(self, *runtime: torch.Tensor) -> torch.Tensor:
        supplied = iter(runtime)
        pieces = []
        for i in range(self.n_pieces):
            buffer = getattr(self, f"piece_{i}")
            pieces.append(next(supplied) if buffer is None else buffer)
        return torch.cat(pieces, dim=self.axis)


class ShapeOf(nn.Module):
    """ONNX ``Shape`` (with ``start``/``end``) of a tensor whose shape is not static."""

    def __init__(self, start: int, end: int | None) -> None:
        super().__init__()
        self.start, self.end = start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(x.shape[self.start : self.end], dtype=torch.int64, device=x.device)


class SizeOf(nn.Module):
    """ONNX ``Size`` (element count) of a tensor whose shape is not static."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


class ConstantOfShape(nn.Module):
    value: torch.Tensor

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value.reshape(()))

    def forward(self, shape: torch.Tensor) -> torch.Tensor:
        dims = [int(v) for v in shape.tolist()]
        return torch.full(dims, self.value.item(), dtype=self.value.dtype, device=shape.device)


class Gather(nn.Module):
    """ONNX ``Gather``: ``data.shape[:axis] + indices.shape + data.shape[axis+1:]``."""

    indices: torch.Tensor | None

    def __init__(self, axis: int, indices: torch.Tensor | None) -> None:
        super().__init__()
        self.axis = axis
        self.register_buffer("indices", indices)

    def forward(self, data: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        idx = self.indices if indices is None else indices
        if idx is None:
            raise TypeError("Gather needs indices")
        axis = _normalize_axis(self.axis, data.dim())
        size = data.shape[axis]
        idx = idx.to(torch.int64)
        idx = torch.where(idx < 0, idx + size, idx)
        picked = torch.index_select(data, axis, idx.reshape(-1))
        return picked.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]))

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


def _slice(
    x: torch.Tensor,
    starts: Sequence[int],
    ends: Sequence[int],
    axes: Sequence[int],
    steps: Sequence[int],
) -> torch.Tensor:
    """ONNX ``Slice`` semantics: clamped bounds, negative indices and negative steps."""
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _normalize_axis(axis, x.dim())
        size = x.shape[axis]
        if step == 0:
            raise ValueError("Slice step must not be 0")
        if start < 0:
            start += size
        if end < 0:
            end += size
        if step > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
            if end <= start:
                x = x.narrow(axis, 0, 0)
                continue
            index = [slice(None)] * x.dim()
            index[axis] = slice(start, end, step)
            x = x[tuple(index)]
        else:
            # Negative steps: start clamps to [0, size-1], end to [-1, size-1] (-1: past 0).
            start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
            positions = torch.arange(start, end, step, device=x.device)
            x = torch.index_select(x, axis, positions)
    return x


class Slice(nn.Module):
    """ONNX ``Slice``. Parameters known at conversion time are stored; a parameter given as
    ``None`` is a run-time input (e.g. ``ends`` computed from a dynamic shape), passed after
    the data in the order starts, ends, axes, steps."""

    def __init__(
        self,
        starts: Sequence[int] | None,
        ends: Sequence[int] | None,
        axes: Sequence[int] | None,
        steps: Sequence[int] | None,
    ) -> None:
        super().__init__()
        self.params = tuple(
            tuple(p) if p is not None else None for p in (starts, ends, axes, steps)
        )

    def forward(self, x: torch.Tensor, *runtime: torch.Tensor) -> torch.Tensor:
        supplied = iter(runtime)
        starts, ends, axes, steps = (
            p if p is not None else tuple(int(v) for v in next(supplied).reshape(-1).tolist())
            for p in self.params
        )
        return _slice(x, starts, ends, axes, steps)

    def extra_repr(self) -> str:
        starts, ends, axes, steps = self.params
        return f"starts={starts}, ends={ends}, axes={axes}, steps={steps}"


class Split(nn.Module):
    def __init__(self, axis: int, sizes: Sequence[int] | None, n_outputs: int) -> None:
        super().__init__()
        self.axis = axis
        self.sizes = tuple(sizes) if sizes is not None else None
        self.n_outputs = n_outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.sizes is not None:
            return tuple(torch.split(x, list(self.sizes), dim=self.axis))
        # Equal parts; ONNX (opset 18) makes the last part smaller when the size does not divide.
        size = x.shape[_normalize_axis(self.axis, x.dim())]
        part = -(-size // self.n_outputs)
        return tuple(torch.split(x, part, dim=self.axis))


class Expand(nn.Module):
    """ONNX ``Expand`` broadcasts both ways (the target may have 1s where the input does not)."""

    def __init__(self, shape: Sequence[int] | None) -> None:
        super().__init__()
        self.shape = tuple(shape) if shape is not None else None

    def forward(self, x: torch.Tensor, shape: torch.Tensor | None = None) -> torch.Tensor:
        target = self.shape if shape is None else tuple(int(v) for v in shape.tolist())
        if target is None:
            raise TypeError("Expand needs a target shape")
        return x.expand(torch.broadcast_shapes(tuple(x.shape), target))


class Tile(nn.Module):
    def __init__(self, repeats: Sequence[int]) -> None:
        super().__init__()
        self.repeats = tuple(repeats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(self.repeats)


class Cast(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)

    def extra_repr(self) -> str:
        return str(self.dtype)


class Range(nn.Module):
    def forward(
        self, start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        return torch.arange(
            start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device
        )


class Pad(nn.Module):
    """``F.pad`` with ONNX modes; ``pads`` is already in torch order (last dim first)."""

    def __init__(self, pads: Sequence[int], mode: str, value: float) -> None:
        super().__init__()
        self.pads = tuple(pads)
        self.mode = mode
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "constant":
            return F.pad(x, self.pads, mode="constant", value=self.value)
        return F.pad(x, self.pads, mode=self.mode)

    def extra_repr(self) -> str:
        return f"pads={self.pads}, mode={self.mode}, value={self.value}"


class Reduce(nn.Module):
    """``ReduceMean``/``Sum``/``Max``/``Min``/``Prod``/``L1``/``L2``/``SumSquare``/``LogSumExp``.

    ``axes`` None reduces over every axis (ONNX's default when no axes are given).
    """

    def __init__(self, op: str, axes: Sequence[int] | None, keepdims: bool) -> None:
        super().__init__()
        self.op = op
        self.axes = tuple(axes) if axes is not None else None
        self.keepdims = keepdims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(x.dim())) if self.axes is None else self.axes
        keep = self.keepdims
        if self.op == "ReduceMean":
            return x.mean(dim=dims, keepdim=keep)
        if self.op == "ReduceSum":
            return x.sum(dim=dims, keepdim=keep)
        if self.op == "ReduceMax":
            return x.amax(dim=dims, keepdim=keep)
        if self.op == "ReduceMin":
            return x.amin(dim=dims, keepdim=keep)
        if self.op == "ReduceSumSquare":
            return (x * x).sum(dim=dims, keepdim=keep)
        if self.op == "ReduceL1":
            return x.abs().sum(dim=dims, keepdim=keep)
        if self.op == "ReduceL2":
            return (x * x).sum(dim=dims, keepdim=keep).sqrt()
        if self.op == "ReduceLogSumExp":
            return torch.logsumexp(x, dim=dims, keepdim=keep)
        out = x
        for d in sorted((_normalize_axis(a, x.dim()) for a in dims), reverse=True):
            out = out.prod(dim=d, keepdim=keep)
        return out

    def extra_repr(self) -> str:
        return f"{self.op}, axes={self.axes}, keepdims={self.keepdims}"


class CoercedSoftmax(nn.Module):
    """Softmax before opset 13: flatten to 2-D at ``axis``, normalize the second part."""

    def __init__(self, axis: int, log: bool) -> None:
        super().__init__()
        self.axis, self.log = axis, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = _normalize_axis(self.axis, x.dim())
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        out = F.log_softmax(flat, dim=1) if self.log else F.softmax(flat, dim=1)
        return out.reshape(x.shape)


class ArgExtreme(nn.Module):
    """``ArgMax``/``ArgMin`` (first occurrence of ties, as torch does)."""

    def __init__(self, op: str, axis: int, keepdims: bool) -> None:
        super().__init__()
        self.op, self.axis, self.keepdims = op, axis, keepdims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = torch.argmax if self.op == "ArgMax" else torch.argmin
        return fn(x, dim=self.axis, keepdim=self.keepdims)


# --------------------------------------------------------------------------------------------
# Converters: layers with weights
# --------------------------------------------------------------------------------------------


def _torch_pads(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """ONNX (x1_begin, x2_begin, ..., x1_end, ...) split in two -> F.pad's last-dim-first order."""
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends), strict=True):
        out += [b, e]
    return out


def _window_pads(
    n: NodeView, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Begin and end pads of a conv or pool, resolving ``auto_pad`` from the static input size."""
    spatial = len(kernel)
    auto_pad = n.attr("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        pads = n.ints("pads", [0] * 2 * spatial)
        return pads[:spatial], pads[spatial:]
    if auto_pad == "VALID":
        return [0] * spatial, [0] * spatial
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise n.error(f"unknown auto_pad {auto_pad!r}")
    shape = n.shapes[0]
    if shape is None or any(d is None for d in shape[2:]):
        raise n.error("auto_pad SAME needs a static input size")
    begins, ends = [], []
    for size, k, s, d in zip(shape[2:], kernel, strides, dilations, strict=True):
        assert size is not None
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else big)
        ends.append(big if auto_pad == "SAME_UPPER" else small)
    return begins, ends


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_BATCHNORM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_INSTANCENORM = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}
_GLOBAL_AVG = {3: nn.AdaptiveAvgPool1d, 4: nn.AdaptiveAvgPool2d, 5: nn.AdaptiveAvgPool3d}
_GLOBAL_MAX = {3: nn.AdaptiveMaxPool1d, 4: nn.AdaptiveMaxPool2d, 5: nn.AdaptiveMaxPool3d}


@converter("Conv")
def _conv(n: NodeView) -> Converted:
    weight = n.need_const(1, "the weight")
    bias = n.need_const(2, "the bias") if n.has(2) else None
    spatial = weight.dim() - 2
    if spatial not in _CONV:
        raise n.error(f"{spatial}-D convolution")
    kernel = list(weight.shape[2:])
    strides = n.ints("strides", [1] * spatial)
    dilations = n.ints("dilations", [1] * spatial)
    groups = int(n.attr("group", 1))
    begins, ends = _window_pads(n, kernel, strides, dilations)
    symmetric = begins == ends
    conv = nn.utils.skip_init(
        _CONV[spatial],
        weight.shape[1] * groups,
        weight.shape[0],
        kernel,
        stride=strides,
        padding=begins if symmetric else 0,
        dilation=dilations,
        groups=groups,
        bias=bias is not None,
    )
    conv.weight = _param(weight)
    if bias is not None:
        conv.bias = _param(bias)
    if symmetric:
        return Emit(conv)
    # nn.ConvNd pads both sides equally; TF-style SAME pads need the padding done first, inside
    # the conv module for 2-D (PaddedConv2d: LRP rules must see padding as padding)
    pads = _torch_pads(begins, ends)
    if isinstance(conv, nn.Conv2d) and len(pads) == 4:
        return Emit(with_zero_padding(conv, (pads[0], pads[1], pads[2], pads[3])))
    return Emit(nn.Sequential(Pad(pads, "constant", 0.0), conv))


def _linear(weight_out_in: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.utils.skip_init(
        nn.Linear, weight_out_in.shape[1], weight_out_in.shape[0], bias=bias is not None
    )
    linear.weight = _param(weight_out_in)
    if bias is not None:
        linear.bias = _param(bias)
    return linear


@converter("Gemm")
def _gemm(n: NodeView) -> Converted:
    alpha = float(n.attr("alpha", 1.0))
    beta = float(n.attr("beta", 1.0))
    trans_a, trans_b = bool(n.attr("transA", 0)), bool(n.attr("transB", 0))
    b, c = n.const(1), n.const(2) if n.has(2) else None
    if not trans_a and b is not None and n.const(0) is None and (not n.has(2) or c is not None):
        weight = b if trans_b else b.t()
        out_features = weight.shape[0]
        bias = None
        # C broadcast over rows only (a scalar or one value per output) is a Linear bias.
        row = c is not None and c.numel() in (1, out_features)
        if c is not None and row and (c.dim() < 2 or (c.dim() == 2 and c.shape[0] == 1)):
            bias = (beta * c.to(torch.float32)).reshape(-1).expand(out_features)
        if c is None or bias is not None:
            weight = weight.to(torch.float32)
            return Emit(_linear(alpha * weight if alpha != 1.0 else weight, bias))
    consts = [n.const(0), b] + ([c] if n.has(2) else [])
    module = Gemm(alpha, beta, trans_a, trans_b, consts)
    return Emit(module, tuple(i for i, v in enumerate(consts) if v is None))


@converter("MatMul")
def _matmul(n: NodeView) -> Converted:
    a, b = n.const(0), n.const(1)
    if a is None and b is not None and b.dim() == 2 and b.is_floating_point():
        # x @ W with a constant W is nn.Linear; a following constant Add becomes its bias.
        return Emit(_linear(b.t(), None))
    if a is None and b is None:
        return Emit(MatMul(), (0, 1))
    if a is None:
        return Emit(MatMul(b, constant_first=False), (0,))
    return Emit(MatMul(a, constant_first=True), (1,))


@converter("BatchNormalization")
def _batchnorm(n: NodeView) -> Converted:
    if int(n.attr("training_mode", 0)) != 0:
        raise n.error("training_mode=1 (batch statistics) is not an inference graph")
    if n.opset < 7 and not int(n.attr("spatial", 1)):
        raise n.error("spatial=0")
    scale = n.need_const(1, "scale")
    bias = n.need_const(2, "bias")
    mean = n.need_const(3, "running mean")
    var = n.need_const(4, "running variance")
    rank = n.rank(0) or 4
    if rank not in _BATCHNORM:
        raise n.error(f"input of rank {rank}")
    momentum = float(n.attr("momentum", 0.9))
    bn = _BATCHNORM[rank](
        scale.numel(), eps=float(n.attr("epsilon", 1e-5)), momentum=1.0 - momentum
    )
    bn.weight = _param(scale)
    bn.bias = _param(bias)
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        bn.running_mean.copy_(mean.to(torch.float32))
        bn.running_var.copy_(var.to(torch.float32))
    bn.eval()
    return Emit(bn)


@converter("InstanceNormalization")
def _instancenorm(n: NodeView) -> Converted:
    scale = n.need_const(1, "scale")
    bias = n.need_const(2, "bias")
    rank = n.rank(0) or 4
    if rank not in _INSTANCENORM:
        raise n.error(f"input of rank {rank}")
    norm = _INSTANCENORM[rank](scale.numel(), eps=float(n.attr("epsilon", 1e-5)), affine=True)
    norm.weight = _param(scale)
    norm.bias = _param(bias)
    return Emit(norm)


@converter("LayerNormalization")
def _layernorm(n: NodeView) -> Converted:
    scale = n.need_const(1, "scale")
    bias = n.need_const(2, "bias") if n.has(2) else None
    axis = int(n.attr("axis", -1))
    rank = n.rank(0)
    shape = n.shapes[0]
    if axis < 0 and rank is not None:
        axis += rank
    if axis >= 0 and shape is not None and all(d is not None for d in shape[axis:]):
        normalized = tuple(int(d) for d in shape[axis:] if d is not None)
    elif axis == -1 and scale.dim() == 1:
        normalized = (scale.numel(),)
    else:
        raise n.error("the normalized shape must be static")
    if tuple(scale.shape) != normalized:
        raise n.error(f"scale of shape {tuple(scale.shape)} over axes of shape {normalized}")
    norm = nn.LayerNorm(normalized, eps=float(n.attr("epsilon", 1e-5)), bias=bias is not None)
    norm.weight = _param(scale)
    if bias is not None:
        norm.bias = _param(bias.expand(normalized))
    if len(n.proto.output) > 1 and any(n.proto.output[1:]):
        raise n.error("the Mean/InvStdDev outputs are not supported")
    return Emit(norm)


@converter("PRelu")
def _prelu(n: NodeView) -> Converted:
    slope = n.need_const(1, "slope")
    rank = n.rank(0)
    # nn.PReLU applies one slope per channel (dim 1) or one for all; other shapes stay a Binary.
    squeezed = slope.reshape(-1)
    per_channel = rank is not None and rank >= 2 and slope.dim() == rank - 1
    if per_channel and all(d == 1 for d in slope.shape[1:]):
        prelu = nn.PReLU(num_parameters=squeezed.numel())
        prelu.weight = _param(squeezed)
        return Emit(prelu)
    if slope.numel() == 1:
        prelu = nn.PReLU(num_parameters=1)
        prelu.weight = _param(squeezed)
        return Emit(prelu)
    raise n.error(f"slope of shape {tuple(slope.shape)} for an input of rank {rank}")


# --------------------------------------------------------------------------------------------
# Converters: activations and pooling
# --------------------------------------------------------------------------------------------


@converter("Relu")
def _relu(n: NodeView) -> Converted:
    return Emit(nn.ReLU())


@converter("LeakyRelu")
def _leaky_relu(n: NodeView) -> Converted:
    return Emit(nn.LeakyReLU(float(n.attr("alpha", 0.01))))


@converter("Elu")
def _elu(n: NodeView) -> Converted:
    return Emit(nn.ELU(float(n.attr("alpha", 1.0))))


@converter("Celu")
def _celu(n: NodeView) -> Converted:
    return Emit(nn.CELU(float(n.attr("alpha", 1.0))))


@converter("Selu")
def _selu(n: NodeView) -> Converted:
    alpha = float(n.attr("alpha", 1.67326319217681884765625))
    gamma = float(n.attr("gamma", 1.05070102214813232421875))
    if abs(alpha - 1.6732632423543772) > 1e-6 or abs(gamma - 1.0507009873554805) > 1e-6:
        raise n.error(f"alpha={alpha}, gamma={gamma} (only the standard SELU)")
    return Emit(nn.SELU())


@converter("Sigmoid")
def _sigmoid(n: NodeView) -> Converted:
    return Emit(nn.Sigmoid())


@converter("Tanh")
def _tanh(n: NodeView) -> Converted:
    return Emit(nn.Tanh())


@converter("Softplus")
def _softplus(n: NodeView) -> Converted:
    return Emit(nn.Softplus())


@converter("Softsign")
def _softsign(n: NodeView) -> Converted:
    return Emit(nn.Softsign())


@converter("Mish")
def _mish(n: NodeView) -> Converted:
    return Emit(nn.Mish())


@converter("Gelu")
def _gelu(n: NodeView) -> Converted:
    return Emit(nn.GELU(approximate=str(n.attr("approximate", "none"))))


@converter("HardSigmoid")
def _hard_sigmoid(n: NodeView) -> Converted:
    alpha, beta = float(n.attr("alpha", 0.2)), float(n.attr("beta", 0.5))
    if abs(alpha - 1.0 / 6.0) < 1e-6 and abs(beta - 0.5) < 1e-6:
        return Emit(nn.Hardsigmoid())
    return Emit(HardSigmoid(alpha, beta))


@converter("HardSwish")
def _hard_swish(n: NodeView) -> Converted:
    return Emit(nn.Hardswish())


@converter("Clip")
def _clip(n: NodeView) -> Converted:
    if n.opset < 11:
        low: float | None = float(n.attr("min", -math.inf))
        high: float | None = float(n.attr("max", math.inf))
    else:
        low = float(n.need_const(1, "min").item()) if n.has(1) else None
        high = float(n.need_const(2, "max").item()) if n.has(2) else None
    low = None if low is None or low == -math.inf else low
    high = None if high is None or high == math.inf else high
    if low == 0.0 and high == 6.0:
        return Emit(nn.ReLU6())
    if low == 0.0 and high is None:
        return Emit(nn.ReLU())
    if low is not None and high is not None:
        return Emit(nn.Hardtanh(low, high))
    return Emit(Clamp(low, high))


@converter("Softmax", "LogSoftmax")
def _softmax(n: NodeView) -> Converted:
    log = n.op_type == "LogSoftmax"
    axis = int(n.attr("axis", -1 if n.opset >= 13 else 1))
    rank = n.rank(0)
    last = axis == -1 or (rank is not None and axis == rank - 1)
    if n.opset >= 13 or last:
        return Emit(nn.LogSoftmax(dim=axis) if log else nn.Softmax(dim=axis))
    return Emit(CoercedSoftmax(axis, log))


def _pool_geometry(
    n: NodeView,
) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    kernel = n.ints("kernel_shape", [])
    if not kernel:
        raise n.error("kernel_shape is required")
    spatial = len(kernel)
    if spatial not in _MAXPOOL:
        raise n.error(f"{spatial}-D pooling")
    strides = n.ints("strides", [1] * spatial)
    dilations = n.ints("dilations", [1] * spatial)
    begins, ends = _window_pads(n, kernel, strides, dilations)
    return kernel, strides, dilations, begins, ends


@converter("MaxPool")
def _maxpool(n: NodeView) -> Converted:
    if len(n.proto.output) > 1 and n.proto.output[1]:
        raise n.error("the Indices output is not supported")
    kernel, strides, dilations, begins, ends = _pool_geometry(n)
    ceil_mode = bool(n.attr("ceil_mode", 0))
    direct = begins == ends and all(2 * p <= k for p, k in zip(begins, kernel, strict=True))
    pool = _MAXPOOL[len(kernel)](
        tuple(kernel),
        stride=tuple(strides),
        padding=tuple(begins) if direct else 0,
        dilation=tuple(dilations),
        ceil_mode=ceil_mode,
    )
    if direct:
        return Emit(pool)
    pad = Pad(_torch_pads(begins, ends), "constant", -math.inf)
    return Emit(nn.Sequential(pad, pool))


@converter("AveragePool")
def _avgpool(n: NodeView) -> Converted:
    kernel, strides, dilations, begins, ends = _pool_geometry(n)
    if any(d != 1 for d in dilations):
        raise n.error("dilated average pooling")
    include_pad = bool(n.attr("count_include_pad", 0))
    ceil_mode = bool(n.attr("ceil_mode", 0))
    direct = begins == ends and all(2 * p <= k for p, k in zip(begins, kernel, strict=True))
    pool_cls = _AVGPOOL[len(kernel)]
    if direct:
        return Emit(
            pool_cls(
                kernel,
                stride=strides,
                padding=begins,
                ceil_mode=ceil_mode,
                count_include_pad=include_pad,
            )
        )
    if not include_pad:
        raise n.error("asymmetric padding with count_include_pad=0")
    pool = pool_cls(kernel, stride=strides, padding=0, ceil_mode=ceil_mode)
    return Emit(nn.Sequential(Pad(_torch_pads(begins, ends), "constant", 0.0), pool))


@converter("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(n: NodeView) -> Converted:
    rank = n.rank(0) or 4
    table = _GLOBAL_AVG if n.op_type == "GlobalAveragePool" else _GLOBAL_MAX
    if rank not in table:
        raise n.error(f"input of rank {rank}")
    return Emit(table[rank](1))


# --------------------------------------------------------------------------------------------
# Converters: element-wise arithmetic
# --------------------------------------------------------------------------------------------


@converter(*_UNARY)
def _unary(n: NodeView) -> Converted:
    return Emit(Unary(n.op_type))


def _binary(n: NodeView, op: str | None = None) -> Converted:
    op = op or n.op_type
    a, b = n.const(0), n.const(1)
    if a is None and b is None:
        return Emit(Add() if op == "Add" else Binary(op), (0, 1))
    if a is not None and b is not None:
        return Emit(Binary(op), (0, 1))  # both constant: the converter loop folds it
    if b is not None:
        return Emit(Binary(op, b, constant_first=False), (0,))
    assert a is not None
    return Emit(Binary(op, a, constant_first=True), (1,))


converter(
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Equal",
    "Less",
    "LessOrEqual",
    "Greater",
    "GreaterOrEqual",
    "And",
    "Or",
    "Xor",
)(_binary)


@converter("Mod")
def _mod_converter(n: NodeView) -> Converted:
    # fmod=1 keeps the dividend's sign (C fmod); fmod=0 the divisor's (Python's %).
    return _binary(n, "Fmod" if int(n.attr("fmod", 0)) else "Mod")


@converter("Sum", "Mean", "Max", "Min")
def _variadic(n: NodeView) -> Converted:
    count = len(n.inputs)
    if count == 1:
        return Alias(0)
    if count == 2 and n.op_type in ("Max", "Min"):
        return _binary(n)
    if n.op_type == "Sum" and all(c is None for c in n.consts):
        return Emit(Add(), tuple(range(count)))
    if any(c is not None for c in n.consts) and any(c is None for c in n.consts):
        raise n.error("a mix of constant and computed operands")
    return Emit(Variadic(n.op_type), tuple(range(count)))


@converter("Where")
def _where(n: NodeView) -> Converted:
    consts = [n.const(i) for i in range(3)]
    return Emit(Where(consts), tuple(i for i, c in enumerate(consts) if c is None))


# --------------------------------------------------------------------------------------------
# Converters: shapes, layout, constants
# --------------------------------------------------------------------------------------------


@converter("Identity")
def _identity(n: NodeView) -> Converted:
    return Alias(0)


@converter("Dropout")
def _dropout(n: NodeView) -> Converted:
    # Inference semantics: Dropout is the identity (the mask output must be unused).
    if len(n.proto.output) > 1 and n.proto.output[1]:
        raise n.error("the mask output is not supported")
    return Alias(0)


@converter("Constant")
def _constant(n: NodeView) -> Converted:
    attrs = n.attrs
    if "value" in attrs:
        value = attrs["value"]
        assert isinstance(value, torch.Tensor)
        return Fold((value,))
    if "value_float" in attrs:
        return Fold((torch.tensor(float(attrs["value_float"]), dtype=torch.float32),))
    if "value_floats" in attrs:
        return Fold((torch.tensor([float(v) for v in attrs["value_floats"]]),))
    if "value_int" in attrs:
        return Fold((torch.tensor(int(attrs["value_int"]), dtype=torch.int64),))
    if "value_ints" in attrs:
        return Fold((torch.tensor([int(v) for v in attrs["value_ints"]], dtype=torch.int64),))
    raise n.error("only tensor, float(s) and int(s) values are supported")


@converter("ConstantOfShape")
def _constant_of_shape(n: NodeView) -> Converted:
    value = n.attr("value")
    fill = value if isinstance(value, torch.Tensor) else torch.zeros(1, dtype=torch.float32)
    return Emit(ConstantOfShape(fill))


@converter("Shape")
def _shape(n: NodeView) -> Converted:
    start = int(n.attr("start", 0))
    end_attr = n.attr("end")
    end = int(end_attr) if end_attr is not None else None
    shape = n.shapes[0]
    if shape is not None and all(d is not None for d in shape[start:end]):
        # Only the requested dims need be static (Python slicing clamps like ONNX does).
        return Fold((torch.tensor(shape[start:end], dtype=torch.int64),))
    return Emit(ShapeOf(start, end))


@converter("Size")
def _size(n: NodeView) -> Converted:
    shape = n.shapes[0]
    if shape is not None and all(d is not None for d in shape):
        return Fold((torch.tensor(math.prod(d for d in shape if d is not None)),))
    return Emit(SizeOf())


@converter("Cast")
def _cast(n: NodeView) -> Converted:
    to = int(n.attr("to"))
    if to not in _DTYPES:
        raise n.error(f"cast to element type {to}")
    return Emit(Cast(_DTYPES[to]))


@converter("Reshape")
def _reshape(n: NodeView) -> Converted:
    allowzero = bool(n.attr("allowzero", 0))
    if n.opset < 5:
        return Emit(Reshape(n.ints("shape", []), allowzero))
    shape = n.const(1)
    partial = n.partial(1)
    if (
        shape is None
        and partial is not None
        and n.batch_first[:1] == [True]
        and partial.unknown_elements() == [0]
        and bool(partial.batch.reshape(-1)[0])
    ):
        # (batch, ...) read from the input's own shape (Keras Flatten, x.view(x.size(0), -1)):
        # a constant reshape that keeps the batch, with no shape ops left to run (or to export).
        target = [int(v) for v in partial.value.reshape(-1).tolist()]
        return Emit(Reshape(target, allowzero, keep_batch=True))
    if shape is None:
        return Emit(Reshape(None, allowzero), (0, 1))
    target = [int(v) for v in shape.tolist()]
    # A fixed-batch export's reshape of a batch-first tensor to (batch, ...): keep it per image
    # so the graph runs any batch size (the converter still probes that it does).
    keep_batch = bool(
        n.fixed_batch is not None and n.batch_first[0] and target and target[0] == n.fixed_batch
    )
    return Emit(Reshape(target, allowzero, keep_batch))


@converter("Flatten")
def _flatten(n: NodeView) -> Converted:
    axis = int(n.attr("axis", 1))
    if axis == 1:
        # nn.Flatten(1) is ONNX Flatten(axis=1) for every rank >= 2 (rank 1 does not occur).
        return Emit(nn.Flatten(1))
    return Emit(Flatten(axis))


@converter("Transpose")
def _transpose(n: NodeView) -> Converted:
    perm = n.attr("perm")
    return Emit(Transpose([int(p) for p in perm] if perm is not None else None))


@converter("Squeeze")
def _squeeze(n: NodeView) -> Converted:
    axes = n.attr("axes") if n.opset < 13 else n.const_ints(1, "axes")
    return Emit(Squeeze([int(a) for a in axes] if axes is not None else None))


@converter("Unsqueeze")
def _unsqueeze(n: NodeView) -> Converted:
    axes = n.attr("axes") if n.opset < 13 else n.const_ints(1, "axes")
    if axes is None:
        raise n.error("axes are required")
    return Emit(Unsqueeze([int(a) for a in axes]))


@converter("Concat")
def _concat(n: NodeView) -> Converted:
    axis = int(n.attr("axis", 1))
    consts = [n.const(i) for i in range(len(n.inputs))]
    runtime = tuple(i for i, c in enumerate(consts) if c is None)
    if len(runtime) == len(consts) or not runtime:
        return Emit(Concat(axis), tuple(range(len(consts))))
    return Emit(ConcatWithConstants(axis, consts), runtime)


@converter("Gather")
def _gather(n: NodeView) -> Converted:
    axis = int(n.attr("axis", 0))
    indices = n.const(1)
    if indices is None:
        return Emit(Gather(axis, None), (0, 1))
    return Emit(Gather(axis, indices.to(torch.int64)))


@converter("Slice")
def _slice_converter(n: NodeView) -> Converted:
    if n.opset < 10:
        starts, ends = n.ints("starts", []), n.ints("ends", [])
        axes = n.ints("axes", list(range(len(starts))))
        return Emit(Slice(starts, ends, axes, [1] * len(starts)))
    params: list[list[int] | None] = []
    runtime = [0]
    for i in (1, 2):
        value = n.const(i)
        params.append([int(v) for v in value.reshape(-1).tolist()] if value is not None else None)
        if value is None:
            runtime.append(i)
    known = next((p for p in params if p is not None), None)
    count = len(known) if known is not None else None
    starts_shape = n.shapes[1]
    if count is None and starts_shape is not None and len(starts_shape) == 1:
        count = starts_shape[0]  # static length of computed starts
    for i, default in ((3, "axes"), (4, "steps")):
        if not n.has(i):
            if count is None:
                raise n.error(f"{default} must be given when starts and ends are computed")
            params.append(list(range(count)) if default == "axes" else [1] * count)
            continue
        value = n.const(i)
        params.append([int(v) for v in value.reshape(-1).tolist()] if value is not None else None)
        if value is None:
            runtime.append(i)
    return Emit(Slice(*params), tuple(runtime))


@converter("Split")
def _split(n: NodeView) -> Converted:
    axis = int(n.attr("axis", 0))
    if n.opset < 13:
        sizes: list[int] | None = n.ints("split", []) or None
    else:
        sizes = n.const_ints(1, "split")
    count = len(n.proto.output)
    if sizes is not None and len(sizes) != count:
        raise n.error(f"{len(sizes)} split sizes for {count} outputs")
    return Emit(Split(axis, sizes, count), (0,), n_outputs=count)


@converter("Expand")
def _expand(n: NodeView) -> Converted:
    shape = n.const(1)
    if shape is None:
        return Emit(Expand(None), (0, 1))
    return Emit(Expand([int(v) for v in shape.tolist()]))


@converter("Tile")
def _tile(n: NodeView) -> Converted:
    repeats = n.const_ints(1, "repeats")
    if repeats is None:
        raise n.error("repeats are required")
    return Emit(Tile(repeats))


@converter("Range")
def _range(n: NodeView) -> Converted:
    return Emit(Range(), (0, 1, 2))


@converter("Pad")
def _pad(n: NodeView) -> Converted:
    mode = str(n.attr("mode", "constant"))
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if mode == "wrap":
        torch_mode = "circular"
    if torch_mode is None:
        raise n.error(f"mode {mode!r}")
    if n.opset < 11:
        pads = n.ints("pads", [])
        value = float(n.attr("value", 0.0))
        axes: list[int] | None = None
    else:
        pads = n.const_ints(1, "pads") or []
        value = float(n.need_const(2, "constant_value").item()) if n.has(2) else 0.0
        axes = n.const_ints(3, "axes")
    rank = n.rank(0)
    if axes is None:
        if rank is None:
            rank = len(pads) // 2
        axes = list(range(rank))
    elif rank is None:
        raise n.error("padding selected axes needs the input rank")
    half = len(pads) // 2
    if half != len(axes):
        raise n.error(f"{len(pads)} pads for {len(axes)} axes")
    begins_by_axis = {_normalize_axis(a, rank): pads[i] for i, a in enumerate(axes)}
    ends_by_axis = {_normalize_axis(a, rank): pads[half + i] for i, a in enumerate(axes)}
    # F.pad takes pairs from the last dim backwards; leading dims without padding are omitted.
    padded = [a for a in range(rank) if begins_by_axis.get(a) or ends_by_axis.get(a)]
    first = min(padded, default=rank)
    begins = [begins_by_axis.get(a, 0) for a in range(first, rank)]
    ends = [ends_by_axis.get(a, 0) for a in range(first, rank)]
    if not begins:
        return Alias(0)
    return Emit(Pad(_torch_pads(begins, ends), torch_mode, value))


_REDUCE_AXES_AS_INPUT = {  # opset from which each reduction takes axes as an input
    "ReduceSum": 13,
    "ReduceMean": 18,
    "ReduceMax": 18,
    "ReduceMin": 18,
    "ReduceProd": 18,
    "ReduceL1": 18,
    "ReduceL2": 18,
    "ReduceSumSquare": 18,
    "ReduceLogSumExp": 18,
}


@converter(*_REDUCE_AXES_AS_INPUT)
def _reduce(n: NodeView) -> Converted:
    keepdims = bool(n.attr("keepdims", 1))
    if n.opset >= _REDUCE_AXES_AS_INPUT[n.op_type]:
        axes = n.const_ints(1, "axes")
        if not axes:  # absent or empty
            if int(n.attr("noop_with_empty_axes", 0)):
                return Alias(0)
            axes = None
    else:
        raw = n.attr("axes")
        axes = [int(a) for a in raw] if raw is not None else None
    rank = n.rank(0)
    if (
        n.op_type == "ReduceMean"
        and keepdims
        and rank == 4
        and axes is not None
        and sorted(_normalize_axis(a, 4) for a in axes) == [2, 3]
    ):
        # Global average pooling in disguise (dynamo exports write mean() this way): the same
        # module as GlobalAveragePool, so both exporters give attribution rules the same graph.
        return Emit(nn.AdaptiveAvgPool2d(1))
    return Emit(Reduce(n.op_type, axes, keepdims))


@converter("ArgMax", "ArgMin")
def _arg_extreme(n: NodeView) -> Converted:
    if int(n.attr("select_last_index", 0)):
        raise n.error("select_last_index=1")
    return Emit(ArgExtreme(n.op_type, int(n.attr("axis", 0)), bool(n.attr("keepdims", 1))))
