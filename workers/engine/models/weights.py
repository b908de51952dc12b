"""Weights files for a named architecture (torchvision or timm): read as data, loaded strictly.

Weights are read as data only: safetensors, or a state dict through
``torch.load(weights_only=True)`` (PyTorch's restricted unpickler, which refuses arbitrary
objects). Whole pickled models are never loaded. Keys must match the architecture exactly: a
missing or unexpected key, or a tensor of the wrong shape, is an error that lists them.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from ..errors import ModelLoadError, WeightsMismatchError

SAFETENSORS = "safetensors"
TORCH_STATE_DICT = "pt"


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


def load_strictly(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], architecture: str, hint: str = ""
) -> None:
    """Load ``state_dict`` into ``model``; every key must match and every shape fit, else a
    :class:`WeightsMismatchError` (missing and unexpected keys) or a :class:`ModelLoadError`
    (the tensors of the wrong shape, then ``hint``), before any weight is copied."""
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
            f"shape: {wrong_shapes[:10]}{hint}",
            wrong_shapes=wrong_shapes,
        )
    model.load_state_dict(state_dict, strict=True)


def prepare_for_attribution(model: nn.Module) -> nn.Module:
    """Eval mode, no in-place activations and attention computed in the open.

    Backward hooks (guided backprop, LRP) need the pre-activation tensors intact, and in-place
    ops on hooked outputs are an autograd error: every module with an ``inplace`` flag
    (torch's activations and dropout, timm's) gets it off. A fused attention kernel
    (``F.scaled_dot_product_attention``, which timm's attention modules call when their
    ``fused_attn`` flag is on) hides the softmax of the attention weights from the LRP rules
    of :mod:`saliency_audit.workers.engine.methods.lrp_ops`, which give a softmax gate's product all
    its
    relevance to the other operand; computed in the open, ``softmax(q k^T) v``, the same
    function gets those rules (tests/engine/test_timm.py measures the difference on a ViT).
    Neither change alters what the model computes.
    """
    for module in model.modules():
        for flag in ("inplace", "fused_attn"):
            if isinstance(getattr(module, flag, None), bool):
                setattr(module, flag, False)
    return model.eval()
