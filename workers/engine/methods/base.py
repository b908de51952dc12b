"""The method registry: one call shape for every saliency method.

A *method* is what a user names (``gradcam``). A *family* computes one or more methods from
shared forward/backward passes (``gradient`` family: gradient, gradient_x_input, gradcam and
gradcam_pp from one forward and one backward). The audit loop asks the registry for a set of
method names and never special-cases any one of them.

Call shape (batched in, batched out, like Captum's ``attribute``):

* ``x``: float32 (N, C, H, W), the model's preprocessed input, on the model's device.
* ``target``: int64 (N,), the class explained for each image.
* result: ``dict[method name, Tensor]``. Pixel methods return (N, C, H, W) like ``x``; CAM-style
  methods return (N, 1, H, W), upsampled bilinearly to the input size. Maps are detached float32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..contract.catalogue import MethodInfo
from ..errors import (
    MethodFailedError,
    NotApplicableError,
    SpecError,
    stops_the_audit,
    unknown_cam_layer,
)
from ..spec import MethodParams


@dataclass
class MethodContext:
    """Everything a family needs besides the model, inputs and targets.

    ``layer`` is the resolved module name for layer-based methods (None when the model has no
    conv layer). ``generator`` is a seeded CPU generator for any randomness (noise, random
    maps), so a run is repeatable bit for bit on the same device. ``baseline`` is the
    Integrated Gradients baseline in the model's (normalized) input space, broadcastable to
    ``x``; the caller builds it from the input spec for ``ig_baseline`` "black" or "mean"
    (None: "zero" is computed by the method, the others are an error). ``conservation`` is
    where relevance methods append, per call, the relevance each image's map distributed and
    the relevance it started from.
    """

    params: MethodParams = field(default_factory=MethodParams)
    layer: str | None = None
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    baseline: torch.Tensor | None = None
    # method -> per call, (relevance handed out, relevance started from) per image: what the
    # relevance methods report so that a broken propagation is seen (``lrp``, ``relevance_cam``)
    conservation: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    # why ``layer`` is None, for the layer-based methods' "not applicable"
    no_layer_reason: str = "the method needs a conv layer and the model has none"


class MethodFamily(ABC):
    """Computes the methods in ``provides`` from shared passes."""

    name: ClassVar[str]
    provides: ClassVar[tuple[MethodInfo, ...]]

    @abstractmethod
    def compute(
        self,
        model: nn.Module,
        x: torch.Tensor,
        target: torch.Tensor,
        wanted: frozenset[str],
        ctx: MethodContext,
    ) -> dict[str, torch.Tensor]:
        """Return a map for each name in ``wanted`` (a subset of ``provides``)."""


FAMILIES: dict[str, MethodFamily] = {}
METHODS: dict[str, MethodInfo] = {}


def register(family_cls: type[MethodFamily]) -> type[MethodFamily]:
    """Class decorator: add a family and its methods to the registry."""
    family = family_cls()
    if family.name in FAMILIES:
        raise RuntimeError(f"family {family.name!r} registered twice")
    FAMILIES[family.name] = family
    for info in family.provides:
        if info.name in METHODS:
            raise RuntimeError(f"method {info.name!r} registered twice")
        if info.family != family.name:
            raise RuntimeError(f"method {info.name!r} names family {info.family!r}")
        METHODS[info.name] = info
    return family_cls


def method_info(name: str) -> MethodInfo:
    try:
        return METHODS[name]
    except KeyError:
        raise SpecError(
            f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}"
        ) from None


def conv_layer_names(model: nn.Module) -> list[str]:
    """Names of the 2-D conv modules, in registration order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


@dataclass(frozen=True)
class LayerChoice:
    """The layer the CAM-family methods use, and why (or why there is none)."""

    name: str | None
    reason: str


# weighted layers a "patch embedding" check counts (what runs after the default CAM layer)
_WEIGHTED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.MultiheadAttention)


def cam_layer_choice(
    model: nn.Module, layer: str | None, example: torch.Tensor | None = None
) -> LayerChoice:
    """The module name a layer-based method uses: ``layer`` if given, else the last conv.

    "Last" means deepest in the computation when an ``example`` input is given: the conv with
    the most convolutions between it and the input (see :func:`deepest_conv`), so a residual
    block's main path wins over its 1x1 shortcut conv even where the shortcut is registered or
    run later, among the convs whose output is a spatial map (more than one position): a conv
    after the global pooling (timm's MobileNetV3 ``conv_head``) has one value per channel,
    where every CAM is constant. Without an example it is the last conv in registration
    order.

    No default layer (the methods are "not applicable", with the reason) when the model has no
    conv layer, or when its deepest conv is a patch embedding at the input (ViT, Swin): when
    more weighted layers (conv, linear, attention) come after that conv than before it and at
    least four do, the network's feature maps are not spatial where the model decides, and a
    CAM at the stem would not explain it. A user can still name any layer. Raises
    ``SpecError`` for an unknown name.
    """
    if layer is not None:
        names = dict(model.named_modules())
        if layer not in names or layer == "":
            raise unknown_cam_layer(layer, conv_layer_names(model))
        return LayerChoice(layer, "named in the audit spec")
    convs = conv_layer_names(model)
    if not convs:
        return LayerChoice(None, "the model has no conv layer, so no spatial feature map")
    passed_over: str | None = None
    if example is not None:
        found = deepest_conv(model, example)
        chosen = found.name if found is not None else convs[-1]
        passed_over = found.passed_over if found is not None else None
    else:
        chosen = convs[-1]
    weighted = [n for n, m in model.named_modules() if isinstance(m, _WEIGHTED_LAYERS)]
    position = weighted.index(chosen) if chosen in weighted else len(weighted)
    before, after = position, len(weighted) - position - 1
    if after >= 4 and after > before:
        return LayerChoice(
            None,
            f"the deepest conv, {chosen}, is a patch embedding near the input: {after} of the "
            f"model's {len(weighted)} weighted layers run after it (attention or linear "
            "layers), so its feature map is not where the model decides and a CAM there "
            "would not explain the model; name a layer to use one anyway",
        )
    how = "deepest in the computation" if example is not None else "last registered"
    if passed_over is not None:
        how += (
            f" with a spatial output ({passed_over}, deeper, outputs one value per channel: "
            "it runs after the global pooling or on a 1x1 map, where a CAM is constant)"
        )
    return LayerChoice(chosen, f"default: the conv layer {how}")


def resolve_layer(
    model: nn.Module, layer: str | None, example: torch.Tensor | None = None
) -> str | None:
    """:func:`cam_layer_choice`'s layer name (None: the layer-based methods do not apply)."""
    return cam_layer_choice(model, layer, example).name


@dataclass(frozen=True)
class DeepestConv:
    """The default CAM layer :func:`deepest_conv` found, and the deeper conv it passed over
    because that one's output is not spatial (None when it passed over none)."""

    name: str
    passed_over: str | None = None


def deepest_conv(model: nn.Module, example: torch.Tensor) -> DeepestConv | None:
    """The conv module whose output has the most convolutions on its longest path back to the
    input, found by walking the autograd graph of one forward pass (ties: the later call),
    among the convs whose output has more than one spatial position; when none has, the
    deepest of all. None when no conv ran."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):

            def hook(_m: nn.Module, _i: object, out: torch.Tensor, name: str = name) -> None:
                outputs.setdefault(name, out)

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            model(example.detach().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    depth: dict[object, int] = {}

    def conv_depth(fn: object) -> int:
        # Iterative post-order walk: deep graphs (densenet) would overflow recursion.
        stack = [(fn, False)]
        while stack:
            node, expanded = stack.pop()
            if node is None or node in depth:
                continue
            parents = [f for f, _ in getattr(node, "next_functions", ())]
            if not expanded:
                stack.append((node, True))
                stack.extend((p, False) for p in parents if p is not None and p not in depth)
                continue
            own = 1 if "Convolution" in type(node).__name__ else 0
            depth[node] = own + max((depth.get(p, 0) for p in parents if p is not None), default=0)
        return depth.get(fn, 0)

    best: tuple[int, int, str] | None = None
    best_spatial: tuple[int, int, str] | None = None
    for order, (name, out) in enumerate(outputs.items()):
        if not isinstance(out, torch.Tensor) or out.grad_fn is None:
            continue
        key = (conv_depth(out.grad_fn), order, name)
        if best is None or key[:2] > best[:2]:
            best = key
        spatial = out.dim() == 4 and out.shape[2] * out.shape[3] > 1
        if spatial and (best_spatial is None or key[:2] > best_spatial[:2]):
            best_spatial = key
    if best is None:
        return None
    if best_spatial is None:
        return DeepestConv(best[2])
    return DeepestConv(best_spatial[2], None if best_spatial == best else best[2])


def get_module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


MethodOutcome = torch.Tensor | NotApplicableError | MethodFailedError


def compute_methods(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    names: Iterable[str],
    ctx: MethodContext,
) -> dict[str, MethodOutcome]:
    """Compute the named methods, each family once; "not applicable" and a method that raised
    are values, not crashes: the other methods' maps stand.

    A converted ONNX graph exported with a fixed batch size (``model.fixed_batch``) runs larger
    batches image group by image group inside its forward, which would hand layer hooks only
    the last group's activations; such batches are split here so each family sees one call.
    """
    wanted = list(dict.fromkeys(names))
    fixed = getattr(model, "fixed_batch", None)
    if isinstance(fixed, int) and 0 < fixed < x.shape[0]:
        parts = [
            compute_methods(model, x[i : i + fixed], target[i : i + fixed], wanted, ctx)
            for i in range(0, x.shape[0], fixed)
        ]
        merged: dict[str, MethodOutcome] = {}
        for name in wanted:
            values = [part[name] for part in parts]
            failed = [v for v in values if not isinstance(v, torch.Tensor)]
            merged[name] = failed[0] if failed else torch.cat(values)  # type: ignore[arg-type]
        return merged
    by_family: dict[str, set[str]] = {}
    for name in wanted:
        by_family.setdefault(method_info(name).family, set()).add(name)
    out: dict[str, MethodOutcome] = {}
    for family_name, members in by_family.items():
        family = FAMILIES[family_name]
        needs_layer = sorted(m for m in members if METHODS[m].needs_conv_layer)
        runnable = set(members)
        if needs_layer and ctx.layer is None:
            for m in needs_layer:
                out[m] = NotApplicableError(ctx.no_layer_reason, method=m)
            runnable -= set(needs_layer)
        if runnable:
            out.update(_compute_family(family, model, x, target, runnable, ctx))
    return {name: out[name] for name in wanted}


def _compute_family(
    family: MethodFamily,
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    members: set[str],
    ctx: MethodContext,
) -> dict[str, MethodOutcome]:
    """Run a family; a family may find out only while running that the model defeats it (e.g.
    a CAM layer called twice per forward pass). That is a result, not a crash: the methods
    that need the layer are marked not applicable and the others are computed without them.
    Any other exception but a ``SpecError`` (the user's spec is wrong: the audit stops with it)
    is the failure of the methods that were running: with several, each is run alone once so
    that one failing method does not take its family with it, and what still fails becomes a
    :class:`MethodFailedError` with the message."""
    recorded = {name: len(calls) for name, calls in ctx.conservation.items()}
    try:
        return dict(family.compute(model, x, target, frozenset(members), ctx))
    except NotApplicableError as exc:
        _forget_since(ctx, recorded)
        layer_methods = {m for m in members if METHODS[m].needs_conv_layer}
        out: dict[str, MethodOutcome] = {
            m: NotApplicableError(exc.message, method=m) for m in layer_methods or members
        }
        rest = members - layer_methods
        if layer_methods and rest:
            out.update(_compute_family(family, model, x, target, rest, ctx))
        return out
    except SpecError:
        raise  # the audit spec is wrong (an unknown composite, a layer that is no feature map)
    except Exception as exc:
        if stops_the_audit(exc):
            raise  # the caller stops the audit (a time limit): not the method's failure
        _forget_since(ctx, recorded)
        if len(members) > 1:
            out = {}
            for member in sorted(members):
                out.update(_compute_family(family, model, x, target, {member}, ctx))
            return out
        (member,) = members
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {
            member: MethodFailedError(
                f"{type(exc).__name__}: {message}"[:500], method=member, family=family.name
            )
        }


def _forget_since(ctx: MethodContext, recorded: dict[str, int]) -> None:
    """Drop what a failed call recorded: it is not a result (a retry records again)."""
    for name, calls in ctx.conservation.items():
        del calls[recorded.get(name, 0) :]
