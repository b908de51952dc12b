"""LRP: conservation, agreement with Zennit, canonization that leaves the model as it was."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import Canonizer, NamedMergeBatchNorm, SequentialMergeBatchNorm
from zennit.composites import EpsilonAlpha2Beta1, EpsilonPlusFlat, LayerMapComposite
from zennit.core import Composite
from zennit.layer import Sum
from zennit.rules import Norm, Pass, ZPlus
from zennit.torchvision import ResNetCanonizer
from zennit.types import Activation, AvgPool, BatchNorm, Convolution

from saliency_audit.workers.engine.errors import NotApplicableError, SpecError
from saliency_audit.workers.engine.methods import lrp
from saliency_audit.workers.engine.methods.base import MethodContext, compute_methods
from saliency_audit.workers.engine.models.canonize import (
    batchnorm_merge_pairs,
    canonized,
    lrp_canonizers,
)
from saliency_audit.workers.engine.models.onnx_convert import load_onnx
from saliency_audit.workers.engine.spec import LRP_COMPOSITES, MethodParams
from tests.engine.nets import images, small_cnn, torchvision_model
from tests.engine.onnx_exports import export_small_cnn, export_torchvision

COMPOSITES = ["epsilon_plus_flat", "epsilon_alpha2_beta1", "z_plus"]
CONSERVATION_RTOL = 0.05


@functools.cache
def model(arch: str) -> nn.Module:
    """One random-weight torchvision model per architecture for the whole module."""
    return torchvision_model(arch)


@functools.cache
def small_cnn_model() -> nn.Module:
    return small_cnn(seed=1)


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread() -> Iterator[None]:
    """One torch thread while these modules run, restored afterwards.

    On the shared 2-core CI machine, two OpenMP threads competing with other processes spin
    at every barrier: these two modules took 257 s with torch's default of 2 threads and 53 s
    with 1 (same results; the differential tests compare runs made with the same setting).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", autouse=True)
def _release_cached_models() -> Iterator[None]:
    """VGG-11 alone holds 0.5 GB; later test modules need none of these."""
    yield
    model.cache_clear()
    small_cnn_model.cache_clear()


def target_logits(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's top class and its logit."""
    with torch.no_grad():
        logits = net(x)
    target = logits.argmax(dim=1)
    return target, logits.gather(1, target[:, None])[:, 0]


def conservation_error(relevance: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    """|sum_d R_d - f(x)| / |f(x)| per image (Bach et al. 2015, conservation)."""
    return (relevance.sum(dim=(1, 2, 3)) - logit).abs() / logit.abs()


def reference_composite(name: str, canonizers: list[Canonizer]) -> Composite:
    """The composites spelled out from Zennit's classes, independently of the engine."""
    if name == "epsilon_plus_flat":
        return EpsilonPlusFlat(zero_params=["bias"], canonizers=canonizers)
    if name == "epsilon_alpha2_beta1":
        return EpsilonAlpha2Beta1(zero_params=["bias"], canonizers=canonizers)
    assert name == "z_plus"
    z_plus = ZPlus(zero_params=["bias"])
    return LayerMapComposite(
        layer_map=[
            (Activation, Pass()),
            (Sum, Norm()),
            (AvgPool, Norm()),
            (BatchNorm, Pass()),
            (Convolution, z_plus),
            (nn.Linear, z_plus),
        ],
        canonizers=canonizers,
    )


def assert_model_unchanged(
    net: nn.Module, before: dict[str, torch.Tensor], modules_before: list[tuple[str, type]]
) -> None:
    after = net.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"parameters or buffers changed: {changed[:5]}"
    assert [(name, type(m)) for name, m in net.named_modules()] == modules_before
    for m in net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not m._backward_hooks and not m._backward_pre_hooks
        assert "forward" not in m.__dict__
    assert all(p.grad is None for p in net.parameters())


def snapshot(net: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, type]]]:
    return (
        {k: v.clone() for k, v in net.state_dict().items()},
        [(name, type(m)) for name, m in net.named_modules()],
    )


def test_unknown_composite_is_a_spec_error_that_lists_the_known_names() -> None:
    with pytest.raises(SpecError) as info:
        lrp.lrp_composite("epsilon_gamma_flat")
    for name in COMPOSITES:
        assert name in info.value.message
    # the spec refuses it already (the contract's enum), with the same list of known names
    with pytest.raises(SpecError, match="z_plus"):
        ctx = MethodContext(params=MethodParams(lrp_composite="nope"))  # type: ignore[arg-type]
        compute_methods(small_cnn(), images(1, size=8), torch.tensor([0]), ["lrp"], ctx)


def test_the_contract_names_every_composite() -> None:
    assert set(LRP_COMPOSITES) == set(lrp.LRP_COMPOSITES)


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("arch", ["resnet18", "vgg11", "densenet121"])
def test_lrp_input_relevance_sums_to_the_target_logit(arch: str, composite: str) -> None:
    net = model(arch)
    x = images(3, size=64, seed=11)
    target, logit = target_logits(net, x)

    relevance = lrp.lrp_relevance(net, x, target, composite)

    assert relevance.shape == x.shape and relevance.dtype == torch.float32
    error = conservation_error(relevance, logit)
    assert bool((error < CONSERVATION_RTOL).all()), f"relative conservation error {error.tolist()}"


def test_alpha2_beta1_conserves_only_where_both_signs_contribute() -> None:
    """Without negative contributions the beta term has nothing to subtract: 2x the relevance."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, 3, bias=False)
    head = nn.Linear(1, 2)
    net = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 6, 6, generator=g) + 0.1  # positive inputs
    target = torch.tensor([0, 0])
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        conv.weight.copy_(torch.rand(1, 1, 3, 3, generator=g) + 0.1)  # all contributions > 0
        logit = net(x)[:, 0]
    one_sided = lrp.lrp_relevance(net, x, target, "epsilon_alpha2_beta1").sum(dim=(1, 2, 3))
    torch.testing.assert_close(one_sided, 2 * logit, rtol=1e-4, atol=0)

    with torch.no_grad():
        weights = torch.randn(3, 3, generator=g)
        weights[0, 0], weights[1, 1] = -weights[0, 0].abs(), weights[1, 1].abs()
        conv.weight.copy_(weights[None, None])  # contributions of both signs everywhere
        logit = net(x)[:, 0]
    both_signs = lrp.lrp_relevance(net, x, target, "epsilon_alpha2_beta1").sum(dim=(1, 2, 3))
    torch.testing.assert_close(both_signs, logit, rtol=1e-4, atol=0)


def test_densenet_loses_relevance_without_its_head_canonizer() -> None:
    """Why canonize.py rewrites DenseNet's head: F.relu + F.adaptive_avg_pool2d leak relevance."""
    net = model("densenet121")
    x = images(2, size=64, seed=11)
    target, logit = target_logits(net, x)
    merges_only = NamedMergeBatchNorm([((a,), b) for a, b in batchnorm_merge_pairs(net)])
    with Gradient(net, EpsilonPlusFlat(zero_params=["bias"], canonizers=[merges_only])) as attr:
        seed = F.one_hot(target, 1000) * logit[:, None]
        _, relevance = attr(x.clone().requires_grad_(True), seed)
    assert bool((conservation_error(relevance, logit) > 0.02).all())
    with_head = lrp.lrp_relevance(net, x, target, "epsilon_plus_flat")
    assert bool((conservation_error(with_head, logit) < 1e-3).all())


def test_densenet_merges_only_the_batchnorms_that_follow_a_conv() -> None:
    pairs = dict(batchnorm_merge_pairs(model("densenet121")))
    assert pairs["features.conv0"] == "features.norm0"
    assert (
        pairs["features.denseblock1.denselayer1.conv1"] == "features.denseblock1.denselayer1.norm2"
    )
    merged = set(pairs.values())
    # Pre-activation BatchNorms (after a concatenation) stay and get the Pass rule.
    assert "features.denseblock1.denselayer2.norm1" not in merged
    assert "features.transition1.norm" not in merged
    assert "features.norm5" not in merged
    assert len(pairs) == 1 + 58  # conv0 + one per dense layer (6 + 12 + 24 + 16)


REFERENCE_CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], list[Canonizer]], int]] = {
    # model factory, Zennit's own canonizers for it, input size
    "resnet18": (lambda: model("resnet18"), lambda: [ResNetCanonizer()], 64),
    "small_cnn": (small_cnn_model, lambda: [SequentialMergeBatchNorm()], 16),
}


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_lrp_matches_a_direct_zennit_gradient_call(case: str, composite: str) -> None:
    make_model, make_canonizers, size = REFERENCE_CASES[case]
    net = make_model()
    x = images(4, size=size, seed=12)
    with torch.no_grad():
        num_classes = net(x).shape[1]
    target = torch.tensor([0, 3, 1, num_classes - 1])

    ours = lrp.lrp_relevance(net, x, target, composite)

    attributor = Gradient(net, reference_composite(composite, make_canonizers()))
    seed_fn = functools.partial(_one_hot_times_output, target=target)
    _, theirs = attributor(x.clone().requires_grad_(True), seed_fn)
    error = (ours - theirs).abs().max() / theirs.abs().max()
    assert float(error) <= 1e-5, f"max relative difference {float(error):.2e}"


def _one_hot_times_output(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.one_hot(target, output.shape[1]).to(output.dtype) * output


def test_lrp_through_the_registry_returns_input_shaped_float32_maps() -> None:
    net = small_cnn_model()
    x = images(2, size=16, seed=13)
    target = torch.tensor([2, 4])
    ctx = MethodContext(params=MethodParams(lrp_composite="z_plus"))
    result = compute_methods(net, x, target, ["lrp"], ctx)["lrp"]
    assert isinstance(result, torch.Tensor)
    assert result.shape == x.shape and result.dtype == torch.float32 and not result.requires_grad
    assert torch.equal(result, lrp.lrp_relevance(net, x, target, "z_plus"))


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "mobilenet_v3_small"])
def test_lrp_leaves_the_model_unchanged(arch: str) -> None:
    net = model(arch) if arch != "mobilenet_v3_small" else torchvision_model(arch)
    before, modules_before = snapshot(net)
    x = images(2, size=64, seed=14)

    for composite in COMPOSITES:
        relevance = lrp.lrp_relevance(net, x, torch.tensor([5, 9]), composite)
        # MobileNetV3 (hard-swish, squeeze-excitation) must run; it need not conserve.
        assert relevance.shape == x.shape and bool(torch.isfinite(relevance).all())

    assert_model_unchanged(net, before, modules_before)


def test_lrp_restores_training_mode_and_runs_in_eval_mode() -> None:
    net = small_cnn(seed=2).train()
    net.features[1].eval()  # a per-module flag that must survive as well
    x = images(2, size=16, seed=15)
    expected = lrp.lrp_relevance(small_cnn(seed=2).eval(), x, torch.tensor([0, 1]), "z_plus")

    relevance = lrp.lrp_relevance(net, x, torch.tensor([0, 1]), "z_plus")

    assert torch.equal(relevance, expected)
    assert net.training and net.features[0].training and not net.features[1].training


class _ReusesItsConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(self.relu(self.conv(x)))))


def test_lrp_refuses_a_layer_that_runs_twice_per_forward() -> None:
    """Rule hooks keep one input per module: a reused conv would be explained wrongly."""
    net = _ReusesItsConv().eval()
    with pytest.raises(NotApplicableError, match="conv"):
        lrp.lrp_relevance(net, images(1, size=8), torch.tensor([0]), "z_plus")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


class _FailsHalfWay(Canonizer):
    """Merges like a real canonizer, then fails before it can hand back a way to undo it."""

    def apply(self, root_module: nn.Module) -> list[Canonizer]:
        merge = NamedMergeBatchNorm([(("features.3",), "features.4")])
        merge.apply(root_module)
        conv = root_module.get_submodule("features.0")
        assert isinstance(conv, nn.Conv2d)
        conv.weight.data = torch.zeros_like(conv.weight)
        conv.bias = None
        root_module.extra = nn.ReLU()
        raise RuntimeError("canonizer failed")

    def register(self) -> None: ...

    def remove(self) -> None: ...


def test_canonized_restores_the_model_even_when_a_canonizer_fails() -> None:
    net = small_cnn(seed=3)
    before, modules_before = snapshot(net)
    first_bias = net.get_submodule("features.0").bias
    with pytest.raises(RuntimeError, match="canonizer failed"), canonized(net, [_FailsHalfWay()]):
        pass
    assert_model_unchanged(net, before, modules_before)
    assert net.get_submodule("features.0").bias is first_bias


def test_canonizers_merge_and_restore_exactly() -> None:
    net = model("resnet18")
    before, modules_before = snapshot(net)
    x = images(1, size=32, seed=16)
    with torch.no_grad():
        expected = net(x)
    bn1 = net.get_submodule("bn1")
    assert isinstance(bn1, nn.BatchNorm2d)
    with canonized(net, lrp_canonizers(net)):
        assert torch.equal(bn1.weight, torch.ones_like(bn1.weight))  # merged away
        assert "forward" in net.get_submodule("layer1.0").__dict__  # residual as a Sum
        with torch.no_grad():
            torch.testing.assert_close(net(x), expected, rtol=1e-4, atol=1e-4)
    assert_model_unchanged(net, before, modules_before)


# --- ONNX-converted graphs --------------------------------------------------------------------


# Exported as the brief of the ONNX adapter has it: batch 1, opset 17 (the dynamo exporter
# raises it to 18 where it cannot convert down). The legacy exporter cannot export VGG's
# AdaptiveAvgPool2d((7, 7)) unless the feature map is a multiple of 7 (224 px); the other
# architectures run at 64 px to keep the suite fast.
ONNX_INPUT_SIZE = {"resnet18": 64, "densenet121": 64, "vgg11": 224}


def onnx_export(arch: str, dynamo: bool, cache_dir: Path) -> bytes:
    """``torch.onnx.export`` of ``torchvision_model(arch)`` (= ``model(arch)``), cached."""
    return export_torchvision(
        arch,
        cache_dir=cache_dir,
        exporter="dynamo" if dynamo else "legacy",
        opset=17,
        size=ONNX_INPUT_SIZE[arch],
        dynamic_batch=False,
    )


@pytest.fixture(scope="module")
def onnx_models(artifact_cache: Path) -> Iterator[Callable[[str, bool], nn.Module]]:
    cache: dict[tuple[str, bool], nn.Module] = {}

    def get(arch: str, dynamo: bool) -> nn.Module:
        if (arch, dynamo) not in cache:
            cache[(arch, dynamo)] = load_onnx(onnx_export(arch, dynamo, artifact_cache)).module
        return cache[(arch, dynamo)]

    yield get
    cache.clear()


# Relevance of a converted graph against the torch model it was exported from (max-normalized
# difference). The exporters fold BatchNorm into the convs as the canonizer does, so the rules see
# the same weights; the float32 fold differs in the last bits. DenseNet's transition convs feed
# an average pool without a ReLU in between, so the Norm rule divides by averages of mixed-sign
# values near zero and amplifies those bits (measured 1-2%); the other two agree to ~4e-5.
SAME_AS_TORCH_RTOL = {"resnet18": 1e-3, "vgg11": 1e-3, "densenet121": 0.05}


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("arch", ["resnet18", "vgg11", "densenet121"])
def test_lrp_on_onnx_converted_graphs_conserves_and_matches_the_torch_model(
    arch: str, dynamo: bool, onnx_models: Callable[[str, bool], nn.Module]
) -> None:
    net = onnx_models(arch, dynamo)
    before, modules_before = snapshot(net)
    # Several images: dynamo exports bake in batch 1, so the graph runs them one at a time.
    x = images(1 if arch == "vgg11" else 3, size=ONNX_INPUT_SIZE[arch], seed=11)
    target, logit = target_logits(net, x)

    errors, relevances = {}, {}
    for composite in COMPOSITES:
        relevances[composite] = lrp.lrp_relevance(net, x, target, composite)
        assert relevances[composite].shape == x.shape
        errors[composite] = conservation_error(relevances[composite], logit)
    # One composite suffices here: what could differ is the graph, not the rules.
    reference = lrp.lrp_relevance(model(arch), x, target, "epsilon_plus_flat")
    difference = (relevances["epsilon_plus_flat"] - reference).abs().max() / reference.abs().max()

    bad = {k: v.tolist() for k, v in errors.items() if not bool((v < CONSERVATION_RTOL).all())}
    assert not bad, f"relative conservation errors {bad}"
    assert float(difference) <= SAME_AS_TORCH_RTOL[arch]
    assert_model_unchanged(net, before, modules_before)


def small_cnn_onnx_with_batchnorm(cache_dir: Path) -> nn.Module:
    """``small_cnn_model()`` exported without constant folding: the file keeps its BatchNorm."""
    return load_onnx(export_small_cnn(cache_dir=cache_dir, seed=1, fold_batchnorm=False)).module


def test_lrp_merges_the_batchnorm_pairs_an_onnx_graph_names(artifact_cache: Path) -> None:
    converted = small_cnn_onnx_with_batchnorm(artifact_cache)
    assert batchnorm_merge_pairs(converted) == [("features.3", "features.4")]
    before, modules_before = snapshot(converted)
    x = images(3, size=16, seed=17)
    target = torch.tensor([0, 2, 4])

    for composite in COMPOSITES:
        ours = lrp.lrp_relevance(converted, x, target, composite)
        reference = lrp.lrp_relevance(small_cnn_model(), x, target, composite)
        torch.testing.assert_close(
            ours, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max())
        )
    assert_model_unchanged(converted, before, modules_before)
