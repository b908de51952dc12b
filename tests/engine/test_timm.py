"""timm architectures (``--arch timm:NAME``) with a weights file: built with
``timm.create_model(NAME, pretrained=False)``, loaded strictly from safetensors, the input spec
from timm's pretrained_cfg, and the engine's default CAM layer and cascade stages on five
families. Models get seeded random weights; nothing is downloaded (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from saliency_audit.service.cli import main
from saliency_audit.workers.engine import audit
from saliency_audit.workers.engine.contract.architectures import TIMM_MISSING
from saliency_audit.workers.engine.errors import (
    ArchitectureUnavailableError,
    ModelLoadError,
    NotAClassifierError,
    UnknownArchitectureError,
    WeightsMismatchError,
)
from saliency_audit.workers.engine.methods.base import cam_layer_choice
from saliency_audit.workers.engine.methods.lrp import lrp_relevance
from saliency_audit.workers.engine.models.base import LoadedModel
from saliency_audit.workers.engine.models.loader import load_model
from saliency_audit.workers.engine.randomization import ROOT, unit_modules, units
from tests.engine.nets import images
from tests.engine.timm_models import hide_timm, safetensors_weights, timm_model

REPO = Path(__file__).resolve().parents[2]
SIZE = 64  # small inputs: every family still has a spatial last stage (2x2 at stride 32)
CLASSES = 3


@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[None]:
    """No hub access, whatever a test does: timm builds with pretrained=False anyway."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@dataclass(frozen=True)
class Family:
    """What the engine is expected to pick on one timm family, read off its architecture."""

    name: str
    default_layer: str | None
    blocks: tuple[str, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()


FAMILIES = {
    # the main path's last conv of the last BasicBlock (its 1x1 downsample is shallower)
    "resnet10t": Family(
        "resnet10t",
        "layer4.0.conv2",
        ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"),
    ),
    # conv_head runs before the global pooling: spatial
    "efficientnet_b0": Family(
        "efficientnet_b0",
        "conv_head",
        ("conv_stem", "bn1", *(f"blocks.{i}" for i in range(7)), "conv_head", "bn2", "classifier"),
    ),
    # convnext_atto's MLP is made of 1x1 convs (conv_mlp): its fc2 is the deepest conv
    "convnext_atto": Family(
        "convnext_atto",
        "stages.3.blocks.1.mlp.fc2",
        ("stem", "stages.0", "stages.1", "stages.2", "stages.3", "head"),
    ),
    # a patch embedding and attention: no default CAM layer; the class token and position
    # embedding the root owns are a stage of their own
    "vit_tiny_patch16_224": Family(
        "vit_tiny_patch16_224",
        None,
        (ROOT, "patch_embed", *(f"blocks.{i}" for i in range(12)), "norm", "head"),
        (("img_size", SIZE),),
    ),
    # conv_head runs after the global pooling (one value per channel): the last conv before it
    "mobilenetv3_small_050": Family(
        "mobilenetv3_small_050",
        "blocks.5.0.conv",
        ("conv_stem", "bn1", *(f"blocks.{i}" for i in range(6)), "conv_head", "classifier"),
    ),
}


def timm_module(family: Family, seed: int = 0) -> nn.Module:
    return timm_model(family.name, CLASSES, seed, **dict(family.kwargs))


@dataclass
class Built:
    family: Family
    reference: nn.Module
    weights: bytes
    loaded: LoadedModel


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def built(request: pytest.FixtureRequest) -> Built:
    family = FAMILIES[request.param]
    reference = timm_module(family)
    weights = safetensors_weights(reference)
    # a ViT's position embedding fixes its input size: the spec states the one it was built at
    given = {"height": SIZE, "width": SIZE} if family.kwargs else None
    loaded = load_model(weights, architecture=f"timm:{family.name}", input_spec_overrides=given)
    return Built(family, reference, weights, loaded)


def test_weights_load_strictly_and_compute_what_the_timm_module_computes(built: Built) -> None:
    import timm

    x = images(2, SIZE, seed=1)
    with torch.no_grad():
        expected = built.reference(x)
        got = built.loaded.module(x)
    assert got.shape == (2, CLASSES)  # the class count read from the head's weights
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    loaded = built.loaded
    assert loaded.source == "timm" and loaded.architecture == f"timm:{built.family.name}"
    cfg = timm.models.get_pretrained_cfg(built.family.name).to_dict()
    assert loaded.output is not None and loaded.output.num_classes == CLASSES
    assert loaded.output.name == cfg["classifier"]
    # the input spec's defaults are timm's pretrained_cfg, each recorded with its source
    spec, sources = loaded.input_spec, loaded.input_spec_sources
    assert (spec.mean, spec.std, spec.interpolation) == (cfg["mean"], cfg["std"], "bicubic")
    assert sources["mean"] == sources["std"] == sources["interpolation"] == "pretrained_cfg"
    assert spec.channels == cfg["input_size"][0] and sources["channels"] == "pretrained_cfg"
    if built.family.kwargs:  # the ViT: built at the size the caller stated
        assert (spec.height, spec.width) == (SIZE, SIZE) and sources["height"] == "given"
    else:
        assert (spec.height, spec.width) == tuple(cfg["input_size"][1:])
        assert sources["height"] == sources["width"] == "pretrained_cfg"
    assert any(f"crop_pct {cfg['crop_pct']:g}" in note for note in loaded.notes)
    # in-place activations off and attention in the open, for the hooks and LRP rules
    assert not any(getattr(m, "inplace", False) for m in loaded.module.modules())
    assert not any(getattr(m, "fused_attn", False) for m in loaded.module.modules())


def test_the_default_cam_layer_and_the_cascade_stages_fit_each_family(built: Built) -> None:
    module = built.loaded.module
    choice = cam_layer_choice(module, None, images(1, SIZE))
    assert choice.name == built.family.default_layer, choice.reason
    if choice.name is None:
        assert "patch embedding" in choice.reason
    blocks = units(module, "block")
    assert tuple(u.name for u in blocks) == built.family.blocks
    # the last cascade stage randomizes every parameter of the model, the root's own included
    members = unit_modules(module)
    covered = {id(p) for u in blocks for m in u.modules for p in members[m].parameters(False)}
    assert covered == {id(p) for p in module.parameters()}


def test_cam_and_relevance_methods_run_at_the_default_layer(built: Built) -> None:
    result = audit(
        built.loaded,
        images(1, SIZE, seed=2),
        methods=["gradcam", "relevance_cam"],
        tests=(),
        device="cpu",
    ).to_dict()
    assert result["spec"]["resolved_layer"] == built.family.default_layer
    methods = result["methods"]
    if built.family.default_layer is None:
        assert {methods[m]["status"] for m in ("gradcam", "relevance_cam")} == {"not_applicable"}
        return
    relevance = methods["relevance_cam"]
    assert relevance["status"] == "ok", relevance
    assert 0 < relevance["conservation"]["min"] <= relevance["conservation"]["max"] < 1.5
    assert methods["gradcam"]["status"] in ("ok", "degenerate"), methods["gradcam"]


def test_lrp_explains_a_timm_vit_with_its_attention_computed_in_the_open() -> None:
    """timm's fused attention kernel hides the attention softmax from the LRP rules; the
    loader turns it off. LRP does not conserve relevance on a ViT either way (the method is
    reported not_conserved), but fused, the input relevance is off from the logit by orders
    of magnitude more."""
    family = FAMILIES["vit_tiny_patch16_224"]
    reference = timm_module(family)
    fused = [m for m in reference.modules() if getattr(m, "fused_attn", False)]
    assert fused  # timm fuses by default
    weights = safetensors_weights(reference)
    loaded = load_model(
        weights,
        architecture=f"timm:{family.name}",
        input_spec_overrides={"height": SIZE, "width": SIZE},
    )
    x, target = images(2, SIZE, seed=3), torch.tensor([0, 1])

    def gaps(model: nn.Module) -> torch.Tensor:
        """Per image, |input relevance sum - target logit|."""
        log: list[tuple[torch.Tensor, torch.Tensor]] = []
        lrp_relevance(model, x, target, "epsilon_plus_flat", conservation=log)
        (distributed, start), *_ = log
        return (distributed - start).abs()

    assert bool((gaps(loaded.module) < 0.1 * gaps(reference)).all())
    # without the size it was built at, the position embedding does not fit, and the error
    # says what to state
    with pytest.raises(ModelLoadError) as unsized:
        load_model(weights, architecture=f"timm:{family.name}")
    assert "pos_embed: expected (1, 197, 192), got (1, 17, 192)" in unsized.value.message
    assert "state the size the weights were trained at" in unsized.value.message


def test_saliency_audit_run_audits_timm_resnet18_weights_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = timm_model("resnet18", CLASSES)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(safetensors_weights(model))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"height": SIZE, "width": SIZE}))
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted((REPO / "examples/reference/shapes_images").glob("*.png"))[:2]:
        (photos / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out"
    argv = ["run", "--arch", "timm:resnet18", "--model", str(weights), "--images", str(photos)]
    argv += ["--input-spec", str(spec), "--methods", "gradient,gradcam", "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "resize         bicubic (pretrained_cfg)" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["source"] == "timm"
    assert report["model"]["architecture"] == "timm:resnet18"
    assert report["model"]["input_spec_sources"]["mean"] == "pretrained_cfg"
    assert report["spec"]["resolved_layer"] == "layer4.1.conv2"
    stages = report["tests"]["cascading"]["stages"]
    names = ["fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]
    assert [s["name"] for s in stages] == names
    assert {(v["method"], v["test"]) for v in report["verdicts"]} >= {
        ("gradient", "cascading"),
        ("gradcam", "cascading"),
    }
    # the engine's own forward pass of the weights gives the reported predictions
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, SIZE, SIZE))
    assert report["model"]["num_classes"] == logits.shape[1] == CLASSES


def test_without_timm_every_way_in_says_how_to_install_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    hide_timm(monkeypatch)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(save_safetensors({"fc.weight": torch.zeros(3, 8)}))
    with pytest.raises(ArchitectureUnavailableError) as caught:
        load_model(weights.read_bytes(), architecture="timm:resnet18")
    assert caught.value.message == TIMM_MISSING
    assert TIMM_MISSING == "timm is not installed in the worker: pip install 'saliency-audit[timm]'"
    with pytest.raises(ArchitectureUnavailableError, match="pip install 'saliency-audit"):
        audit(weights, torch.zeros(1, 3, 8, 8), architecture="timm:resnet18", tests=())
    code = main(["run", "--arch", "timm:resnet18", "--model", str(weights), "--images", "x"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {TIMM_MISSING} (architecture_unavailable)"


def test_names_timm_does_not_have_are_refused_with_close_names() -> None:
    weights = save_safetensors({"fc.weight": torch.zeros(3, 8)})
    with pytest.raises(UnknownArchitectureError) as unknown:
        load_model(weights, architecture="timm:resnet_18")
    assert "resnet18" in unknown.value.details["suggestions"]
    with pytest.raises(UnknownArchitectureError, match="no pretrained tag 'nope' for resnet18"):
        load_model(weights, architecture="timm:resnet18.nope")
    with pytest.raises(UnknownArchitectureError, match="lowercase letters"):
        load_model(weights, architecture="timm:ResNet-18")


def test_keys_must_match_exactly_and_the_head_must_be_a_classifier() -> None:
    state = dict(timm_module(FAMILIES["resnet10t"]).state_dict())

    def load(changed: dict[str, torch.Tensor]) -> LoadedModel:
        return load_model(save_safetensors(changed), architecture="timm:resnet10t")

    renamed = {("extra.weight" if k == "layer1.0.conv1.weight" else k): v for k, v in state.items()}
    with pytest.raises(WeightsMismatchError) as mismatch:
        load(renamed)
    assert mismatch.value.details["missing_keys"] == ["layer1.0.conv1.weight"]
    assert mismatch.value.details["unexpected_keys"] == ["extra.weight"]
    with pytest.raises(ModelLoadError, match=r"layer1.0.conv1.weight: expected \(64, 64, 3, 3\)"):
        load({**state, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)})
    with pytest.raises(NotAClassifierError):
        load({**state, "fc.weight": torch.zeros(1, 512), "fc.bias": torch.zeros(1)})
