"""Canonization: put a model, temporarily, into the form that LRP rules assume.

LRP rules are stated for a chain of linear layers and element-wise activations (Bach et al.
2015; Montavon et al. 2019, sec. 10.2.1). Real classifiers break that form in three
ways, and each has a fix that does not change what the model computes:

* **BatchNorm after a conv or linear layer** is an affine map of that layer's output, so it is
  merged into the layer (``W' = s W``, ``b' = s (b - mu) + beta`` with ``s = gamma / sqrt(var +
  eps)``) and the BatchNorm becomes the identity (Zennit ``NamedMergeBatchNorm``). The rule of
  the layer then sees the weights the model really uses.
* **Residual additions** written as ``out + identity`` give each branch the full upper relevance
  under plain autograd (relevance doubles). They are rewritten as a ``zennit.layer.Sum`` over a
  stack, which the composites map to the ``Norm`` rule: relevance is split in proportion to each
  branch's contribution. torchvision ResNet blocks get Zennit's block canonizers; ONNX-converted
  graphs already use :class:`~saliency_audit.workers.engine.models.layers.Add` (a ``Sum``).
* **Functional operations in ``forward``** escape module hooks. torchvision DenseNet ends with
  ``F.relu`` and ``F.adaptive_avg_pool2d``: the gradient of the pool spreads relevance uniformly
  and the ReLU's gradient then drops the share of the inactive positions, so relevance is lost.
  Its head is rewritten with ``nn.ReLU`` and ``nn.AdaptiveAvgPool2d`` modules, which the
  composites map to ``Pass`` and ``Norm``.

**Pre-activation BatchNorm** (DenseNet: ``norm1`` of every dense layer, the transition ``norm``,
``norm5``) follows a concatenation and precedes a ReLU. No linear layer produces its input
alone (the input is a concatenation of several layers' outputs, each also read elsewhere), and
a ReLU separates it from the next conv, so it cannot be merged without changing the function.
It stays, and the composites give it the ``Pass`` rule. For an element-wise affine map
``y = s x + t`` the LRP-0 rule with the bias excluded gives ``R_x = (s x / s x) R_y = R_y``:
``Pass`` *is* that rule, and it conserves relevance exactly. This matches the engine's choice to
exclude biases from every LRP rule (see :mod:`saliency_audit.workers.engine.methods.lrp`).

MobileNetV3's hard-swish activations get ``Pass`` and its squeeze-excitation products and
in-place residual additions go through plain autograd: LRP runs, but relevance is not conserved
there (no canonizer exists for a product of two activations).

Canonizers modify parameters and ``forward`` attributes while registered. :func:`canonized`
applies them and restores the model in ``finally``, then additionally restores a reference
snapshot of every module's parameters, buffers, children and instance attributes, so the model
is left exactly as it was found (parameters bit-identical) even if a canonizer fails half-way.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.densenet import DenseNet, _DenseLayer
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from zennit.canonizers import Canonizer, NamedMergeBatchNorm
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer

from .layers import ChannelAffine

_LINEAR_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, ChannelAffine)


def batchnorm_merge_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(linear layer name, BatchNorm name) pairs whose BatchNorm reads only that layer's output.

    ONNX-converted graphs name their own pairs (``linear_bn_pairs()``, found on the graph). For
    torch models the pairs come from structure that guarantees the data flow: consecutive
    children of an ``nn.Sequential``, and the known conv/BN attributes of torchvision ResNet
    stems and blocks and DenseNet dense layers (``conv1 -> norm2``). A BatchNorm found nowhere
    stays unmerged and gets the ``Pass`` rule, which still conserves relevance.
    """
    pairs_fn = getattr(model, "linear_bn_pairs", None)
    if callable(pairs_fn):
        candidates = [(str(lin), str(bn)) for lin, bn in pairs_fn()]
    else:
        candidates = []
        for name, module in model.named_modules():
            prefix = f"{name}." if name else ""
            # A Sequential that keeps nn.Sequential's forward feeds each child the previous one.
            if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
                children = list(module.named_children())
                for (a_name, a), (b_name, b) in itertools.pairwise(children):
                    if isinstance(a, _LINEAR_TYPES) and isinstance(b, _BATCHNORM_TYPES):
                        candidates.append((prefix + a_name, prefix + b_name))
            attribute_pairs: tuple[tuple[str, str], ...] = ()
            if isinstance(module, ResNet):
                attribute_pairs = (("conv1", "bn1"),)
            elif isinstance(module, BasicBlock):
                attribute_pairs = (("conv1", "bn1"), ("conv2", "bn2"))
            elif isinstance(module, Bottleneck):
                attribute_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
            elif isinstance(module, _DenseLayer):
                attribute_pairs = (("conv1", "norm2"),)
            candidates.extend((prefix + a, prefix + b) for a, b in attribute_pairs)
    modules = dict(model.named_modules())
    pairs: list[tuple[str, str]] = []
    for lin_name, bn_name in dict.fromkeys(candidates):
        if _mergeable(modules.get(lin_name), modules.get(bn_name)):
            pairs.append((lin_name, bn_name))
    return pairs


def _mergeable(linear: nn.Module | None, bn: nn.Module | None) -> bool:
    """Checked before merging so that a merge can never fail half-way through a layer."""
    if not isinstance(linear, _LINEAR_TYPES) or not isinstance(bn, _BATCHNORM_TYPES):
        return False
    out_features = linear.out_features if isinstance(linear, nn.Linear) else linear.out_channels
    return (
        bn.affine
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.running_var is not None
        and bn.num_features == out_features
    )


class _SetAttributes(Canonizer):
    """Set instance attributes on matching modules and restore exactly what was there.

    Zennit's ``AttributeCanonizer`` removes overloaded attributes with ``delattr``, which would
    delete an attribute the module already had (e.g. ``memory_efficient``); this one remembers
    the previous value.
    """

    def __init__(self, attribute_map: Callable[[nn.Module], dict[str, Any] | None]) -> None:
        self.attribute_map = attribute_map
        self.module: nn.Module | None = None
        self.previous: dict[str, tuple[bool, Any]] = {}

    def apply(self, root_module: nn.Module) -> list[_SetAttributes]:
        instances = []
        for module in root_module.modules():
            attributes = self.attribute_map(module)
            if attributes:
                instance = self.copy()
                instance.register(module, attributes)
                instances.append(instance)
        return instances

    def register(self, module: nn.Module, attributes: dict[str, Any]) -> None:
        self.module = module
        for key, value in attributes.items():
            had = key in module.__dict__ or key in module._modules
            self.previous[key] = (had, getattr(module, key) if had else None)
            setattr(module, key, value)

    def remove(self) -> None:
        if self.module is None:
            return
        for key, (had, value) in reversed(list(self.previous.items())):
            if had:
                setattr(self.module, key, value)
            else:
                delattr(self.module, key)
        self.previous.clear()
        self.module = None

    def copy(self) -> _SetAttributes:
        return _SetAttributes(self.attribute_map)


def _densenet_forward(self: DenseNet, x: torch.Tensor) -> torch.Tensor:
    """torchvision ``DenseNet.forward`` with the head's ReLU and pooling as hookable modules."""
    out = self.canonizer_relu(self.features(x))
    out = torch.flatten(self.canonizer_pool(out), 1)
    return self.classifier(out)


def _densenet_attributes(module: nn.Module) -> dict[str, Any] | None:
    if isinstance(module, DenseNet):
        return {
            "forward": _densenet_forward.__get__(module),
            "canonizer_relu": nn.ReLU(),
            "canonizer_pool": nn.AdaptiveAvgPool2d((1, 1)),
        }
    if isinstance(module, _DenseLayer) and module.memory_efficient:
        # Checkpointing re-runs the forward inside backward, where rule hooks would misfire.
        return {"memory_efficient": False}
    return None


def lrp_canonizers(model: nn.Module, keep_unmerged: Collection[str] = ()) -> list[Canonizer]:
    """The Zennit canonizers that make ``model`` LRP-ready (see the module docstring).

    ``keep_unmerged`` names layers whose BatchNorm must not be merged into them: a CAM method
    reading a conv's output needs the conv's own output, not conv + BatchNorm.
    """
    pairs = [((lin,), bn) for lin, bn in batchnorm_merge_pairs(model) if lin not in keep_unmerged]
    canonizers: list[Canonizer] = []
    if pairs:
        canonizers.append(NamedMergeBatchNorm(pairs))
    if any(isinstance(m, BasicBlock | Bottleneck) for m in model.modules()):
        canonizers += [ResNetBasicBlockCanonizer(), ResNetBottleneckCanonizer()]
    if any(isinstance(m, DenseNet | _DenseLayer) for m in model.modules()):
        canonizers.append(_SetAttributes(_densenet_attributes))
    return canonizers


@dataclass
class _ModuleState:
    module: nn.Module
    parameters: dict[str, nn.Parameter | None]
    parameter_data: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor | None]
    buffer_data: dict[str, torch.Tensor]
    children: dict[str, nn.Module | None]
    attributes: dict[str, Any]


def _snapshot(model: nn.Module) -> list[_ModuleState]:
    """References (no copies) to everything a canonizer may rebind, storages included."""
    states = []
    for module in model.modules():
        params = dict(module._parameters)
        states.append(
            _ModuleState(
                module=module,
                parameters=params,
                parameter_data={k: p.data for k, p in params.items() if p is not None},
                buffers=dict(module._buffers),
                buffer_data={k: b.data for k, b in module._buffers.items() if b is not None},
                children=dict(module._modules),
                attributes={
                    k: v
                    for k, v in module.__dict__.items()
                    if k not in ("_parameters", "_buffers", "_modules")
                },
            )
        )
    return states


_MISSING = object()


def _restore(states: list[_ModuleState]) -> None:
    for state in states:
        module = state.module
        for key in [k for k in module.__dict__ if k not in state.attributes]:
            if key not in ("_parameters", "_buffers", "_modules"):
                object.__delattr__(module, key)
        for key, value in state.attributes.items():
            if module.__dict__.get(key, _MISSING) is not value:
                object.__setattr__(module, key, value)
        module._parameters.clear()
        module._parameters.update(state.parameters)
        for key, data in state.parameter_data.items():
            param = state.parameters[key]
            if param is not None:
                param.data = data
        module._buffers.clear()
        module._buffers.update(state.buffers)
        for key, data in state.buffer_data.items():
            buffer = state.buffers[key]
            if buffer is not None:
                buffer.data = data
        module._modules.clear()
        module._modules.update(state.children)


@contextmanager
def canonized(model: nn.Module, canonizers: list[Canonizer]) -> Iterator[nn.Module]:
    """Apply ``canonizers`` to ``model`` for the ``with`` block; always undo them afterwards."""
    states = _snapshot(model)
    applied: list[Canonizer] = []
    try:
        for canonizer in canonizers:
            applied.extend(canonizer.apply(model))
        yield model
    finally:
        try:
            for instance in reversed(applied):
                instance.remove()
        finally:
            _restore(states)


__all__ = ["batchnorm_merge_pairs", "canonized", "lrp_canonizers"]
