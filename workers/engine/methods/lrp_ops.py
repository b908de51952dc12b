"""Relevance rules for the operations LRP meets outside Zennit's module rules.

Zennit attaches LRP rules to *modules* (conv, linear, pooling, BatchNorm, activations). Real
classifiers also compute in ``forward`` with plain tensor operations, and plain autograd is the
wrong rule for most of them: a residual ``x + f(x)`` hands the full relevance to both branches
(it doubles), a squeeze-excitation gate ``s * sigmoid(g)`` scales relevance by the gate and
sends a share into the gate's branch, a saturated ReLU6 drops it, an attention ``softmax(q k^T)
v`` or a LayerNorm mixes gradients that are not contributions. On real models (MobileNet,
EfficientNet, ConvNeXt, ViT) the input relevance then sums to anything from 1e-9 to 1e24 times
the explained logit.

:class:`RelevanceRules` is a ``TorchFunctionMode``: while the LRP forward pass runs, it sees
every ``torch`` function call (module internals included) and replaces the backward of the ones
listed below with an LRP rule; the forward values are computed by the original function, so
the model's output is unchanged (checked by the callers). Inside a module that a Zennit rule
already explains, nothing is replaced (the module rule decides there).

Rules (the z-rule below is LRP-0 with a tiny stabilizer, Bach et al. 2015, eq. 56; "bias
excluded" as everywhere in this engine, see :mod:`.lrp`):

* **activations** (ReLU, ReLU6 / clamp, SiLU, GELU, Hardswish, ELU, Mish, LeakyReLU,
  Softplus) and **normalizations** (LayerNorm, GroupNorm, BatchNorm, ``F.normalize``) called as
  functions: identity ("Pass", as Zennit gives activation modules and as AttnLRP, Achtibat et
  al. 2024, sec. 3.3, gives LayerNorm's normalization). An element-wise map conserves relevance
  this way; a normalization's scale is treated as a constant (Ali et al. 2022, CP-LRP).
* **sums of two activations** (residual connections, ``a + b``, ``a - b``): z-rule, relevance
  split in proportion to each operand's contribution (Zennit's ``Norm`` rule for ``Sum``).
  A constant added to an activation is a bias: identity for the activation.
* **products of two activations**: if one of them is a *gate* (the output of a sigmoid,
  hard-sigmoid, tanh, erf or softmax, possibly reshaped or shifted/scaled by constants; also the
  divisor of a quotient), the other operand takes all the relevance and the gate none
  ("signal-take-all", Arras et al. 2017, LSTM-LRP): SiLU ``x * sigmoid(x)``, squeeze-excitation,
  GELU's ``x * (1 + erf(.)) / 2`` and attention ``softmax(q k^T) v`` (with the attention weights
  treated as constants, as in CP-LRP and AttnLRP). Without a gate, the z-rule relevance is
  split evenly between the two operands (AttnLRP's uniform rule for a product).
* **linear maps with constant weights** called as functions (``F.linear``, ``matmul`` or
  ``einsum`` with a weight, products with a constant, means, sums, average pooling,
  interpolation): z-rule with the bias left out.
* ``F.multi_head_attention_forward`` and ``F.scaled_dot_product_attention`` are decomposed into
  the value projection, the attention weights (a gate) and the output projection.

Max pooling and other selections keep their gradient (winner takes all), which conserves.
Whatever else escapes these rules shows up in the conservation figure every LRP result
reports (:func:`.lrp.lrp_relevance`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from zennit.core import Composite, stabilize

STABILIZER = 1e-6

Handler = Callable[["RelevanceRules", Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


@dataclass(frozen=True)
class _Spec:
    """One replaced operation: ``forward`` computes it as the model does (constants and biases
    included); ``contribution`` is the map whose z-rule distributes relevance (biases left out),
    or None for the identity rule; ``shares[i]`` scales what input ``i`` receives."""

    forward: Callable[..., Tensor]
    contribution: Callable[..., Tensor] | None
    shares: tuple[float, ...]


class _Rule(torch.autograd.Function):
    """Forward: ``spec.forward(*inputs)``. Backward (relevance in, relevance out): identity, or
    ``R_i = share_i * x_i * d/dx_i [z . (R / stabilize(z))]`` with ``z = contribution(x)``."""

    @staticmethod
    def forward(ctx: Any, spec: _Spec, *inputs: Tensor) -> Tensor:
        ctx.spec = spec
        ctx.save_for_backward(*inputs)
        return spec.forward(*inputs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:
        (relevance,) = grads
        spec: _Spec = ctx.spec
        inputs = ctx.saved_tensors
        if spec.contribution is None:
            return (None, relevance, *(None for _ in inputs[1:]))
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(True) for x in inputs]
            z = spec.contribution(*leaves)
            gradients = torch.autograd.grad(
                z, leaves, relevance / stabilize(z.detach(), STABILIZER), allow_unused=True
            )
        out: list[Tensor | None] = [None]
        for share, x, g in zip(spec.shares, inputs, gradients, strict=True):
            out.append(None if g is None or share == 0 else share * x * g)
        return tuple(out)


def _apply(spec: _Spec, *inputs: Tensor) -> Tensor:
    result = _Rule.apply(spec, *inputs)
    assert isinstance(result, Tensor)
    return result


def _runtime(value: Any) -> bool:
    """An activation: a tensor that depends on the input (weights are frozen meanwhile)."""
    return isinstance(value, Tensor) and value.requires_grad


class RelevanceRules(TorchFunctionMode):
    """The rules of the module docstring, active for the forward pass run inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self._gates: dict[int, Tensor] = {}
        self.suspended = 0  # > 0 inside a module a Zennit rule explains
        self.replaced = 0  # operations given a rule (for tests and diagnostics)

    def is_gate(self, value: Any) -> bool:
        return isinstance(value, Tensor) and self._gates.get(id(value)) is value

    def mark_gate(self, value: Any) -> None:
        if isinstance(value, Tensor):
            self._gates[id(value)] = value
        elif isinstance(value, tuple | list):
            for item in value:
                self.mark_gate(item)

    def clear(self) -> None:
        self._gates.clear()

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if self.suspended:
            return func(*args, **kwargs)
        handler = _HANDLERS.get(func)
        if handler is not None:
            result = handler(self, func, args, kwargs)
            if result is not NotImplemented:
                return result
        out = func(*args, **kwargs)
        if func in _GATE_CARRIERS and args and self.is_gate(args[0]):
            self.mark_gate(out)
        return out


# --------------------------------------------------------------------------- handlers


def _bind(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return bound


def _out_of_place(func: Callable[..., Any]) -> Callable[..., Any]:
    """The out-of-place twin of an in-place operation (``Tensor.relu_`` -> ``Tensor.relu``):
    a rule must not overwrite the activation its backward needs."""
    return _OUT_OF_PLACE.get(func, func)


def _identity_rule(gate: bool) -> Handler:
    def handler(
        mode: RelevanceRules, func: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]
    ) -> Any:
        if not args or not _runtime(args[0]):
            out = func(*args, **kw)
        else:
            target = _out_of_place(func)
            if "inplace" in kw:
                kw = {**kw, "inplace": False}
            position = _INPLACE_POSITION.get(func)
            if position is not None and len(args) > position:
                args = (*args[:position], False, *args[position + 1 :])
            rest, kwargs = args[1:], kw

            def forward(x: Tensor) -> Tensor:
                return target(x, *rest, **kwargs)

            out = _apply(_Spec(forward, None, (1.0,)), args[0])
            if out.shape != args[0].shape:  # not element-wise after all: plain autograd
                out = target(*args, **kwargs)
            else:
                mode.replaced += 1
        if gate:
            mode.mark_gate(out)
        return out

    return handler


def _reflected_sub(p: Any, q: Tensor) -> Tensor:
    return torch.rsub(q, p)  # p - q


def _reflected_div(p: Any, q: Tensor) -> Tensor:
    return torch.div(torch.as_tensor(p, dtype=q.dtype, device=q.device), q)


def _binary_operands(
    func: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]
) -> tuple[Any, Any, Callable[[Any, Any], Tensor]] | None:
    """(a, b, op) with ``op(a, b)`` the operation, for add/sub/mul/div-like calls."""
    extra = {k: v for k, v in kw.items() if k != "other"}
    if len(args) < 2:
        if "other" not in kw or not args:
            return None
        args = (args[0], kw["other"])
    a, b, rest = args[0], args[1], args[2:]
    reflected = _REFLECTED.get(func)
    if reflected is not None:  # Tensor.__rsub__(x, c) computes c - x
        return b, a, reflected
    target = _out_of_place(func)

    def op(p: Any, q: Any) -> Tensor:
        return target(p, q, *rest, **extra)

    return a, b, op


def _zeros_like(value: Any) -> Any:
    return torch.zeros_like(value) if isinstance(value, Tensor) else 0.0


def _additive(mode: RelevanceRules, func: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    parsed = _binary_operands(func, args, kw)
    if parsed is None:
        return NotImplemented
    a, b, op = parsed
    ra, rb = _runtime(a), _runtime(b)
    if not (ra or rb):
        return NotImplemented
    mode.replaced += 1
    if ra and rb:  # a residual connection: proportional split (Zennit's Norm for a Sum)
        return _apply(_Spec(op, op, (1.0, 1.0)), a, b)
    return _one_activation(mode, op, a, b, bias=True)


def _one_activation(
    mode: RelevanceRules, op: Callable[[Any, Any], Tensor], a: Any, b: Any, *, bias: bool
) -> Tensor:
    """``op(a, b)`` where one operand is an activation and the other a constant: the z-rule on
    the activation, a constant that is added being a bias (left out of the contribution); the
    result is a gate when the activation is one."""
    if _runtime(a):
        source, const = a, b

        def forward(x: Tensor) -> Tensor:
            return op(x, const)

        def contribution(x: Tensor) -> Tensor:
            return op(x, _zeros_like(const) if bias else const)
    else:
        source, const = b, a

        def forward(x: Tensor) -> Tensor:
            return op(const, x)

        def contribution(x: Tensor) -> Tensor:
            return op(_zeros_like(const) if bias else const, x)

    out = _apply(_Spec(forward, contribution, (1.0,)), source)
    if mode.is_gate(source):
        mode.mark_gate(out)
    return out


def _gate_shares(mode: RelevanceRules, a: Tensor, b: Tensor) -> tuple[float, float]:
    if mode.is_gate(a) and not mode.is_gate(b):
        return 0.0, 1.0
    if mode.is_gate(b) and not mode.is_gate(a):
        return 1.0, 0.0
    return 0.5, 0.5


def _multiplicative(
    mode: RelevanceRules, func: Any, args: tuple[Any, ...], kw: dict[str, Any]
) -> Any:
    parsed = _binary_operands(func, args, kw)
    if parsed is None:
        return NotImplemented
    a, b, op = parsed
    ra, rb = _runtime(a), _runtime(b)
    if not (ra or rb):
        return NotImplemented
    mode.replaced += 1
    if ra and rb:
        return _apply(_Spec(op, op, _gate_shares(mode, a, b)), a, b)
    return _one_activation(mode, op, a, b, bias=False)


def _division(mode: RelevanceRules, func: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    parsed = _binary_operands(func, args, kw)
    if parsed is None:
        return NotImplemented
    a, b, op = parsed
    ra, rb = _runtime(a), _runtime(b)
    if ra and rb:  # a normalization: the divisor is a gate, the numerator takes it all
        mode.replaced += 1
        return _apply(_Spec(op, op, (1.0, 0.0)), a, b)
    if ra:
        mode.replaced += 1
        return _one_activation(mode, op, a, b, bias=False)
    if rb:  # constant / activation: a normalizer, never a signal
        out = op(a, b)
        mode.mark_gate(out)
        return out
    return NotImplemented


def _bilinear_map(
    mode: RelevanceRules, func: Any, args: tuple[Any, ...], kw: dict[str, Any]
) -> Any:
    """matmul / mm / bmm: z-rule on the activation(s), a gate operand taking nothing."""
    if len(args) < 2:
        return NotImplemented
    a, b = args[0], args[1]
    rest = args[2:]
    target = _out_of_place(func)
    ra, rb = _runtime(a), _runtime(b)
    if not (ra or rb):
        return NotImplemented
    mode.replaced += 1

    def op(p: Tensor, q: Tensor) -> Tensor:
        return target(p, q, *rest, **kw)

    if ra and rb:
        return _apply(_Spec(op, op, _gate_shares(mode, a, b)), a, b)
    if ra:
        return _apply(_Spec(lambda x: op(x, b), lambda x: op(x, b), (1.0,)), a)
    return _apply(_Spec(lambda x: op(a, x), lambda x: op(a, x), (1.0,)), b)


def _einsum(mode: RelevanceRules, func: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    if not args or not isinstance(args[0], str) or kw:
        return NotImplemented
    equation = args[0]
    operands = list(args[1:])
    if len(operands) == 1 and isinstance(operands[0], list | tuple):
        operands = list(operands[0])
    runtime = [i for i, t in enumerate(operands) if _runtime(t)]
    if not runtime or len(runtime) > 2:
        return NotImplemented
    mode.replaced += 1

    def op(*live: Tensor) -> Tensor:
        full = list(operands)
        for i, value in zip(runtime, live, strict=True):
            full[i] = value
        return torch.einsum(equation, *full)

    live = [operands[i] for i in runtime]
    shares = (1.0,) if len(live) == 1 else _gate_shares(mode, live[0], live[1])
    return _apply(_Spec(op, op, shares), *live)


def _linear(mode: RelevanceRules, func: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    """``F.linear(x, W, b)``: z-rule of ``x W^T`` (bias left out)."""
    bound = _bind(F.linear, args, kw)
    if bound is None:
        return NotImplemented
    x, weight, bias = bound.arguments["input"], bound.arguments["weight"], bound.arguments["bias"]
    if not _runtime(x) or _runtime(weight):
        return NotImplemented
    mode.replaced += 1
    return _apply(
        _Spec(lambda v: F.linear(v, weight, bias), lambda v: F.linear(v, weight), (1.0,)), x
    )


def _linear_reduction(
    mode: RelevanceRules, func: Any, args: tuple[Any, ...], kw: dict[str, Any]
) -> Any:
    """Means, sums, average pooling, interpolation of one activation: z-rule."""
    if not args or not _runtime(args[0]) or any(_runtime(a) for a in args[1:]):
        return NotImplemented
    mode.replaced += 1
    rest = args[1:]

    def op(x: Tensor) -> Tensor:
        return func(x, *rest, **kw)

    return _apply(_Spec(op, op, (1.0,)), args[0])


def _attention_weights(
    q: Tensor, k: Tensor, scale: float, mask: Tensor | None, causal: bool
) -> Tensor:
    with torch.no_grad():
        scores = torch.matmul(q, k.transpose(-2, -1)) * scale
        if causal:
            length, source = scores.shape[-2], scores.shape[-1]
            allowed = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))
        if mask is not None:
            scores = (
                scores.masked_fill(~mask, float("-inf"))
                if mask.dtype == torch.bool
                else (scores + mask)
            )
        return torch.softmax(scores, dim=-1)


def _gated_values(weights: Tensor, values: Tensor) -> Tensor:
    """``weights @ values`` with constant attention weights: z-rule on the values."""

    def op(v: Tensor) -> Tensor:
        return torch.matmul(weights, v)

    return _apply(_Spec(op, op, (1.0,)), values)


def _sdpa(mode: RelevanceRules, func: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    bound = _bind(F.scaled_dot_product_attention, args, kw)
    if bound is None:
        return NotImplemented
    a = bound.arguments
    q, k, v = a["query"], a["key"], a["value"]
    if not _runtime(v) or a.get("dropout_p", 0.0) or a.get("enable_gqa", False):
        return NotImplemented
    scale = a.get("scale")
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    mode.replaced += 1
    weights = _attention_weights(q, k, scale, a.get("attn_mask"), bool(a.get("is_causal")))
    return _gated_values(weights, v)


def _linear_rule(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return _apply(
        _Spec(lambda v: F.linear(v, weight, bias), lambda v: F.linear(v, weight), (1.0,)), x
    )


def _mha(mode: RelevanceRules, func: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    """``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) for self- and
    cross-attention without extra key/value biases or padding masks; other configurations keep
    plain autograd (and the conservation figure says so)."""
    bound = _bind(F.multi_head_attention_forward, args, kw)
    if bound is None:
        return NotImplemented
    a = bound.arguments
    unsupported = (
        a["bias_k"] is not None
        or a["bias_v"] is not None
        or a["add_zero_attn"]
        or a["key_padding_mask"] is not None
        or a["static_k"] is not None
        or a["static_v"] is not None
        or (a["training"] and a["dropout_p"] > 0)
    )
    query, key, value = a["query"], a["key"], a["value"]
    if unsupported or not _runtime(value) or query.dim() != 3:
        return NotImplemented
    mode.replaced += 1
    heads = int(a["num_heads"])
    if a["use_separate_proj_weight"]:
        w_q, w_k, w_v = a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]
    else:
        w_q, w_k, w_v = a["in_proj_weight"].chunk(3)
    b_q = b_k = b_v = None
    if a["in_proj_bias"] is not None:
        b_q, b_k, b_v = a["in_proj_bias"].chunk(3)
    length, batch, embed = query.shape
    source = key.shape[0]
    head_dim = embed // heads
    with torch.no_grad():
        q = F.linear(query, w_q, b_q).reshape(length, batch * heads, head_dim).transpose(0, 1)
        k = F.linear(key, w_k, b_k).reshape(source, batch * heads, head_dim).transpose(0, 1)
    v = _linear_rule(value, w_v, b_v).reshape(source, batch * heads, head_dim).transpose(0, 1)
    mask = a["attn_mask"]
    if mask is not None and mask.dim() == 3:
        mask = mask.reshape(batch * heads, length, source)
    weights = _attention_weights(q, k, head_dim**-0.5, mask, bool(a["is_causal"]))
    attended = _gated_values(weights, v).transpose(0, 1).reshape(length, batch, embed)
    out = _linear_rule(attended, a["out_proj_weight"], a["out_proj_bias"])
    if not a["need_weights"]:
        return out, None
    per_head = weights.reshape(batch, heads, length, source)
    return out, per_head.mean(dim=1) if a["average_attn_weights"] else per_head


# --------------------------------------------------------------------------- the tables

T = torch.Tensor
_ACTIVATIONS: list[Callable[..., Any]] = [
    F.relu,
    torch.relu,
    torch.relu_,
    T.relu,
    T.relu_,
    F.relu6,
    F.hardtanh,
    F.hardtanh_,
    torch.clamp,
    torch.clip,
    T.clamp,
    T.clamp_,
    T.clip,
    F.silu,
    F.gelu,
    F.hardswish,
    F.mish,
    F.elu,
    F.selu,
    F.celu,
    F.leaky_relu,
    F.softplus,
    F.layer_norm,
    F.group_norm,
    F.batch_norm,
    F.instance_norm,
    F.normalize,
]
_GATES: list[Callable[..., Any]] = [
    torch.sigmoid,
    T.sigmoid,
    F.sigmoid,
    F.hardsigmoid,
    torch.tanh,
    T.tanh,
    F.tanh,
    torch.softmax,
    T.softmax,
    F.softmax,
    torch.erf,
    T.erf,
]
# position of the ``inplace`` flag for functions that take it positionally
_INPLACE_POSITION: dict[Callable[..., Any], int] = {
    F.relu: 1,
    F.relu6: 1,
    F.silu: 1,
    F.hardswish: 1,
    F.mish: 1,
    F.hardtanh: 3,
    F.elu: 2,
    F.celu: 2,
    F.selu: 1,
    F.leaky_relu: 2,
    F.hardsigmoid: 1,
}
_REFLECTED: dict[Callable[..., Any], Callable[[Any, Any], Tensor]] = {
    T.__rsub__: _reflected_sub,
    T.__rdiv__: _reflected_div,
    T.__rtruediv__: _reflected_div,
}
_OUT_OF_PLACE: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.relu_: torch.relu,
    T.relu_: T.relu,
    T.clamp_: T.clamp,
    F.hardtanh_: F.hardtanh,
    T.add_: T.add,
    T.__iadd__: T.add,
    T.sub_: T.sub,
    T.__isub__: T.sub,
    T.mul_: T.mul,
    T.__imul__: T.mul,
    T.div_: T.div,
    T.__itruediv__: T.div,
}

_HANDLERS: dict[Callable[..., Any], Handler] = {}
for _f in _ACTIVATIONS:
    _HANDLERS[_f] = _identity_rule(gate=False)
for _f in _GATES:
    _HANDLERS[_f] = _identity_rule(gate=True)
for _f in (torch.add, T.add, T.add_, T.__add__, T.__iadd__, torch.sub, T.sub, T.sub_):
    _HANDLERS[_f] = _additive
for _f in (T.__sub__, T.__isub__, T.__rsub__, T.__radd__):
    _HANDLERS[_f] = _additive
for _f in (torch.mul, T.mul, T.mul_, T.__mul__, T.__rmul__, T.__imul__):
    _HANDLERS[_f] = _multiplicative
for _f in (torch.div, T.div, T.div_, torch.true_divide, T.__truediv__, T.__itruediv__):
    _HANDLERS[_f] = _division
_HANDLERS[T.__rsub__] = _additive
_HANDLERS[T.__rdiv__] = _division
_HANDLERS[T.__rtruediv__] = _division
for _f in (torch.matmul, T.matmul, T.__matmul__, torch.mm, T.mm, torch.bmm, T.bmm):
    _HANDLERS[_f] = _bilinear_map
_HANDLERS[torch.einsum] = _einsum
_HANDLERS[F.linear] = _linear
for _f in (
    torch.mean,
    T.mean,
    torch.sum,
    T.sum,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.interpolate,
):
    _HANDLERS[_f] = _linear_reduction
_HANDLERS[F.scaled_dot_product_attention] = _sdpa
_HANDLERS[F.multi_head_attention_forward] = _mha

# operations that keep a gate a gate (reshaping, broadcasting, splitting)
_GATE_CARRIERS = frozenset(
    {
        T.view,
        T.reshape,
        T.flatten,
        torch.flatten,
        torch.reshape,
        T.unsqueeze,
        torch.unsqueeze,
        T.squeeze,
        torch.squeeze,
        T.expand,
        T.expand_as,
        T.permute,
        torch.permute,
        T.transpose,
        torch.transpose,
        T.contiguous,
        T.chunk,
        torch.chunk,
        T.split,
        torch.split,
        T.unbind,
        torch.unbind,
        T.__getitem__,
        T.clone,
        T.to,
        T.view_as,
        T.reshape_as,
        F.dropout,
    }
)

# Modules whose output is a gate; Zennit must leave them unhooked so that the rules here see
# their output tensor (a Zennit hook would hand downstream a wrapped copy).
GATE_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.Softmax)


@contextmanager
def relevance_rules(model: nn.Module, composite: Composite) -> Iterator[RelevanceRules]:
    """Activate the rules for the forward passes run in the block.

    Modules that ``composite`` gives a rule suspend the function rules while they run (the
    module rule decides there, and wrapping their internals would only cost time); gate modules
    mark their outputs. Weights are frozen meanwhile, so that "depends on the input" is
    "requires grad".
    """
    from ._graph import frozen_parameters

    mode = RelevanceRules()
    ruled = _ruled_modules(model, composite)

    def enter(*_: Any) -> None:
        mode.suspended += 1

    def leave(*_: Any) -> None:
        mode.suspended -= 1

    def mark(_module: nn.Module, _inputs: Any, output: Any) -> None:
        mode.mark_gate(output)

    handles = []
    for module in model.modules():
        if module in ruled:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
        elif isinstance(module, GATE_MODULES):
            handles.append(module.register_forward_hook(mark))
    try:
        with ExitStack() as stack:
            stack.enter_context(frozen_parameters(model))
            stack.enter_context(mode)
            yield mode
    finally:
        mode.clear()
        for handle in handles:
            handle.remove()


def _ruled_modules(model: nn.Module, composite: Composite) -> set[nn.Module]:
    """The modules ``composite`` attaches a rule to (the same walk as ``Composite.register``)."""
    ctx: dict[Any, Any] = {}
    ruled = set()
    for name, module in model.named_modules():
        if composite.module_map(ctx, name, module) is not None:
            ruled.add(module)
    return ruled


def outputs_agree(reference: Tensor, explained: Tensor, rtol: float = 1e-4) -> bool:
    """The rules must not change what the model computes: the logits of the LRP forward pass
    equal a plain forward pass's up to float rounding."""
    if reference.shape != explained.shape:
        return False
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    return bool(torch.allclose(explained, reference, rtol=rtol, atol=rtol * max(scale, 1.0)))


__all__: Sequence[str] = ["GATE_MODULES", "RelevanceRules", "outputs_agree", "relevance_rules"]
