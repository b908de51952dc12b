"""torchvision architectures with uploaded weights: data only, strict keys, clear errors."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from safetensors.torch import save as save_safetensors

from saliency_audit.workers.engine.errors import ModelLoadError, WeightsMismatchError
from saliency_audit.workers.engine.models.loader import load_model
from saliency_audit.workers.engine.models.torchvision_adapter import load_torchvision
from tests.engine.nets import torchvision_model


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    return torchvision_model("resnet18", seed=3, num_classes=7).state_dict()


def _torch_save(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.ones(1, 3, 64, 64))


def test_safetensors_weights_load_and_reproduce_logits(resnet18_state) -> None:  # type: ignore[no-untyped-def]
    reference = torchvision_model("resnet18", seed=3, num_classes=7)
    data = save_safetensors({k: v.contiguous() for k, v in resnet18_state.items()})
    loaded = load_torchvision("resnet18", data)
    assert loaded.source == "torchvision" and len(loaded.sha256) == 64
    torch.testing.assert_close(_logits(loaded.module), _logits(reference))
    assert _logits(loaded.module).shape == (1, 7)  # head size read from the weights


def test_state_dict_pt_loads_with_weights_only(resnet18_state) -> None:  # type: ignore[no-untyped-def]
    loaded = load_model(_torch_save(resnet18_state), architecture="resnet18")
    relus = [m for m in loaded.module.modules() if isinstance(m, torch.nn.ReLU)]
    assert relus and not any(r.inplace for r in relus)
    assert not loaded.module.training


def test_a_pickled_whole_model_is_refused(resnet18_state) -> None:  # type: ignore[no-untyped-def]
    model = torchvision_model("resnet18", seed=3, num_classes=7)
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_torchvision("resnet18", _torch_save(model))


def test_a_pickle_payload_is_never_executed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (open, (str(marker), "w"))

    with pytest.raises(ModelLoadError):
        load_torchvision("resnet18", _torch_save({"fc.weight": Payload()}))
    with pytest.raises(ModelLoadError, match="neither safetensors nor"):
        load_torchvision("resnet18", pickle.dumps({"fc.weight": Payload()}))
    assert not marker.exists()


def test_key_mismatch_lists_missing_and_unexpected(resnet18_state) -> None:  # type: ignore[no-untyped-def]
    state = dict(resnet18_state)
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsMismatchError) as info:
        load_torchvision("resnet18", _torch_save(state))
    assert info.value.details["missing_keys"] == ["layer1.0.conv1.weight"]
    assert info.value.details["unexpected_keys"] == ["extra.weight"]
    assert "layer1.0.conv1.weight" in info.value.message


def test_wrong_shape_and_unknown_architecture(resnet18_state) -> None:  # type: ignore[no-untyped-def]
    state = dict(resnet18_state)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(ModelLoadError, match="wrong shape"):
        load_torchvision("resnet18", _torch_save(state))
    with pytest.raises(ModelLoadError, match="unknown torchvision"):
        load_torchvision("resnet_nope", _torch_save(resnet18_state))


def test_truncated_weights_give_a_clear_error(resnet18_state) -> None:  # type: ignore[no-untyped-def]
    data = save_safetensors({k: v.contiguous() for k, v in resnet18_state.items()})
    with pytest.raises(ModelLoadError):
        load_torchvision("resnet18", data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        load_torchvision("resnet18", _torch_save(resnet18_state)[:5000])
