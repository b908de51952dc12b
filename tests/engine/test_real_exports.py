"""Files as real exporters write them, loaded and audited.

tf2onnx computes "same" padding and Keras ``Flatten`` targets from tensor shapes; torch's dynamo
exporter writes the weights to a side file by default; BatchNorm arrives folded into constant
``Mul``/``Add``; random-weight networks have logits of 1e12; and a legacy export bakes batch 1
into a reshape. Reference numbers come from ONNX Runtime on the file itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from jsonschema import Draft202012Validator
from onnx import helper
from torch import nn

from saliency_audit.service.openapi import openapi_document
from saliency_audit.workers.engine import randomization
from saliency_audit.workers.engine.errors import FidelityError, ModelLoadError, SpecError
from saliency_audit.workers.engine.layers import layer_analysis
from saliency_audit.workers.engine.maps import compute_maps
from saliency_audit.workers.engine.methods import _ort, scorecam
from saliency_audit.workers.engine.models.canonize import canonized, lrp_canonizers
from saliency_audit.workers.engine.models.fidelity import (
    DEFAULT_RTOL,
    check_fidelity,
    ensure_fidelity,
)
from saliency_audit.workers.engine.models.layers import ChannelAffine, PaddedConv2d
from saliency_audit.workers.engine.models.onnx_convert import OnnxGraphModule, load_onnx
from saliency_audit.workers.engine.models.onnx_ops import Pad, Reshape, ShapeOf
from saliency_audit.workers.engine.randomization import Randomizer, units
from saliency_audit.workers.engine.spec import AuditSpec, MethodParams
from saliency_audit.workers.reports.schema import report_schema
from saliency_audit.workers.reports.text import format_summary
from tests.engine import onnx_exports
from tests.engine.nets import images

CPU = torch.device("cpu")


def _graph(module: nn.Module) -> OnnxGraphModule:
    assert isinstance(module, OnnxGraphModule)
    return module


def _no_onnx_runtime_errors(capfd: pytest.CaptureFixture[str]) -> None:
    err = capfd.readouterr().err
    assert "onnxruntime" not in err and "[E:" not in err, err


# --------------------------------------------------------------------------------------------
# tf2onnx: shape arithmetic folded at the model's input size
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_images", [1, 5])
def test_tf2onnx_style_classifier_matches_onnx_runtime(n_images: int) -> None:
    loaded = load_onnx(onnx_exports.tf2onnx_style_classifier())
    assert loaded.input_spec.layout == "NHWC" and loaded.input_spec.height == 32
    assert _graph(loaded.module).fixed_batch is None
    report = ensure_fidelity(loaded, images(n_images, 32, seed=n_images), atol=1e-4)
    assert report.passed and report.n_images == n_images and report.argmax_agreement == 1.0


def test_tf2onnx_computed_pads_and_flatten_target_become_constants() -> None:
    module = _graph(load_onnx(onnx_exports.tf2onnx_style_classifier()).module)
    # TF "same" pads the end first: at 32 px a 3x3 stride-2 window needs one row and column at
    # the end; the second Pad reads the shape of a tensor after the first (folded second).
    # (the second pads only the spatial dims of a conv's sole input: it became that conv's own
    # padding, so that LRP rules see it as padding)
    pads = [m.pads for m in module.modules() if isinstance(m, Pad)]
    assert pads == [(0, 0, 0, 1, 0, 1)]
    (padded,) = [m for m in module.modules() if isinstance(m, PaddedConv2d)]
    assert padded.pre_pad == (0, 1, 0, 1) and padded.padding == (0, 0)
    # auto_pad=SAME_UPPER after the first computed Pad needs that Pad's output size
    depthwise = module.get_submodule("conv_1")
    assert isinstance(depthwise, nn.Conv2d) and depthwise.padding == (1, 1)
    assert depthwise.groups == 8
    # tf.reshape(x, [tf.shape(x)[0], -1]): the batch is kept, nothing is read at run time
    (flatten,) = [m for m in module.modules() if isinstance(m, Reshape)]
    assert flatten.keep_batch and flatten.shape == (1, -1)
    x = images(3, 32)
    torch.testing.assert_close(module(x), torch.cat([module(x[i : i + 1]) for i in range(3)]))


def test_tf2onnx_graph_exported_with_a_fixed_batch_runs_any_batch() -> None:
    loaded = load_onnx(onnx_exports.tf2onnx_style_classifier(batch=1))
    assert _graph(loaded.module).fixed_batch is None
    assert not any("fixed batch" in note for note in loaded.notes)
    report = ensure_fidelity(loaded, images(3, 32), atol=1e-4, batch_size=3)
    assert report.passed


def _pad_graph(
    pad_source: list[onnx.NodeProto], initializers: dict[str, np.ndarray] | None = None
) -> bytes:
    """Relu then a Pad whose pads ``pad_source`` computes into tensor ``pads``."""
    return onnx_exports.graph_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            *pad_source,
            helper.make_node("Pad", ["r", "pads"], ["y"], name="pad_by_shape"),
        ],
        initializers={
            "zero": np.array([0], np.int64),
            "zeros": np.zeros(5, np.int64),
            **(initializers or {}),
        },
        output_shape=("N", 3, None, 8),
    )


def test_pads_that_depend_on_the_batch_size_are_refused_naming_node_and_input() -> None:
    # pads = [0, 0, batch, 0, 0, 0, 0, 0]: the batch size is only known at run time
    data = _pad_graph(
        [
            helper.make_node("Shape", ["x"], ["shape"], name="shape"),
            helper.make_node("Gather", ["shape", "zero"], ["batch"], name="batch"),
            helper.make_node("Concat", ["zero", "zero", "batch", "zeros"], ["pads"], axis=0),
        ]
    )
    with pytest.raises(ModelLoadError) as info:
        load_onnx(data)
    message = info.value.message
    assert "node 'pad_by_shape'" in message and "tensor 'pads'" in message
    assert "element(s) 2 depend on the batch size" in message


def test_pads_computed_from_the_image_values_are_refused_as_such() -> None:
    data = _pad_graph(
        [
            helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0, name="peak"),
            helper.make_node("Cast", ["peak"], ["peak_int"], to=onnx.TensorProto.INT64),
            helper.make_node("Unsqueeze", ["peak_int", "zero"], ["peak_1"]),
            helper.make_node("Concat", ["zero", "zero", "peak_1", "zeros"], ["pads"], axis=0),
        ]
    )
    with pytest.raises(ModelLoadError, match=r"node 'pad_by_shape'.*computed from the image"):
        load_onnx(data)


def test_static_dims_read_through_casts_and_arithmetic_fold() -> None:
    # pads = [0, 0, H / 4 - 1, 0, 0, 0, 0, 0] via Shape -> Cast(int32) -> Slice -> Div -> Sub
    data = _pad_graph(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Cast", ["shape"], ["shape32"], to=onnx.TensorProto.INT32),
            helper.make_node("Slice", ["shape32", "two", "three"], ["h"]),
            helper.make_node("Div", ["h", "four"], ["quarter"]),
            helper.make_node("Sub", ["quarter", "one"], ["pad_h"]),
            helper.make_node("Cast", ["pad_h"], ["pad_h64"], to=onnx.TensorProto.INT64),
            helper.make_node("Concat", ["zero", "zero", "pad_h64", "zeros"], ["pads"], axis=0),
        ],
        {
            "two": np.array([2], np.int64),
            "three": np.array([3], np.int64),
            "four": np.array([4], np.int32),
            "one": np.array([1], np.int32),
        },
    )
    loaded = load_onnx(data)
    (pad,) = [m for m in loaded.module.modules() if isinstance(m, Pad)]
    assert pad.pads == (0, 0, 1, 0)  # 8 / 4 - 1 = 1 row before the height axis
    assert ensure_fidelity(loaded, images(3, 8), atol=1e-6).passed


# --------------------------------------------------------------------------------------------
# torch's side-file weights
# --------------------------------------------------------------------------------------------


def test_side_file_weights_are_refused_with_the_fix_that_works(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    example = (torch.randn(1, 3, 8, 8),)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model.eval(), example, path, dynamo=True, verbose=False)
    assert (tmp_path / "model.onnx.data").exists()  # torch 2.14's default
    with pytest.raises(ModelLoadError) as info:
        load_onnx(path.read_bytes())
    message = info.value.message
    assert "'model.onnx.data'" in message and "only the uploaded file is read" in message
    assert "torch.onnx.export(..., external_data=False)" in message
    assert 'onnx.save(onnx.load("model.onnx"), "single.onnx", save_as_external_data=False)' in (
        message
    )
    # both fixes the message gives work with the installed torch and onnx
    single = tmp_path / "single.onnx"
    onnx.save(onnx.load(str(path)), str(single), save_as_external_data=False)
    assert load_onnx(single.read_bytes()).module(example[0]).shape == (1, 2)
    embedded = tmp_path / "embedded.onnx"
    torch.onnx.export(model, example, embedded, dynamo=True, external_data=False, verbose=False)
    assert not (tmp_path / "embedded.onnx.data").exists()
    assert load_onnx(embedded.read_bytes()).module(example[0]).shape == (1, 2)


# --------------------------------------------------------------------------------------------
# Relative fidelity tolerance
# --------------------------------------------------------------------------------------------


def _huge_logits_graph(scale: float = 1e12) -> bytes:
    rng = np.random.default_rng(0)
    return onnx_exports.graph_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["c2"], pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
        ],
        initializers={
            "w": rng.normal(0, 0.3, (16, 3, 3, 3)).astype(np.float32),
            "w2": rng.normal(0, 0.1, (32, 16, 3, 3)).astype(np.float32),
            "fc": (rng.normal(0, 1.0, (10, 32)) * scale).astype(np.float32),
        },
        input_shape=("N", 3, 16, 16),
    )


def test_huge_logits_pass_within_the_relative_tolerance() -> None:
    loaded = load_onnx(_huge_logits_graph())
    x = images(4, 16)
    report = ensure_fidelity(loaded, x, atol=1e-3)
    assert report.rtol == DEFAULT_RTOL == AuditSpec.fidelity_rtol == 1e-5
    assert report.max_abs_diff > 1e-3  # absolute differences of float32 at 1e12
    assert 0 < report.max_rel_diff < 1e-5
    # the absolute tolerance alone refuses the same, faithful conversion
    assert not check_fidelity(loaded, x, atol=1e-3, rtol=0.0).passed


def test_the_relative_tolerance_still_refuses_a_wrong_weight() -> None:
    loaded = load_onnx(_huge_logits_graph())
    conv = next(m for m in loaded.module.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.weight[0].mul_(1.01)
    with pytest.raises(FidelityError) as info:
        ensure_fidelity(loaded, images(3, 16), atol=1e-3)
    details = info.value.details
    assert details["rtol"] == 1e-5 and details["max_rel_diff"] > 1e-4
    assert "of the largest logit" in info.value.message


def test_fidelity_rtol_is_an_audit_spec_field_reported_everywhere() -> None:
    spec = AuditSpec.from_dict({"methods": ["gradient"], "fidelity_rtol": 1e-4})
    assert spec.fidelity_rtol == 1e-4 and spec.to_dict()["fidelity_rtol"] == 1e-4
    with pytest.raises(SpecError):
        AuditSpec(methods=("gradient",), fidelity_rtol=-1.0)
    properties = openapi_document()["components"]["schemas"]["AuditSpec"]["properties"]
    # bounded on both sides (the upper bound: issue 18, every parameter bounded before it is queued)
    assert properties["fidelity_rtol"] == {"type": "number", "minimum": 0, "maximum": 1e6}
    fidelity_schema: dict[str, Any] = report_schema()["properties"]["fidelity"]["anyOf"][0]
    assert fidelity_schema["properties"]["rtol"] == {"type": "number", "minimum": 0}
    fidelity = check_fidelity(load_onnx(_huge_logits_graph()), images(2, 16), 1e-3).to_dict()
    Draft202012Validator(fidelity_schema).validate(fidelity)
    line = format_summary(
        {"fidelity": fidelity, "spec": {"resolved_layer": None}, "methods": {}}
    ).splitlines()[0]
    assert f"relative {fidelity['max_rel_diff']:.2e}" in line and "rtol 1e-05" in line


# --------------------------------------------------------------------------------------------
# BatchNorm folded into constant Mul/Add
# --------------------------------------------------------------------------------------------


def _folded() -> OnnxGraphModule:
    return _graph(load_onnx(onnx_exports.folded_batchnorm_classifier()).module)


def test_folded_batchnorm_becomes_channel_affine_and_nothing_else_does() -> None:
    module = _folded()
    affine = [name for name, m in module.named_modules() if isinstance(m, ChannelAffine)]
    assert affine == ["channel_affine_0", "channel_affine_1", "channel_affine_2"]
    # conv -> Mul -> Add and conv -> lone Mul merge into their conv; the pre-activation one
    # follows a residual sum and stays
    assert module.linear_bn_pairs() == [
        ("conv_0", "channel_affine_0"),
        ("conv_1", "channel_affine_1"),
    ]
    kinds = {
        name: (type(m).__name__, m.extra_repr())
        for name, m in module.named_children()
        if name.startswith(("mul", "add"))
    }
    assert kinds == {
        "mul_0": ("Binary", "Mul, constant second, shape=(3, 1, 1)"),  # input normalization
        "add_0": ("Binary", "Add, constant second, shape=(3, 1, 1)"),
        "mul_1": ("Binary", "Mul"),  # SiLU: x * sigmoid(x)
        "add_1": ("Add", ""),  # the residual sum
        "mul_2": ("Binary", "Mul"),  # squeeze-and-excitation gate
        "mul_3": ("Binary", "Mul, constant second, shape=()"),  # scalar
        "mul_4": ("Binary", "Mul, constant second, shape=(8, 1, 1)"),  # layer scale, no conv
    }


@pytest.mark.parametrize("n_images", [1, 3])
def test_channel_affine_graph_matches_onnx_runtime(n_images: int) -> None:
    loaded = load_onnx(onnx_exports.folded_batchnorm_classifier())
    assert ensure_fidelity(loaded, images(n_images, 16, seed=n_images), atol=1e-5).passed


def test_randomization_resets_channel_affine_like_batchnorm() -> None:
    module = _folded().eval()
    names = [u.name for u in units(module, "module")]
    assert {"channel_affine_0", "channel_affine_1", "channel_affine_2"} <= set(names)
    assert "ChannelAffine" in randomization.NORMALIZATION_HANDLING
    x = images(2, 16)
    with torch.no_grad():
        before = module(x)
    affine = module.get_submodule("channel_affine_2")
    assert isinstance(affine, ChannelAffine)
    trained = (affine.weight.detach().clone(), affine.bias.detach().clone())
    assert not torch.all(trained[0] == 1) and not torch.all(trained[1] == 0)
    randomizer = Randomizer(module, seed=0)
    randomizer.set(["channel_affine_2"])
    assert torch.all(affine.weight == 1) and torch.all(affine.bias == 0)
    with torch.no_grad():
        assert not torch.allclose(module(x), before)
    randomizer.restore()
    assert torch.equal(affine.weight, trained[0]) and torch.equal(affine.bias, trained[1])
    with torch.no_grad():
        torch.testing.assert_close(module(x), before, rtol=0, atol=0)


def test_lrp_canonizer_merges_channel_affine_into_its_conv() -> None:
    module = _folded().eval()
    x = images(2, 16)
    with torch.no_grad():
        before = module(x)
    conv = module.get_submodule("conv_0")
    affine = module.get_submodule("channel_affine_0")
    assert isinstance(conv, nn.Conv2d) and isinstance(affine, ChannelAffine)
    scale = affine.weight.detach().clone()
    weight = conv.weight.detach().clone()
    with canonized(module, lrp_canonizers(module)), torch.no_grad():
        assert torch.all(affine.weight == 1) and torch.all(affine.bias == 0)
        torch.testing.assert_close(conv.weight, weight * scale[:, None, None, None])
        torch.testing.assert_close(module(x), before, atol=1e-5, rtol=1e-5)
    assert torch.equal(conv.weight, weight) and torch.equal(affine.weight, scale)


def test_channel_affine_never_normalizes_with_batch_statistics() -> None:
    affine = ChannelAffine(torch.tensor([2.0, 3.0]), torch.tensor([1.0, -1.0])).train()
    x = torch.randn(4, 2, 3, 3)
    expected = x * torch.tensor([2.0, 3.0]).view(1, 2, 1, 1) + torch.tensor([1.0, -1.0]).view(
        1, 2, 1, 1
    )
    torch.testing.assert_close(affine(x), expected)
    assert affine.running_mean is not None and torch.all(affine.running_mean == 0)


# --------------------------------------------------------------------------------------------
# Graphs exported with a fixed batch: every ONNX Runtime path respects it
# --------------------------------------------------------------------------------------------


def test_zero_padded_export_with_batch_one_runs_any_batch(artifact_cache: Path) -> None:
    # what the lukemelas-style EfficientNet-Lite legacy export looks like, in small
    loaded = load_onnx(onnx_exports.export_padded_cnn(cache_dir=artifact_cache))
    module = _graph(loaded.module)
    assert module.fixed_batch is None
    (flatten,) = [m for m in module.modules() if isinstance(m, Reshape)]
    assert flatten.keep_batch
    x = images(3, 16)
    reference = onnx_exports.PaddedCNN(0).eval()
    with torch.no_grad():
        expected = torch.cat([reference(x[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)
    assert ensure_fidelity(loaded, x, atol=1e-5).passed


def _small_layers_spec() -> AuditSpec:
    return AuditSpec(
        methods=("gradcam",),
        tests=("layers",),
        batch_size=4,
        params=MethodParams(faithfulness_steps=4, scorecam_batch=8),
    )


def _assert_finite_analysis(module: nn.Module, n_images: int) -> None:
    x = images(n_images, 16)
    with torch.no_grad():
        targets = module(x).argmax(1)
    result = layer_analysis(module, x, targets, _small_layers_spec(), device=CPU)
    assert result.stages and result.scores
    for score in result.scores:
        values = np.asarray([v for v in score.values if v is not None], dtype=np.float64)
        assert np.isfinite(values).all() and score.n > 0, score
    for maps in result.example_maps.values():
        for name, m in maps.items():
            assert np.isfinite(m).all() and m.shape == (n_images, 16, 16), name


@pytest.mark.parametrize("pinned", [False, True])
def test_layers_analysis_and_scorecam_on_fixed_batch_exports_log_no_onnx_runtime_error(
    pinned: bool,
    artifact_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # PaddedCNN: batch 1 baked into a reshape (converted to run any batch); ClassTokenNet: a
    # constant of batch 1 that only runs batch 1 (the module runs images one group at a time)
    if pinned:
        data = onnx_exports.export_class_token_net(cache_dir=artifact_cache)
    else:
        data = onnx_exports.export_padded_cnn(cache_dir=artifact_cache)
    module = _graph(load_onnx(data).module).eval()
    assert module.fixed_batch == (1 if pinned else None)
    capfd.readouterr()
    _assert_finite_analysis(module, n_images=5)
    # the metrics' forward passes ran in ONNX Runtime, at the graph's batch size
    assert module in _ort._SESSIONS
    # Score-CAM through ONNX Runtime (forced for this small job) equals Score-CAM in PyTorch
    x = images(3, 16, seed=2)
    with torch.no_grad():
        targets = module(x).argmax(1)
    layer = next(n for n, m in module.named_modules() if isinstance(m, nn.Conv2d))
    spec = _small_layers_spec()
    with monkeypatch.context() as torch_only:
        torch_only.setattr(scorecam, "checked_forward", lambda model, x: None)
        torch_only.setattr(scorecam, "worth_exporting", lambda n_passes, x: False)
        in_torch = compute_maps(module, x, targets, ["scorecam"], spec, layer, device=CPU)
    _ort._SESSIONS.pop(module, None)  # no export to reuse: Score-CAM makes and checks its own
    monkeypatch.setattr(scorecam, "worth_exporting", lambda n_passes, x: True)
    in_ort = compute_maps(module, x, targets, ["scorecam"], spec, layer, device=CPU)
    assert module in _ort._SESSIONS
    assert np.isfinite(in_ort.maps["scorecam"]).all()
    np.testing.assert_allclose(in_ort.maps["scorecam"], in_torch.maps["scorecam"], atol=1e-4)
    _no_onnx_runtime_errors(capfd)


def test_ort_forward_finds_a_fixed_batch_inside_a_wrapper(
    artifact_cache: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    inner = _graph(load_onnx(onnx_exports.export_class_token_net(cache_dir=artifact_cache)).module)
    wrapper = nn.Sequential(inner).eval()  # hides ``fixed_batch`` from getattr(wrapper, ...)
    assert _ort.fixed_batch(wrapper) == 1
    x = images(5, 16)
    with torch.no_grad():
        logits = wrapper(x)
    capfd.readouterr()
    forward = _ort.ort_forward(wrapper, x, logits)
    assert forward is not None
    torch.testing.assert_close(forward(x), logits, atol=1e-5, rtol=1e-5)
    _no_onnx_runtime_errors(capfd)


def test_scorecam_reuses_an_existing_export_however_small_the_job(
    artifact_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _graph(load_onnx(onnx_exports.export_padded_cnn(cache_dir=artifact_cache)).module)
    x = images(2, 16)
    with torch.no_grad():
        logits = module(x)
    assert _ort.ort_forward(module, x, logits) is not None  # as the layers analysis does
    assert not scorecam.worth_exporting(16, x)
    calls: list[int] = []
    forward = _ort.checked_forward(module, x)
    assert forward is not None

    def counted(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        assert forward is not None
        return forward(batch)

    monkeypatch.setattr(scorecam, "checked_forward", lambda model, x: counted)
    maps = compute_maps(
        module, x, logits.argmax(1), ["scorecam"], _small_layers_spec(), "stem", device=CPU
    )
    assert calls and np.isfinite(maps.maps["scorecam"]).all()
    with torch.no_grad():
        module.get_submodule("stem").weight.mul_(0.5)  # other weights: no export to reuse
    assert _ort.checked_forward(module, x) is None


def test_an_export_that_bakes_the_batch_is_not_used_and_not_retried(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # the batch computed with arithmetic (batch * 1) stays a run-time reshape, which tracing
    # records as a constant: the export runs only its example's batch size
    data = onnx_exports.graph_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Shape", ["r"], ["shape"]),
            helper.make_node("Gather", ["shape", "zero"], ["batch"]),
            helper.make_node("Mul", ["batch", "one"], ["rows"]),
            helper.make_node("Concat", ["rows", "minus_one"], ["target"], axis=0),
            helper.make_node("Reshape", ["r", "target"], ["f"]),
            helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
        ],
        initializers={
            "zero": np.array([0], np.int64),
            "one": np.array([1], np.int64),
            "minus_one": np.array([-1], np.int64),
            "fc": np.random.default_rng(0).normal(size=(4, 3 * 8 * 8)).astype(np.float32),
        },
    )
    module = load_onnx(data).module.eval()
    assert any(isinstance(m, ShapeOf) for m in module.modules())
    x = images(3, 8)
    with torch.no_grad():
        logits = module(x)
    exports = []
    original = torch.onnx.export

    def counting_export(*args: Any, **kwargs: Any) -> Any:
        exports.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", counting_export)
    capfd.readouterr()
    assert _ort.ort_forward(module, x, logits) is None
    with torch.no_grad():
        module.get_submodule("gemm_0").weight.mul_(2.0)  # new weights: still not retried
        assert _ort.ort_forward(module, x, module(x)) is None
    assert len(exports) == 1
    _no_onnx_runtime_errors(capfd)
