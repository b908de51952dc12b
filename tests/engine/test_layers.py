"""The ``layers`` analysis: which layers, LRP at a layer, the per-layer scores, and
Relevance-CAM's claim checked on the reference shapes ResNet."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from saliency_audit.service.cli import main
from saliency_audit.workers.engine.errors import SpecError
from saliency_audit.workers.engine.images import (
    load_image_folder,
    load_mask_folder,
    masks_tensor,
    preprocess,
)
from saliency_audit.workers.engine.layers import (
    FAITHFULNESS,
    LOCALIZATION,
    METHODS,
    block_output_layers,
    layer_analysis,
    resolve_layers,
)
from saliency_audit.workers.engine.methods.lrp import lrp_layer_relevance, lrp_relevance
from saliency_audit.workers.engine.models.base import LoadedModel
from saliency_audit.workers.engine.models.loader import load_model
from saliency_audit.workers.engine.runner import run_audit
from saliency_audit.workers.engine.spec import AuditSpec
from tests.engine.nets import images, small_cnn, torchvision_model

REFERENCE = Path(__file__).resolve().parents[2] / "examples" / "reference"
CPU = torch.device("cpu")


@functools.cache
def shapes_resnet() -> LoadedModel:
    return load_model((REFERENCE / "shapes_small_resnet.onnx").read_bytes())


@functools.cache
def shapes_inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``n`` bundled shapes images, their object masks and predicted classes."""
    model = shapes_resnet()
    decoded = load_image_folder(REFERENCE / "shapes_images", 3)[:n]
    x = preprocess(decoded, model.input_spec)
    masks = masks_tensor(
        load_mask_folder(REFERENCE / "shapes_masks", [d.name for d in decoded]), model.input_spec
    )
    with torch.no_grad():
        targets = model.module(x).argmax(1)
    return x, masks, targets


def test_default_layers_are_each_blocks_output_shallow_to_deep() -> None:
    resnet18 = torchvision_model("resnet18").eval()
    assert block_output_layers(resnet18, torch.zeros(1, 3, 64, 64)) == [
        ("conv1", "conv1"),
        ("layer1", "layer1"),
        ("layer2", "layer2"),
        ("layer3", "layer3"),
        ("layer4", "layer4"),
    ]
    # a converted ONNX graph: its scopes never run, so a block's output is its last module
    converted = shapes_resnet().module
    assert block_output_layers(converted, torch.zeros(1, 3, 32, 32)) == [
        ("stem", "stem.2"),
        ("layer1", "layer1.0.relu2"),
        ("layer2", "layer2.0.relu2"),
        ("layer3", "layer3.0.relu2"),
    ]


def test_requested_layers_must_exist_and_be_spatial() -> None:
    net = small_cnn().eval()
    example = images(1)
    names = [n for n, _ in net.named_modules() if n]
    conv = next(n for n in names if n.startswith("features") or "conv" in n)
    assert resolve_layers(net, [conv], example) == [(conv, conv)]
    with pytest.raises(SpecError, match="unknown layer 'nope'"):
        resolve_layers(net, ["nope"], example)
    head = names[-1]
    with pytest.raises(SpecError, match="not a spatial"):
        resolve_layers(net, [head], example)


def test_lrp_relevance_at_a_layer_is_conserved_from_the_logit_down() -> None:
    """Conservation (Bach et al. 2015), biases excluded: at the last block the relevance sums
    to the target logit; below it z+ neurons without a positive contribution drop theirs (on
    this model up to 6.5% by layer1, measured), and from the first block to the input the
    flat rule loses nothing, so the first block holds exactly the input relevance."""
    model = shapes_resnet().module.eval()
    x, _, targets = shapes_inputs(8)
    with torch.no_grad():
        logit = model(x).gather(1, targets[:, None])[:, 0]
    layers = [layer for _, layer in block_output_layers(model, x[:1])]
    totals = {
        layer: lrp_layer_relevance(
            model, x, targets, layer, "epsilon_plus_flat", upsample=False
        ).sum(dim=(1, 2, 3))
        for layer in layers
    }
    assert torch.allclose(totals[layers[-1]], logit, rtol=1e-3)
    for total in totals.values():
        assert ((total - logit).abs() / logit.abs()).max() < 0.1
    input_total = lrp_relevance(model, x, targets, "epsilon_plus_flat").sum(dim=(1, 2, 3))
    assert torch.allclose(totals[layers[0]], input_total, rtol=1e-4)
    # upsampled to the input size for the analysis, the map keeps its shape per image
    upsampled = lrp_layer_relevance(model, x, targets, layers[0], "epsilon_plus_flat")
    assert upsampled.shape == (8, 1, 32, 32)


def test_layer_analysis_scores_every_method_layer_and_metric() -> None:
    model = shapes_resnet().module.eval()
    x, masks, targets = shapes_inputs(6)
    spec = AuditSpec(methods=("gradcam",), tests=("layers",), batch_size=4, seed=1)
    result = layer_analysis(model, x, targets, spec, device=CPU, masks=masks)
    layers = [s.name for s in result.stages]
    assert layers == ["stem", "layer1", "layer2", "layer3"]
    metrics = (*FAITHFULNESS, *LOCALIZATION)
    keys = {(s.stage, s.method, s.measure) for s in result.scores}
    assert keys == {(layer, m, k) for layer in layers for m in METHODS for k in metrics}
    for score in result.scores:
        assert score.n + score.n_undefined == 6
        if score.measure in ("average_increase", "pointing_game") and score.mean is not None:
            assert 0 <= score.mean <= (100 if score.measure == "average_increase" else 1)
    assert set(result.details["definitions"]) >= set(metrics)
    beats = result.details["beats_random"]
    by_key = {(s.stage, s.method, s.measure): s.mean for s in result.scores}
    drop = by_key[("layer3", "gradcam", "average_drop")]
    random_drop = by_key[("layer3", "control_random", "average_drop")]
    assert beats["layer3"]["gradcam"]["average_drop"] == (drop < random_drop)
    # the maps of the first images at each layer are kept for the overlays
    assert set(result.example_maps) == set(layers)
    assert result.example_maps["stem"]["relevance_cam"].shape == (6, 32, 32)
    # the same seed and inputs give the same numbers
    again = layer_analysis(model, x, targets, spec, device=CPU, masks=masks)
    assert [s.mean for s in again.scores] == [s.mean for s in result.scores]


def test_without_masks_no_localization_is_scored() -> None:
    model = shapes_resnet().module.eval()
    x, _, targets = shapes_inputs(3)
    spec = AuditSpec(methods=("gradcam",), layers=("layer3.0.relu2",), batch_size=4)
    result = layer_analysis(model, x, targets, spec, device=CPU)
    assert {s.measure for s in result.scores} == set(FAITHFULNESS)
    assert [s.name for s in result.stages] == ["layer3.0.relu2"]


def test_the_layers_analysis_decides_no_verdict_and_is_in_the_report() -> None:
    model = shapes_resnet()
    x, masks, _ = shapes_inputs(4)
    spec = AuditSpec(methods=("gradient",), tests=("cascading", "layers"), batch_size=4)
    result = run_audit(model, x, spec, masks=masks)
    assert {v.test for v in result.verdicts} == {"cascading"}
    report = result.to_dict()
    assert report["tests"]["layers"]["details"]["localization"] == "masks"
    json.dumps(report, allow_nan=False)


@pytest.mark.slow
def test_relevance_cam_beats_gradcam_at_shallow_blocks_and_matches_it_at_the_last() -> None:
    """Lee et al. 2021's claim on the reference shapes ResNet (64 images with object masks):
    at the shallow blocks Relevance-CAM has a lower Average Drop and a higher IoU than
    Grad-CAM; at the last block the two are close."""
    model = shapes_resnet().module.eval()
    x, masks, targets = shapes_inputs(64)
    spec = AuditSpec(methods=("gradcam",), tests=("layers",), batch_size=64)
    result = layer_analysis(model, x, targets, spec, device=CPU, masks=masks)
    mean = {(s.stage, s.method, s.measure): s for s in result.scores}

    def of(layer: str, method: str, metric: str) -> float:
        value = mean[(layer, method, metric)].mean
        assert value is not None
        return value

    for shallow in ("stem", "layer1", "layer2"):
        # Average Drop, with the whole 95% intervals apart
        assert (
            mean[(shallow, "relevance_cam", "average_drop")].ci_high
            < mean[(shallow, "gradcam", "average_drop")].ci_low
        ), shallow
        assert of(shallow, "relevance_cam", "iou") > of(shallow, "gradcam", "iou"), shallow
    assert (
        abs(of("layer3", "relevance_cam", "average_drop") - of("layer3", "gradcam", "average_drop"))
        < 5
    )
    assert abs(of("layer3", "relevance_cam", "iou") - of("layer3", "gradcam", "iou")) < 0.05


def test_cli_runs_the_layers_analysis_with_masks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    for path in sorted((REFERENCE / "shapes_images").glob("*.png"))[:4]:
        (images_dir / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--model",
            str(REFERENCE / "shapes_small_resnet.onnx"),
            "--images",
            str(images_dir),
            "--methods",
            "gradcam",
            "--tests",
            "layers",
            "--masks",
            str(REFERENCE / "shapes_masks"),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "per-layer analysis" in printed and "localization IoU" in printed
    report = json.loads((out / "report.json").read_text())
    table = report["tests"]["layers"]
    assert [s["name"] for s in table["stages"]] == ["stem", "layer1", "layer2", "layer3"]
    assert {s["measure"] for s in table["scores"]} == {*FAITHFULNESS, *LOCALIZATION}
