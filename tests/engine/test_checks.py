"""The check registry: every test and analysis the spec accepts is a registered check with its
metadata, and a check registered in one module runs through ``run_audit`` like the others."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pytest

from saliency_audit.workers.engine import sanity, spec
from saliency_audit.workers.engine.checks import CHECKS, AuditContext, Check, check_info, register
from saliency_audit.workers.engine.errors import SpecError
from saliency_audit.workers.engine.models.base import LoadedModel
from saliency_audit.workers.engine.result import StageInfo, TestResult
from saliency_audit.workers.engine.runner import run_audit
from saliency_audit.workers.engine.spec import AuditSpec, InputSpec, MethodParams
from tests.engine.nets import images, small_cnn


def test_the_registry_holds_exactly_the_tests_the_spec_accepts_in_its_order() -> None:
    assert tuple(CHECKS) == spec.TESTS
    assert tuple(n for n, c in CHECKS.items() if c.kind == "analysis") == spec.ANALYSES
    every = AuditSpec(methods=("gradient",), stages="all")
    for name in spec.MODEL_RANDOMIZATION_TESTS:  # one map set per stage computed
        assert CHECKS[name].kind == "test"
        assert CHECKS[name].cost(every, 7) == 7.0
    # the default plans the stages the shipped rules read, of 7: the top quarter (1, 2) and
    # the last; bottom-up's first and last; independent averages them all
    planned = AuditSpec(methods=("gradient",))
    costs = {name: CHECKS[name].cost(planned, 7) for name in spec.MODEL_RANDOMIZATION_TESTS}
    assert costs == {"cascading": 3.0, "cascading_bottom_up": 2.0, "independent": 7.0}


def test_every_check_says_what_it_is_and_cites_its_source() -> None:
    default = AuditSpec(methods=("gradient",))
    for name, check in CHECKS.items():
        assert check.name == name and check.kind in ("test", "analysis")
        assert check.description and check.reference
        assert check.cost(default, 5) > 0
    assert [n for n, c in CHECKS.items() if c.needs_training_data] == ["data_randomization"]
    # the CLI and the catalogue read the same registry
    assert sanity.TEST_INFO is CHECKS


def test_an_unknown_check_or_a_second_registration_is_refused() -> None:
    with pytest.raises(SpecError, match="unknown test 'nope'"):
        check_info("nope")

    class Again(Check):
        name = "emprt"
        kind = "test"
        description = reference = "again"

        def run(self, ctx: AuditContext) -> TestResult:
            raise AssertionError

    with pytest.raises(RuntimeError, match="registered twice"):
        register(Again)
    assert type(CHECKS["emprt"]).__name__ == "EfficientMPRT"


MEAN_ABS = "mean_abs_of_trained_maps"


@pytest.fixture
def registered_mean_abs() -> Iterator[type[Check]]:
    """A check written for this test, registered as one module would register it. Which names
    a user may request is the contract's declaration (workers/engine/contract/spec.py, checked
    against the registry above); the runner itself runs whatever the spec names."""

    @register
    class MeanAbs(Check):
        name = MEAN_ABS
        kind = "analysis"
        description = "Mean |m| of each method's maps of the trained model."
        reference = "this test"

        def cost(self, spec: AuditSpec, n_units: int) -> float:
            return 3.0

        def run(self, ctx: AuditContext) -> TestResult:
            ctx.progress(0.5, "averaging")
            return TestResult(
                test=self.name,
                description=self.description,
                reference=self.reference,
                stages=[StageInfo(1, "trained")],
                details={m: float(np.abs(v).mean()) for m, v in ctx.reference.maps.items()},
            )

    try:
        yield MeanAbs
    finally:
        del CHECKS[MEAN_ABS]


def test_a_check_registered_in_one_module_runs_through_run_audit(
    registered_mean_abs: type[Check],
) -> None:
    loaded = LoadedModel(
        module=small_cnn(),
        input_spec=InputSpec(height=16, width=16),
        source="torchvision",
        sha256="0" * 64,
    )
    audit = AuditSpec(
        methods=("gradient",), tests=("emprt",), batch_size=4, params=MethodParams(smprt_samples=2)
    )
    # the contract refuses a name it does not declare; set past it, as a declared name would be
    object.__setattr__(audit, "tests", ("emprt", MEAN_ABS))
    steps: list[tuple[float, str]] = []
    result = run_audit(loaded, images(4, 16), audit, progress=lambda f, s: steps.append((f, s)))
    ours = result.tests[MEAN_ABS]
    assert list(result.tests) == ["emprt", MEAN_ABS]
    assert ours.details["gradient"] == pytest.approx(float(np.abs(result.maps["gradient"]).mean()))
    assert f"test_{MEAN_ABS}" in result.timings_s
    # an analysis has no verdict; the test beside it has its verdicts
    assert {v.test for v in result.verdicts} == {"emprt"}
    # its progress comes from its declared cost: 3 of (maps 1 + emprt 1 + 3) = 0.54 of 0.9
    fractions = [f for f, s in steps if s == "averaging"]
    assert fractions == [pytest.approx(0.05 + 0.9 * 2 / 5 + 0.5 * 0.9 * 3 / 5)]
    assert all(a <= b for a, b in itertools.pairwise(f for f, _ in steps))
