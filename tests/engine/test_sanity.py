"""The sanity checks' scoring: controls behave as defined, scores are per image and seeded, shared
model states are computed once, and eMPRT / sMPRT / Random Logit follow their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from saliency_audit.workers.engine import maps, sanity
from saliency_audit.workers.engine.maps import MapInputs, compute_maps, methods_to_run
from saliency_audit.workers.engine.methods import resolve_layer
from saliency_audit.workers.engine.spec import AuditSpec, MethodParams
from tests.engine.nets import images, small_cnn

STAGES = ["classifier", "features.4", "features.3", "features.0"]


def _states(
    seed: int = 0,
    methods: tuple[str, ...] = ("gradient", "guided_backprop"),
    measures: tuple[str, ...] = ("spearman_abs", "ssim"),
    n: int = 6,
    **params: float,
) -> sanity.RandomizedStates:
    model = small_cnn()
    x = images(n, 16, seed=2)
    with torch.no_grad():
        targets = model(x).argmax(1)
    names = methods_to_run(methods)
    spec = AuditSpec(
        methods=tuple(names),
        seed=seed,
        batch_size=4,
        measures=measures,
        params=MethodParams(**params),
    )  # type: ignore[arg-type]
    layer = resolve_layer(model, None)
    cpu = torch.device("cpu")
    reference = compute_maps(model, x, targets, names, spec, layer, device=cpu)
    inputs = MapInputs(model, x, targets, names, spec, layer, cpu)
    return sanity.RandomizedStates(inputs, reference)


def _cascade(seed: int) -> list:  # type: ignore[type-arg]
    result = sanity.model_randomization(_states(seed), test="cascading", granularity="module")
    assert [s.name for s in result.stages] == STAGES
    assert "BatchNorm" in result.details["normalization_handling"]
    return result.scores


def test_controls_and_scores_per_stage() -> None:
    scores = _cascade(seed=0)
    assert len(scores) == 4 * 4 * 2  # stages x methods x measures
    by_key = {(s.method, s.stage, s.measure): s for s in scores}
    for stage in STAGES:
        sobel = by_key[("control_sobel", stage, "spearman_abs")]
        assert sobel.mean == pytest.approx(1.0) and sobel.ci_low == pytest.approx(1.0)
        random = by_key[("control_random", stage, "spearman_abs")]
        assert random.mean is not None and abs(random.mean) < 0.1  # a fresh map every stage
        assert random.n == 6 and len(random.values) == 6
    gradient = by_key[("gradient", "classifier", "spearman_abs")]
    assert gradient.ci_low is not None and gradient.ci_high is not None
    assert gradient.ci_low <= gradient.mean <= gradient.ci_high  # type: ignore[operator]
    assert np.mean([v for v in gradient.values if v is not None]) == pytest.approx(gradient.mean)


def test_same_seed_same_scores() -> None:
    assert _cascade(seed=0) == _cascade(seed=0)
    assert _cascade(seed=0) != _cascade(seed=1)


def test_a_model_state_shared_by_two_tests_is_computed_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    states = _states()
    calls = []
    real = maps.compute_maps

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs.get("random_control_key"))
        return real(*args, **kwargs)

    monkeypatch.setattr(maps, "compute_maps", counting)
    top_down = sanity.model_randomization(states, test="cascading", granularity="module")
    bottom_up = sanity.model_randomization(states, test="cascading_bottom_up", granularity="module")
    independent = sanity.model_randomization(states, test="independent", granularity="module")
    # 4 cascading + 3 new bottom-up (the last is the full randomization) + 2 new independent
    # (features.0 alone is bottom-up's first stage; classifier alone is cascading's first).
    assert len(calls) == 4 + 3 + 2
    last = {(s.method, s.measure): s.values for s in top_down.scores if s.stage_index == 4}
    for s in bottom_up.scores:
        if s.stage_index == 4:
            assert s.values == last[(s.method, s.measure)]
    first = {(s.method, s.measure): s.values for s in top_down.scores if s.stage_index == 1}
    for s in independent.scores:
        if s.stage == "classifier":
            assert s.values == first[(s.method, s.measure)]


def test_discrete_entropy_matches_numpy_histogram_and_scipy() -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(5, 12, 12, generator=g)
    maps[1] = maps[1].abs() ** 3  # skewed
    maps[2] = 0.25  # constant: entropy 0
    ours = sanity.discrete_entropy(maps, 100).numpy()
    for i in range(5):
        hist, _ = np.histogram(maps[i].numpy().ravel(), bins=100)
        expected = scipy.stats.entropy(hist) if i != 2 else 0.0
        assert ours[i] == pytest.approx(expected, abs=1e-12)


def test_emprt_is_the_relative_entropy_rise_and_sobel_does_not_rise() -> None:
    states = _states()
    result = sanity.emprt(states)
    by_method = {s.method: s for s in result.scores}
    assert all(s.measure == "entropy_rise" for s in result.scores)
    assert by_method["control_sobel"].mean == 0.0 and by_method["control_sobel"].ci_high == 0.0
    full = states.evaluate(result.stages[0].randomized, lambda f, s: None)
    trained = sanity.map_entropy(states.reference, 100)["gradient"]
    expected = (full.entropy["gradient"] - trained) / trained
    assert np.allclose(by_method["gradient"].values, expected)
    assert set(result.stages[0].randomized) == {
        "features.0",
        "features.3",
        "features.4",
        "classifier",
    }


def test_smprt_noise_is_relative_to_each_image_and_the_last_copy_is_clean() -> None:
    x = images(3, 16, seed=1)
    x[1] *= 10.0
    copies = sanity.noisy_copies(x, 0.1, 5, seed=0)
    assert len(copies) == 5 and torch.equal(copies[-1], x)
    span = x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))
    noise = torch.stack([c - x for c in copies[:-1]])  # (4, N, C, H, W)
    sigma = noise.transpose(0, 1).reshape(3, -1).std(dim=1)
    assert torch.allclose(sigma / span, torch.full((3,), 0.1), rtol=0.1)
    assert torch.equal(sanity.noisy_copies(x, 0.1, 5, seed=0)[0], copies[0])


def test_smprt_with_one_sample_is_mprt_at_full_randomization() -> None:
    states = _states(smprt_samples=1)
    smooth = sanity.smprt(states)
    everything = smooth.stages[0].randomized
    plain = states.evaluate(everything, lambda f, s: None)
    for s in smooth.scores:
        if s.method != "control_random":  # its maps are keyed differently, by design
            assert np.allclose(s.values, plain.similarity[s.method][s.measure], equal_nan=True)


def test_smprt_averages_maps_over_noisy_copies() -> None:
    states = _states(smprt_samples=4)
    result = sanity.smprt(states)
    sobel = {s.measure: s for s in result.scores if s.method == "control_sobel"}
    assert sobel["spearman_abs"].mean == pytest.approx(1.0)  # the input, not the model
    copies = sanity.noisy_copies(states.images, 0.1, 4, states.spec.seed)
    maps = [
        compute_maps(
            states.module,
            c,
            states.targets,
            ["gradient"],
            states.spec,
            states.layer,
            device=torch.device("cpu"),
        ).maps["gradient"]
        for c in copies
    ]
    assert np.allclose(
        result.example_maps["trained"]["gradient"], np.mean(maps, axis=0)[:4], atol=1e-6
    )


def test_random_logit_explains_another_class_for_every_image() -> None:
    targets = torch.tensor([0, 1, 2, 3, 4] * 200)
    others = sanity.other_classes(targets, 5, seed=0)
    assert not torch.any(others == targets)
    counts = torch.bincount(others[targets == 0], minlength=5)
    assert counts[0] == 0 and counts[1:].min() > 30  # uniform over the 4 others
    states = _states()
    result = sanity.random_logit(states, num_classes=5)
    assert len(result.details["other_classes"]) == 6
    sobel = [s for s in result.scores if s.method == "control_sobel"]
    assert all(s.mean == pytest.approx(1.0) for s in sobel)
    single = sanity.random_logit(states, num_classes=1)
    assert single.status == "not_run" and "single output class" in (single.reason or "")
