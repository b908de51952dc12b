"""Adaptive audits: images in rounds, stop when every verdict is decided (docs/policy.md,
"Adaptive audits").

:func:`~.runner.run_audit` with ``spec.adaptive`` takes the images in a seeded random order and
measures them ``round_images`` at a time: each round's maps and check results are computed on
that round's images only, exactly as a fixed audit computes them (every per-image score depends
on its own image, the model states and the seed; noise draws follow the image's position in the
order), and appended to the rounds before it (:func:`merge_map_sets`, :func:`merge_tests`).
After each round every verdict is decided on the anytime-valid confidence sequence over the
rounds so far (:func:`~.policy.decide` with ``looks``); the audit stops when none is pending
(:func:`~.policy.pending_verdicts`) or the images run out. Only tests whose per-image scores
are bounded and independent of the other images take part (the spec refuses the others:
:data:`~.contract.spec.ADAPTIVE_TESTS`).
"""

from __future__ import annotations

import numpy as np

from .maps import MapSet
from .result import AdaptiveRound, AdaptiveRun, MapProblem, Score, TestResult, Verdict
from .sanity import DEGENERATE_DETAIL, make_score
from .sequential import CONFIDENCE
from .spec import AuditSpec
from .stats import key_seed

INTERVAL = (
    "anytime-valid 95% confidence sequence of the mean (betting, hedged capital; "
    "Waudby-Smith & Ramdas 2024, JRSS-B), intersected over the looks"
)
ORDER = "a random permutation of the images given, seeded by the audit seed"


def image_order(n: int, spec: AuditSpec) -> np.ndarray:
    """The images an adaptive audit may use, in the order it uses them: a seeded permutation
    of ``range(n)``, cut to ``max_images``."""
    assert spec.adaptive is not None
    rng = np.random.default_rng(key_seed(spec.seed, "adaptive_order"))
    order = rng.permutation(n)
    cap = spec.adaptive.max_images
    return order[:cap] if cap is not None else order


def merge_map_sets(first: MapSet, second: MapSet) -> MapSet:
    """The map set of ``first``'s images followed by ``second``'s (same model state and
    methods). A method that raised in either has no maps (as in one run: a partial set would
    be misread)."""
    errors = {**second.errors, **first.errors}
    not_applicable = {**second.not_applicable, **first.not_applicable}
    dropped = set(errors) | set(not_applicable)
    return MapSet(
        maps={
            m: np.concatenate([v, second.maps[m]])
            for m, v in first.maps.items()
            if m in second.maps and m not in dropped
        },
        native_channels={**second.native_channels, **first.native_channels},
        not_applicable=not_applicable,
        family_time={
            f: first.family_time.get(f, 0.0) + second.family_time.get(f, 0.0)
            for f in {**first.family_time, **second.family_time}
        },
        by_family=first.by_family,
        errors=errors,
        conservation={
            m: (
                np.concatenate([pair[0], second.conservation[m][0]]),
                np.concatenate([pair[1], second.conservation[m][1]]),
            )
            for m, pair in first.conservation.items()
            if m in second.conservation and m not in dropped
        },
    )


def _score_key(score: Score) -> tuple[str, int, str]:
    return score.method, score.stage_index, score.measure


def _values(score: Score) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in score.values], dtype=np.float64)


def merged_score(first: Score, second: Score) -> Score:
    """One score over both rounds' images: values appended, the mean over all of them (the
    interval is left to :func:`finish_tests`; an adaptive audit decides on the confidence
    sequence of the values, not on this)."""
    values = np.concatenate([_values(first), _values(second)])
    finite = values[np.isfinite(values)]
    return Score(
        method=first.method,
        test=first.test,
        stage=first.stage,
        stage_index=first.stage_index,
        measure=first.measure,
        mean=float(finite.mean()) if finite.size else None,
        ci_low=None,
        ci_high=None,
        n=int(finite.size),
        n_undefined=int(values.size - finite.size),
        values=tuple(float(v) if np.isfinite(v) else None for v in values),
    )


def _merged_problems(
    first: list[MapProblem], second: list[MapProblem], images: int
) -> list[MapProblem]:
    """Map problems of both rounds: counts per (method, stage, kind) added, out of every image
    (each model state explains all of them)."""
    merged: dict[tuple[str, str, str], MapProblem] = {}
    for p in [*first, *second]:
        key = (p.method, p.stage, p.kind)
        if key in merged:
            q = merged[key]
            merged[key] = MapProblem(
                q.method, q.stage, q.kind, q.n_images + p.n_images, q.n_total, q.detail
            )
        else:
            total = 0 if p.kind == "error" else images
            merged[key] = MapProblem(p.method, p.stage, p.kind, p.n_images, total, p.detail)
    return list(merged.values())


def _merged_details(first: dict[str, object], second: dict[str, object]) -> dict[str, object]:
    """Details over both rounds: per-image lists appended, the counts of degenerate randomized
    maps added, settings (equal in every round) kept."""
    out = dict(first)
    for key, value in second.items():
        mine = out.get(key)
        if key == DEGENERATE_DETAIL and isinstance(mine, dict) and isinstance(value, dict):
            counts = {m: {s: dict(k) for s, k in by.items()} for m, by in mine.items()}
            for method, by_stage in value.items():
                for stage, kinds in by_stage.items():
                    here = counts.setdefault(method, {}).setdefault(stage, {})
                    for kind, n in kinds.items():
                        here[kind] = here.get(kind, 0) + n
            out[key] = counts
        elif isinstance(mine, list) and isinstance(value, list):
            out[key] = [*mine, *value]
        elif key not in out:
            out[key] = value
    return out


def merge_tests(first: TestResult, second: TestResult, images: int) -> TestResult:
    """One test over ``first``'s images followed by ``second``'s; ``images`` is their total.
    A score missing from either round (its method raised there) is left out: its map problem
    says why."""
    theirs = {_score_key(s): s for s in second.scores}
    return TestResult(
        test=first.test,
        description=first.description,
        reference=first.reference,
        status=first.status,
        reason=first.reason,
        granularity=first.granularity,
        stages=list(first.stages),
        scores=[
            merged_score(s, theirs[_score_key(s)]) for s in first.scores if _score_key(s) in theirs
        ],
        details=_merged_details(first.details, second.details),
        map_problems=_merged_problems(first.map_problems, second.map_problems, images),
        example_maps=first.example_maps,  # the first images' maps, as in a fixed audit
    )


def finish_tests(tests: dict[str, TestResult], seed: int) -> dict[str, TestResult]:
    """Every score with its seeded bootstrap interval over all the images used, as a fixed
    audit of those images reports it (descriptive; the verdicts rest on the sequence)."""
    for test in tests.values():
        test.scores = [
            make_score(
                _values(s),
                method=s.method,
                test=s.test,
                stage=s.stage,
                stage_index=s.stage_index,
                measure=s.measure,
                seed=seed,
            )
            for s in test.scores
        ]
    return tests


def adaptive_run(
    spec: AuditSpec,
    *,
    available: int,
    rounds: list[tuple[int, list[Verdict], list[Verdict]]],
) -> AdaptiveRun:
    """The report's account of an adaptive audit: ``available`` images given, and per round
    done (the images used so far, the verdicts after it, those still pending)."""
    assert spec.adaptive is not None
    used, _, pending = rounds[-1]
    decided = not pending
    if decided:
        reason = (
            f"every verdict was decided after {used} of {available} images "
            f"({len(rounds)} round{'s' if len(rounds) > 1 else ''})"
        )
    else:
        left = ", ".join(f"{v.method}/{v.test}" for v in pending[:5])
        more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
        capped = spec.adaptive.max_images is not None and spec.adaptive.max_images < available
        limit = f"max_images ({spec.adaptive.max_images})" if capped else "the images"
        reason = f"{limit} ran out after {used} images with undecided verdicts: {left}{more}"
    return AdaptiveRun(
        round_images=spec.adaptive.round_images,
        max_images=spec.adaptive.max_images,
        images_available=available,
        images_used=used,
        stopped="decided" if decided else "exhausted",
        reason=reason,
        interval=INTERVAL,
        confidence=CONFIDENCE,
        order=ORDER,
        rounds=tuple(
            AdaptiveRound(
                round=i + 1,
                images=n,
                decided=sum(v.verdict != "INCONCLUSIVE" for v in round_verdicts),
                pending=len(round_pending),
            )
            for i, (n, round_verdicts, round_pending) in enumerate(rounds)
        ),
    )
