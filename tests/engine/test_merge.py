"""A split audit merged from its parts is the audit run in one piece: same maps, scores,
intervals and verdicts."""

from __future__ import annotations

import dataclasses

import numpy as np

from saliency_audit.workers.engine.merge import merge_results, split_methods, splittable
from saliency_audit.workers.engine.runner import run_audit
from saliency_audit.workers.engine.spec import AuditSpec
from tests.engine.test_layers import shapes_inputs, shapes_resnet

METHODS = ("gradient", "gradcam", "smoothgrad", "integrated_gradients", "guided_backprop", "lrp")


def test_parts_are_whole_families_balanced_and_cover_every_method() -> None:
    spec = AuditSpec(methods=METHODS, tests=("cascading",))
    parts = split_methods(spec, 2)
    assert len(parts) == 2
    assert sorted(m for p in parts for m in p) == sorted(METHODS)
    # gradient and gradcam share a family: never split apart
    assert any({"gradient", "gradcam"} <= set(p) for p in parts)
    assert len(split_methods(spec, 10)) == 5  # one part per family at most
    assert not splittable(dataclasses.replace(spec, tests=("cascading", "layers")))
    assert not splittable(AuditSpec(methods=("gradient", "gradcam"), tests=("cascading",)))


def test_a_merged_split_audit_equals_the_whole_audit() -> None:
    model = shapes_resnet()
    x, _, _ = shapes_inputs(6)
    spec = AuditSpec(
        methods=METHODS,
        tests=("cascading", "independent", "random_logit"),
        batch_size=4,
        seed=7,
        params=dataclasses.replace(
            AuditSpec(methods=("gradient",)).params, noise_samples=4, ig_steps=4
        ),
    )
    whole = run_audit(model, x, spec)
    parts = [
        run_audit(model, x, dataclasses.replace(spec, methods=methods))
        for methods in split_methods(spec, 3)
    ]
    merged = merge_results(spec, parts)
    a, b = whole.to_dict(), merged.to_dict()
    for key in ("verdicts", "tests", "methods", "spec", "images", "model", "fidelity", "policy"):
        if key == "methods":
            for m in a[key].values():
                m.pop("family_time_s")
            for m in b[key].values():
                m.pop("family_time_s")
        assert a[key] == b[key], key
    assert list(whole.maps) == list(merged.maps)
    for name in whole.maps:
        np.testing.assert_array_equal(whole.maps[name], merged.maps[name])
    for test in whole.tests:
        for stage, by_method in whole.tests[test].example_maps.items():
            assert list(by_method) == list(merged.tests[test].example_maps[stage])
