"""timm models with seeded random weights, and an environment without timm, for the tests of
``--arch timm:NAME`` (engine and service). Nothing is downloaded: ``pretrained=False``."""

from __future__ import annotations

import builtins
import sys
from typing import Any

import pytest
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from tests.engine.nets import randomize_batchnorm_stats


def trained_like(model: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights without timm's initial zeros: the last BatchNorm of a residual
    block starts at gamma 0 and ConvNeXt's layer scale at 1e-6, which silence every block's
    branch (a trained model's are not silent)."""
    randomize_batchnorm_stats(model, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.copy_(torch.rand(parameter.shape, generator=g) * 0.5 + 0.5)
    return model.eval()


def timm_model(name: str, num_classes: int, seed: int = 0, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False)`` with seeded, trained-like weights."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    return trained_like(model, seed)


def safetensors_weights(model: nn.Module) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})


def hide_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    """timm not installed, as in an environment without the extra: importing it fails (the
    modules already imported are set aside until ``monkeypatch`` undoes it)."""
    real_import = builtins.__import__

    def refuse_timm(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "timm" or name.startswith("timm."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", refuse_timm)
