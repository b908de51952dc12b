"""Model randomization scoring: controls behave as defined, scores are per image and seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.engine.nets import images, small_cnn
from workers.engine.methods import resolve_layer
from workers.engine.runner import compute_maps, methods_to_run
from workers.engine.sanity import model_randomization
from workers.engine.spec import AuditSpec, MethodParams


def _run(seed: int) -> list:  # type: ignore[type-arg]
    model = small_cnn()
    x = images(6, 16, seed=2)
    with torch.no_grad():
        targets = model(x).argmax(1)
    names = methods_to_run(["gradient", "guided_backprop"])
    spec = AuditSpec(methods=tuple(names), seed=seed, batch_size=4, params=MethodParams())
    layer = resolve_layer(model, None)
    reference = compute_maps(model, x, targets, names, spec, layer, device=torch.device("cpu"))
    outcome = model_randomization(
        model,
        x,
        targets,
        names,
        spec,
        layer,
        reference,
        test="cascading",
        granularity="module",
        measures=["spearman_abs", "ssim"],
        device=torch.device("cpu"),
    )
    assert [s.name for s in outcome.stages] == [
        "classifier",
        "features.4",
        "features.3",
        "features.0",
    ]
    return outcome.scores


def test_controls_and_scores_per_stage() -> None:
    scores = _run(seed=0)
    assert len(scores) == 4 * 4 * 2  # stages x methods x measures
    by_key = {(s.method, s.stage, s.measure): s for s in scores}
    for stage in ("classifier", "features.4", "features.3", "features.0"):
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
    assert _run(seed=0) == _run(seed=0)
