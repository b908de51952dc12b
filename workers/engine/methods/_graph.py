"""The autograd graph of one forward pass, read as a network of operations.

Guided Backprop (Springenberg et al. 2015) is defined by what it does at a rectifier: the
gradient arriving at a ReLU's output is clamped at zero before the ReLU's own backward. Hooking
``nn.ReLU`` modules (Captum's way) silently misses every rectifier that is not such a module:
``F.relu`` in ``forward`` (Inception, GoogLeNet, DenseNet's head), ``nn.ReLU6`` and ONNX's
``Clip(0, 6)`` (MobileNet, EfficientNet-Lite), and the method then degrades to the plain
gradient without a word. Here the rule is applied to the *autograd nodes* of one forward pass,
whatever code created them, and the same walk tells whether the network has nonlinearities for
which Guided Backprop has no rule (SiLU, GELU, sigmoid gates, LayerNorm, attention): then the
method is not applicable, never a silent gradient.

Node kinds (by the autograd node's type; ``torch.autograd.graph.Node``):

* **rectifiers** (the guided rule applies): ``ReLU``, ``Hardtanh``/``Clamp`` with lower bound 0
  (ReLU6, ``Clip(0, c)``, ``clamp(min=0)``), ``Threshold`` at 0, and the piecewise-linear leaky
  variants ``LeakyReLU`` and ``PReLU``, for which the rule is defined the same way (the arriving
  gradient clamped at zero, then the activation's own derivative);
* **selections**: max pooling and max/min reductions, which route the gradient to the winning
  input (piecewise linear, as in the paper's networks);
* **linear**: convolutions, matrix products with a constant operand, sums, means, average
  pooling, BatchNorm in eval mode, products and quotients with a constant, and every node that
  only moves values (view, permute, cat, slice, pad, upsample, ...);
* everything else is a nonlinearity without a guided rule.

Parameters must not require grad during the forward pass whose graph is read (see
:func:`frozen_parameters`): an operand then requires grad exactly when it depends on the input,
which is how a product of two activations (a gate) is told from a product with a weight.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Node = Any  # torch.autograd.graph.Node; its subclasses are generated per operation

_RECTIFIERS = frozenset(
    {
        "ReluBackward0",
        "ReluBackward1",
        "LeakyReluBackward0",
        "LeakyReluBackward1",
        "PreluKernelBackward0",
        "PreluBackward0",
    }
)
# rectifiers only when their lower bound is 0 (read from the node's saved arguments)
_BOUNDED = {
    "HardtanhBackward0": "_saved_min_val",
    "HardtanhBackward1": "_saved_min_val",
    "ClampBackward0": "_saved_min",
    "ClampBackward1": "_saved_min",
    "ClampMinBackward0": "_saved_min",
    "ThresholdBackward0": "_saved_threshold",
    "ThresholdBackward1": "_saved_threshold",
}
_SELECTIONS = (
    "MaxPool",
    "AdaptiveMaxPool",
    "MaxBackward",
    "MinBackward",
    "AmaxBackward",
    "AminBackward",
    "MaximumBackward",
    "MinimumBackward",
    "FmaxBackward",
    "FminBackward",
)
# node types that are linear in every operand that requires grad
_LINEAR = (
    "Convolution",
    "Addmm",
    "AddBackward",
    "SubBackward",
    "NegBackward",
    "RsubBackward",
    "MeanBackward",
    "SumBackward",
    "AvgPool",
    "AdaptiveAvgPool",
    "NativeBatchNormBackward",
    "CudnnBatchNormBackward",
    "MiopenBatchNormBackward",
    "ViewBackward",
    "ReshapeAlias",
    "UnsafeViewBackward",
    "PermuteBackward",
    "TransposeBackward",
    "TBackward",
    "ExpandBackward",
    "SqueezeBackward",
    "UnsqueezeBackward",
    "CatBackward",
    "StackBackward",
    "SplitBackward",
    "SplitWithSizesBackward",
    "UnbindBackward",
    "SelectBackward",
    "SliceBackward",
    "IndexBackward",
    "IndexSelectBackward",
    "GatherBackward",
    "NarrowBackward",
    "CloneBackward",
    "ToCopyBackward",
    "AliasBackward",
    "ConstantPadNdBackward",
    "ReflectionPad",
    "ReplicationPad",
    "RollBackward",
    "AsStridedBackward",
    "FlipBackward",
    "RepeatBackward",
    "UpsampleBilinear",
    "UpsampleNearest",
    "UpsampleBicubic",
    "Im2ColBackward",
    "Col2ImBackward",
    "PixelShuffleBackward",
    "PixelUnshuffleBackward",
    "ChannelShuffleBackward",
    "AccumulateGrad",
)
# linear only while all but one operand is constant (products of two activations are not)
_BILINEAR = ("MulBackward", "MmBackward", "BmmBackward", "MatmulBackward", "DotBackward")
_BILINEAR_STEMS = tuple(b.removesuffix("Backward") for b in _BILINEAR)

# readable names for the report ("SiluBackward0" -> "SiLU")
_READABLE = {
    "Silu": "SiLU",
    "Gelu": "GELU",
    "Hardswish": "Hardswish",
    "Hardsigmoid": "Hardsigmoid",
    "Sigmoid": "Sigmoid",
    "Tanh": "Tanh",
    "NativeLayerNorm": "LayerNorm",
    "NativeGroupNorm": "GroupNorm",
    "Softmax": "Softmax",
    "LogSoftmax": "LogSoftmax",
    "Elu": "ELU",
    "Softplus": "Softplus",
    "Mish": "Mish",
    "Erf": "Erf",
    "Exp": "Exp",
    "Pow": "Pow",
    "Sqrt": "Sqrt",
    "Rsqrt": "Rsqrt",
}


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad for the ``with`` block; the flags are restored after.

    Attribution never needs weight gradients, and with the weights frozen a tensor requires
    grad exactly when it depends on the input.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def nodes_of(output: torch.Tensor) -> list[Node]:
    """Every autograd node that ``output`` depends on (iterative walk: graphs are deep)."""
    root = output.grad_fn
    seen: set[Node] = set()
    order: list[Node] = []
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        order.append(node)
        stack.extend(f for f, _ in node.next_functions if f is not None and f not in seen)
    return order


def _saved_zero(node: Node, attribute: str) -> bool:
    value = getattr(node, attribute, None)
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and float(value) == 0.0
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def _kind(node: Node) -> str:
    """``rectifier``, ``selection``, ``linear`` or ``nonlinear`` (see the module docstring)."""
    name = type(node).__name__
    if name in _RECTIFIERS:
        return "rectifier"
    if name in _BOUNDED:
        return "rectifier" if _saved_zero(node, _BOUNDED[name]) else "nonlinear"
    if name.startswith(_SELECTIONS):
        return "selection"
    if name.startswith(_LINEAR):
        return "linear"
    if name.startswith(_BILINEAR):
        runtime = sum(1 for f, _ in node.next_functions if f is not None)
        return "linear" if runtime <= 1 else "nonlinear"
    if name.startswith("DivBackward"):
        # a / b is linear in a while b is constant: the divisor is the second operand
        functions = node.next_functions
        return "linear" if len(functions) < 2 or functions[1][0] is None else "nonlinear"
    return "nonlinear"


def readable(node_type: str) -> str:
    """A user-facing name for a nonlinear node type."""
    stem = node_type.removesuffix("Backward0").removesuffix("Backward1")
    for key, label in _READABLE.items():
        if stem.startswith(key):
            return label
    if stem.startswith(_BILINEAR_STEMS):
        return "product of two activations"
    if stem.startswith("Div"):
        return "division by an activation"
    if stem.startswith("ScaledDotProduct"):
        return "attention"
    return stem


class RectifierGraph:
    """The rectifiers of one forward pass, with a switchable guided-backprop rule.

    ``unsupported`` counts the nonlinearities that have no guided rule (readable name ->
    number of nodes). :meth:`guide` registers a pre-hook on every rectifier node that clamps
    the arriving gradient at zero while :attr:`guided` is True, so one graph serves an ordinary
    and a guided backward pass.
    """

    def __init__(self, output: torch.Tensor) -> None:
        self.nodes = nodes_of(output)
        self.rectifiers: list[Node] = []
        self.unsupported: Counter[str] = Counter()
        for node in self.nodes:
            kind = _kind(node)
            if kind == "rectifier":
                self.rectifiers.append(node)
            elif kind == "nonlinear":
                self.unsupported[readable(type(node).__name__)] += 1
        self.guided = True
        self._handles: list[Any] = []

    def describe_unsupported(self, limit: int = 6) -> str:
        parts = [f"{name} ({count}x)" for name, count in self.unsupported.most_common(limit)]
        if len(self.unsupported) > limit:
            parts.append(f"{len(self.unsupported) - limit} more kinds")
        return ", ".join(parts)

    def _clamp(self, grad_outputs: tuple[torch.Tensor | None, ...]) -> Any:
        if not self.guided:
            return None
        return tuple(F.relu(g) if g is not None else None for g in grad_outputs)

    @contextmanager
    def guide(self) -> Iterator[RectifierGraph]:
        self._handles = [node.register_prehook(self._clamp) for node in self.rectifiers]
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def rectifiers_above(self, node: Node) -> int:
        """How many rectifiers lie on a path from the output down to ``node`` (e.g. after the
        CAM layer): if none, guided and ordinary gradients at ``node`` are the same."""
        reaches: dict[Node, bool] = {}
        # iterative post-order: a node reaches ``node`` when it is it or a child reaches it
        stack: list[tuple[Node, bool]] = [(self.nodes[0], False)] if self.nodes else []
        while stack:
            current, expanded = stack.pop()
            if current in reaches:
                continue
            children = [f for f, _ in current.next_functions if f is not None]
            if not expanded:
                stack.append((current, True))
                stack.extend((c, False) for c in children if c not in reaches)
                continue
            reaches[current] = current is node or any(reaches.get(c, False) for c in children)
        return sum(1 for r in self.rectifiers if reaches.get(r, False) and r is not node)
