"""The shipped cascading rule follows from the committed calibration scores (docs/policy.md):
its thresholds, its recommended image count, its leave-one-model-out accuracy, verdicts that do
not change from that count on, and the same verdicts at block and module granularity."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from examples.calibration import fit
from saliency_audit.workers.engine.policy import load_policy

SCORES = Path(__file__).resolve().parents[2] / "docs" / "calibration"
SHIPPED = fit.Candidate("ssim", (0.0, 0.25), True)
ZONE = 0.1


@functools.cache
def docs() -> dict[str, dict[str, Any]]:
    return fit.load(SCORES)


@pytest.fixture(autouse=True)
def _zone() -> None:
    fit.SETTINGS["zone"] = ZONE


def test_the_calibration_set_has_ten_models_with_real_pretrained_ones() -> None:
    names = set(docs())
    assert len(names) == 10
    assert {"efficientnet_lite1", "efficientnet_lite2", "digits64_vit"} <= names
    assert all(d["n_images"] >= 96 for d in docs().values())


def test_the_shipped_thresholds_are_the_ones_fitted_on_every_model() -> None:
    rule = load_policy().rules["cascading"]
    fitted = fit.fit(docs(), SHIPPED)
    assert fitted is not None
    assert rule.stage == {"area": [0, 0.25]} and rule.scale == "controls"
    assert rule.threshold == pytest.approx(fitted.pass_below, abs=5e-4)
    assert rule.fail_bound == pytest.approx(fitted.fail_at, abs=5e-4)


def test_from_the_recommended_image_count_every_model_gets_the_papers_verdicts() -> None:
    fitted = fit.fit(docs(), SHIPPED)
    assert fitted is not None
    rows = fit.verdict_rows(docs(), SHIPPED, dict.fromkeys(docs(), fitted))
    assert fit.minimum_images(rows) == load_policy().recommended_images == 128
    for model, by_method in rows.items():
        for method, by_n in by_method.items():
            expected = fit.EXPECTED.get(method) or ("FAIL" if method == "control_sobel" else "PASS")
            later = {n: v for n, v in by_n.items() if n >= 128}
            assert set(later.values()) <= {expected}, (model, method, by_n)


def test_leave_one_model_out_gets_every_verdict_right_from_128_images() -> None:
    results = fit.leave_one_out(docs(), SHIPPED)
    assert results is not None
    assert fit.accuracy(results, 128) == (27, 27)
    assert fit.accuracy(results, 256) == (27, 27)
    right, total = fit.accuracy(results, 32)
    assert (right, total) == (34, 35)


def test_block_and_module_granularity_give_the_same_verdicts() -> None:
    fitted = fit.fit(docs(), SHIPPED)
    assert fitted is not None
    modules = fit.load(SCORES, "module")
    assert set(modules) == {"shapes_small_resnet", "shapes64_resnet18"}
    for name, doc in modules.items():
        assert len(doc["stages"]) > 2 * len(docs()[name]["stages"])
        for method in fit.SENSITIVE + fit.INSENSITIVE:
            block = fit.per_image(docs()[name], method, SHIPPED)
            module = fit.per_image(doc, method, SHIPPED)
            assert block is not None and module is not None
            assert fit.verdict(block, fitted, "b") == fit.verdict(module, fitted, "m")


def test_spearman_and_hog_do_not_separate_the_groups() -> None:
    for measure in ("spearman_abs", "hog_pearson"):
        assert fit.fit(docs(), fit.Candidate(measure, (0.0, 0.25), True)) is None
