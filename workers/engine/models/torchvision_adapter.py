"""A torchvision classification architecture plus uploaded weights.

The weights are read as data and loaded strictly (:mod:`.weights`): safetensors or a
``torch.save`` state dict, never a pickled model; keys must match the architecture exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
import torchvision
from torch import nn

from ..errors import ModelLoadError, NotAClassifierError, UnknownArchitectureError
from ..spec import InputSpec
from .base import LoadedModel, ModelOutput
from .weights import (
    SAFETENSORS,
    TORCH_STATE_DICT,
    detect_weights_format,
    load_strictly,
    prepare_for_attribution,
    read_state_dict,
)

__all__ = [
    "SAFETENSORS",
    "TORCH_STATE_DICT",
    "build_torchvision",
    "classification_architectures",
    "detect_weights_format",
    "load_torchvision",
    "prepare_for_attribution",
    "read_state_dict",
]


def classification_architectures() -> list[str]:
    """The torchvision classification model names this adapter accepts."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _last_linear_name(model: nn.Module) -> str | None:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def build_torchvision(
    architecture: str, state_dict: Mapping[str, torch.Tensor], num_classes: int | None = None
) -> nn.Module:
    """Instantiate ``architecture`` (no downloaded weights) and load ``state_dict`` strictly.

    When ``num_classes`` is None it is read from the shape of the last linear layer's weight
    in the state dict, so fine-tuned heads load without extra configuration. A head of fewer
    than two classes (a regression head) is not a classifier and is refused.
    """
    if architecture not in classification_architectures():
        raise UnknownArchitectureError(
            f"unknown torchvision classification architecture {architecture!r}",
            known=classification_architectures(),
        )
    probe = torchvision.models.get_model(architecture, weights=None)
    if num_classes is None:
        head = _last_linear_name(probe)
        head_weight = state_dict.get(f"{head}.weight") if head else None
        num_classes = int(head_weight.shape[0]) if head_weight is not None else 1000
        if num_classes != 1000:
            probe = torchvision.models.get_model(
                architecture, weights=None, num_classes=num_classes
            )
    elif num_classes != 1000:
        probe = torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)
    if num_classes < 2:
        raise NotAClassifierError(_head(probe)[0], (None, num_classes))
    load_strictly(probe, state_dict, architecture)
    return prepare_for_attribution(probe)


def load_torchvision(
    architecture: str,
    weights: bytes,
    input_spec: InputSpec | None = None,
    num_classes: int | None = None,
) -> LoadedModel:
    module = build_torchvision(architecture, read_state_dict(weights), num_classes)
    head, classes = _head(module)
    return LoadedModel(
        module=module,
        input_spec=input_spec or InputSpec(),
        source="torchvision",
        sha256=hashlib.sha256(weights).hexdigest(),
        architecture=architecture,
        output=ModelOutput(name=head, index=0, shape=(None, classes), num_classes=classes),
    )


def _head(model: nn.Module) -> tuple[str, int]:
    """The classification head's module name and its number of classes: the last linear layer,
    or the last conv for architectures whose head is a 1x1 conv (squeezenet)."""
    for name, module in reversed(list(model.named_modules())):
        if isinstance(module, nn.Linear):
            return name, module.out_features
        if isinstance(module, nn.Conv2d):
            return name, module.out_channels
    raise ModelLoadError("the architecture has no linear or conv layer to read the classes from")
