"""Only the stages the verdict rule reads get maps (issue 19, item 2), and the verdicts stay.

The plan's stages for given unit counts are derived by hand; the area from the planned points
equals the full curve's when that curve runs linearly through them; the maps and scores at a
planned stage are bit for bit those of a full run (and of randomizing that stage from scratch);
``stages: "all"`` measures every stage and decides on the full curve as before; the reports
draw only measured points; the cost estimate counts only planned stages.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from saliency_audit.service.arguments import STAGE_CHOICES
from saliency_audit.workers.engine.contract.stage_plan import (
    DEFAULT_POINTS,
    STAGE_MODES,
    plan_stages,
    planned_count,
    spread,
)
from saliency_audit.workers.engine.errors import SpecError
from saliency_audit.workers.engine.maps import MapInputs, methods_to_run
from saliency_audit.workers.engine.models.base import LoadedModel
from saliency_audit.workers.engine.policy import (
    Rule,
    curve_area,
    evidence,
    load_policy,
    stage_fractions,
)
from saliency_audit.workers.engine.randomization import randomized, stages, units
from saliency_audit.workers.engine.result import AuditResult, Score
from saliency_audit.workers.engine.runner import run_audit
from saliency_audit.workers.engine.spec import AuditSpec, InputSpec
from saliency_audit.workers.engine.stats import bootstrap_mean, key_seed
from saliency_audit.workers.reports.content import CurveFigure, Table, build_content
from saliency_audit.workers.reports.text import format_verdicts
from tests.engine.nets import deep_chain, images, small_cnn

AREA = {"area": [0, 0.25]}  # the shipped cascading rule's span (read from the policy below)


def equal(n: int) -> list[float]:
    """Fractions of a cascade whose every stage randomizes one more module of ``n``."""
    return [i / n for i in range(1, n + 1)]


# ------------------------------------------------------------------------ the plan, by hand


def test_the_shipped_policy_reads_the_top_quarter_and_bottom_up_its_first_stage() -> None:
    rules = load_policy().rules
    assert rules["cascading"].stage == AREA
    assert rules["cascading_bottom_up"].stage == "first"
    assert rules["independent"].stage == "mean_over_stages"
    assert DEFAULT_POINTS == 8
    assert STAGE_CHOICES == STAGE_MODES == ("rule", "all")


@pytest.mark.parametrize(
    ("n", "computed"),
    [
        # resnet18 exported to ONNX (BatchNorm folded), per module: 21 stages; the top quarter
        # is stages 1-6 (5/21 = 0.238 < 0.25 <= 6/21), 6 <= 8 points: all of them, and the last
        (21, (1, 2, 3, 4, 5, 6, 21)),
        # torchvision resnet18 per module (BatchNorm its own unit): 41 stages; stages 1-11
        # span the quarter (10/41 = 0.244); 8 of the 11: positions j * 10 / 7 rounded half up,
        # 0 1 3 4 6 7 9 10, i.e. stages 1 2 4 5 7 8 10 11
        (41, (1, 2, 4, 5, 7, 8, 10, 11, 41)),
        # a flat ResNet-50 export of 54 stages: stages 1-14 (13/54 = 0.241); j * 13 / 7 ->
        # 0 2 4 6 7 9 11 13
        (54, (1, 3, 5, 7, 8, 10, 12, 14, 54)),
        # 8 stages: stage 2 ends the quarter exactly (2/8), stage 3's step starts at it
        (8, (1, 2, 8)),
        # a 36-stage cascade: 9/36 = 0.25 exactly, so stages 1-9; j * 8 / 7 -> 0 1 2 3 5 6 7 8
        (36, (1, 2, 3, 4, 6, 7, 8, 9, 36)),
        (1, (1,)),
    ],
)
def test_an_area_plan_computes_the_stages_of_its_span_thinned_to_eight_and_the_last(
    n: int, computed: tuple[int, ...]
) -> None:
    plan = plan_stages(equal(n), AREA)
    assert plan.computed == computed
    assert plan.total == n and plan.window == (0.0, 0.25) and plan.rule == "area 0-0.25"
    assert plan.points == (DEFAULT_POINTS if len(computed) - 1 == DEFAULT_POINTS else None)
    assert planned_count(n, AREA) == len(computed)


def test_block_granularity_places_the_span_by_modules_randomized() -> None:
    # resnet18 (ONNX, 21 modules) per block, from the logits down: fc (1 module), layer4 (5),
    # layer3 (5), layer2 (5), layer1 (4), conv1 (1): fractions 1/21, 6/21, 11/21, ...
    fractions = [1 / 21, 6 / 21, 11 / 21, 16 / 21, 20 / 21, 1.0]
    assert plan_stages(fractions, AREA).computed == (1, 2, 6)
    # a span from the middle: stages whose step overlaps [0.5, 0.75] with positive length
    assert plan_stages(equal(8), {"area": [0.5, 0.75]}).computed == (5, 6, 8)


@pytest.mark.parametrize(
    ("selector", "computed"),
    [
        ("first", (1, 5)),
        ("last", (5,)),
        ("mean_over_stages", (1, 2, 3, 4, 5)),
        ({"index": 3}, (3, 5)),
        ({"index": 9}, (5,)),  # no such stage: the verdict says so, the curve still ends
        ({"fraction": 0.5}, (3, 5)),  # stage ceil(0.5 * 5) = 3
        ({"name": "c"}, (3, 5)),
        (None, (1, 2, 3, 4, 5)),  # no rule for the test: every stage
    ],
)
def test_single_stage_rules_compute_that_stage_and_the_last(
    selector: Any, computed: tuple[int, ...]
) -> None:
    plan = plan_stages(equal(5), selector, names=list("abcde"))
    assert plan.computed == computed
    assert plan_stages(equal(5), selector, mode="all").computed == (1, 2, 3, 4, 5)


def test_spread_rounds_half_up_and_keeps_both_ends() -> None:
    assert spread(5, 8) == [0, 1, 2, 3, 4]
    assert spread(9, 8) == [0, 1, 2, 3, 5, 6, 7, 8]  # 4 * 8 / 7 = 4.57 -> 5
    assert spread(15, 3) == [0, 7, 14]
    with pytest.raises(ValueError):
        spread(4, 1)


# ------------------------------------------------------------------ the area on fewer points


def _score(stage_index: int, values: list[float]) -> Score:
    v = np.array(values)
    return Score(
        "gradient",
        "cascading",
        f"s{stage_index}",
        stage_index,
        "ssim",
        float(v.mean()),
        None,
        None,
        len(v),
        0,
        tuple(values),
    )


HALF = Rule(measure="ssim", stage={"area": [0, 0.5]}, threshold=0.3, pass_when="below")


def test_the_planned_area_equals_the_full_area_on_a_curve_linear_through_the_points() -> None:
    # 12 stages of 1/12; the span 0-0.5 holds stages 1-6 (6/12 = 0.5); with 4 points:
    # positions j * 5 / 3 -> 0 2 3 5, stages 1 3 4 6 (and the last, 12)
    fractions = {i: i / 12 for i in range(1, 13)}
    plan = plan_stages(list(fractions.values()), HALF.stage, points=4)
    assert plan.computed == (1, 3, 4, 6, 12)
    # two images; measured values at stages 1 3 4 6: image a 0.9 0.5 0.4 0.0, image b 1.0 0.6
    # 0.6 0.2; on a curve linear between them stage 2 is (0.9 + 0.5) / 2 = 0.7 (b: 0.8) and
    # stage 5 is 0.2 (b: 0.4). The step area over 0-0.5 is the mean of stages 1-6:
    # a: (0.9 + 0.7 + 0.5 + 0.4 + 0.2 + 0.0) / 6 = 0.45, b: (1 + .8 + .6 + .6 + .4 + .2) / 6 = 0.6
    full = {
        1: [0.9, 1.0],
        2: [0.7, 0.8],
        3: [0.5, 0.6],
        4: [0.4, 0.6],
        5: [0.2, 0.4],
        6: [0.0, 0.2],
        **{i: [-0.5, 0.3] for i in range(7, 13)},  # outside the span: never read
    }
    planned = [_score(i, full[i]) for i in plan.computed]
    expected = bootstrap_mean(np.array([0.45, 0.6]), key_seed(0, "x"))
    for scores in (planned, [_score(i, v) for i, v in full.items()]):
        ev = evidence(scores, HALF, 0, fractions=fractions, stage_count=12)
        assert ev is not None and ev.mean == pytest.approx(expected.mean)
    # off the line the planned area is an approximation: stage 2 at 0.9 moves the full area
    # of image a to 2.9 / 6, the planned one stays at 0.45
    bent = [_score(i, [0.9, 0.8] if i == 2 else v) for i, v in full.items()]
    ev = evidence(bent, HALF, 0, fractions=fractions, stage_count=12)
    assert ev is not None and ev.mean == pytest.approx((2.9 / 6 + 0.6) / 2)


def test_single_stage_rules_find_their_stage_by_index_among_the_planned_ones() -> None:
    scores = [_score(1, [0.1, 0.2]), _score(5, [0.7, 0.9])]
    first = evidence(scores, dataclasses.replace(HALF, stage="first"), 0, stage_count=5)
    last = evidence(scores, dataclasses.replace(HALF, stage="last"), 0, stage_count=5)
    assert first is not None and first.mean == pytest.approx(0.15)
    assert last is not None and last.mean == pytest.approx(0.8)
    # stage 3 was not measured: no evidence rather than another stage's
    third = dataclasses.replace(HALF, stage={"fraction": 0.5})
    assert evidence(scores, third, 0, stage_count=5) is None


# --------------------------------------------------------------- real audits on tiny networks

QUIET = dict(methods=("gradient", "guided_backprop"), measures=("ssim",), batch_size=4)


def _loaded(module: torch.nn.Module) -> LoadedModel:
    return LoadedModel(
        module=module,
        input_spec=InputSpec(height=16, width=16, class_names=tuple("abcde")),
        source="torchvision",
        sha256="0" * 64,
    )


@pytest.fixture(scope="module")
def chain_runs() -> dict[str, AuditResult]:
    """The 36-unit chain per module: cascading and bottom-up planned, cascading in full."""
    x = images(4, 16, seed=3)
    runs = {}
    for mode, tests in (("rule", ("cascading", "cascading_bottom_up")), ("all", ("cascading",))):
        spec = AuditSpec(
            methods=("gradient",),
            measures=("ssim",),
            batch_size=4,
            tests=tests,
            granularity="module",
            stages=mode,  # type: ignore[arg-type]
        )
        runs[mode] = run_audit(_loaded(deep_chain()), x, spec)
    return runs


def test_the_planned_run_computes_the_planned_stages_of_the_chain(
    chain_runs: dict[str, AuditResult],
) -> None:
    rule, full = chain_runs["rule"].tests, chain_runs["all"].tests
    cascade = rule["cascading"]
    assert len(cascade.stages) == 36 == len(full["cascading"].stages)
    assert cascade.stage_plan is not None and full["cascading"].stage_plan is not None
    assert cascade.stage_plan.computed == (1, 2, 3, 4, 6, 7, 8, 9, 36)
    assert {s.stage_index for s in cascade.scores} == set(cascade.stage_plan.computed)
    assert set(cascade.example_maps) == {s.name for s in cascade.measured()}
    assert rule["cascading_bottom_up"].stage_plan.computed == (1, 36)  # type: ignore[union-attr]
    assert {s.stage_index for s in full["cascading"].scores} == set(range(1, 37))
    assert full["cascading"].stage_plan.mode == "all"


def test_planned_stages_have_the_maps_and_scores_of_the_full_run_bit_for_bit(
    chain_runs: dict[str, AuditResult],
) -> None:
    for test in ("cascading",):
        planned, full = chain_runs["rule"].tests[test], chain_runs["all"].tests[test]
        by_key = {(s.method, s.stage_index, s.measure): s for s in full.scores}
        for score in planned.scores:
            assert score == by_key[(score.method, score.stage_index, score.measure)]
        for stage, by_method in planned.example_maps.items():
            for method, maps in by_method.items():
                np.testing.assert_array_equal(maps, full.example_maps[stage][method])


def test_a_stage_reached_over_skipped_ones_is_the_stage_randomized_from_scratch() -> None:
    # stage 4 of the small CNN's cascade (everything random) is reached from stage 1 with
    # stages 2 and 3 skipped; its maps equal the model randomized at once with randomized()
    module, x = small_cnn(), images(4, 16, seed=5)
    spec = AuditSpec(**QUIET, tests=("cascading",), granularity="module")  # type: ignore[arg-type]
    result = run_audit(_loaded(module), x, spec)
    test = result.tests["cascading"]
    assert test.stage_plan is not None and test.stage_plan.computed == (1, 4)
    last = stages(units(module, "module"), "cascading")[-1]
    targets = torch.tensor([i.target for i in result.images])
    inputs = MapInputs(module, x, targets, methods_to_run(spec.methods), spec, None, x.device)
    key = "randomized/" + "|".join(sorted(last.randomized))  # the random control's draw
    with randomized(module, last.randomized, seed=spec.seed):
        scratch = inputs.compute(random_control_key=key)
    for method in ("gradient", "guided_backprop", "control_random"):
        kept = test.example_maps[last.name][method]
        np.testing.assert_array_equal(kept, scratch.maps[method][: len(kept)])


def test_all_stages_decide_on_the_full_curve_exactly(chain_runs: dict[str, AuditResult]) -> None:
    full = chain_runs["all"]
    test = full.tests["cascading"]
    fractions = stage_fractions(test)
    rule = load_policy().rules["cascading"]
    by_stage = {(s.method, s.stage_index): s for s in test.scores if s.measure == rule.measure}
    low = {k: by_stage[("control_random", k)].mean for k in fractions}
    high = {k: by_stage[("control_sobel", k)].mean for k in fractions}
    for verdict in (v for v in full.verdicts if v.test == "cascading"):
        # the shipped formula on every stage, with no interpolation anywhere
        curve = [
            (
                fractions[k],
                (np.array(by_stage[(verdict.method, k)].values, dtype=float) - low[k])
                / (high[k] - low[k]),
            )
            for k in fractions
        ]
        label = "area 0-0.25"
        expected = bootstrap_mean(
            curve_area(curve, 0, 0.25), key_seed(0, verdict.method, "cascading", label, "ssim")
        )
        assert verdict.mean == expected.mean and verdict.ci_low == expected.ci_low


def test_the_planned_verdicts_agree_with_the_full_ones_on_the_chain(
    chain_runs: dict[str, AuditResult],
) -> None:
    planned = {(v.method, v.test): v for v in chain_runs["rule"].verdicts}
    for v in chain_runs["all"].verdicts:
        p = planned[(v.method, v.test)]
        assert p.verdict == v.verdict, (v.method, v.test)
        # stage 5 of the span (1-9) interpolated: the mean moves, a little
        assert p.mean is not None and v.mean is not None and abs(p.mean - v.mean) < 0.05


# ------------------------------------------------------------------- reports and the count


def test_the_reports_draw_only_measured_stages_and_say_why(
    chain_runs: dict[str, AuditResult],
) -> None:
    report = json.loads(json.dumps(chain_runs["rule"].to_dict(), allow_nan=False))
    again = AuditResult.from_dict(report).tests["cascading"].stage_plan
    assert again == chain_runs["rule"].tests["cascading"].stage_plan
    content = build_content(report)
    cascade = next(f for f in content.figures() if "cascading" in f.key and "bottom" not in f.key)
    names = {s.index: s.name for s in chain_runs["rule"].tests["cascading"].stages}
    assert isinstance(cascade, CurveFigure)
    assert cascade.stages == tuple(names[i] for i in (1, 2, 3, 4, 6, 7, 8, 9, 36))
    for panel in cascade.panels:
        for series in panel.series:
            assert None not in series.mean
    tables = [b for b in content.blocks() if isinstance(b, Table) and "maps" in b.header]
    skipped = [row for row in tables[0].rows if row[2].text == "skipped"]
    assert len(skipped) == 36 - 9
    text = format_verdicts(report)
    assert "cascading: maps at stages 1, 2, 3, 4, 6, 7, 8, 9, 36 of 36" in text
    assert "8 of them spread evenly" in text


def test_the_cost_counts_only_the_planned_stages() -> None:
    from saliency_audit.workers.engine.contract.cost import model_states, planned_stages

    rules = {t: r.stage for t, r in load_policy().rules.items()}
    spec = AuditSpec(
        methods=("gradient",), tests=("cascading", "cascading_bottom_up", "independent", "emprt")
    )
    # 41 stages: cascading 9 (above), bottom-up 2 (first and last), independent all 41
    assert planned_stages(spec, 41, rules) == {
        "cascading": 9,
        "cascading_bottom_up": 2,
        "independent": 41,
    }
    assert model_states(spec, 41, rules) == 1 + 9 + 2 + 41 + 1  # trained, ..., eMPRT's one
    every = dataclasses.replace(spec, stages="all")
    assert model_states(every, 41, rules) == 1 + 3 * 41 + 1
    assert model_states(spec, 41) == 1 + 3 * 41 + 1  # no rules given: every stage, a bound


def test_run_gate_and_the_api_take_the_stage_mode() -> None:
    from saliency_audit.service.api.audits import engine_spec
    from saliency_audit.service.cli import build_parser

    run = ["run", "--model", "m.onnx", "--images", "i"]
    assert build_parser().parse_args(run).stages == "rule"
    assert build_parser().parse_args([*run, "--stages", "all"]).stages == "all"
    gate = ["gate", "--model", "m.onnx", "--images", "i", "--methods", "a", "--require", "a"]
    assert build_parser().parse_args(gate).stages is None  # the service's default
    assert build_parser().parse_args([*gate, "--stages", "all"]).stages == "all"
    assert engine_spec({"methods": ["gradient"]})["stages"] == "rule"
    assert engine_spec({"methods": ["gradient"], "stages": "all"})["stages"] == "all"
    with pytest.raises(SpecError, match="stages must be rule or all"):
        engine_spec({"methods": ["gradient"], "stages": "some"})


# ------------------------------------------------------------------- the calibration models


def test_the_calibration_models_decide_on_the_same_numbers_with_the_default_plan() -> None:
    from examples.calibration import fit, planned

    scores = Path(__file__).resolve().parents[2] / "docs" / "calibration"
    docs = {
        f"{name}.{granularity}": doc
        for granularity in ("block", "module")
        for name, doc in fit.load(scores, granularity).items()
    }
    assert len(docs) == 12
    compared = 0
    for name, doc in docs.items():
        for method in planned.METHODS:
            full = planned.full_per_image(doc, method)
            found = planned.planned_per_image(doc, method)
            if full is None or found is None or doc["statuses"].get(method) != "ok":
                continue
            per_image, plan = found
            # every calibration model's top quarter holds at most 8 stages: computed whole,
            # the same area to the last bit, so the same verdicts at every image count
            assert plan.points is None
            np.testing.assert_array_equal(per_image, full, err_msg=f"{name} {method}")
            compared += 1
    assert compared == 67
    # thinned to 2 points the MobileNet's guided Grad-CAM would PASS at 128 images: the check
    # above can fail, and the default's 8 points are not an idle choice
    mobilenet = {"m": docs["shapes64_mobilenet_v2.block"]}
    changed = [r for r in planned.compare(mobilenet, 2) if r["full"] != r["planned"]]
    assert [(r["method"], r["full"], r["planned"]) for r in changed] == [
        ("guided_gradcam", "IIIIIF", "IIIIPP")
    ]
