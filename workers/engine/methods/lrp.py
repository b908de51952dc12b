"""Layer-wise Relevance Propagation and Relevance-CAM, on Zennit rules and canonizers.

**LRP** (Bach et al. 2015, PLoS ONE 10(7):e0130140). The output score is redistributed layer by
layer, ``R_i = sum_k z_ik / z_k * R_k`` with ``z_ik = a_i w_ik``, so that every layer's
relevance sums to the score, ``sum_d R_d = f(x)`` ("conservation"). Rules differ in which
contributions ``z_ik`` count (Montavon et al. 2019, "Layer-wise relevance propagation: an
overview", sec. 10.2.1 for the rules, sec. 10.3 for assigning them to layers; Montavon et al.
2017, "Explaining nonlinear classification decisions with deep Taylor decomposition", Pattern
Recognition 65, for the z+ and z^B rules).

The initial relevance is the target logit at the target class and zero elsewhere
(one-hot(target) * f(x)), so conservation means: the input relevance sums to the target logit.

*Bias handling (a decision).* A rule that keeps the bias in ``z_k = sum_i z_ik + b_k`` hands the
bias's share ``b_k / z_k * R_k`` to nobody, so relevance leaks at every layer (Bach et al. 2015
note that the bias and the stabilizer absorb relevance). Every composite here is built with
``zero_params=["bias"]``: the rules see the bias-free pre-activations, and each layer conserves
up to its stabilizer. Canonization merges BatchNorm into the preceding layer's weights and bias
(:mod:`saliency_audit.workers.engine.models.canonize`), so its shift is excluded too; the BatchNorms
that cannot
merge (pre-activation BN in DenseNet) get ``Pass``, which is the bias-free LRP-0 rule of an
element-wise affine map. The price: where the bias dominates ``z_k``, the LRP-epsilon rule
divides by a small bias-free ``z_k`` and relevance is large with both signs (it still sums to
``R_k``).

Named composites (``MethodParams.lrp_composite``):

* ``epsilon_plus_flat`` (Zennit ``EpsilonPlusFlat``; Kohlbrenner et al. 2020, "Towards best
  practice in explaining neural network decisions with LRP"): flat rule for the first layer
  (relevance spread uniformly over the receptive field; Lapuschkin et al. 2019), z+ for the
  other convolutions, epsilon for dense layers. Conserves. "First" is the first conv or dense
  module in ``named_modules()`` order, which is execution order for torchvision models and
  for converted ONNX graphs.
* ``epsilon_alpha2_beta1`` (Zennit ``EpsilonAlpha2Beta1``): alpha=2, beta=1 for every
  convolution, the first included (Bach et al. 2015, alpha-beta rule), epsilon for dense layers.
  Conserves *only where both the positive and the negative part of z_k are non-zero*: a neuron
  with no negative contribution passes 2 R_k down (no negative part to subtract), one with no
  positive contribution passes -R_k. Both parts are almost always present in real layers (on
  random-weight ResNet-18, VGG-11 and DenseNet-121 the input relevance sums to the logit within
  6e-5, relative), but nothing guarantees it; the tests pin down both cases on a toy layer.
* ``z_plus`` (own composite, the z+-rule of Montavon et al. 2017): z+ for every convolution
  and dense layer. The input layer gets z+ as well, in Zennit's form ``x+ w+ + x- w-``
  (contributions that raise z_k, whatever the input's sign), because the bounded z^B rule
  needs the pixel bounds of the input normalization, which methods do not receive. Conserves
  wherever some contribution is positive.

All composites map activations and BatchNorm to ``Pass``, ``Sum`` (residual additions) and
average pooling to ``Norm`` (proportional split); max pooling keeps its gradient (winner takes
all), which conserves.

**Relevance-CAM** (Lee, Kim, Park, Eo, Hwang, CVPR 2021, "Relevance-CAM: Your model already
knows where to look"). ``alpha_k = mean over (i, j) of R_k(i, j)``, the relevance of channel k
at the chosen layer's *output* A, propagated from the output with the z+ rule, and
``map = ReLU(sum_k alpha_k A_k)``, upsampled bilinearly to the input size.

* Initial relevance, as in the official code (``CLRP`` in ``modules/resnet.py``; the same as
  ``LRP_util.CLRP``'s ``Tt - Tn``, by linearity of z+ in R): 1 at the target class and
  ``-1/num_classes`` elsewhere, a contrastive start (Gu et al. 2018, CLRP) that removes what
  the classes share. It is not scaled by the logit; only the map's scale would change.
* Rules: z+ with the bias kept in the intermediate layers (Zennit ``ZPlus`` without
  ``zero_params``: a positive bias counts as a positive contribution, ``z_k = z_k^+ + b_k^+``),
  ``Norm`` for additions and average pooling, ``Pass`` for activations and BatchNorm.
  The paper's z^B rule for the input layer never runs, because propagation stops at the
  layer's output, so no first-layer rule is registered.
* One forward pass and one backward pass from the logits to A, for the whole batch: the
  relevance at A is the gradient at A under the rule hooks. (A converted ONNX graph with a
  baked-in batch size gets one pass per chunk; see :func:`_chunks`.)
* Deviations from the official code: (1) its conv rule adds the raw bias to *both* the positive
  and the negative term (``z^+ + 2 b``), and its dense rule drops the bias; Zennit's ``ZPlus``
  uses ``b^+`` once in both; (2) the official ResNet keeps BatchNorm unmerged with an almost
  pass-through rule (it squares the running variance), while here BatchNorm is merged into
  the preceding conv, except the one right after the chosen layer, so that A is the layer's
  true output; the relevance at A is the same either way because the unmerged BN passes it
  through; (3) the official script sums R over positions, its model code averages; the map
  differs by a constant factor (the mean is used here).

``lrp`` and ``relevance_cam`` never share a pass: the LRP composites exclude biases and use
epsilon for dense layers (and flat or alpha-beta at the input), Relevance-CAM keeps the biases
under z+ and starts from a contrastive relevance, so no backward pass serves both. Each gets
its own canonization, hooks, forward and backward.

Rule hooks remember one input per module, so a model that calls a conv, dense, sum or pooling
module twice in one forward pass is refused with ``NotApplicableError`` rather than explained
with the wrong inputs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from zennit.composites import EpsilonAlpha2Beta1, EpsilonPlusFlat, LayerMapComposite
from zennit.core import BasicHook, Composite, ParamMod, Stabilizer
from zennit.layer import Sum
from zennit.rules import ClampMod, Norm, Pass, zero_bias
from zennit.types import Activation, AvgPool, BatchNorm, Convolution

from ..errors import NotApplicableError, SpecError
from ..models.canonize import canonized, lrp_canonizers
from ._hooks import (
    as_map,
    cam_from_weights,
    cam_layer,
    capture_layer,
    evaluating,
    input_leaf,
    spatial_activation,
    upsample_bilinear,
)
from .base import MethodContext, MethodFamily, MethodInfo, register
from .lrp_ops import GATE_MODULES, outputs_agree, relevance_rules

EXCLUDE_BIAS = ["bias"]
# Modules whose rules (every BasicHook: z+, epsilon, flat, alpha-beta, Norm) store their input.
_STORED_INPUT_RULE_TYPES = (Convolution, nn.Linear, Sum, AvgPool)
NORMALIZATIONS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.LocalResponseNorm,
)


class ZPlusFlat(BasicHook):
    """The z+ rule (Montavon et al. 2017; Zennit ``ZPlus``: ``x+ w+ + x- w-``), with the flat
    rule (Lapuschkin et al. 2019; Zennit ``Flat``) for the neurons that have no positive
    contribution at all.

    z+ hands a neuron's relevance to its positive contributions; a neuron with none (``z+ =
    0``) keeps it, and the relevance is lost. In a standard convolution with hundreds of inputs
    that never happens, but a depthwise 3x3 convolution has nine inputs, one channel each: on
    MobileNet v2 with random weights a few percent of its neurons have no positive contribution
    and are active through their (BatchNorm-merged) bias alone, so plain z+ lost half the
    relevance over the network. Those neurons' relevance is spread uniformly over their
    receptive field instead, so the rule conserves wherever z+ or the receptive field is
    non-empty; elsewhere it equals Zennit's ``ZPlus`` (checked in tests/engine/test_lrp_rules.py).
    The flat pass runs only for a layer where such a neuron holds relevance (resnet18: z+ alone
    costs 245 ms per batch of 8 at 112 px, z+ with a flat pass at every conv 292 ms).
    """

    def __init__(self, stabilizer: float = 1e-6, zero_params: list[str] | None = None) -> None:
        stabilize_fn = Stabilizer.ensure(stabilizer)
        flat = ParamMod(
            lambda param, name: torch.ones_like(param),
            zero_params=zero_bias(zero_params),
            require_params=False,
        )

        def gradient_mapper(
            out_grad: torch.Tensor, outputs: list[torch.Tensor]
        ) -> list[torch.Tensor]:
            if len(outputs) == 1:  # the flat pass: spread what z+ could not place
                return [out_grad / stabilize_fn(outputs[0])]
            positive = outputs[0] + outputs[1]
            ratio = torch.where(positive > 0, out_grad / stabilize_fn(positive), 0.0)
            return [ratio, ratio]

        super().__init__(
            input_modifiers=[
                lambda input: input.clamp(min=0),
                lambda input: input.clamp(max=0),
                torch.ones_like,
            ],
            param_modifiers=[
                ClampMod(min=0.0, zero_params=zero_params),
                ClampMod(max=0.0, zero_params=zero_bias(zero_params)),
                flat,
            ],
            output_modifiers=[lambda output: output] * 3,
            gradient_mapper=gradient_mapper,
            reducer=lambda inputs, gradients: inputs[0] * gradients[0] + inputs[1] * gradients[1],
        )

    def _passes(
        self, module: nn.Module, original: torch.Tensor, which: range
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        inputs, outputs = [], []
        for k in which:
            modified_input = self.input_modifiers[k](original).requires_grad_()
            with ParamMod.ensure(self.param_modifiers[k])(module) as modified, torch.enable_grad():
                outputs.append(self.output_modifiers[k](modified.forward(modified_input)))
            inputs.append(modified_input)
        return inputs, outputs

    def backward(self, module: nn.Module, grad_input: Any, grad_output: Any) -> Any:
        """Zennit's ``BasicHook.backward`` for the two z+ passes, then the flat pass only where
        relevance sits on a neuron without a positive contribution."""
        original = self.stored_tensors["input"][0].clone()
        relevance_out = grad_output[0]
        create_graph = bool(relevance_out.requires_grad)
        inputs, outputs = self._passes(module, original, range(2))
        ratios = self.gradient_mapper(relevance_out, outputs)
        gradients = torch.autograd.grad(outputs, inputs, ratios, create_graph=create_graph)
        relevance = self.reducer(inputs, gradients)
        stranded = torch.where((outputs[0] + outputs[1]).detach() > 0, 0.0, relevance_out)
        if bool(stranded.ne(0).any()):
            (ones,), (counts,) = self._passes(module, original, range(2, 3))
            (spread,) = torch.autograd.grad(
                counts, ones, self.gradient_mapper(stranded, [counts]), create_graph=create_graph
            )
            relevance = relevance + spread
        return tuple(relevance if g.shape == relevance.shape else None for g in grad_input)


def _extra_layer_map(
    z_plus_convolutions: bool = False,
) -> list[tuple[tuple[type[nn.Module], ...], Any]]:
    """Entries every composite puts before Zennit's own: gate modules (sigmoid, softmax, ...)
    get no module rule, so the function rules of :mod:`.lrp_ops` see and mark their outputs;
    LayerNorm and GroupNorm get ``Pass`` like BatchNorm (their scale treated as a constant);
    with ``z_plus_convolutions``, convolutions get :class:`ZPlusFlat` where the composite
    would give them z+."""
    extra: list[tuple[tuple[type[nn.Module], ...], Any]] = [
        # Zennit counts every class of torch.nn.modules.activation as an activation, attention
        # included: its function rule (lrp_ops) explains it instead
        ((*GATE_MODULES, nn.MultiheadAttention), None),
        (NORMALIZATIONS, Pass()),
    ]
    if z_plus_convolutions:
        extra.append(((Convolution,), ZPlusFlat(zero_params=EXCLUDE_BIAS)))
    return extra


def _z_plus_composite() -> Composite:
    return LayerMapComposite(
        layer_map=[
            *_extra_layer_map(),
            (Activation, Pass()),
            (Sum, Norm()),
            (AvgPool, Norm()),
            (BatchNorm, Pass()),
            (Convolution, ZPlusFlat(zero_params=EXCLUDE_BIAS)),
            (nn.Linear, ZPlusFlat(zero_params=EXCLUDE_BIAS)),
        ]
    )


LRP_COMPOSITES: dict[str, Callable[[], Composite]] = {
    "epsilon_plus_flat": lambda: EpsilonPlusFlat(
        zero_params=EXCLUDE_BIAS, layer_map=_extra_layer_map(z_plus_convolutions=True)
    ),
    "epsilon_alpha2_beta1": lambda: EpsilonAlpha2Beta1(
        zero_params=EXCLUDE_BIAS, layer_map=_extra_layer_map()
    ),
    "z_plus": _z_plus_composite,
}


def lrp_composite(name: str) -> Composite:
    """A fresh Zennit composite for ``name`` (a composite holds hooks for one model at a time)."""
    try:
        factory = LRP_COMPOSITES[name]
    except KeyError:
        known = sorted(LRP_COMPOSITES)
        raise SpecError(
            f"unknown LRP composite {name!r}; known composites: {', '.join(known)}", known=known
        ) from None
    return factory()


def relevance_cam_composite() -> Composite:
    """z+ with biases kept (Lee et al. 2021, following Montavon et al. 2017)."""
    return LayerMapComposite(
        layer_map=[
            *_extra_layer_map(),
            (Activation, Pass()),
            (Sum, Norm()),
            (AvgPool, Norm()),
            (BatchNorm, Pass()),
            (Convolution, ZPlusFlat()),
            (nn.Linear, ZPlusFlat()),
        ]
    )


def contrastive_initial_relevance(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 at the target class, -1/num_classes elsewhere (official Relevance-CAM code, CLRP)."""
    num_classes = logits.shape[1]
    seed = torch.full_like(logits, -1.0 / num_classes)
    return seed.scatter(1, target.view(-1, 1), 1.0)


@contextmanager
def _hooked(model: nn.Module, composite: Composite) -> Iterator[None]:
    composite.register(model)
    try:
        yield
    finally:
        composite.remove()


def _logits(output: object, target: torch.Tensor) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        raise SpecError("LRP needs a model that returns logits of shape (N, num_classes)")
    if target.shape != (output.shape[0],):
        raise SpecError(f"target must have shape ({output.shape[0]},), got {tuple(target.shape)}")
    return output


def _chunks(model: nn.Module, n: int) -> list[slice]:
    """Row slices that each run the model's modules once.

    A converted ONNX graph with a baked-in batch size (``fixed_batch``) runs larger batches one
    chunk at a time, calling every module once per chunk; rule hooks keep one input per module,
    so each chunk gets its own forward and backward pass.
    """
    size = getattr(model, "fixed_batch", None)
    if not isinstance(size, int) or size <= 0 or size >= n:
        return [slice(0, n)]
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


@contextmanager
def _one_call_per_module(model: nn.Module, method: str) -> Iterator[Callable[[], None]]:
    """Yield a check that no module with a stored-input rule ran twice in the last forward.

    Zennit's rules keep the input of a module's last call, so a module called twice per
    forward would explain its first call with the second call's input: refuse instead.
    """
    calls: Counter[str] = Counter()
    handles = [
        module.register_forward_pre_hook(lambda *_, name=name: calls.update([name]))
        for name, module in model.named_modules()
        if isinstance(module, _STORED_INPUT_RULE_TYPES)
    ]

    def check() -> None:
        reused = sorted(name for name, count in calls.items() if count > 1)
        calls.clear()
        if reused:
            raise NotApplicableError(
                f"{method} needs each layer to run once per forward pass; "
                f"{', '.join(reused[:5])} run more than once",
                method=method,
            )

    try:
        yield check
    finally:
        for handle in handles:
            handle.remove()


Conservation = list[tuple[torch.Tensor, torch.Tensor]]


def _record(log: Conservation | None, distributed: torch.Tensor, start: torch.Tensor) -> None:
    """Per image: the relevance a method handed out and the relevance it started from."""
    if log is not None:
        log.append((distributed.detach().double().cpu(), start.detach().double().cpu()))


def _plain_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), evaluating(model):
        out = model(x)
    if not isinstance(out, torch.Tensor):
        raise SpecError("LRP needs a model that returns logits of shape (N, num_classes)")
    return out


@contextmanager
def _rule_passes(
    model: nn.Module,
    composite: Composite,
    x: torch.Tensor,
    *,
    method: str,
    keep_unmerged: Collection[str] = (),
    layer: str | None = None,
) -> Iterator[Callable[[slice, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """Everything an LRP-style pass needs, for the ``with`` block: canonized model, Zennit
    rules, the function rules of :mod:`.lrp_ops`, and a capture of ``layer`` (read it from
    the yielded function's ``capture`` attribute). The yielded ``run(rows, target)`` does one
    forward pass of ``x[rows]`` and returns ``(x_leaf, logits)``; it checks that every rule
    module ran once and that the rules left the model's output unchanged."""
    with ExitStack() as stack:
        stack.enter_context(evaluating(model))
        stack.enter_context(canonized(model, lrp_canonizers(model, keep_unmerged=keep_unmerged)))
        # the canonized model's own output on the first image: what the rules must leave
        # unchanged (a forward pass that defeats them does so on any image, so one is enough)
        plain = _plain_logits(model, x[:1])
        stack.enter_context(torch.enable_grad())
        stack.enter_context(_hooked(model, composite))
        check_calls = stack.enter_context(_one_call_per_module(model, method))
        # Registered after the rule hooks, so A is the output the rest of the model sees.
        capture = stack.enter_context(capture_layer(model, layer)) if layer else None

        def run(rows: slice, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if capture is not None:
                capture.reset()
            x_leaf = input_leaf(x[rows])
            with relevance_rules(model, composite):
                logits = _logits(model(x_leaf), target)
            check_calls()
            explained = logits.detach()[:1]
            if rows.start in (0, None) and not outputs_agree(plain.to(explained.dtype), explained):
                difference = float((plain - explained).abs().max())
                raise RuntimeError(
                    f"{method}: the model's output changed under the relevance rules (max "
                    f"|difference| {difference:.3g}); an operation in its forward pass modifies "
                    "a tensor in place that the rules had to copy"
                )
            return x_leaf, logits

        run.capture = capture  # type: ignore[attr-defined]
        yield run


def lrp_relevance(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    composite_name: str,
    *,
    conservation: Conservation | None = None,
) -> torch.Tensor:
    """Input relevance (N, C, H, W) of the target logits under the named composite.

    ``conservation`` collects, per image, the input relevance's sum and the target logit it
    started from (they are equal when relevance is conserved)."""
    composite = lrp_composite(composite_name)
    parts = []
    with _rule_passes(model, composite, x, method="lrp") as run:
        for rows in _chunks(model, x.shape[0]):
            x_leaf, logits = run(rows, target[rows])
            one_hot = F.one_hot(target[rows].to(logits.device), logits.shape[1])
            seed = one_hot.to(logits.dtype) * logits.detach()
            (relevance,) = torch.autograd.grad(logits, x_leaf, grad_outputs=seed)
            _record(conservation, relevance.sum(dim=tuple(range(1, relevance.dim()))), seed.sum(1))
            parts.append(relevance)
    return as_map(torch.cat(parts))


def lrp_layer_relevance(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    layer: str,
    composite_name: str,
    *,
    upsample: bool = True,
    conservation: Conservation | None = None,
) -> torch.Tensor:
    """LRP relevance at the output of module ``layer``, summed over channels and upsampled
    bilinearly to the input size: (N, 1, H, W) (``upsample=False``: at the layer's own size).

    The same rules and initial relevance as :func:`lrp_relevance` (one-hot target logit, the
    named composite, biases excluded), stopped at the layer instead of the input: relevance
    at the layer's output A is the gradient at A under the rule hooks. Summed over channels,
    each position's relevance is what that location of the layer contributes to the logit, so
    the map conserves like the input relevance (its spatial sum is the logit, up to the
    layers above A that absorb relevance). The BatchNorm after ``layer`` stays unmerged so
    that A is the layer's own output, as for Relevance-CAM.
    """
    composite = lrp_composite(composite_name)
    parts = []
    with _rule_passes(model, composite, x, method="lrp", keep_unmerged={layer}, layer=layer) as run:
        capture = run.capture  # type: ignore[attr-defined]
        for rows in _chunks(model, x.shape[0]):
            _, logits = run(rows, target[rows])
            one_hot = F.one_hot(target[rows].to(logits.device), logits.shape[1])
            seed = one_hot.to(logits.dtype) * logits.detach()
            (relevance,) = torch.autograd.grad(logits, capture.activation, grad_outputs=seed)
            spatial_activation(capture, layer)  # a CAM-style layer: (N, K, h, w)
            _record(conservation, relevance.sum(dim=(1, 2, 3)), seed.sum(1))
            parts.append(relevance.detach().sum(dim=1, keepdim=True))
    relevance_map = torch.cat(parts)
    if upsample:
        relevance_map = upsample_bilinear(relevance_map, (x.shape[-2], x.shape[-1]))
    return as_map(relevance_map)


def relevance_cam(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    layer: str,
    *,
    conservation: Conservation | None = None,
) -> torch.Tensor:
    """Relevance-CAM maps (N, 1, H, W) at module ``layer`` (Lee et al. 2021).

    ``conservation`` collects, per image, the relevance reaching the layer from the target
    logit's unit relevance (a second backward pass through the same rules, with the one-hot
    start instead of the contrastive one) and that unit start: z+ with the biases kept lets
    the biases absorb a share, so the ratio is at most about 1, and far below it when the
    propagation breaks down."""
    composite = relevance_cam_composite()
    parts = []
    with _rule_passes(
        model, composite, x, method="relevance_cam", keep_unmerged={layer}, layer=layer
    ) as run:
        capture = run.capture  # type: ignore[attr-defined]
        for rows in _chunks(model, x.shape[0]):
            _, logits = run(rows, target[rows])
            t = target[rows].to(logits.device)
            seed = contrastive_initial_relevance(logits.detach(), t)
            (relevance,) = torch.autograd.grad(
                logits, capture.activation, grad_outputs=seed, retain_graph=conservation is not None
            )
            if conservation is not None:
                unit = F.one_hot(t, logits.shape[1]).to(logits.dtype)
                (from_target,) = torch.autograd.grad(logits, capture.activation, grad_outputs=unit)
                _record(conservation, from_target.sum(dim=(1, 2, 3)), unit.sum(1))
            activation = spatial_activation(capture, layer)
            parts.append(cam_from_weights(relevance.mean(dim=(2, 3)), activation))
    return as_map(upsample_bilinear(torch.cat(parts), (x.shape[-2], x.shape[-1])))


@register
class LrpFamily(MethodFamily):
    """LRP and Relevance-CAM (separate passes; see the module docstring for why)."""

    name = "lrp"
    provides = (
        MethodInfo(
            name="lrp",
            family="lrp",
            reference="Bach et al. 2015, PLoS ONE; Montavon et al. 2019 (composites)",
            description=(
                "Layer-wise Relevance Propagation of the target logit to the input with a named "
                "Zennit composite (params.lrp_composite), biases excluded so relevance is "
                "conserved; rules for residual sums, gates, attention and normalizations "
                "(lrp_ops); its conservation is reported."
            ),
            relevance="total",
        ),
        MethodInfo(
            name="relevance_cam",
            family="lrp",
            reference="Lee, Kim, Park, Eo, Hwang, CVPR 2021",
            description=(
                "CAM weighted by the mean z+ relevance of each channel at the layer, from a "
                "contrastive initial relevance; one forward and one backward pass (a second "
                "backward measures the share of relevance reaching the layer)."
            ),
            needs_conv_layer=True,
            relevance="share",
        ),
    )

    def compute(
        self,
        model: nn.Module,
        x: torch.Tensor,
        target: torch.Tensor,
        wanted: frozenset[str],
        ctx: MethodContext,
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        # No shared pass: the rules, the bias handling and the initial relevance all differ
        # (module docstring), so each method runs its own forward and backward.
        if "lrp" in wanted:
            out["lrp"] = lrp_relevance(
                model,
                x,
                target,
                ctx.params.lrp_composite,
                conservation=ctx.conservation.setdefault("lrp", []),
            )
        if "relevance_cam" in wanted:
            out["relevance_cam"] = relevance_cam(
                model,
                x,
                target,
                cam_layer(ctx),
                conservation=ctx.conservation.setdefault("relevance_cam", []),
            )
        return out
