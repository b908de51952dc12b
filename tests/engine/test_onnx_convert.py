"""The ONNX adapter rebuilds the exported network: same logits, same module names, real layers.

Reference numbers come from the torch model that was exported (the converted graph computes the
same function) and from ONNX Runtime on the file itself. Exports are cached in tests/.cache.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import external_data_helper, helper
from torch import nn

from saliency_audit.workers.engine.errors import ModelLoadError, SpecError, UnsupportedOperatorError
from saliency_audit.workers.engine.models import layers
from saliency_audit.workers.engine.models.fidelity import check_fidelity, ort_session
from saliency_audit.workers.engine.models.onnx_convert import OnnxGraphModule, load_onnx
from saliency_audit.workers.engine.models.onnx_ops import Reshape, ShapeOf
from saliency_audit.workers.engine.spec import IMAGENET_MEAN, InputSpec
from tests.engine import onnx_exports
from tests.engine.nets import images, small_cnn, torchvision_model

# (arch, exporter, opset, seed, size). Each architecture runs with both weight seeds (seed 1
# stands in for trained weights) and with both exporters. Opsets 14-16 change no operator these
# networks use (HardSwish arrives in 14, so mobilenet runs at 13 and 17), so they run on resnet18
# alone. vgg11 needs 224 px (its adaptive pool to 7x7 only exports when 7 divides the feature
# map), which makes it a 530 MB file: it runs at legacy 13 and dynamo 18 only, since its
# operators (Conv, Relu, MaxPool, AveragePool, Flatten, Gemm) read the same at opsets 13-17.
MATRIX = [
    ("resnet18", "legacy", 13, 0, 64),
    ("resnet18", "legacy", 14, 1, 64),
    ("resnet18", "legacy", 15, 0, 64),
    ("resnet18", "legacy", 16, 1, 64),
    ("resnet18", "legacy", 17, 1, 224),
    ("resnet18", "dynamo", 18, 0, 64),
    ("mobilenet_v3_small", "legacy", 13, 0, 64),
    ("mobilenet_v3_small", "legacy", 17, 1, 64),
    ("mobilenet_v3_small", "dynamo", 18, 1, 64),
    ("densenet121", "legacy", 13, 0, 64),
    ("densenet121", "legacy", 17, 1, 64),
    pytest.param("densenet121", "dynamo", 18, 0, 64, marks=pytest.mark.slow),
    # channel shuffle: x.view(n, groups, c // groups, h, w) on a dynamic batch, and x.chunk(2)
    # that the dynamo optimizer turns into a Split without a module scope
    ("shufflenet_v2_x0_5", "legacy", 17, 0, 64),
    ("shufflenet_v2_x0_5", "dynamo", 18, 1, 64),
    pytest.param("vgg11", "legacy", 13, 0, 224, marks=pytest.mark.slow),
    pytest.param("vgg11", "dynamo", 18, 1, 224, marks=pytest.mark.slow),
]


def _layer_names(model: nn.Module, kind: type[nn.Module]) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, kind)]


def _ort(data: bytes, x: torch.Tensor) -> np.ndarray:
    session = ort_session(data)
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize(("arch", "exporter", "opset", "seed", "size"), MATRIX)
def test_converted_torchvision_model_reproduces_logits_and_layer_names(
    arch: str,
    exporter: onnx_exports.Exporter,
    opset: int,
    seed: int,
    size: int,
    artifact_cache: Path,
) -> None:
    data = onnx_exports.export_torchvision(
        arch, cache_dir=artifact_cache, seed=seed, exporter=exporter, opset=opset, size=size
    )
    loaded = load_onnx(data)
    reference = torchvision_model(arch, seed)
    x = images(2, size, seed=seed)
    with torch.no_grad():
        expected = reference(x)
        actual = loaded.module(x)

    # Tolerance relative to the logit scale: random mobilenet logits are ~0.02, resnet's ~3.
    tol = 1e-4 * float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= tol
    assert torch.equal(actual.argmax(1), expected.argmax(1))
    report = check_fidelity(loaded, x, atol=tol)
    assert report.passed and report.argmax_agreement == 1.0

    assert loaded.source == "onnx" and loaded.opset == opset and loaded.onnx_bytes == data
    assert loaded.input_spec.layout == "NCHW"
    assert (loaded.input_spec.height, loaded.input_spec.width) == (size, size)
    # Both exporters carry the module hierarchy: every conv and linear layer keeps its name,
    # in execution order (so the last conv listed is the network's last conv).
    assert _layer_names(loaded.module, nn.Conv2d) == _layer_names(reference, nn.Conv2d)
    assert _layer_names(loaded.module, nn.Linear) == _layer_names(reference, nn.Linear)


@pytest.fixture(scope="module")
def resnet18_legacy(artifact_cache: Path) -> bytes:
    return onnx_exports.export_torchvision(
        "resnet18", cache_dir=artifact_cache, seed=0, exporter="legacy", opset=13, size=64
    )


@pytest.fixture(scope="module")
def resnet18_dynamo(artifact_cache: Path) -> bytes:
    return onnx_exports.export_torchvision(
        "resnet18", cache_dir=artifact_cache, seed=0, exporter="dynamo", opset=18, size=64
    )


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_resnet18_module_tree_mirrors_torchvision_blocks(
    exporter: str, resnet18_legacy: bytes, resnet18_dynamo: bytes
) -> None:
    data = resnet18_legacy if exporter == "legacy" else resnet18_dynamo
    module = load_onnx(data).module
    children = dict(module.named_children())
    for block in ("layer1", "layer2", "layer3", "layer4"):
        assert block in children  # a block is a child of the root, as in torchvision
    names = dict(module.named_modules())
    assert isinstance(names["layer1.0.conv1"], nn.Conv2d)
    assert isinstance(names["layer2.0.downsample.0"], nn.Conv2d)
    assert isinstance(names["fc"], nn.Linear)
    # torchvision calls block.relu twice; each call gets its own module, as LRP needs.
    assert isinstance(names["layer1.0.relu"], nn.ReLU)
    assert isinstance(names["layer1.0.relu_1"], nn.ReLU)
    assert names["layer1.0.relu"] is not names["layer1.0.relu_1"]
    assert len(_layer_names(module, nn.ReLU)) == 17
    residual = _layer_names(module, layers.Add)
    assert len(residual) == 8 and "layer1.0.add" in residual
    assert list(children)[:3] == ["conv1", "relu", "maxpool"]


@pytest.fixture(scope="module")
def resnet18_with_batchnorm(artifact_cache: Path) -> bytes:
    """Legacy export without constant folding: BatchNorm stays a node after each conv."""
    return onnx_exports.export_torchvision(
        "resnet18", cache_dir=artifact_cache, exporter="legacy", opset=13, fold_batchnorm=False
    )


def test_gradients_reach_the_input_and_match_the_torch_model(
    resnet18_with_batchnorm: bytes,
) -> None:
    # With BatchNorm kept, the converted graph computes exactly the torch model's function, so
    # the input gradients agree to rounding. (A BN-folded export can flip a ReLU or max-pool
    # switch that sits at its kink, which changes gradients far more than logits.)
    module = load_onnx(resnet18_with_batchnorm).module
    reference = torchvision_model("resnet18", 0)
    x = images(2, 64)
    grads = []
    for net in (module, reference):
        xi = x.clone().requires_grad_(True)
        logits = net(xi)
        (grad,) = torch.autograd.grad(logits[:, 7].sum(), xi)
        grads.append(grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU:UserWarning")
def test_guided_backprop_hooks_every_relu_of_the_converted_graph(
    resnet18_with_batchnorm: bytes,
) -> None:
    # Captum's Guided Backprop only changes the backward pass of nn.ReLU modules; a ReLU left
    # as a function would make the two maps differ.
    from captum.attr import GuidedBackprop

    module = load_onnx(resnet18_with_batchnorm).module
    reference = torchvision_model("resnet18", 0)
    x = images(2, 64).requires_grad_(True)
    converted_map = GuidedBackprop(module).attribute(x, target=3)
    reference_map = GuidedBackprop(reference).attribute(x, target=3)
    assert float(reference_map.abs().max()) > 0
    torch.testing.assert_close(converted_map, reference_map, rtol=1e-4, atol=1e-7)


def test_converted_module_deep_copies_and_moves_like_any_module(
    resnet18_legacy: bytes,
) -> None:
    module = load_onnx(resnet18_legacy).module
    twin = copy.deepcopy(module)
    x = images(2, 64)
    fc = twin.get_submodule("fc")
    assert isinstance(fc, nn.Linear)
    with torch.no_grad():
        fc.weight.mul_(2.0)
        assert not torch.allclose(twin(x), module(x))
        twin.load_state_dict(module.state_dict())
        torch.testing.assert_close(twin.double().float()(x), module(x))


def test_every_conv_batchnorm_pair_of_resnet18_is_listed(resnet18_with_batchnorm: bytes) -> None:
    module = load_onnx(resnet18_with_batchnorm).module
    assert isinstance(module, OnnxGraphModule)
    reference = torchvision_model("resnet18", 0)
    convs = _layer_names(reference, nn.Conv2d)
    bns = _layer_names(reference, nn.BatchNorm2d)
    assert module.linear_bn_pairs() == list(zip(convs, bns, strict=True))
    assert _layer_names(module, nn.BatchNorm2d) == bns


def test_weights_are_parameters_that_can_be_reinitialized(resnet18_legacy: bytes) -> None:
    module = load_onnx(resnet18_legacy).module
    x = images(2, 64)
    names = dict(module.named_modules())
    conv = names["layer4.1.conv2"]
    assert isinstance(conv, nn.Conv2d)
    assert isinstance(conv.weight, nn.Parameter) and conv.weight.requires_grad
    assert {n for n, _ in module.named_parameters()} >= {"fc.weight", "fc.bias", "conv1.weight"}
    with torch.no_grad():
        before = module(x)
        torch.manual_seed(123)
        conv.reset_parameters()
        after = module(x)
    assert not torch.allclose(before, after)


def test_shared_initializers_through_identity_become_independent_parameters() -> None:
    # Legacy exports deduplicate equal tensors: conv "b" reads conv "a"'s weight via Identity.
    weight = np.random.default_rng(0).normal(size=(3, 3, 3, 3)).astype(np.float32)
    data = onnx_exports.graph_model(
        [
            helper.make_node("Identity", ["w_a"], ["w_b"], name="Identity_0"),
            helper.make_node("Conv", ["x", "w_a"], ["h"], name="/a/Conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["h"], ["r"], name="/relu/Relu"),
            helper.make_node("Conv", ["r", "w_b"], ["y"], name="/b/Conv", pads=[1, 1, 1, 1]),
        ],
        initializers={"w_a": weight},
        producer="pytorch",
    )
    module = load_onnx(data).module
    a, b = module.get_submodule("a"), module.get_submodule("b")
    assert isinstance(a, nn.Conv2d) and isinstance(b, nn.Conv2d)
    assert a.weight.data_ptr() != b.weight.data_ptr()
    x = images(2, 8)
    np.testing.assert_allclose(module(x).detach().numpy(), _ort(data, x), atol=1e-5)
    with torch.no_grad():
        a.weight.zero_()
    assert torch.equal(b.weight, torch.from_numpy(weight))


def test_legacy_mobilenet_identity_shared_biases_are_untied(artifact_cache: Path) -> None:
    data = onnx_exports.export_torchvision(
        "mobilenet_v3_small", cache_dir=artifact_cache, seed=0, exporter="legacy", opset=13
    )
    assert any(n.op_type == "Identity" for n in onnx.load_from_string(data).graph.node)
    module = load_onnx(data).module
    storages = [p.untyped_storage().data_ptr() for p in module.parameters()]
    assert len(storages) == len(set(storages))


def test_reshape_honours_allowzero() -> None:
    empty = torch.empty(0, 6)
    assert Reshape((3, 0), allowzero=True)(empty).shape == (3, 0)  # 0 is a real 0
    x = torch.zeros(2, 3, 4)
    assert Reshape((0, -1), allowzero=False)(x).shape == (2, 12)  # 0 copies the input dim
    data = onnx_exports.graph_model(
        [
            helper.make_node("Reshape", ["x", "copy"], ["flat"], allowzero=0),
            helper.make_node("Reshape", ["flat", "shape"], ["y"], allowzero=1),
        ],
        initializers={
            "copy": np.array([0, -1], dtype=np.int64),
            "shape": np.array([-1, 192], dtype=np.int64),
        },
    )
    x = images(3, 8)
    np.testing.assert_allclose(load_onnx(data).module(x).detach().numpy(), _ort(data, x))


def test_reduce_mean_18_with_axes_input_becomes_global_average_pool() -> None:
    # The dynamo exporter computes the axes with a small constant subgraph.
    data = onnx_exports.graph_model(
        [
            helper.make_node("Constant", [], ["axes_raw"], value_ints=[2, 3]),
            helper.make_node("Reshape", ["axes_raw", "minus_one"], ["axes"]),
            helper.make_node("ReduceMean", ["x", "axes"], ["pooled"], keepdims=1),
            helper.make_node("ReduceMean", ["pooled", "channel"], ["y"], keepdims=0),
        ],
        initializers={
            "minus_one": np.array([-1], dtype=np.int64),
            "channel": np.array([1], dtype=np.int64),
        },
        output_shape=("N", 1, 1),
        opset=18,
    )
    module = load_onnx(data).module
    kinds = [type(m) for _, m in module.named_children()]
    assert kinds[0] is nn.AdaptiveAvgPool2d and nn.Flatten not in kinds
    x = images(3, 8)
    np.testing.assert_allclose(module(x).detach().numpy(), _ort(data, x), atol=1e-6)


def test_shape_subgraph_of_the_batch_runs_at_run_time_so_any_batch_works() -> None:
    # x.view(x.size(0), -1) as the legacy exporter writes it with a dynamic batch axis
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    consts = {
        "zero": np.array(0, dtype=np.int64),
        "axes": np.array([0], dtype=np.int64),
        "minus_one": np.array([-1], dtype=np.int64),
    }
    x = images(3, 8)
    dynamic = onnx_exports.graph_model(nodes, initializers=consts)
    module = load_onnx(dynamic).module
    assert any(isinstance(m, ShapeOf) for m in module.modules())
    np.testing.assert_allclose(module(x).detach().numpy(), _ort(dynamic, x))
    # Exported with batch 1, the same subgraph still reads the batch at run time (instead of
    # baking in 1), so batches of any size run in one call.
    static = onnx_exports.graph_model(nodes, initializers=consts, input_shape=(1, 3, 8, 8))
    module = load_onnx(static).module
    assert module.fixed_batch is None
    assert torch.equal(module(x), x.reshape(3, -1))


def test_shape_subgraph_of_static_dims_is_folded_at_conversion() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["tail"], start=1),
        helper.make_node("Concat", ["minus_one", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    data = onnx_exports.graph_model(
        nodes, initializers={"minus_one": np.array([-1], dtype=np.int64)}, opset=15
    )
    module = load_onnx(data).module
    children = [m for _, m in module.named_children()]
    assert len(children) == 1 and isinstance(children[0], Reshape)
    assert children[0].shape == (-1, 3, 8, 8)


def test_nhwc_graph_is_detected_and_takes_nchw_input(artifact_cache: Path) -> None:
    reference = small_cnn(0)
    x = images(3, 16)
    exports: list[tuple[onnx_exports.Exporter, int]] = [("legacy", 17), ("dynamo", 18)]
    for exporter, opset in exports:
        data = onnx_exports.export_nhwc_small_cnn(
            cache_dir=artifact_cache, exporter=exporter, opset=opset
        )
        loaded = load_onnx(data)
        assert loaded.input_spec.layout == "NHWC"
        assert loaded.input_spec.channels == 3 and loaded.input_spec.height == 16
        with torch.no_grad():
            out = loaded.module(x)  # NCHW in
        torch.testing.assert_close(out, reference(x).detach(), atol=1e-5, rtol=1e-5)
        nhwc = x.permute(0, 2, 3, 1).contiguous()
        np.testing.assert_allclose(out.numpy(), _ort(data, nhwc), atol=1e-5)


def _image_input_model(shape: tuple[int | str, ...]) -> bytes:
    return onnx_exports.graph_model([helper.make_node("Relu", ["x"], ["y"])], input_shape=shape)


def test_derived_input_spec_uses_graph_size_and_imagenet_defaults() -> None:
    loaded = load_onnx(_image_input_model(("N", 3, 32, 48)))
    spec = loaded.input_spec
    assert (spec.layout, spec.channels, spec.height, spec.width) == ("NCHW", 3, 32, 48)
    assert spec.mean == IMAGENET_MEAN
    assert any("normalization assumed" in note for note in loaded.notes)
    gray = load_onnx(_image_input_model(("N", 28, 28, 1))).input_spec
    assert (gray.layout, gray.channels, len(gray.mean)) == ("NHWC", 1, 1)


@pytest.mark.parametrize("shape", [("N", 3, 8, 3), ("N", 5, 8, 8), ("N", 3, "H", "W"), ("N", 3, 8)])
def test_input_spec_that_cannot_be_derived_asks_for_one(shape: tuple[int | str, ...]) -> None:
    with pytest.raises(SpecError):
        load_onnx(_image_input_model(shape))


def test_explicit_input_spec_is_checked_against_the_graph() -> None:
    ambiguous = _image_input_model(("N", 3, 8, 3))
    spec = InputSpec(height=3, width=8, channels=3, layout="NHWC")  # (N, H=3, W=8, C=3)
    loaded = load_onnx(ambiguous, spec)
    assert loaded.input_spec == spec and loaded.module.layout == "NHWC"
    with pytest.raises(SpecError, match="does not fit"):
        load_onnx(_image_input_model(("N", 3, 32, 32)), InputSpec(height=64, width=64))
    dynamic = load_onnx(_image_input_model(("N", 3, "H", "W")), InputSpec(height=40, width=40))
    assert dynamic.input_spec.height == 40


def test_unsupported_operator_error_names_operator_opset_and_node() -> None:
    data = onnx_exports.graph_model(
        [helper.make_node("LRN", ["x"], ["y"], name="norm1", size=3)], opset=15
    )
    with pytest.raises(UnsupportedOperatorError) as info:
        load_onnx(data)
    assert "LRN" in info.value.message and "15" in info.value.message
    assert info.value.details == {"op_type": "LRN", "opset": 15, "node": "norm1"}


def test_operator_from_another_domain_is_unsupported() -> None:
    data = onnx_exports.graph_model(
        [helper.make_node("FusedConv", ["x"], ["y"], domain="com.microsoft", name="fc")],
        output_shape=("N", 3, 8, 8),
        domains={"com.microsoft": 1},
    )
    with pytest.raises(UnsupportedOperatorError, match=r"com\.microsoft\.FusedConv"):
        load_onnx(data)


def test_model_with_external_data_is_refused() -> None:
    data = onnx_exports.graph_model(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        initializers={"w": np.ones((4, 3, 3, 3), dtype=np.float32)},
    )
    model = onnx.load_from_string(data)
    external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0
    )
    with pytest.raises(ModelLoadError, match="external data"):
        load_onnx(model.SerializeToString())


@pytest.mark.parametrize("data", [b"this is not an onnx file", b"", b"\x08\x07"])
def test_garbage_bytes_are_a_model_load_error(data: bytes) -> None:
    with pytest.raises(ModelLoadError):
        load_onnx(data)


def test_invalid_graph_fails_the_checker() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["missing"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelLoadError, match="invalid ONNX model"):
        load_onnx(model.SerializeToString())


@pytest.mark.parametrize(("exporter", "opset"), [("legacy", 13), ("dynamo", 18)])
def test_batchnorm_after_conv_is_listed_for_canonizers(
    exporter: onnx_exports.Exporter, opset: int, artifact_cache: Path
) -> None:
    data = onnx_exports.export_small_cnn(
        cache_dir=artifact_cache, exporter=exporter, opset=opset, fold_batchnorm=False
    )
    module = load_onnx(data).module
    assert isinstance(module, OnnxGraphModule)
    assert module.linear_bn_pairs() == [("features.3", "features.4")]
    bn = module.get_submodule("features.4")
    assert isinstance(bn, nn.BatchNorm2d) and not bn.training
    assert bn.running_var is not None and not torch.all(bn.running_var == 1)
    x = images(2, 16)
    torch.testing.assert_close(module(x), small_cnn(0)(x), atol=1e-5, rtol=1e-5)


def test_batchnorm_is_not_paired_when_the_conv_output_is_also_used_elsewhere() -> None:
    rng = np.random.default_rng(0)
    c = 3
    data = onnx_exports.graph_model(
        [
            helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["n"]),
            helper.make_node("Add", ["n", "h"], ["y"]),
        ],
        initializers={
            "w": rng.normal(size=(c, c, 3, 3)).astype(np.float32),
            "s": np.ones(c, np.float32),
            "b": np.zeros(c, np.float32),
            "m": np.zeros(c, np.float32),
            "v": np.ones(c, np.float32),
        },
    )
    module = load_onnx(data).module
    assert isinstance(module, OnnxGraphModule)
    assert module.linear_bn_pairs() == []


def test_fixed_batch_reshape_is_kept_per_image_so_any_batch_runs(artifact_cache: Path) -> None:
    # dynamo writes x.view(x.size(0), -1) of a batch-1 export as Reshape(x, [1, 16])
    data = onnx_exports.export_small_cnn(
        cache_dir=artifact_cache, exporter="dynamo", opset=18, dynamic_batch=False
    )
    module = load_onnx(data).module
    assert isinstance(module, OnnxGraphModule) and module.fixed_batch is None
    reshapes = [m for m in module.modules() if isinstance(m, Reshape)]
    assert len(reshapes) == 1 and reshapes[0].keep_batch and reshapes[0].shape == (1, 16)
    x = images(3, 16)
    torch.testing.assert_close(module(x), small_cnn(0)(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("exporter", "opset"), [("legacy", 17), ("dynamo", 18)])
def test_graph_that_only_runs_its_fixed_batch_runs_image_groups(
    exporter: onnx_exports.Exporter, opset: int, artifact_cache: Path
) -> None:
    # the class token is a constant of batch 1 concatenated with the image tokens
    data = onnx_exports.export_class_token_net(
        cache_dir=artifact_cache, exporter=exporter, opset=opset
    )
    loaded = load_onnx(data)
    module = loaded.module
    assert isinstance(module, OnnxGraphModule) and module.fixed_batch == 1
    assert any("fixed batch size of 1" in note for note in loaded.notes)
    x = images(3, 16)
    reference = onnx_exports.ClassTokenNet(0).eval()
    torch.testing.assert_close(module(x), reference(x), atol=1e-5, rtol=1e-5)


class _TwoNorms(nn.Module):
    """Two LayerNorms initialized alike: the dynamo optimizer stores one copy of their weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.norm1 = nn.LayerNorm(8)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.norm2 = nn.LayerNorm(8)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm2(self.conv2(self.norm1(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def test_dynamo_names_survive_deduplicated_initializers(artifact_cache: Path) -> None:
    torch.manual_seed(0)
    model = _TwoNorms().eval()
    data = onnx_exports.cached(
        artifact_cache,
        onnx_exports.cache_key("two_norms", "seed0", "dynamo18", "8px", "dyn"),
        lambda: onnx_exports.export_module(
            model, torch.zeros(2, 3, 8, 8), exporter="dynamo", opset=18
        ),
    )
    graph = onnx.load_from_string(data).graph
    norm_weights = [n.input[1] for n in graph.node if n.op_type == "LayerNormalization"]
    assert len(norm_weights) == 2 and norm_weights[0] == norm_weights[1]  # one shared copy
    module = load_onnx(data).module
    assert _layer_names(module, nn.LayerNorm) == ["norm1", "norm2"]
    assert _layer_names(module, nn.Conv2d) == ["conv1", "conv2"]
    x = images(2, 8)
    torch.testing.assert_close(module(x), model(x), atol=1e-5, rtol=1e-5)


def test_flat_names_when_the_file_carries_no_hierarchy() -> None:
    rng = np.random.default_rng(0)
    data = onnx_exports.graph_model(
        [
            helper.make_node("Conv", ["x", "w"], ["h"], name="StatefulPartitionedCall/conv"),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["y"]),
        ],
        initializers={
            "w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
            "w2": rng.normal(size=(2, 4, 1, 1)).astype(np.float32),
        },
    )
    module = load_onnx(data).module
    assert [n for n, _ in module.named_children()] == ["conv_0", "relu_0", "conv_1"]


def test_hierarchy_out_of_execution_order_falls_back_to_flat_names() -> None:
    # Scope "a" runs, then "b", then "a" again: a tree would list a's relu before b's conv.
    rng = np.random.default_rng(0)
    data = onnx_exports.graph_model(
        [
            helper.make_node("Conv", ["x", "w"], ["h"], name="/a/Conv", pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["h", "w"], ["h2"], name="/b/Conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["h2"], ["y"], name="/a/Relu"),
        ],
        initializers={"w": rng.normal(size=(3, 3, 3, 3)).astype(np.float32)},
        producer="pytorch",
    )
    loaded = load_onnx(data)
    assert _layer_names(loaded.module, nn.Conv2d) == ["conv_0", "conv_1"]
    assert any("does not follow execution order" in note for note in loaded.notes)


_RNG = np.random.default_rng(7)


def _w(*shape: int) -> np.ndarray:
    return _RNG.normal(size=shape).astype(np.float32)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _node(op: str, inputs: list[str], output: str = "y", **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], **attrs)


# (case id, nodes, initializers, opset, torch module class the op must become or None)
OP_CASES: list[tuple[str, list[onnx.NodeProto], dict[str, np.ndarray], int, type | None]] = [
    (
        "conv_grouped_dilated",
        [_node("Conv", ["x", "w", "b"], group=3, dilations=[2, 2], pads=[2, 2, 2, 2])],
        {"w": _w(6, 1, 3, 3), "b": _w(6)},
        13,
        nn.Conv2d,
    ),
    (
        "conv_asymmetric_pads",
        [_node("Conv", ["x", "w"], strides=[2, 2], pads=[0, 0, 1, 1])],
        {"w": _w(4, 3, 3, 3)},
        13,
        layers.PaddedConv2d,
    ),
    (
        "conv_same_upper",
        [_node("Conv", ["x", "w"], strides=[2, 2], auto_pad="SAME_UPPER")],
        {"w": _w(4, 3, 3, 3)},
        13,
        layers.PaddedConv2d,
    ),
    (
        "maxpool_ceil",
        [
            _node(
                "MaxPool",
                ["x"],
                kernel_shape=[3, 3],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
                ceil_mode=1,
            )
        ],
        {},
        13,
        nn.MaxPool2d,
    ),
    (
        "maxpool_asymmetric",
        [_node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1])],
        {},
        13,
        nn.MaxPool2d,
    ),
    (
        "avgpool_exclude_pad",
        [_node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        {},
        13,
        nn.AvgPool2d,
    ),
    (
        "avgpool_include_pad",
        [
            _node(
                "AveragePool",
                ["x"],
                kernel_shape=[3, 3],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
                count_include_pad=1,
            )
        ],
        {},
        13,
        nn.AvgPool2d,
    ),
    ("global_max_pool", [_node("GlobalMaxPool", ["x"])], {}, 13, nn.AdaptiveMaxPool2d),
    ("global_average_pool", [_node("GlobalAveragePool", ["x"])], {}, 13, nn.AdaptiveAvgPool2d),
    (
        "batchnorm_15",
        [_node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)],
        {"s": _w(3), "b": _w(3), "m": _w(3), "v": np.abs(_w(3)) + 0.5},
        15,
        nn.BatchNorm2d,
    ),
    (
        "instancenorm",
        [_node("InstanceNormalization", ["x", "s", "b"])],
        {"s": _w(3), "b": _w(3)},
        13,
        nn.InstanceNorm2d,
    ),
    (
        "layernorm_17",
        [_node("LayerNormalization", ["x", "s", "b"], axis=-1)],
        {"s": _w(8), "b": _w(8)},
        17,
        nn.LayerNorm,
    ),
    ("prelu_per_channel", [_node("PRelu", ["x", "slope"])], {"slope": _w(3, 1, 1)}, 13, nn.PReLU),
    ("leaky_relu", [_node("LeakyRelu", ["x"], alpha=0.2)], {}, 13, nn.LeakyReLU),
    ("elu", [_node("Elu", ["x"], alpha=0.7)], {}, 13, nn.ELU),
    ("selu", [_node("Selu", ["x"])], {}, 13, nn.SELU),
    ("sigmoid", [_node("Sigmoid", ["x"])], {}, 13, nn.Sigmoid),
    ("tanh", [_node("Tanh", ["x"])], {}, 13, nn.Tanh),
    ("softplus", [_node("Softplus", ["x"])], {}, 13, nn.Softplus),
    ("hard_sigmoid_onnx_default", [_node("HardSigmoid", ["x"])], {}, 13, None),
    ("hard_sigmoid_torch", [_node("HardSigmoid", ["x"], alpha=1 / 6)], {}, 13, nn.Hardsigmoid),
    ("hard_swish", [_node("HardSwish", ["x"])], {}, 14, nn.Hardswish),
    ("gelu_20", [_node("Gelu", ["x"], approximate="tanh")], {}, 20, nn.GELU),
    (
        "clip_relu6",
        [_node("Clip", ["x", "lo", "hi"])],
        {"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)},
        13,
        nn.ReLU6,
    ),
    (
        "clip_hardtanh",
        [_node("Clip", ["x", "lo", "hi"])],
        {"lo": np.array(-0.5, np.float32), "hi": np.array(0.5, np.float32)},
        13,
        nn.Hardtanh,
    ),
    ("clip_min_only", [_node("Clip", ["x", "lo"])], {"lo": np.array(0.1, np.float32)}, 13, None),
    ("clip_attributes_10", [_node("Clip", ["x"], min=-0.2, max=0.3)], {}, 10, nn.Hardtanh),
    ("softmax_13", [_node("Softmax", ["x"], axis=1)], {}, 13, nn.Softmax),
    ("softmax_11_coerced", [_node("Softmax", ["x"], axis=1)], {}, 11, None),
    ("log_softmax", [_node("LogSoftmax", ["x"], axis=-1)], {}, 13, nn.LogSoftmax),
    (
        "gemm_linear",
        [_node("Flatten", ["x"], "f"), _node("Gemm", ["f", "w", "c"], alpha=0.5, beta=2.0)],
        {"w": _w(192, 5), "c": _w(1, 5)},
        13,
        nn.Linear,
    ),
    (
        "gemm_trans_a",
        [
            _node("Flatten", ["x"], "f"),
            _node("Transpose", ["f"], "t"),
            _node("Gemm", ["t", "w"], transA=1, transB=1),
        ],
        {"w": _w(5, 192)},
        13,
        None,
    ),
    (
        "matmul_add_is_linear_with_bias",
        [_node("Flatten", ["x"], "f"), _node("MatMul", ["f", "w"], "m"), _node("Add", ["m", "b"])],
        {"w": _w(192, 5), "b": _w(5)},
        13,
        nn.Linear,
    ),
    (
        "matmul_runtime",
        [_node("Transpose", ["x"], "t", perm=[0, 1, 3, 2]), _node("MatMul", ["x", "t"])],
        {},
        13,
        None,
    ),
    (
        "pad_reflect",
        [_node("Pad", ["x", "p"], mode="reflect")],
        {"p": _i64(0, 0, 1, 2, 0, 0, 2, 1)},
        13,
        None,
    ),
    (
        "pad_edge",
        [_node("Pad", ["x", "p"], mode="edge")],
        {"p": _i64(0, 0, 1, 1, 0, 0, 1, 1)},
        13,
        None,
    ),
    (
        "pad_constant_axes_18",
        [_node("Pad", ["x", "p", "v", "a"])],
        {"p": _i64(1, 0, 2, 3), "v": np.array(0.5, np.float32), "a": _i64(2, 3)},
        18,
        None,
    ),
    (
        "pad_attributes_10",
        [_node("Pad", ["x"], pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.25)],
        {},
        10,
        None,
    ),
    ("transpose", [_node("Transpose", ["x"], perm=[0, 2, 3, 1])], {}, 13, None),
    (
        "squeeze_unsqueeze_13",
        [_node("Unsqueeze", ["x", "a"], "u"), _node("Squeeze", ["u", "a"])],
        {"a": _i64(2)},
        13,
        None,
    ),
    (
        "squeeze_unsqueeze_11",
        [_node("Unsqueeze", ["x"], "u", axes=[-1]), _node("Squeeze", ["u"], axes=[4])],
        {},
        11,
        None,
    ),
    (
        "split_13",
        [
            helper.make_node("Split", ["x", "s"], ["a", "b"], axis=1),
            _node("Concat", ["b", "a"], axis=1),
        ],
        {"s": _i64(1, 2)},
        13,
        None,
    ),
    (
        "split_even_11",
        [helper.make_node("Split", ["x"], ["a", "b"], axis=2), _node("Sub", ["a", "b"])],
        {},
        11,
        None,
    ),
    (
        "slice_negative_step",
        [_node("Slice", ["x", "st", "en", "ax", "sp"])],
        {"st": _i64(-1, 6), "en": _i64(-100, 1), "ax": _i64(3, 2), "sp": _i64(-2, -1)},
        13,
        None,
    ),
    ("slice_attributes_9", [_node("Slice", ["x"], starts=[1], ends=[100], axes=[1])], {}, 9, None),
    ("gather_channels", [_node("Gather", ["x", "i"], axis=1)], {"i": _i64(2, 0, -1)}, 13, None),
    (
        "expand_tile",
        [
            _node("ReduceMean", ["x"], "m", axes=[1], keepdims=1),
            _node("Expand", ["m", "e"], "ex"),
            _node("Tile", ["ex", "t"]),
        ],
        {"e": _i64(1, 3, 1, 1), "t": _i64(1, 1, 2, 1)},
        13,
        None,
    ),
    (
        "where_compare",
        [_node("Greater", ["x", "zero"], "c"), _node("Where", ["c", "x", "h"])],
        {"zero": np.array(0, np.float32), "h": np.array(0.5, np.float32)},
        13,
        None,
    ),
    (
        "cast_round_trip",
        [
            _node("Cast", ["x"], "i", to=onnx.TensorProto.INT32),
            _node("Cast", ["i"], to=onnx.TensorProto.FLOAT),
        ],
        {},
        13,
        None,
    ),
    (
        "arithmetic_constants_first",
        [
            _node("Sub", ["one", "x"], "a"),
            _node("Div", ["two", "a"], "b"),
            _node("Mul", ["b", "x"], "c"),
            _node("Pow", ["c", "sq"]),
        ],
        {
            "one": np.array(3.0, np.float32),
            "two": np.array(2.0, np.float32),
            "sq": np.array(2.0, np.float32),
        },
        13,
        None,
    ),
    (
        "unary_chain",
        [
            _node("Abs", ["x"], "a"),
            _node("Sqrt", ["a"], "s"),
            _node("Exp", ["s"], "e"),
            _node("Log", ["e"], "l"),
            _node("Erf", ["l"], "r"),
            _node("Neg", ["r"], "n"),
            _node("Floor", ["n"], "f"),
            _node("Add", ["f", "s"]),
        ],
        {},
        13,
        None,
    ),
    (
        "sum_mean_max_min",
        [
            _node("Relu", ["x"], "r"),
            _node("Sigmoid", ["x"], "s"),
            _node("Sum", ["x", "r", "s"], "a"),
            _node("Mean", ["x", "r", "s"], "m"),
            _node("Max", ["a", "m"], "mx"),
            _node("Min", ["mx", "r", "s"], "mn"),
            _node("Add", ["mn", "mx"]),
        ],
        {},
        13,
        None,
    ),
    (
        "reduce_13_attributes",
        [
            _node("ReduceMax", ["x"], "a", axes=[2], keepdims=0),
            _node("ReduceSum", ["a", "ax"], "b", keepdims=1),
            _node("ReduceL2", ["b"], axes=[1], keepdims=1),
        ],
        {"ax": _i64(2)},
        13,
        None,
    ),
    (
        "reduce_18_inputs",
        [
            _node("ReduceProd", ["x", "ax"], "p", keepdims=1),
            _node("ReduceLogSumExp", ["p", "ax2"], keepdims=0),
        ],
        {"ax": _i64(1), "ax2": _i64(-1)},
        18,
        None,
    ),
    (
        "concat_with_constant",
        [_node("Concat", ["x", "k"], axis=0)],
        {"k": _w(1, 3, 8, 8)},
        13,
        None,
    ),
    ("flatten_axis_2", [_node("Flatten", ["x"], axis=2)], {}, 13, None),
    ("dropout_identity", [_node("Dropout", ["x"], "d"), _node("Identity", ["d"])], {}, 13, None),
    (
        "unary_more",
        [
            _node("Abs", ["x"], "a"),
            _node("Add", ["a", "one"], "one_plus"),
            _node("Reciprocal", ["one_plus"], "r"),
            _node("Ceil", ["x"], "c"),
            _node("Cos", ["x"], "co"),
            _node("Sin", ["x"], "si"),
            _node("Sign", ["x"], "sg"),
            _node("Round", ["c"], "ro"),
            _node("Softsign", ["x"], "ss"),
            _node("Celu", ["x"], "ce", alpha=0.5),
            _node("Mish", ["x"], "mi"),
            _node("Sum", ["r", "co", "si", "sg", "ro", "ss", "ce", "mi"]),
        ],
        {"one": np.array(1.0, np.float32)},
        18,
        nn.Mish,
    ),
    (
        "logic_and_modulo",
        [
            _node("Less", ["x", "zero"], "neg"),
            _node("GreaterOrEqual", ["x", "half"], "big"),
            _node("Not", ["neg"], "pos"),
            _node("And", ["pos", "big"], "both"),
            _node("Or", ["neg", "both"], "either"),
            _node("Xor", ["either", "big"], "odd"),
            _node("Mod", ["x", "half"], "m", fmod=1),
            _node("Where", ["odd", "m", "x"]),
        ],
        {"zero": np.array(0.0, np.float32), "half": np.array(0.5, np.float32)},
        13,
        None,
    ),
    (
        "reduce_more_and_argmax",
        [
            _node("ReduceMin", ["x"], "mn", axes=[1], keepdims=1),
            _node("ReduceL1", ["x"], "l1", axes=[1], keepdims=1),
            _node("ReduceSumSquare", ["x"], "sq", axes=[1], keepdims=1),
            _node("ArgMax", ["x"], "am", axis=1, keepdims=1),
            _node("Cast", ["am"], "amf", to=onnx.TensorProto.FLOAT),
            _node("Sum", ["mn", "l1", "sq", "amf"]),
        ],
        {},
        13,
        None,
    ),
    (
        "range_and_size_of_the_batch",
        [
            _node("Shape", ["x"], "s"),
            _node("Gather", ["s", "zero"], "n", axis=0),
            _node("Range", ["start", "n", "step"], "r"),
            _node("Cast", ["r"], "rf", to=onnx.TensorProto.FLOAT),
            _node("Size", ["x"], "size"),
            _node("Cast", ["size"], "sizef", to=onnx.TensorProto.FLOAT),
            _node("ReduceMean", ["x"], "m", axes=[1, 2, 3], keepdims=0),
            _node("Add", ["m", "rf"], "mr"),
            _node("Div", ["mr", "sizef"], "d"),
            _node("Reshape", ["d", "flat"]),  # gives the output a rank for shape inference
        ],
        {
            "zero": np.array(0, np.int64),
            "start": np.array(0, np.int64),
            "step": np.array(1, np.int64),
            "flat": _i64(-1),
        },
        13,
        None,
    ),
    (
        "constant_of_shape",
        [
            _node("Shape", ["x"], "s"),
            _node("ConstantOfShape", ["s"], "k", value=helper.make_tensor("v", 1, [1], [0.5])),
            _node("Mul", ["x", "k"]),
        ],
        {},
        13,
        None,
    ),
]


@pytest.mark.parametrize(
    ("nodes", "initializers", "opset", "expected_module"),
    [pytest.param(*case[1:], id=case[0]) for case in OP_CASES],
)
def test_operator_matches_onnx_runtime(
    nodes: list[onnx.NodeProto],
    initializers: dict[str, np.ndarray],
    opset: int,
    expected_module: type | None,
) -> None:
    data = onnx_exports.graph_model(list(nodes), initializers=initializers, opset=opset)
    module = load_onnx(data).module
    x = images(2, 8, seed=3)
    np.testing.assert_allclose(module(x).detach().numpy(), _ort(data, x), rtol=1e-5, atol=1e-5)
    if expected_module is not None:
        assert any(type(m) is expected_module for m in module.modules())
