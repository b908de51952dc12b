"""A torchvision classification architecture plus uploaded weights.

Weights are read as data only: safetensors, or a state dict through
``torch.load(weights_only=True)`` (PyTorch's restricted unpickler, which refuses arbitrary
objects). Whole pickled models are never loaded. Keys must match the architecture exactly.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Mapping

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from ..errors import ModelLoadError, NotAClassifierError, WeightsMismatchError
from ..spec import InputSpec
from .base import LoadedModel, ModelOutput

SAFETENSORS = "safetensors"
TORCH_STATE_DICT = "pt"


def classification_architectures() -> list[str]:
    """The torchvision classification model names this adapter accepts."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def detect_weights_format(data: bytes) -> str:
    """safetensors starts with an 8-byte header length then '{'; torch.save writes a zip."""
    if len(data) >= 9 and data[8:9] == b"{":
        return SAFETENSORS
    if data[:4] == b"PK\x03\x04":
        return TORCH_STATE_DICT
    raise ModelLoadError(
        "weights are neither safetensors nor a torch.save zip archive (legacy pickle files "
        "are refused: re-save the state dict with torch.save or safetensors)"
    )


def read_state_dict(data: bytes) -> dict[str, torch.Tensor]:
    fmt = detect_weights_format(data)
    obj: object
    if fmt == SAFETENSORS:
        try:
            obj = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"invalid safetensors file: {exc}") from None
    else:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (RuntimeError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise ModelLoadError(
                f"the .pt file is not a plain state dict loadable with weights_only=True "
                f"({first_line})"
            ) from None
        except Exception as exc:  # the restricted unpickler raises UnpicklingError subclasses
            raise ModelLoadError(f"refused .pt file: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ModelLoadError("weights must be a mapping of parameter names to tensors")
    return dict(obj)


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
        raise ModelLoadError(
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
    model = probe
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise WeightsMismatchError(architecture, missing, unexpected)
    wrong_shapes = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state_dict[k].shape)}"
        for k in expected
        if tuple(expected[k].shape) != tuple(state_dict[k].shape)
    ]
    if wrong_shapes:
        raise ModelLoadError(
            f"weights do not fit {architecture}: {len(wrong_shapes)} tensors have the wrong "
            f"shape: {wrong_shapes[:10]}",
            wrong_shapes=wrong_shapes,
        )
    model.load_state_dict(state_dict, strict=True)
    return prepare_for_attribution(model)


def prepare_for_attribution(model: nn.Module) -> nn.Module:
    """Eval mode, and no in-place ReLUs: backward hooks (guided backprop, LRP) need the
    pre-activation tensors intact, and in-place ops on hooked outputs are an autograd error."""
    for module in model.modules():
        if isinstance(module, nn.ReLU | nn.ReLU6 | nn.Hardswish | nn.Hardsigmoid | nn.SiLU):
            module.inplace = False
    return model.eval()


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
