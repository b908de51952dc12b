"""The sanity checks: model parameter randomization (Adebayo et al. 2018, section 3.1), its
repairs sMPRT and eMPRT (Hedstrom et al. 2023) and Random Logit (Sixt et al. 2020), scored
per image.

Every test compares maps of a changed model (or class) with the trained model's maps on the
same images, targets and noise draws. Each (method, test, stage, measure) keeps its per-image
scores and is reduced to a mean with a seeded bootstrap 95% interval and n (DOMAIN.md section
5). The data randomization test lives in :mod:`.data_randomization`.

A model state is identified by the set of modules randomized in it; every test draws a module's
random weights the same way (:func:`.randomization.randomized`), so a state that occurs in
several tests (the fully randomized model ends both cascades and is eMPRT's) is computed once
per audit by :class:`RandomizedStates`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import similarity
from .contract.stage_plan import StageMode, plan_stages
from .maps import MapInputs, MapSet, degenerate_maps, map_problems
from .policy import MapChecks
from .progress import ProgressCallback, no_progress
from .randomization import (
    NORMALIZATION_HANDLING,
    ModelTest,
    Randomizer,
    parameterized_modules,
    randomized,
    stages,
    units,
)
from .result import TRAINED_STAGE, MapProblem, Score, StageInfo, TestResult
from .spec import AuditSpec, Granularity
from .stats import Estimate, bootstrap_mean, key_seed

if TYPE_CHECKING:
    from .checks import Check

KEEP_EXAMPLES = 4  # images per stage whose maps are kept for heatmap grids


def registered_check(test: str) -> Check:
    """The check registered as ``test`` in :mod:`.checks`: its description and reference head
    the test's result."""
    from .checks import check_info  # here: the check modules import this module

    return check_info(test)


def __getattr__(name: str) -> dict[str, Check]:
    # TEST_INFO (test name -> its description and reference), read by the CLI and the
    # catalogue, is the check registry itself; looked up late for the same reason
    if name == "TEST_INFO":
        from .checks import CHECKS

        return CHECKS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class PreparedReference:
    """A reference map set prepared once for every measure (ranks, normalized maps and their
    local moments, HOG features), with the scores of a method whose maps did not change.

    A cascade compares every stage with the same trained maps: preparing them once halves the
    similarity work, and a map set equal to the reference (``control_sobel`` never depends on
    the weights) is scored once, exactly as a fresh comparison would score it."""

    def __init__(self, reference: MapSet) -> None:
        self.reference = reference
        self._prepared: dict[tuple[str, str], similarity.Prepared] = {}
        self._unchanged: dict[tuple[str, str], np.ndarray] = {}

    def prepared(self, method: str, measure: str) -> similarity.Prepared:
        key = (method, measure)
        if key not in self._prepared:
            maps = torch.from_numpy(self.reference.maps[method])
            self._prepared[key] = similarity.prepare(measure, maps)
        return self._prepared[key]

    def unchanged(self, method: str, measure: str) -> np.ndarray:
        key = (method, measure)
        if key not in self._unchanged:
            ref = self.prepared(method, measure)
            self._unchanged[key] = similarity.compare(ref, ref).numpy().astype(np.float64)
        return self._unchanged[key]


def similarity_values(
    reference: MapSet | PreparedReference,
    other: MapSet,
    names: Sequence[str],
    measures: Sequence[str],
) -> dict[str, dict[str, np.ndarray]]:
    """Per-image similarity of two map sets: method -> measure -> (N,) float64 (NaN where a
    measure is undefined for an image). Measures the map size does not allow are left out.
    Pass a :class:`PreparedReference` to compare many map sets with one reference."""
    prepared = (
        reference if isinstance(reference, PreparedReference) else PreparedReference(reference)
    )
    ref_maps = prepared.reference.maps
    out: dict[str, dict[str, np.ndarray]] = {}
    for method in names:
        if method not in ref_maps or method not in other.maps:
            continue
        a, b = ref_maps[method], other.maps[method]
        if a.shape != b.shape:
            raise ValueError(f"{method}: map batches differ in shape: {a.shape} vs {b.shape}")
        same = np.array_equal(a, b, equal_nan=True)
        scores: dict[str, np.ndarray] = {}
        for measure in measures:
            if min(a.shape[-2:]) < similarity.MIN_MAP_SIDE_PX[measure]:
                continue
            if same:
                scores[measure] = prepared.unchanged(method, measure)
                continue
            theirs = similarity.prepare(measure, torch.from_numpy(b))
            values = similarity.compare(prepared.prepared(method, measure), theirs)
            scores[measure] = values.numpy().astype(np.float64)
        out[method] = scores
    return out


def make_score(
    values: np.ndarray,
    *,
    method: str,
    test: str,
    stage: str,
    stage_index: int,
    measure: str,
    seed: int,
    interval: bool = True,
) -> Score:
    """One score: the mean of the per-image ``values`` with its seeded bootstrap interval
    (``interval=False``: the mean alone, for an adaptive audit's round, whose scores are
    merged with the other rounds' and given their interval once at the end)."""
    if not interval:
        values = np.asarray(values, dtype=np.float64)
        finite = values[np.isfinite(values)]
        mean = float(finite.mean()) if finite.size else None
        est = Estimate(mean, None, None, int(finite.size), int(values.size - finite.size))
    else:
        est = bootstrap_mean(values, key_seed(seed, method, test, stage, measure))
    return Score(
        method=method,
        test=test,
        stage=stage,
        stage_index=stage_index,
        measure=measure,
        mean=est.mean,
        ci_low=est.ci_low,
        ci_high=est.ci_high,
        n=est.n,
        n_undefined=est.n_undefined,
        values=tuple(float(v) if np.isfinite(v) else None for v in values),
    )


def scores_of(
    values: dict[str, dict[str, np.ndarray]],
    *,
    test: str,
    stage: str,
    stage_index: int,
    seed: int,
    interval: bool = True,
) -> list[Score]:
    return [
        make_score(
            v,
            method=m,
            test=test,
            stage=stage,
            stage_index=stage_index,
            measure=k,
            seed=seed,
            interval=interval,
        )
        for m, by_measure in values.items()
        for k, v in by_measure.items()
    ]


def examples_of(maps: MapSet, k: int = KEEP_EXAMPLES) -> dict[str, np.ndarray]:
    return {m: v[:k].copy() for m, v in maps.maps.items()}


def discrete_entropy(maps: torch.Tensor, bins: int) -> torch.Tensor:
    """Shannon entropy (natural log) of the histogram of each map's values: ``bins`` equal-width
    bins over that map's [min, max], as Quantus ``discrete_entropy`` (np.histogram then
    scipy.stats.entropy). A constant map has entropy 0. ``maps`` (N, ...) -> (N,) float64."""
    flat = maps.reshape(maps.shape[0], -1).double()
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    scaled = (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)) * bins
    index = scaled.floor().clamp(0, bins - 1).long()  # np.histogram: the last bin is closed
    counts = torch.zeros(flat.shape[0], bins, dtype=torch.float64)
    counts.scatter_add_(1, index, torch.ones_like(flat))
    p = counts / flat.shape[1]
    entropy = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(dim=1)
    return torch.where(span.squeeze(1) > 0, entropy, torch.zeros_like(entropy))


@dataclass
class StateEvaluation:
    """One model state compared with the trained model: per-image similarity per method and
    measure, per-image map entropy per method, the first images' maps, and the maps that
    cannot carry a verdict (their ``stage`` is filled in by the test that uses the state)."""

    similarity: dict[str, dict[str, np.ndarray]]
    entropy: dict[str, np.ndarray]
    examples: dict[str, np.ndarray]
    problems: list[MapProblem] = dataclasses.field(default_factory=list)
    # all-zero or constant maps of a randomized model: legitimate outcomes, reported
    degenerate: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def problems_at(self, stage: str) -> list[MapProblem]:
        return [dataclasses.replace(p, stage=stage) for p in self.problems]


DEGENERATE_DETAIL = "randomized_maps_all_zero_or_constant"


def note_degenerate(result: TestResult, stage: str, counts: dict[str, dict[str, int]]) -> None:
    """Record a randomized model's all-zero or constant maps (legitimate outcomes, see
    :class:`~.policy.MapChecks`) in the test's details: method -> stage -> kind -> images."""
    for method, by_kind in counts.items():
        kept = {k: v for k, v in by_kind.items() if k != "non_finite"}
        if kept:
            result.details.setdefault(DEGENERATE_DETAIL, {}).setdefault(method, {})[stage] = kept


def problems_of(
    maps: MapSet, checks: MapChecks, stage: str, *, trained: bool = True
) -> list[MapProblem]:
    """The maps of ``maps`` that cannot carry a verdict, labeled with ``stage``."""
    return [
        p for found in map_problems(maps, checks, stage, trained=trained).values() for p in found
    ]


class RandomizedStates:
    """Maps of randomized model states, each computed once per audit and compared with the
    trained model's ``reference`` maps."""

    def __init__(
        self,
        inputs: MapInputs,
        reference: MapSet,
        *,
        checks: MapChecks | None = None,
        intervals: bool = True,
    ) -> None:
        self.inputs = inputs
        self.checks = checks or MapChecks()
        # False for an adaptive audit's rounds: their scores get their intervals once merged
        self.intervals = intervals
        # the trained model's maps that cannot carry a verdict: every test reports them
        self.reference_problems = problems_of(reference, self.checks, TRAINED_STAGE)
        self.reference = reference
        self.prepared = PreparedReference(reference)
        self._cache: dict[frozenset[str], StateEvaluation] = {}
        self._randomizer = Randomizer(inputs.module, seed=inputs.spec.seed)

    @property
    def module(self) -> torch.nn.Module:
        return self.inputs.module

    @property
    def images(self) -> torch.Tensor:
        return self.inputs.images

    @property
    def targets(self) -> torch.Tensor:
        return self.inputs.targets

    @property
    def names(self) -> list[str]:
        return list(self.inputs.names)

    @property
    def spec(self) -> AuditSpec:
        return self.inputs.spec

    @property
    def layer(self) -> str | None:
        return self.inputs.layer

    def restore(self) -> None:
        """Put the trained weights back (after a test's last evaluation)."""
        self._randomizer.restore()

    def evaluate(
        self, randomized_modules: Sequence[str], progress: ProgressCallback
    ) -> StateEvaluation:
        key = frozenset(randomized_modules)
        if key not in self._cache:
            # The model stays in this state until the next evaluation or restore(): a cascade
            # then re-draws only the unit it adds (same weights as randomizing from scratch).
            self._randomizer.set(list(randomized_modules))
            try:
                maps = self.inputs.compute(
                    random_control_key="randomized/" + "|".join(sorted(key)), progress=progress
                )
            except BaseException:
                self.restore()
                raise
            self._cache[key] = StateEvaluation(
                similarity=similarity_values(self.prepared, maps, self.names, self.spec.measures),
                entropy=map_entropy(maps, self.spec.params.emprt_bins),
                examples=examples_of(maps),
                problems=problems_of(maps, self.checks, "", trained=not key),
                degenerate=degenerate_maps(maps, self.checks) if key else {},
            )
        return self._cache[key]


def map_entropy(maps: MapSet, bins: int) -> dict[str, np.ndarray]:
    return {m: discrete_entropy(torch.from_numpy(v), bins).numpy() for m, v in maps.maps.items()}


def model_randomization(
    states: RandomizedStates,
    *,
    test: ModelTest,
    granularity: Granularity,
    progress: ProgressCallback = no_progress,
    mode: StageMode = "all",
    rule_stage: Any = None,
) -> TestResult:
    """One model parameter randomization test: a score per stage, method and measure.

    ``mode`` and ``rule_stage`` (the stage selector of the policy's rule for this test) plan
    which stages get maps (:func:`~.contract.stage_plan.plan_stages`); the others are only
    randomized on the way (a stage's state is reached from the last one computed by re-drawing
    the units between them, the same weights a full run draws there)."""
    stage_list = stages(units(states.module, granularity), test)
    total = max((len(s.randomized) for s in stage_list), default=1)
    plan = plan_stages(
        [len(s.randomized) / total for s in stage_list],
        rule_stage,
        mode=mode,
        names=[s.name for s in stage_list],
    )
    computed = set(plan.computed)
    planned = [s for s in stage_list if s.index in computed]
    info = registered_check(test)
    result = TestResult(
        test=test,
        description=info.description,
        reference=info.reference,
        granularity=granularity,
        stages=[StageInfo(s.index, s.name, s.randomized) for s in stage_list],
        details={
            "normalization_handling": NORMALIZATION_HANDLING,
            "stage_zero": "the trained model (every score compares a stage with it)",
        },
        map_problems=list(states.reference_problems),
        stage_plan=plan,
    )
    try:
        for i, stage in enumerate(planned):
            label = f"{test} stage {stage.index}/{len(stage_list)} ({stage.name})"

            def stage_progress(
                f: float, step: str, i: int = i, label: str = label, count: int = len(planned)
            ) -> None:
                progress((i + f) / count, f"{label}: {step}")

            evaluation = states.evaluate(stage.randomized, stage_progress)
            result.example_maps[stage.name] = evaluation.examples
            result.map_problems += evaluation.problems_at(stage.name)
            note_degenerate(result, stage.name, evaluation.degenerate)
            result.scores += scores_of(
                evaluation.similarity,
                test=test,
                stage=stage.name,
                stage_index=stage.index,
                seed=states.spec.seed,
                interval=states.intervals,
            )
    finally:
        states.restore()
    return result


FULL_RANDOMIZATION = "full_randomization"


def emprt(states: RandomizedStates, progress: ProgressCallback = no_progress) -> TestResult:
    """eMPRT: per image, (H(random map) - H(trained map)) / H(trained map) with H the discrete
    entropy of the map's value histogram; the random model has every parameterized module
    re-initialized. Undefined (left out of the mean, counted) where the trained map is constant.
    """
    info = registered_check("emprt")
    everything = tuple(parameterized_modules(states.module))
    try:
        evaluation = states.evaluate(everything, progress)
    finally:
        states.restore()
    trained = map_entropy(states.reference, states.spec.params.emprt_bins)
    result = TestResult(
        test="emprt",
        description=info.description,
        reference=info.reference,
        stages=[StageInfo(1, FULL_RANDOMIZATION, everything)],
        details={
            "measure": "entropy_rise = (H_random - H_trained) / H_trained, natural log",
            "histogram_bins": states.spec.params.emprt_bins,
            "normalization_handling": NORMALIZATION_HANDLING,
            "entropy_trained_mean": {m: float(np.mean(v)) for m, v in trained.items()},
            "entropy_random_mean": {m: float(np.mean(v)) for m, v in evaluation.entropy.items()},
        },
    )
    result.example_maps[FULL_RANDOMIZATION] = evaluation.examples
    result.map_problems = [
        *states.reference_problems,
        *evaluation.problems_at(FULL_RANDOMIZATION),
    ]
    note_degenerate(result, FULL_RANDOMIZATION, evaluation.degenerate)
    for method, before in trained.items():
        after = evaluation.entropy.get(method)
        if after is None:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            rise = np.where(
                before > 0, (after - before) / np.where(before > 0, before, 1.0), np.nan
            )
        result.scores.append(
            make_score(
                rise,
                method=method,
                test="emprt",
                stage=FULL_RANDOMIZATION,
                stage_index=1,
                measure="entropy_rise",
                seed=states.spec.seed,
                interval=states.intervals,
            )
        )
    return result


def _round_key(first_image: int) -> tuple[str, ...]:
    """What a random draw over a batch of images adds to its key when the batch does not start
    the audit (an adaptive audit's later rounds): their own draws, not the first round's."""
    return (str(first_image),) if first_image else ()


def noisy_copies(
    images: torch.Tensor, level: float, samples: int, seed: int, first_image: int = 0
) -> list[torch.Tensor]:
    """sMPRT's inputs: ``samples - 1`` noisy copies of each image, noise sigma =
    ``level * (max - min)`` of that image, and the clean images last (as Quantus SmoothMPRT)."""
    span = (images.amax(dim=(1, 2, 3)) - images.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    out = []
    for k in range(samples - 1):
        key = key_seed(seed, "smprt_noise", str(k), *_round_key(first_image))
        g = torch.Generator().manual_seed(key >> 1)
        noise = torch.randn(images.shape, generator=g, dtype=images.dtype)
        out.append(images + noise * level * span)
    out.append(images)
    return out


def smoothed_maps(
    inputs: MapInputs,
    copies: Sequence[torch.Tensor],
    *,
    random_control_key: str,
    progress: ProgressCallback,
) -> MapSet:
    """Maps of ``inputs`` averaged over the noisy copies of its images (sMPRT's denoised
    explanations)."""
    total: dict[str, np.ndarray] = {}
    errors: dict[str, str] = {}
    conserved: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    last: MapSet | None = None
    for k, x in enumerate(copies):

        def copy_progress(f: float, step: str, k: int = k) -> None:
            progress((k + f) / len(copies), f"noisy copy {k + 1}/{len(copies)}: {step}")

        last = dataclasses.replace(inputs, images=x).compute(
            random_control_key=f"{random_control_key}/{k}", progress=copy_progress
        )
        for method, maps in last.maps.items():
            total[method] = total.get(method, 0.0) + maps.astype(np.float64)
        for method, message in last.errors.items():
            errors.setdefault(method, message)
        for method, pair in last.conservation.items():
            conserved.setdefault(method, []).append(pair)
    assert last is not None
    averaged = {
        m: (v / len(copies)).astype(np.float32) for m, v in total.items() if m not in errors
    }
    return MapSet(
        maps=averaged,
        native_channels=last.native_channels,
        not_applicable=last.not_applicable,
        family_time=last.family_time,
        by_family=last.by_family,
        errors=errors,
        conservation={
            m: (np.concatenate([d for d, _ in pairs]), np.concatenate([s for _, s in pairs]))
            for m, pairs in conserved.items()
            if m not in errors
        },
    )


def smprt(states: RandomizedStates, progress: ProgressCallback = no_progress) -> TestResult:
    """sMPRT at full randomization: noise-averaged maps of the trained model vs noise-averaged
    maps of the model with every parameterized module re-initialized, same noise draws (Quantus
    SmoothMPRT with ``skip_layers=True``, i.e. its last correlation)."""
    info = registered_check("smprt")
    params = states.spec.params
    copies = noisy_copies(
        states.images,
        params.smprt_noise_level,
        params.smprt_samples,
        states.spec.seed,
        states.inputs.first_image,
    )
    trained = smoothed_maps(
        states.inputs,
        copies,
        random_control_key="smprt/trained",
        progress=lambda f, s: progress(0.5 * f, f"trained model: {s}"),
    )
    everything = tuple(parameterized_modules(states.module))
    with randomized(states.module, everything, seed=states.spec.seed):
        random = smoothed_maps(
            states.inputs,
            copies,
            random_control_key="smprt/random",
            progress=lambda f, s: progress(0.5 + 0.5 * f, f"random model: {s}"),
        )
    result = TestResult(
        test="smprt",
        description=info.description,
        reference=info.reference,
        stages=[StageInfo(1, FULL_RANDOMIZATION, everything)],
        details={
            "samples": params.smprt_samples,
            "noise_level": params.smprt_noise_level,
            "noise": "sigma = noise_level * (max(x) - min(x)) per image; the last sample is the "
            "clean image (as Quantus SmoothMPRT)",
            "normalization_handling": NORMALIZATION_HANDLING,
        },
    )
    result.example_maps["trained"] = examples_of(trained)
    result.example_maps[FULL_RANDOMIZATION] = examples_of(random)
    result.map_problems = [
        *problems_of(trained, states.checks, TRAINED_STAGE),
        *problems_of(random, states.checks, FULL_RANDOMIZATION, trained=False),
    ]
    note_degenerate(result, FULL_RANDOMIZATION, degenerate_maps(random, states.checks))
    result.scores = scores_of(
        similarity_values(trained, random, states.names, states.spec.measures),
        test="smprt",
        stage=FULL_RANDOMIZATION,
        stage_index=1,
        seed=states.spec.seed,
        interval=states.intervals,
    )
    return result


def other_classes(
    targets: torch.Tensor, num_classes: int, seed: int, first_image: int = 0
) -> torch.Tensor:
    """For each image a class drawn uniformly from the ``num_classes - 1`` others (seeded)."""
    key = key_seed(seed, "random_logit", *_round_key(first_image))
    g = torch.Generator().manual_seed(key >> 1)
    offset = torch.randint(1, num_classes, targets.shape, generator=g)
    return (targets.cpu() + offset) % num_classes


def random_logit(
    states: RandomizedStates, num_classes: int, progress: ProgressCallback = no_progress
) -> TestResult:
    """Random Logit: the trained model's map for the target vs its map for a random other
    class, same images. Class-sensitive methods give dissimilar maps."""
    info = registered_check("random_logit")
    result = TestResult(
        test="random_logit",
        description=info.description,
        reference=info.reference,
        stages=[StageInfo(1, "random_class")],
    )
    if num_classes < 2:
        result.status = "not_run"
        result.reason = "the model has a single output class"
        return result
    others = other_classes(states.targets, num_classes, states.spec.seed, states.inputs.first_image)
    maps = dataclasses.replace(states.inputs, targets=others).compute(
        random_control_key="random_logit", progress=progress
    )
    result.details = {"other_classes": [int(c) for c in others]}
    result.example_maps["random_class"] = examples_of(maps)
    result.map_problems = [
        *states.reference_problems,
        *problems_of(maps, states.checks, "random_class"),
    ]
    result.scores = scores_of(
        similarity_values(states.prepared, maps, states.names, states.spec.measures),
        test="random_logit",
        stage="random_class",
        stage_index=1,
        seed=states.spec.seed,
        interval=states.intervals,
    )
    return result
