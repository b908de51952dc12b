"""run_audit: every method on every image, controls always present, repeatable bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saliency_audit.workers.engine.data_randomization import LabeledImages
from saliency_audit.workers.engine.errors import SpecError
from saliency_audit.workers.engine.methods import METHODS
from saliency_audit.workers.engine.models.base import LoadedModel
from saliency_audit.workers.engine.result import AuditResult
from saliency_audit.workers.engine.runner import map_statistics, run_audit
from saliency_audit.workers.engine.spec import (
    ANALYSES,
    TESTS,
    AuditSpec,
    InputSpec,
    MethodParams,
    TrainRecipe,
)
from tests.engine.nets import images, small_cnn, tiny_mlp

FAST = MethodParams(ig_steps=4, noise_samples=3, scorecam_batch=16, smprt_samples=2)
QUICK_TRAINING = TrainRecipe(max_epochs=3, batch_size=4)


def _train_set() -> LabeledImages:
    return LabeledImages(images(10, 16, seed=11), torch.arange(10) % 5)


def _loaded(module: torch.nn.Module, size: int = 16) -> LoadedModel:
    return LoadedModel(
        module=module,
        input_spec=InputSpec(height=size, width=size, class_names=tuple("abcde")),
        source="torchvision",
        sha256="0" * 64,
    )


def _spec(**kwargs: object) -> AuditSpec:
    base: dict[str, object] = dict(
        methods=tuple(n for n, i in METHODS.items() if not i.is_control),
        seed=7,
        batch_size=3,
        device="cpu",
        params=FAST,
    )
    base.update(kwargs)
    return AuditSpec(**base)  # type: ignore[arg-type]


def test_every_method_runs_and_the_controls_are_always_added() -> None:
    result = run_audit(_loaded(small_cnn()), images(5, 16), _spec(methods=("gradient",)))
    assert list(result.methods) == ["gradient", "control_sobel", "control_random"]
    full = run_audit(_loaded(small_cnn()), images(5, 16), _spec())
    assert set(full.methods) == set(METHODS)
    for name, method in full.methods.items():
        assert method.status == "ok", (name, method.reason)
        assert result.maps["gradient"].shape == (5, 16, 16)
        assert full.maps[name].shape == (5, 16, 16) and full.maps[name].dtype == np.float32
        assert set(method.similarity_to_sobel) >= {"spearman_abs", "ssim"}
    assert full.methods["control_sobel"].similarity_to_sobel["ssim"].mean == pytest.approx(1.0)
    assert full.methods["gradcam"].shared_with == ("gradient", "gradient_x_input", "gradcam_pp")
    assert full.spec["resolved_layer"] == "features.3"
    assert [r.target_name for r in full.images] == [
        "abcde"[int(t)] for t in small_cnn()(images(5, 16)).argmax(1)
    ]


def _without_times(result: AuditResult) -> dict[str, object]:
    doc = {k: v for k, v in result.to_dict().items() if k != "timings_s"}
    for m in doc["methods"].values():  # type: ignore[attr-defined]
        m.pop("family_time_s")
    for test in doc["tests"].values():  # type: ignore[attr-defined]
        for run in ("permuted_labels_run", "true_labels_run"):
            test["details"].get(run, {}).pop("seconds", None)
    return doc


def test_same_seed_same_numbers_bit_for_bit() -> None:
    every_test = _spec(tests=TESTS, training=QUICK_TRAINING)
    first = run_audit(_loaded(small_cnn()), images(5, 16), every_test, train=_train_set())
    second = run_audit(_loaded(small_cnn()), images(5, 16), every_test, train=_train_set())
    for name in first.maps:
        assert np.array_equal(first.maps[name], second.maps[name]), name
    a, b = _without_times(first), _without_times(second)
    assert set(a["tests"]) == set(TESTS)  # type: ignore[call-overload]
    sanity_tests = [t for t in TESTS if t not in ANALYSES]  # analyses decide no verdict
    assert len(a["verdicts"]) == len(sanity_tests) * len(METHODS)  # type: ignore[arg-type]
    assert a == b
    other = run_audit(_loaded(small_cnn()), images(5, 16), _spec(seed=8))
    assert not np.array_equal(first.maps["control_random"], other.maps["control_random"])
    assert not np.array_equal(first.maps["smoothgrad"], other.maps["smoothgrad"])
    assert np.array_equal(first.maps["gradient"], other.maps["gradient"])


def test_layer_methods_are_not_applicable_without_conv_layers() -> None:
    x = images(4, 8)
    model = LoadedModel(tiny_mlp(), InputSpec(height=8, width=8), "torchvision", "0" * 64)
    result = run_audit(model, x, _spec(methods=("gradient", "gradcam", "relevance_cam")))
    assert result.methods["gradient"].status == "ok"
    for name in ("gradcam", "relevance_cam"):
        assert result.methods[name].status == "not_applicable"
        assert "conv" in (result.methods[name].reason or "")
        assert name not in result.maps


def test_report_roundtrips_through_json() -> None:
    spec = _spec(
        methods=("gradcam", "lrp"),
        tests=("cascading", "emprt", "data_randomization"),
        training=QUICK_TRAINING,
    )
    result = run_audit(_loaded(small_cnn()), images(3, 16), spec, train=_train_set())
    document = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    again = json.loads(json.dumps(AuditResult.from_dict(document).to_dict(), allow_nan=False))
    assert again == document
    assert document["schema_version"] == "7"
    assert document["environment"]["torch"].startswith("2.14")


def test_bad_specs_are_refused_clearly() -> None:
    with pytest.raises(SpecError, match="unknown method 'gradcamm'"):
        run_audit(_loaded(small_cnn()), images(2, 16), _spec(methods=("gradcamm",)))
    with pytest.raises(SpecError, match="no module named 'nope'"):
        run_audit(_loaded(small_cnn()), images(2, 16), _spec(methods=("gradcam",), layer="nope"))
    with pytest.raises(SpecError, match="targets"):
        run_audit(_loaded(small_cnn()), images(2, 16), _spec(), targets=torch.tensor([0, 9]))
    with pytest.raises(SpecError, match="unknown tests"):
        _spec(tests=("cascading", "sideways"))
    with pytest.raises(SpecError, match="needs a labeled training set"):
        run_audit(_loaded(small_cnn()), images(2, 16), _spec(tests=("data_randomization",)))
    with pytest.raises(SpecError, match="threshold"):
        bad_policy = {"extends": "default", "tests": {"cascading": {"measure": "ssim"}}}
        run_audit(_loaded(small_cnn()), images(2, 16), _spec(policy=bad_policy))


def test_explicit_targets_are_explained() -> None:
    targets = torch.tensor([4, 0, 2])
    result = run_audit(
        _loaded(small_cnn()), images(3, 16), _spec(methods=("gradient",)), targets=targets
    )
    assert [r.target for r in result.images] == [4, 0, 2]
    x = images(3, 16).requires_grad_(True)
    logits = small_cnn()(x)
    (grad,) = torch.autograd.grad(logits[torch.arange(3), targets].sum(), x)
    np.testing.assert_allclose(result.maps["gradient"], grad.sum(1).numpy(), rtol=1e-5, atol=1e-7)


def test_map_statistics_by_hand() -> None:
    maps = np.array([[[1.0, -1.0], [0.0, 2.0]]], dtype=np.float32)
    stats = map_statistics(maps, native_channels=3)
    assert stats.mean == pytest.approx(0.5)
    assert stats.min == -1.0 and stats.max == 2.0
    assert stats.mean_abs == pytest.approx(1.0)
    assert stats.fraction_positive == pytest.approx(0.5)
    assert stats.fraction_zero == pytest.approx(0.25)
    assert stats.top10_mass == pytest.approx(2.0 / 4.0)  # top 10% of 4 pixels = 1 pixel


def test_fixed_batch_graphs_give_the_same_cam_as_one_image_at_a_time(artifact_cache) -> None:  # type: ignore[no-untyped-def]
    """A graph with batch 1 baked in runs a batch image by image inside its forward; layer
    hooks would then see only the last image. compute_methods splits such batches."""
    from saliency_audit.workers.engine.methods import MethodContext, compute_methods
    from saliency_audit.workers.engine.models.onnx_convert import load_onnx
    from tests.engine.onnx_exports import export_class_token_net

    net = load_onnx(export_class_token_net(cache_dir=artifact_cache)).module
    assert getattr(net, "fixed_batch", None) == 1
    x = images(3, 16, seed=5)
    with torch.no_grad():
        target = net(x).argmax(1)
    names = ["gradcam", "gradcam_pp", "gradient", "guided_gradcam", "scorecam"]
    ctx = MethodContext(params=FAST, layer="patchify")
    batch = compute_methods(net, x, target, names, ctx)
    for name in names:
        singles = torch.cat(
            [
                compute_methods(net, x[i : i + 1], target[i : i + 1], [name], ctx)[name]  # type: ignore[misc]
                for i in range(3)
            ]
        )
        value = batch[name]
        assert isinstance(value, torch.Tensor), (name, value)
        assert float(singles.abs().max()) > 0, name
        torch.testing.assert_close(value, singles, rtol=1e-5, atol=1e-6, msg=name)


def test_all_zero_maps_have_undefined_concentration_not_nan() -> None:
    stats = map_statistics(np.zeros((2, 4, 4), dtype=np.float32), native_channels=1)
    assert stats.top10_mass is None and stats.fraction_zero == 1.0 and stats.mean == 0.0
    mixed = np.zeros((2, 4, 4), dtype=np.float32)
    mixed[1, 0, 0] = 3.0
    assert map_statistics(mixed, native_channels=1).top10_mass == pytest.approx(1.0)


def test_default_cam_layer_is_the_deepest_conv_not_a_residual_shortcut() -> None:
    """In the reference ResNet's last block the 1x1 shortcut conv is registered after conv2;
    the default CAM layer must still be the main path's last conv."""
    from pathlib import Path

    from saliency_audit.workers.engine.methods import resolve_layer
    from saliency_audit.workers.engine.models.loader import load_model

    onnx_file = Path(__file__).parents[2] / "examples/reference/shapes_small_resnet.onnx"
    module = load_model(onnx_file.read_bytes()).module
    assert resolve_layer(module, None) == "layer3.0.shortcut.0"  # registration order
    assert resolve_layer(module, None, torch.zeros(1, 3, 32, 32)) == "layer3.0.conv2"
    cnn = small_cnn()
    assert resolve_layer(cnn, None, images(1, 16)) == "features.3" == resolve_layer(cnn, None)
