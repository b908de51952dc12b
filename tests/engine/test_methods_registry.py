"""The method registry: names, references, "not applicable", shared passes, seeds, hygiene."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

from saliency_audit.workers.engine.errors import NotApplicableError, SpecError
from saliency_audit.workers.engine.methods import FAMILIES, METHODS, MethodContext, compute_methods
from saliency_audit.workers.engine.methods.base import resolve_layer
from saliency_audit.workers.engine.spec import MethodParams
from tests.engine.nets import images, small_cnn, tiny_mlp, torchvision_model

# The families this suite owns and the methods each provides (lrp/relevance_cam live elsewhere).
FAMILY_METHODS = {
    "gradient": {"gradient", "gradient_x_input", "gradcam", "gradcam_pp"},
    "noise": {"smoothgrad", "smoothgrad_sq", "vargrad"},
    "integrated_gradients": {"integrated_gradients"},
    "guided": {"guided_backprop", "guided_gradcam"},
    "scorecam": {"scorecam"},
    "controls": {"control_sobel", "control_random"},
}
CAM_METHODS = {"gradcam", "gradcam_pp", "guided_gradcam", "scorecam"}
CONTROLS = {"control_sobel", "control_random"}
ALL = sorted(set().union(*FAMILY_METHODS.values()))
PIXEL_METHODS = {
    "gradient",
    "gradient_x_input",
    "smoothgrad",
    "smoothgrad_sq",
    "vargrad",
    "integrated_gradients",
    "guided_backprop",
    "guided_gradcam",
}
SEEDED = ["smoothgrad", "smoothgrad_sq", "vargrad", "control_random"]
FAST = MethodParams(noise_samples=3, ig_steps=4, scorecam_batch=16)


def small_batch(n: int = 3) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return small_cnn(), images(n, 16, seed=1), torch.arange(n) % 5


def run(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    names: list[str],
    seed: int = 0,
    layer: str | None = None,
) -> dict[str, torch.Tensor | NotApplicableError]:
    ctx = MethodContext(
        params=FAST,
        layer=layer if layer is not None else resolve_layer(model, None),
        generator=torch.Generator().manual_seed(seed),
    )
    return compute_methods(model, x, t, names, ctx)


def tensors(out: dict[str, torch.Tensor | NotApplicableError]) -> dict[str, torch.Tensor]:
    bad = {k: v for k, v in out.items() if not isinstance(v, torch.Tensor)}
    assert not bad, bad
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


@contextmanager
def counting_forwards(model: nn.Module) -> Iterator[list[int]]:
    calls = [0]

    def hook(_m: nn.Module, _i: Any, _o: Any) -> None:
        calls[0] += 1

    handle = model.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


@contextmanager
def counting_autograd_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    calls = [0]
    original: Callable[..., Any] = torch.autograd.grad

    def grad(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.autograd, "grad", grad)
        yield calls


def hooks_of(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


# --- registry -----------------------------------------------------------------------------------


def test_every_method_is_registered_once_in_its_family_with_a_reference() -> None:
    provided = [info.name for family in FAMILIES.values() for info in family.provides]
    assert len(provided) == len(set(provided)), "a method is provided by two families"
    assert set(provided) == set(METHODS)
    for family, names in FAMILY_METHODS.items():
        assert {info.name for info in FAMILIES[family].provides} == names
        for name in names:
            assert METHODS[name].family == family
    for info in METHODS.values():
        assert info.reference.strip() and info.description.strip(), info.name


def test_cam_methods_need_a_conv_layer_and_controls_are_flagged() -> None:
    assert {n for n in ALL if METHODS[n].needs_conv_layer} == CAM_METHODS
    assert {n for n in ALL if METHODS[n].is_control} == CONTROLS


def test_layer_methods_on_an_mlp_are_not_applicable_and_the_rest_still_run() -> None:
    model, x, t = tiny_mlp(), images(2, 8, seed=2), torch.tensor([0, 3])
    out = run(model, x, t, ALL)
    assert list(out) == ALL
    for name in ALL:
        value = out[name]
        if name in CAM_METHODS:
            assert isinstance(value, NotApplicableError), name
            assert value.code == "not_applicable"
        else:
            assert isinstance(value, torch.Tensor), (name, value)


# --- call shape ---------------------------------------------------------------------------------


def test_maps_are_detached_float32_with_pixel_or_cam_shape() -> None:
    model, x, t = small_batch()
    for name, value in tensors(run(model, x, t, ALL)).items():
        channels = x.shape[1] if name in PIXEL_METHODS else 1
        assert value.shape == (3, channels, 16, 16), name
        assert value.dtype == torch.float32 and not value.requires_grad, name
        assert torch.isfinite(value).all(), name
        assert value.abs().sum() > 0, name


def test_each_image_is_explained_independently_of_the_rest_of_its_batch() -> None:
    model, x, t = small_batch(4)
    deterministic = sorted(set(ALL) - set(SEEDED))
    batched = tensors(run(model, x, t, deterministic))
    for i in (0, 3):
        alone = tensors(run(model, x[i : i + 1], t[i : i + 1], deterministic))
        for name in deterministic:
            torch.testing.assert_close(alone[name][0], batched[name][i], msg=name)


# --- shared passes ------------------------------------------------------------------------------


def test_gradient_family_runs_one_forward_and_one_backward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, x, t = small_batch()
    names = ["gradient", "gradient_x_input", "gradcam", "gradcam_pp"]
    with counting_forwards(model) as forwards, counting_autograd_calls(monkeypatch) as backs:
        run(model, x, t, names)
    assert (forwards[0], backs[0]) == (1, 1)


@pytest.mark.parametrize(
    ("layer", "backwards"),
    [("layer4", 1), ("layer4.1.conv2", 2)],  # a ReLU after the layer costs a partial backward
)
def test_guided_family_runs_one_forward(
    monkeypatch: pytest.MonkeyPatch, layer: str, backwards: int
) -> None:
    model, x, t = torchvision_model("resnet18"), images(2, 32, seed=1), torch.tensor([1, 2])
    with counting_forwards(model) as forwards, counting_autograd_calls(monkeypatch) as backs:
        run(model, x, t, ["guided_backprop", "guided_gradcam"], layer=layer)
    assert (forwards[0], backs[0]) == (1, backwards)


def test_noise_family_shares_one_sample_set_folded_into_the_batch() -> None:
    model, x, t = small_batch()
    with counting_forwards(model) as forwards:
        run(model, x, t, ["smoothgrad", "smoothgrad_sq", "vargrad"])
    # 3 images x 3 samples = 9 rows, one chunk
    assert forwards[0] == 1


def test_scorecam_runs_one_forward_then_one_per_chunk_of_live_channels() -> None:
    model, x, t = small_batch(2)
    with counting_forwards(model) as forwards:
        run(model, x, t, ["scorecam"])
    live_pairs = 2 * 16  # features.3 is a conv: no channel is all zero
    assert forwards[0] == 1 + math.ceil(live_pairs / FAST.scorecam_batch)


def test_controls_never_run_the_model() -> None:
    model, x, t = small_batch()
    with counting_forwards(model) as forwards:
        run(model, x, t, sorted(CONTROLS))
    assert forwards[0] == 0


# --- seeds --------------------------------------------------------------------------------------


def test_same_seed_gives_identical_noise_and_random_maps() -> None:
    model, x, t = small_batch()
    first, second = tensors(run(model, x, t, SEEDED, seed=7)), tensors(run(model, x, t, SEEDED, 7))
    for name in SEEDED:
        assert torch.equal(first[name], second[name]), name


def test_different_seeds_give_different_noise_and_random_maps() -> None:
    model, x, t = small_batch()
    first, second = tensors(run(model, x, t, SEEDED, seed=7)), tensors(run(model, x, t, SEEDED, 8))
    for name in SEEDED:
        assert not torch.allclose(first[name], second[name]), name


def test_control_random_is_uniform_in_the_unit_interval() -> None:
    x = images(8, 32)
    value = run(small_cnn(), x, torch.zeros(8, dtype=torch.long), ["control_random"])
    random_map = tensors(value)["control_random"]
    assert float(random_map.min()) >= 0 and float(random_map.max()) < 1
    assert abs(float(random_map.mean()) - 0.5) < 0.02  # 8192 draws: sd of the mean ~0.003
    assert abs(float(random_map.std()) - (1 / 12) ** 0.5) < 0.02


# --- hygiene ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "names"),
    [
        # Score-CAM's 512 masked forwards per resnet18 image would add only time here.
        ("resnet18", [n for n in ALL if n != "scorecam"]),
        ("small_cnn", ALL),
    ],
)
def test_methods_leave_no_hooks_training_flags_or_requires_grad_changes_behind(
    arch: str, names: list[str]
) -> None:
    model = (torchvision_model("resnet18") if arch == "resnet18" else small_cnn()).train()
    last = list(model.parameters())[-1]
    last.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    x, t = images(2, 32, seed=1), torch.tensor([1, 2])
    layer = "layer4" if arch == "resnet18" else None
    out = run(model, x, t, names, layer=layer)
    assert set(tensors(out)) == set(names)
    assert hooks_of(model) == 0
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())


def test_maps_are_computed_in_eval_mode_whatever_mode_the_model_is_in() -> None:
    model, x, t = small_batch()
    deterministic = sorted(set(ALL) - set(SEEDED))
    in_eval = tensors(run(model, x, t, deterministic))
    in_train = tensors(run(model.train(), x, t, deterministic))
    for name in deterministic:
        torch.testing.assert_close(in_train[name], in_eval[name], msg=name)


def test_frozen_parameters_still_give_gradient_maps() -> None:
    model, x, t = small_batch()
    model.requires_grad_(False)
    out = tensors(run(model, x, t, ["gradient", "gradcam", "guided_gradcam"]))
    assert all(v.abs().sum() > 0 for v in out.values())


def test_inplace_relu_after_the_cam_layer_does_not_change_its_activation() -> None:
    # In a BasicBlock, bn1's output goes through ReLU(inplace=True): Grad-CAM must still see the
    # BatchNorm output. Reference: the same weights with every ReLU out of place.
    model, x, t = torchvision_model("resnet18"), images(2, 64, seed=2), torch.tensor([1, 4])
    out = tensors(run(model, x, t, ["gradcam", "gradcam_pp"], layer="layer4.1.bn1"))
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and all(m.inplace for m in relus)
    try:
        for m in relus:
            m.inplace = False
        expected = tensors(run(model, x, t, ["gradcam", "gradcam_pp"], layer="layer4.1.bn1"))
    finally:
        for m in relus:
            m.inplace = True
    for name in ("gradcam", "gradcam_pp"):
        torch.testing.assert_close(out[name], expected[name], msg=name)


def test_cam_on_a_layer_without_spatial_output_is_a_spec_error() -> None:
    model, x, t = small_batch()
    with pytest.raises(SpecError, match="spatial"):
        run(model, x, t, ["gradcam"], layer="classifier")


def test_cam_on_a_module_called_twice_per_forward_is_not_applicable() -> None:
    # torchvision's BasicBlock applies its one ``relu`` module twice.
    model, x, t = torchvision_model("resnet18"), images(1, 32, seed=1), torch.tensor([3])
    names = ["gradcam", "guided_gradcam", "scorecam"]
    out = run(model, x, t, names, layer="layer4.1.relu")
    for name in ("gradcam", "guided_gradcam", "scorecam"):
        value = out[name]
        assert isinstance(value, NotApplicableError), (name, value)
        assert "more than once" in value.message
    assert hooks_of(model) == 0


def test_onnx_runtime_forward_reproduces_the_module_and_refuses_what_it_cannot_check() -> None:
    """Score-CAM's masked passes may run in ONNX Runtime: only on an export of the module as it
    is now, checked against PyTorch's logits; a stale or wrong graph is never used."""
    from saliency_audit.workers.engine.methods._ort import ort_forward

    model = small_cnn(seed=4)
    x = images(3, 16, seed=9)
    with torch.no_grad():
        logits = model(x)
    forward = ort_forward(model, x, logits)
    assert forward is not None
    other = images(5, 16, seed=10)  # another batch size: the batch axis is dynamic
    with torch.no_grad():
        torch.testing.assert_close(forward(other), model(other), rtol=1e-4, atol=1e-5)
    fresh = small_cnn(seed=5)  # no checked session yet
    with torch.no_grad():
        fresh_logits = fresh(x)
    assert ort_forward(fresh, x, fresh_logits + 1.0) is None  # does not reproduce -> refused
    assert ort_forward(fresh, x[:1], fresh_logits[:1]) is not None  # one image: checked on two


def test_onnx_runtime_session_is_reused_only_while_the_weights_are_unchanged() -> None:
    from saliency_audit.workers.engine.methods._ort import ort_forward
    from saliency_audit.workers.engine.randomization import randomized

    model = small_cnn(seed=4)
    x = images(2, 16, seed=9)
    with torch.no_grad():
        logits = model(x)
    first = ort_forward(model, x, logits)
    assert first is not None and ort_forward(model, x, logits) is first
    with randomized(model, ["classifier"], seed=0):
        with torch.no_grad():
            random_logits = model(x)
        inside = ort_forward(model, x, random_logits)
        assert inside is not None and inside is not first  # in-place writes invalidate
        torch.testing.assert_close(inside(x), random_logits, rtol=1e-4, atol=1e-5)
    assert ort_forward(model, x, logits) is not first  # restored weights: re-exported, checked
