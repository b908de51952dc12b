"""Randomization stages come from the module tree; re-initialization is seeded and undone."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from saliency_audit.workers.engine.randomization import (
    parameterized_modules,
    randomized,
    reinitialize,
    stages,
    units,
)
from tests.engine.nets import small_cnn, torchvision_model


def test_resnet18_blocks_are_the_root_children_with_parameters() -> None:
    model = torchvision_model("resnet18")
    assert [u.name for u in units(model, "block")] == [
        "conv1",
        "bn1",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "fc",
    ]
    per_module = units(model, "module")
    assert len(per_module) == len(parameterized_modules(model)) == 41
    assert per_module[-1].name == "fc" and per_module[0].name == "conv1"


def test_cascading_goes_top_down_and_keeps_earlier_randomizations() -> None:
    block_units = units(small_cnn(), "block")
    # ``features`` holds 3 of the 4 parameterized modules: more than half, so it is split
    assert [u.name for u in block_units] == ["features.0", "features.3", "features.4", "classifier"]
    module_units = units(small_cnn(), "module")
    top_down = stages(module_units, "cascading")
    assert [s.name for s in top_down] == ["classifier", "features.4", "features.3", "features.0"]
    assert top_down[-1].randomized == ("classifier", "features.4", "features.3", "features.0")
    bottom_up = stages(module_units, "cascading_bottom_up")
    assert bottom_up[0].randomized == ("features.0",) and len(bottom_up[-1].randomized) == 4
    independent = stages(module_units, "independent")
    assert [s.randomized for s in independent] == [(u.name,) for u in module_units]
    with pytest.raises(ValueError):
        stages(module_units, "sideways")  # type: ignore[arg-type]


def test_reinitialization_follows_the_default_initializer_and_is_seeded() -> None:
    layer = nn.Linear(400, 300)
    reinitialize(layer, torch.Generator().manual_seed(1))
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    weight = layer.weight.detach()
    assert float(weight.abs().max()) <= bound
    assert float(weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert float(layer.bias.detach().abs().max()) <= bound
    first = layer.weight.detach().clone()
    reinitialize(layer, torch.Generator().manual_seed(1))
    assert torch.equal(first, layer.weight)
    reinitialize(layer, torch.Generator().manual_seed(2))
    assert not torch.equal(first, layer.weight)
    norm = nn.BatchNorm2d(4)
    with torch.no_grad():
        norm.weight.fill_(3.0)
        norm.running_var.fill_(9.0)
    reinitialize(norm, torch.Generator().manual_seed(1))
    assert torch.equal(norm.weight, torch.ones(4)) and torch.equal(norm.running_var, torch.ones(4))


def test_randomized_restores_the_trained_weights_and_leaves_the_global_rng_alone() -> None:
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_state = torch.get_rng_state()
    with randomized(model, ["classifier", "features.3"], seed=0):
        changed = model.state_dict()
        assert not torch.equal(changed["classifier.weight"], before["classifier.weight"])
        assert not torch.equal(changed["features.3.weight"], before["features.3.weight"])
        assert torch.equal(changed["features.0.weight"], before["features.0.weight"])
        inside = changed["classifier.weight"].clone()
    assert torch.equal(torch.get_rng_state(), rng_state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # Same seed and module: the same random weights at every stage and in every test, so a
    # stage that randomizes the same modules is the same model wherever it occurs.
    with randomized(model, ["classifier"], seed=0):
        assert torch.equal(model.state_dict()["classifier.weight"], inside)
    with randomized(model, ["classifier"], seed=1):
        assert not torch.equal(model.state_dict()["classifier.weight"], inside)
    with randomized(model, ["classifier"], seed=0, draw="other"):
        assert not torch.equal(model.state_dict()["classifier.weight"], inside)


def test_parameters_without_an_initializer_are_redrawn_like_a_vit_embedding() -> None:
    from torchvision.models.convnext import CNBlock

    block = CNBlock(8, layer_scale=1e-6, stochastic_depth_prob=0.0)
    before = block.layer_scale.detach().clone()
    conv_before = block.block[0].weight.detach().clone()
    reinitialize(block, torch.Generator().manual_seed(1))
    after = block.layer_scale.detach()
    assert not torch.equal(after, before) and float(after.abs().max()) <= 0.04
    assert torch.equal(block.block[0].weight, conv_before)  # children are units of their own
    again = CNBlock(8, layer_scale=1e-6, stochastic_depth_prob=0.0)
    reinitialize(again, torch.Generator().manual_seed(1))
    assert torch.equal(again.layer_scale, after)


def test_a_root_child_holding_most_of_the_model_is_split_into_its_blocks() -> None:
    mobilenet = torchvision_model("mobilenet_v2")
    names = [u.name for u in units(mobilenet, "block")]
    assert names == [f"features.{k}" for k in range(19)] + ["classifier"]
    resnet = [u.name for u in units(torchvision_model("resnet18"), "block")]
    assert resnet == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]  # unchanged
