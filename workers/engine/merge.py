"""Split an audit into parts by method family, and merge the parts' results into the result of
the whole audit, identical to running it in one piece.

Why it is exact: every map depends only on (model state, images, targets, seed, batch) and its
own family (noise draws come from a generator per (seed, batch); the random control from the
seed), every randomized model state from (seed, module name), every bootstrap interval from
(seed, method, test, stage, measure). So a part that computes some families gets bit for bit
the maps and scores those families get in the whole run, on the same device and batch size.
Each part also computes the two controls (cheap); the merge keeps the first part's. Verdicts
are decided again over the merged scores, with the same policy and method order.

Tests that do work independent of the methods (training the data randomization copies, the
``layers`` analysis' fixed method set) would be repeated by every part, so audits with them
are not split (:func:`splittable`), nor are adaptive audits (each part would stop at its own
round, and the merge decides on one interval for all).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .maps import CONTROLS
from .methods import METHODS
from .policy import decide, load_policy
from .result import AuditResult, MapProblem, Score, TestResult
from .spec import AuditSpec

SPLITTABLE_TESTS = frozenset(
    {"cascading", "cascading_bottom_up", "independent", "smprt", "emprt", "random_logit"}
)


def family_cost(family: str, spec: AuditSpec) -> float:
    """Rough passes per image of a family, to balance the parts."""
    params = spec.params
    return {
        "noise": 2.0 * params.noise_samples,
        "integrated_gradients": 2.0 * params.ig_steps,
        "scorecam": float(min(64, params.scorecam_channels or 64)),
        "lrp": 4.0,
        "guided": 2.0,
        "gradient": 2.0,
    }.get(family, 2.0)


def families_of(methods: Sequence[str]) -> dict[str, list[str]]:
    by_family: dict[str, list[str]] = {}
    for name in methods:
        if name not in CONTROLS:
            by_family.setdefault(METHODS[name].family, []).append(name)
    return by_family


def splittable(spec: AuditSpec) -> bool:
    return (
        spec.adaptive is None
        and set(spec.tests) <= SPLITTABLE_TESTS
        and len(families_of(spec.methods)) >= 2
    )


def split_methods(spec: AuditSpec, parts: int) -> list[tuple[str, ...]]:
    """The methods of each part: whole families, greedily balanced by :func:`family_cost`,
    heaviest first; at most one part per family, no empty part."""
    by_family = families_of(spec.methods)
    order = sorted(by_family, key=lambda f: (-family_cost(f, spec), f))
    count = max(1, min(parts, len(order)))
    loads = [0.0] * count
    groups: list[list[str]] = [[] for _ in range(count)]
    for family in order:
        lightest = min(range(count), key=lambda i: (loads[i], i))
        groups[lightest] += by_family[family]
        loads[lightest] += family_cost(family, spec)
    requested = list(spec.methods)
    return [tuple(sorted(g, key=requested.index)) for g in groups if g]


def merge_results(spec: AuditSpec, parts: Sequence[AuditResult]) -> AuditResult:
    """The result of the whole audit from its parts (``spec`` is the whole audit's)."""
    if not parts:
        raise ValueError("no parts to merge")
    first = parts[0]
    names = [*dict.fromkeys(spec.methods), *(c for c in CONTROLS if c not in spec.methods)]
    owner: dict[str, AuditResult] = {}
    for part in parts:
        for name in part.methods:
            owner.setdefault(name, part)
    methods = {name: owner[name].methods[name] for name in names if name in owner}
    maps = {
        name: owner[name].maps[name] for name in names if name in owner and name in owner[name].maps
    }
    measures_order = {
        m: i
        for i, m in enumerate(
            dict.fromkeys(s.measure for t in first.tests.values() for s in t.scores)
        )
    }
    tests: dict[str, TestResult] = {}
    for test_name, base in first.tests.items():
        scores: list[Score] = []
        problems: list[MapProblem] = []
        examples: dict[str, dict[str, np.ndarray]] = {}
        for part in parts:
            test = part.tests[test_name]
            scores += [s for s in test.scores if owner.get(s.method) is part]
            problems += [p for p in test.map_problems if owner.get(p.method) is part]
            for stage, by_method in test.example_maps.items():
                for method, value in by_method.items():
                    if owner.get(method) is part:
                        examples.setdefault(stage, {})[method] = value
        scores.sort(
            key=lambda s: (s.stage_index, names.index(s.method), measures_order.get(s.measure, 0))
        )
        tests[test_name] = TestResult(
            test=base.test,
            description=base.description,
            reference=base.reference,
            status=base.status,
            reason=base.reason,
            granularity=base.granularity,
            stages=list(base.stages),
            scores=scores,
            details=dict(base.details),
            map_problems=sorted(problems, key=lambda p: names.index(p.method)),
            stage_plan=base.stage_plan,  # every part planned the same stages from one policy
            example_maps={
                s: {m: examples[s][m] for m in names if m in examples[s]} for s in examples
            },
        )
    policy = load_policy(spec.policy)
    verdicts = decide(
        policy,
        tests,
        {
            name: (m.is_control, m.reason if m.status == "not_applicable" else None)
            for name, m in methods.items()
        },
        spec.seed,
    )
    timings = {"parts_total": round(sum(p.timings_s.get("total", 0.0) for p in parts), 4)}
    timings.update({f"part_{i}_total": p.timings_s.get("total", 0.0) for i, p in enumerate(parts)})
    return AuditResult(
        spec={**first.spec, "methods": names},
        model=first.model,
        images=first.images,
        methods=methods,
        fidelity=first.fidelity,
        environment=first.environment,
        timings_s=timings,
        tests=tests,
        verdicts=verdicts,
        policy=policy.document,
        maps=maps,
    )
