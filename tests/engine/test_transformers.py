"""A vision transformer, as a user brings one: CAM methods say why they do not apply, guided
backprop names the nonlinearities it has no rule for, LRP reports its conservation, and a method
that fails never costs the report the other methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.models.vision_transformer import VisionTransformer

from saliency_audit.service.cli import main
from saliency_audit.workers.engine.methods import FAMILIES, METHODS
from saliency_audit.workers.engine.models.base import LoadedModel
from saliency_audit.workers.engine.runner import run_audit
from saliency_audit.workers.engine.spec import AuditSpec, InputSpec, MethodParams
from tests.engine.nets import images
from tests.engine.onnx_exports import cache_key, cached, export_module

FAST = MethodParams(ig_steps=4, noise_samples=3, scorecam_batch=16)


def tiny_vit() -> VisionTransformer:
    """torchvision's ViT at 32 px: the same modules as vit_b_16, small enough for a test."""
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=5,
    )
    torch.nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision starts it at zero
    return model.eval()


def test_a_vit_audit_reports_every_method_with_its_status(tmp_path: Path) -> None:
    vit = tiny_vit()
    result = run_audit(
        LoadedModel(vit, InputSpec(height=32, width=32), "torchvision", "0" * 64),
        images(3, 32, seed=2),
        AuditSpec(
            methods=tuple(n for n, i in METHODS.items() if not i.is_control),
            params=FAST,
            tests=("cascading",),
            measures=("ssim",),
        ),
    )
    methods = result.methods
    assert set(methods) == set(METHODS)
    for name in ("gradcam", "gradcam_pp", "scorecam", "guided_gradcam", "relevance_cam"):
        assert methods[name].status == "not_applicable", name
        assert "patch embedding" in (methods[name].reason or ""), name
    assert methods["guided_backprop"].status == "not_applicable"
    assert "GELU" in (methods["guided_backprop"].reason or "")
    lrp = methods["lrp"]
    assert lrp.conservation is not None and lrp.status in ("ok", "not_conserved")
    assert (lrp.status == "ok") == lrp.conservation.within_tolerance
    for name in ("gradient", "integrated_gradients", "smoothgrad"):
        assert methods[name].status == "ok", (name, methods[name].reason)
    assert result.spec["resolved_layer"] is None
    assert "patch embedding" in result.spec["layer_reason"]


def test_a_failing_method_on_a_vit_leaves_a_report_with_every_other_method(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        raise RuntimeError("integrated gradients ran out of memory")

    monkeypatch.setattr(FAMILIES["integrated_gradients"], "compute", broken)
    result = run_audit(
        LoadedModel(tiny_vit(), InputSpec(height=32, width=32), "torchvision", "0" * 64),
        images(2, 32, seed=3),
        AuditSpec(methods=("gradient", "integrated_gradients", "lrp"), params=FAST),
    )
    assert result.methods["integrated_gradients"].status == "error"
    assert "ran out of memory" in (result.methods["integrated_gradients"].reason or "")
    assert result.methods["gradient"].status == "ok"
    assert set(result.maps) == {"gradient", "lrp", "control_sobel", "control_random"}
    json.dumps(result.to_dict(), allow_nan=False)


def test_the_cli_audits_a_vit_onnx_export(
    tmp_path: Path, artifact_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = cached(
        artifact_cache,
        cache_key("tiny_vit", "legacy17"),
        lambda: export_module(tiny_vit(), torch.zeros(1, 3, 32, 32), exporter="legacy", opset=17),
    )
    model = tmp_path / "vit.onnx"
    model.write_bytes(data)
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    for i in range(2):
        pixels = (images(1, 32, seed=i)[0].permute(1, 2, 0).clamp(-2, 2) * 60 + 128).byte()
        Image.fromarray(pixels.numpy()).save(photos / f"p{i}.png")
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"ig_steps": 4, "noise_samples": 3}))
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--model",
            str(model),
            "--images",
            str(photos),
            "--out",
            str(out),
            "--tests",
            "none",
            "--params",
            str(params),
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == set(METHODS)
    assert report["methods"]["gradcam"]["status"] == "not_applicable"
    assert report["methods"]["lrp"]["conservation"] is not None
    printed = capsys.readouterr().out
    assert "layer for CAM methods: none (the deepest conv" in printed
    assert "not ok:" in printed and "guided_backprop (not_applicable)" in printed
