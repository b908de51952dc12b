"""The speed-ups of issue 8 change no number: prepared similarity, cached self-similarity, and
channels-last convolutions.

* A measure split into ``prepare`` (the part that depends on one map batch) and ``compare``
  gives bit-identical scores to the direct call, NaN and constant maps included; the direct
  calls are the ones checked against SciPy and scikit-image in test_similarity.py.
* ``similarity_values`` with a :class:`PreparedReference` (one reference, many map sets: a
  cascade) gives the same scores as a fresh comparison, and a map set equal to the reference
  (``control_sobel``, whatever the weights) gets exactly the scores a fresh comparison gives.
* The audit runs the model channels-last for inputs of 128 x 128 px or more: every method's
  maps agree with the contiguous model's to float32 rounding, and the audit's scores do too.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from saliency_audit.workers.engine import similarity
from saliency_audit.workers.engine.maps import MapSet
from saliency_audit.workers.engine.methods import METHODS, MethodContext, compute_methods
from saliency_audit.workers.engine.models.base import LoadedModel
from saliency_audit.workers.engine.runner import (
    CHANNELS_LAST_MIN_PIXELS,
    memory_format_for,
    run_audit,
)
from saliency_audit.workers.engine.sanity import PreparedReference, similarity_values
from saliency_audit.workers.engine.spec import AuditSpec, InputSpec, MethodParams
from tests.engine.nets import images, small_cnn, torchvision_model


def _maps(n: int = 5, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(n, size, size, generator=g)
    maps[1] = 0.0  # a constant map: undefined correlations (NaN), SSIM defined
    maps[2, :8, :8] = float("nan")  # NaN propagates
    maps[3] = torch.relu(maps[3])  # ties: a ReLU'd CAM
    return maps


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    return bool(torch.equal(torch.isnan(x), torch.isnan(y))) and bool(
        torch.equal(torch.nan_to_num(x, nan=7.0), torch.nan_to_num(y, nan=7.0))
    )


@pytest.mark.parametrize("measure", list(similarity.MEASURES))
def test_prepared_comparison_is_the_direct_measure_bit_for_bit(measure: str) -> None:
    a, b = _maps(seed=1), _maps(seed=2)
    direct = similarity.MEASURES[measure](a, b)
    prepared = similarity.compare(similarity.prepare(measure, a), similarity.prepare(measure, b))
    assert prepared.dtype == torch.float64 and prepared.shape == (5,)
    assert _same(direct, prepared)
    assert torch.isnan(direct[2])  # the NaN map is really undefined, not silently scored
    if measure != "ssim":
        assert torch.isnan(direct[1])  # a constant map has no correlation


def test_compare_refuses_mismatched_preparations() -> None:
    a = _maps()
    with pytest.raises(ValueError, match="different measures"):
        similarity.compare(similarity.prepare("ssim", a), similarity.prepare("spearman", a))
    with pytest.raises(ValueError, match="differ in shape"):
        similarity.compare(similarity.prepare("spearman", a), similarity.prepare("spearman", a[:3]))
    with pytest.raises(similarity.MapTooSmallError):
        similarity.prepare("ssim", a[:, :5, :5])


def _mapset(maps: dict[str, torch.Tensor]) -> MapSet:
    return MapSet(
        maps={k: v.numpy().astype(np.float32) for k, v in maps.items()},
        native_channels={k: 1 for k in maps},
        not_applicable={},
        family_time={},
        by_family={},
    )


def test_a_prepared_reference_scores_every_map_set_as_a_fresh_comparison_would() -> None:
    measures = list(similarity.MEASURES)
    reference = _mapset({"m": _maps(seed=1), "fixed": _maps(seed=5)})
    prepared = PreparedReference(reference)
    for seed in (2, 3):  # two "stages" against one reference; "fixed" never changes
        other = _mapset({"m": _maps(seed=seed), "fixed": _maps(seed=5)})
        fresh = similarity_values(reference, other, ["m", "fixed"], measures)
        cached = similarity_values(prepared, other, ["m", "fixed"], measures)
        for method in ("m", "fixed"):
            for measure in measures:
                direct = similarity.MEASURES[measure](
                    torch.from_numpy(reference.maps[method]), torch.from_numpy(other.maps[method])
                ).numpy()
                np.testing.assert_array_equal(cached[method][measure], direct)
                np.testing.assert_array_equal(fresh[method][measure], direct)
    # the unchanged method was prepared once and scored once, not once per stage
    assert set(prepared._unchanged) == {("fixed", m) for m in measures}
    # an unchanged map scores 1 where defined: a map is identical to itself
    spearman = prepared.unchanged("fixed", "spearman")
    assert np.isnan(spearman[[1, 2]]).all() and np.allclose(spearman[[0, 3, 4]], 1.0)


def test_similarity_values_refuses_map_sets_of_different_shapes() -> None:
    reference = _mapset({"m": _maps(size=64)})
    other = _mapset({"m": _maps(size=48)})
    with pytest.raises(ValueError, match="differ in shape"):
        similarity_values(reference, other, ["m"], ["spearman"])


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_channels_last_changes_no_map_beyond_float_rounding(arch: str) -> None:
    model = small_cnn() if arch == "small_cnn" else torchvision_model("resnet18", num_classes=7)
    model = model.eval()
    x = images(3, 32)
    with torch.no_grad():
        target = model(x).argmax(1)
    layer = "features.3" if arch == "small_cnn" else "layer4.1.conv2"
    names = [n for n, i in METHODS.items() if n != "control_random"]
    params = MethodParams(ig_steps=4, noise_samples=3, scorecam_batch=16)

    def maps(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        ctx = MethodContext(params=params, layer=layer, generator=torch.Generator().manual_seed(0))
        out = compute_methods(module, x, target, names, ctx)
        assert not [n for n, v in out.items() if not isinstance(v, torch.Tensor)], out
        return out  # type: ignore[return-value]

    contiguous = maps(model)
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    convs = [p for p in nhwc.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)  # the layout really changed
    fast = maps(nhwc)
    for name in names:
        a, b = contiguous[name].double(), fast[name].double()
        scale = float(a.abs().max()) or 1.0
        assert float((a - b).abs().max()) <= 1e-4 * scale, name


def test_the_layout_is_decided_by_the_input_size_alone() -> None:
    assert CHANNELS_LAST_MIN_PIXELS == 128 * 128
    assert memory_format_for(torch.zeros(2, 3, 128, 128)) == torch.channels_last
    assert memory_format_for(torch.zeros(2, 3, 224, 224)) == torch.channels_last
    assert memory_format_for(torch.zeros(2, 3, 127, 128)) == torch.contiguous_format
    assert memory_format_for(torch.zeros(2, 1, 32, 32)) == torch.contiguous_format
    # a module left channels-last by an earlier audit runs contiguous for small inputs
    model = small_cnn().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    spec = AuditSpec(methods=("gradient",), tests=("cascading",), granularity="block")
    run_audit(
        LoadedModel(model, InputSpec(height=32, width=32), "torchvision", "t"), images(2), spec
    )
    assert all(p.is_contiguous() for p in model.parameters())


def test_the_audit_scores_equal_a_contiguous_run_to_float_rounding() -> None:
    torch.manual_seed(0)
    module = small_cnn().eval()
    model = LoadedModel(module, InputSpec(height=128, width=128), "torchvision", "t")
    x = images(4, 128)  # large enough to run channels-last
    spec = AuditSpec(
        methods=("gradient", "gradcam", "guided_backprop"),
        tests=("cascading",),
        granularity="block",
        params=MethodParams(),
    )
    fast = run_audit(model, x, spec)
    assert all(
        p.is_contiguous(memory_format=torch.channels_last)
        for p in module.parameters()
        if p.dim() == 4
    )
    # the same audit with the layout forced back to contiguous at every map computation
    from saliency_audit.workers.engine import maps as maps_module

    original = maps_module.compute_methods

    def contiguous_methods(m: torch.nn.Module, *args: object, **kwargs: object) -> object:
        m.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
        return original(m, *args, **kwargs)  # type: ignore[arg-type]

    maps_module.compute_methods = contiguous_methods  # type: ignore[assignment]
    try:
        plain = run_audit(model, x, spec)
    finally:
        maps_module.compute_methods = original
    assert all(p.is_contiguous() for p in module.parameters())
    pairs = {(s.method, s.stage, s.measure): s.mean for s in plain.tests["cascading"].scores}
    assert len(pairs) > 20
    for s in fast.tests["cascading"].scores:
        other = pairs[(s.method, s.stage, s.measure)]
        if s.mean is None or other is None:
            assert s.mean is None and other is None
        else:
            assert abs(s.mean - other) <= 1e-4, (s.method, s.stage, s.measure)

    def outcomes(result: object) -> list[tuple[str, str, str]]:
        return [(v.method, v.test, v.verdict) for v in result.verdicts]  # type: ignore[attr-defined]

    assert outcomes(fast) == outcomes(plain)


def test_the_randomizer_gives_the_weights_of_randomizing_from_scratch() -> None:
    from saliency_audit.workers.engine.randomization import Randomizer, randomized, stages, units

    model = small_cnn()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    twin = copy.deepcopy(model)
    unit_list = units(model, "module")
    sequence = [s.randomized for s in stages(unit_list, "cascading")]
    sequence += [s.randomized for s in stages(unit_list, "independent")]
    sequence += [s.randomized for s in stages(unit_list, "cascading_bottom_up")[::-1]]
    assert len(sequence) > 6
    randomizer = Randomizer(model, seed=11)
    for names in sequence:
        randomizer.set(names)
        assert randomizer.randomized == frozenset(names)
        with randomized(twin, names, seed=11):
            expected = twin.state_dict()
            for key, value in model.state_dict().items():
                assert torch.equal(value, expected[key]), (names, key)
    randomizer.restore()
    assert randomizer.randomized == frozenset()
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    with pytest.raises(KeyError, match="no module named 'nope'"):
        randomizer.set(["nope"])
