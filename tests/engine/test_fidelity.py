"""The fidelity check compares the converted graph with ONNX Runtime and refuses a mismatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from torch import nn

from saliency_audit.workers.engine.errors import FidelityError
from saliency_audit.workers.engine.models.base import LoadedModel
from saliency_audit.workers.engine.models.fidelity import (
    FidelityReport,
    check_fidelity,
    ensure_fidelity,
    ort_providers,
    ort_session,
)
from saliency_audit.workers.engine.models.onnx_convert import load_onnx
from saliency_audit.workers.engine.spec import AuditSpec
from tests.engine import onnx_exports
from tests.engine.nets import images


@pytest.fixture()
def small_cnn_onnx(artifact_cache: Path) -> LoadedModel:
    return load_onnx(onnx_exports.export_small_cnn(cache_dir=artifact_cache, opset=17))


def _first_conv(loaded: LoadedModel) -> nn.Conv2d:
    conv = next(m for m in loaded.module.modules() if isinstance(m, nn.Conv2d))
    assert isinstance(conv, nn.Conv2d)
    return conv


def test_correct_conversion_passes_with_a_report(small_cnn_onnx: LoadedModel) -> None:
    x = images(4, 16)
    report = ensure_fidelity(small_cnn_onnx, x, atol=1e-4)
    assert isinstance(report, FidelityReport)
    assert report.passed and report.n_images == 4 and report.argmax_agreement == 1.0
    assert 0.0 <= report.max_abs_diff <= 1e-4 and report.atol == 1e-4
    assert report.provider == ort_providers()[0]
    assert report.to_dict() == {
        "max_abs_diff": report.max_abs_diff,
        "max_rel_diff": report.max_rel_diff,
        "argmax_agreement": 1.0,
        "n_images": 4,
        "atol": 1e-4,
        "rtol": AuditSpec.fidelity_rtol,
        "provider": report.provider,
        "passed": True,
    }


def test_resnet18_conversion_passes(artifact_cache: Path) -> None:
    data = onnx_exports.export_torchvision(
        "resnet18", cache_dir=artifact_cache, seed=0, exporter="legacy", opset=13, size=64
    )
    loaded = load_onnx(data)
    report = check_fidelity(loaded, images(3, 64), atol=1e-4, session=ort_session(data))
    assert report.passed and report.max_abs_diff < 1e-4


def test_perturbed_weight_fails_and_names_the_disagreeing_images(
    small_cnn_onnx: LoadedModel,
) -> None:
    x = images(4, 16)
    x[0] = 0.0
    x[2] = 0.0  # a zero image only sees the first conv's bias, which stays untouched
    with torch.no_grad():
        _first_conv(small_cnn_onnx).weight.add_(0.05)
    report = check_fidelity(small_cnn_onnx, x, atol=1e-4)
    assert not report.passed and report.max_abs_diff > 1e-4
    with pytest.raises(FidelityError) as info:
        ensure_fidelity(small_cnn_onnx, x, atol=1e-4)
    error = info.value
    assert error.details["image_indices"] == [1, 3]
    assert error.details["atol"] == 1e-4
    assert error.details["max_abs_diff"] == pytest.approx(report.max_abs_diff)
    assert "tolerance 0.0001" in error.message and "images: 1, 3" in error.message
    assert f"{report.max_abs_diff:.3g}" in error.message
    assert error.to_dict()["code"] == "fidelity_mismatch"


def test_nan_output_never_passes(small_cnn_onnx: LoadedModel) -> None:
    with torch.no_grad():
        _first_conv(small_cnn_onnx).weight[0, 0, 0, 0] = float("nan")
    report = check_fidelity(small_cnn_onnx, images(2, 16), atol=1.0)
    assert not report.passed and report.max_abs_diff == float("inf")


def test_nhwc_file_is_fed_nhwc_to_onnx_runtime(artifact_cache: Path) -> None:
    loaded = load_onnx(onnx_exports.export_nhwc_small_cnn(cache_dir=artifact_cache))
    assert loaded.input_spec.layout == "NHWC"
    report = ensure_fidelity(loaded, images(3, 16), atol=1e-4)
    assert report.passed and report.n_images == 3


@pytest.mark.parametrize("pinned", [True, False])
def test_fixed_batch_file_is_run_by_onnx_runtime_in_its_batch_size(
    pinned: bool, artifact_cache: Path
) -> None:
    # ClassTokenNet's graph only runs batch 1; SmallCNN's batch-1 graph is converted to run any
    # batch. Either way ONNX Runtime gets the batch size the file fixes.
    if pinned:
        data = onnx_exports.export_class_token_net(cache_dir=artifact_cache)
    else:
        data = onnx_exports.export_small_cnn(
            cache_dir=artifact_cache, exporter="dynamo", opset=18, dynamic_batch=False
        )
    loaded = load_onnx(data)
    assert ort_session(data).get_inputs()[0].shape[0] == 1
    report = ensure_fidelity(loaded, images(5, 16), atol=1e-4, batch_size=2)
    assert report.passed and report.n_images == 5


def test_fidelity_leaves_the_module_mode_as_it_was(small_cnn_onnx: LoadedModel) -> None:
    small_cnn_onnx.module.train()
    ensure_fidelity(small_cnn_onnx, images(2, 16), atol=1e-4)
    assert small_cnn_onnx.module.training


def test_cpu_is_always_the_last_provider() -> None:
    providers = ort_providers()
    assert providers[-1] == "CPUExecutionProvider"
    gpu = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    assert providers[0] == ("CUDAExecutionProvider" if gpu else "CPUExecutionProvider")
    session = ort_session(onnx_exports.graph_model([helper.make_node("Relu", ["x"], ["y"])]))
    assert session.get_providers()[-1] == "CPUExecutionProvider"
    out = session.run(None, {"x": -np.ones((1, 3, 8, 8), np.float32)})[0]
    assert np.asarray(out).max() == 0.0
