"""Maps that cannot carry a verdict never get one: degenerate reference maps, non-finite maps,
relevance that is not conserved, and methods that raised are INCONCLUSIVE with a reason that
names the method, the stage and how many images; a failing method never loses the rest of the
run."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from torch import nn

from saliency_audit.workers.engine.maps import MapSet, map_problems
from saliency_audit.workers.engine.methods import FAMILIES, METHODS
from saliency_audit.workers.engine.models.base import LoadedModel
from saliency_audit.workers.engine.policy import MapChecks, decide, load_policy
from saliency_audit.workers.engine.result import MapProblem, Score, StageInfo, TestResult
from saliency_audit.workers.engine.runner import run_audit
from saliency_audit.workers.engine.spec import AuditSpec, InputSpec, MethodParams
from saliency_audit.workers.reports.schema import report_schema
from saliency_audit.workers.reports.text import format_summary
from tests.engine.nets import UnconservingCNN, images, small_cnn

FAST = MethodParams(ig_steps=4, noise_samples=3, scorecam_batch=16)
CHECKS = MapChecks()


def _mapset(**maps: np.ndarray) -> MapSet:
    return MapSet(
        maps=dict(maps), native_channels={}, not_applicable={}, family_time={}, by_family={}
    )


def test_degenerate_reference_maps_are_problems_a_randomized_all_zero_map_is_not() -> None:
    healthy = np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32)
    zero = healthy.copy()
    zero[1] = 1e-13
    constant = healthy.copy()
    constant[2] = 0.7
    broken = healthy.copy()
    broken[0, 2, 2] = np.nan
    maps = _mapset(gradient=zero, gradcam=constant, lrp=broken, smoothgrad_sq=healthy * 1e-13)
    trained = map_problems(maps, CHECKS, "trained", trained=True)
    assert {(p.kind, p.n_images, p.n_total) for p in trained["gradient"]} == {("all_zero", 1, 3)}
    assert [(p.kind, p.n_images) for p in trained["gradcam"]] == [("constant", 1)]
    assert [(p.kind, p.n_images) for p in trained["lrp"]] == [("non_finite", 1)]
    assert "smoothgrad_sq" not in trained  # squared maps get the squared floor (1e-24)
    randomized = map_problems(maps, CHECKS, "fc", trained=False)
    assert set(randomized) == {"lrp"}  # only non-finite maps count at a randomized stage


def test_relevance_beyond_the_tolerance_is_not_conserved() -> None:
    maps = _mapset()
    maps.conservation["lrp"] = (np.array([2.0, 1.96, 0.0]), np.array([2.0, 2.0, 0.0]))
    # shares inside a residual branch may exceed 1 or go negative: only beyond +-2 counts
    maps.conservation["relevance_cam"] = (np.array([0.3, 2.5, -0.06]), np.array([1.0, 1.0, 1.0]))
    found = map_problems(maps, CHECKS, "trained", trained=True)
    assert "lrp" not in found  # 1.0 and 0.98 are within 5%; an image with no logit is skipped
    (problem,) = found["relevance_cam"]
    assert (problem.kind, problem.n_images, problem.n_total) == ("not_conserved", 1, 3)
    assert "2.5" in problem.detail
    maps.conservation["lrp"] = (np.array([2.0, np.inf]), np.array([2.0, 2.0]))
    assert map_problems(maps, CHECKS, "x", trained=False)["lrp"][0].n_images == 1


def _test_with(problems: list[MapProblem], means: dict[str, float]) -> TestResult:
    result = TestResult(
        test="cascading", description="", reference="", stages=[StageInfo(1, "fc", ("fc",))]
    )
    for method, mean in means.items():
        values = tuple(mean + 0.001 * i for i in range(8))
        result.scores.append(
            Score(
                method, "cascading", "fc", 1, "ssim", mean, mean - 0.01, mean + 0.01, 8, 0, values
            )
        )
    result.map_problems = problems
    return result


def test_a_problem_makes_the_method_inconclusive_and_names_method_stage_and_images() -> None:
    policy = load_policy()
    problem = MapProblem("lrp", "layer4", "non_finite", 3, 16, "contain NaN or infinite values")
    test = _test_with(
        [problem], {"lrp": 0.1, "gradient": 0.1, "control_sobel": 1.0, "control_random": 0.0}
    )
    methods = {name: (METHODS[name].is_control, None) for name in ("lrp", "gradient")}
    methods |= {"control_sobel": (True, None), "control_random": (True, None)}
    verdicts = {v.method: v for v in decide(policy, {"cascading": test}, methods, seed=0)}
    assert verdicts["gradient"].verdict == "PASS"
    lrp = verdicts["lrp"]
    assert lrp.verdict == "INCONCLUSIVE"
    assert "lrp at stage layer4: 3 of 16 maps contain NaN" in lrp.reason


class _Blind(nn.Module):
    """A classifier that ignores its input: every map of every method is zero."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x * 0.0)).mean(dim=(2, 3)))


def _loaded(module: nn.Module, size: int = 16) -> LoadedModel:
    return LoadedModel(
        module=module,
        input_spec=InputSpec(height=size, width=size),
        source="torchvision",
        sha256="0" * 64,
    )


def _spec(**kwargs: Any) -> AuditSpec:
    base: dict[str, Any] = dict(
        methods=("gradient", "gradcam", "lrp", "relevance_cam"),
        seed=3,
        batch_size=4,
        device="cpu",
        params=FAST,
        tests=("cascading",),
        measures=("ssim", "spearman_abs"),
    )
    return AuditSpec(**(base | kwargs))


def test_all_zero_maps_of_the_trained_model_give_inconclusive_not_fail() -> None:
    result = run_audit(_loaded(_Blind().eval()), images(4, 16), _spec())
    # the gradient is zero; Grad-CAM weighs a constant activation (the conv's bias) evenly
    expected = {"gradient": "all zero", "lrp": "all zero", "gradcam": "constant"}
    verdicts = {v.method: v for v in result.verdicts}
    for name, kind in expected.items():
        method = result.methods[name]
        assert method.status == "degenerate", (name, method.status, method.reason)
        assert f"4 of 4 maps are {kind}" in (method.reason or "")
        assert verdicts[name].verdict == "INCONCLUSIVE"
        assert f"{name} at the trained model: 4 of 4 maps are {kind}" in verdicts[name].reason
    printed = format_summary(result.to_dict())
    assert "degenerate" in printed and "are all zero" in printed


def test_a_method_that_raises_is_an_error_and_the_rest_of_the_run_stands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    family = FAMILIES["lrp"]
    original = family.compute

    def failing(model, x, target, wanted, ctx):  # type: ignore[no-untyped-def]
        if "relevance_cam" in wanted:
            raise RuntimeError("boom in relevance_cam\nsecond line")
        return original(model, x, target, wanted, ctx)

    monkeypatch.setattr(family, "compute", failing)
    result = run_audit(_loaded(small_cnn()), images(4, 16), _spec())
    failed = result.methods["relevance_cam"]
    assert failed.status == "error" and failed.reason == "RuntimeError: boom in relevance_cam"
    assert result.methods["lrp"].status == "ok"  # its family member is unaffected
    assert result.methods["gradient"].status == "ok"
    assert "relevance_cam" not in result.maps
    verdicts = {v.method: v for v in result.verdicts}
    assert verdicts["relevance_cam"].verdict == "INCONCLUSIVE"
    assert "relevance_cam failed at the trained model" in verdicts["relevance_cam"].reason
    document = json.loads(json.dumps(result.to_dict()))
    jsonschema.Draft202012Validator(report_schema()).validate(document)


def test_lrp_conservation_is_reported_per_method() -> None:
    result = run_audit(_loaded(small_cnn()), images(4, 16), _spec(tests=()))
    conservation = result.methods["lrp"].conservation
    assert conservation is not None and conservation.within_tolerance
    assert conservation.n == 4 and abs(conservation.mean - 1) < 0.05  # type: ignore[operator]
    assert result.methods["relevance_cam"].conservation is not None
    assert result.methods["gradient"].conservation is None


def test_lrp_that_does_not_conserve_is_reported_and_its_verdicts_are_inconclusive() -> None:
    result = run_audit(
        _loaded(UnconservingCNN().eval()), images(4, 16), _spec(methods=("gradient", "lrp"))
    )
    lrp = result.methods["lrp"]
    assert lrp.status == "not_conserved"
    assert lrp.conservation is not None and not lrp.conservation.within_tolerance
    assert lrp.conservation.mean == pytest.approx(2.0, rel=1e-3)
    verdicts = {v.method: v for v in result.verdicts}
    assert verdicts["lrp"].verdict == "INCONCLUSIVE"
    assert "do not conserve relevance" in verdicts["lrp"].reason
    assert (
        verdicts["gradient"].verdict != "INCONCLUSIVE" or "lrp" not in verdicts["gradient"].reason
    )
