"""What an audit produced: plain dataclasses with a versioned JSON form.

``AuditResult.to_dict()`` is the document the CLI writes as ``report.json`` and the service
stores; ``AuditResult.from_dict`` reads it back (maps are kept out of JSON and travel as arrays).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

# 3: the layers analysis; the service adds dataset, links, artifacts
# 4: method statuses error / degenerate / not_conserved, relevance conservation per method,
#    map problems per test (a report of version 3 still reads)
SCHEMA_VERSION = "4"
READABLE_SCHEMA_VERSIONS = ("3", SCHEMA_VERSION)

VerdictValue = Literal["PASS", "FAIL", "INCONCLUSIVE"]

# ok; not_applicable (the method has no rule for this model, with the reason); error (it raised,
# with the message; the rest of the audit stands); degenerate (its maps on the trained model are
# constant, all zero or not finite); not_conserved (a relevance method lost or created relevance
# beyond the policy's tolerance). The last two are still scored, never decided on.
MethodStatus = Literal["ok", "not_applicable", "error", "degenerate", "not_conserved"]
ProblemKind = Literal["error", "non_finite", "all_zero", "constant", "not_conserved"]


def finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class ScoreSummary:
    """A per-image score reduced over images: mean, sample std and n (NaNs excluded, counted)."""

    mean: float | None
    std: float | None
    n: int
    n_undefined: int = 0

    @classmethod
    def of(cls, values: np.ndarray) -> ScoreSummary:
        values = np.asarray(values, dtype=np.float64).ravel()
        finite = values[np.isfinite(values)]
        n = int(finite.size)
        return cls(
            mean=finite_or_none(float(finite.mean())) if n else None,
            std=finite_or_none(float(finite.std(ddof=1))) if n > 1 else None,
            n=n,
            n_undefined=int(values.size - n),
        )


@dataclass(frozen=True)
class MapStatistics:
    """Statistics of one method's maps (channels reduced), pooled over all audit images."""

    n_images: int
    height: int
    width: int
    native_channels: int  # channels the method produced before reduction (C or 1)
    # None where undefined (non-finite values in the maps)
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    mean_abs: float | None
    fraction_positive: float
    fraction_zero: float
    # Share of total |map| mass in the top 10% of pixels per image, averaged over images whose
    # map is not all zero: 0.1 for a flat map, near 1 for a very concentrated one; None when
    # every map is all zero.
    top10_mass: float | None


@dataclass(frozen=True)
class MapProblem:
    """Why one method's maps in one model state cannot carry a verdict: the method raised
    (``error``), or ``n_images`` of ``n_total`` maps are not finite, all zero (max |m| at or
    below the policy's floor), constant, or their relevance is not conserved."""

    method: str
    stage: str
    kind: ProblemKind
    n_images: int
    n_total: int
    detail: str

    def describe(self) -> str:
        where = "the trained model" if self.stage == TRAINED_STAGE else f"stage {self.stage}"
        if self.kind == "error":
            return f"{self.method} failed at {where}: {self.detail}"
        return f"{self.method} at {where}: {self.n_images} of {self.n_total} maps {self.detail}"


TRAINED_STAGE = "trained"


@dataclass(frozen=True)
class Conservation:
    """How much relevance a relevance method's maps distributed, relative to where it started,
    per image (``ratio``: 1 when conserved). For ``lrp`` the start is the target logit and the
    ratio is the input relevance's sum over it; for ``relevance_cam`` (and LRP stopped at a
    layer) the start is the target's unit relevance and the ratio is the share reaching the
    layer, at most about 1 (biases and skip connections take the rest)."""

    definition: str
    mean: float | None
    min: float | None
    max: float | None
    n: int
    tolerance: float
    within_tolerance: bool


@dataclass(frozen=True)
class MethodResult:
    name: str
    family: str
    status: MethodStatus
    reference: str
    is_control: bool
    layer: str | None = None
    reason: str | None = None
    family_time_s: float | None = None  # wall time of the family's shared passes
    shared_with: tuple[str, ...] = ()
    statistics: MapStatistics | None = None
    # similarity of this method's maps to the edge-detector control, per measure
    similarity_to_sobel: dict[str, ScoreSummary] = field(default_factory=dict)
    conservation: Conservation | None = None
    problems: tuple[MapProblem, ...] = ()


@dataclass(frozen=True)
class Score:
    """One (method, test, stage, measure) score: per-image values, their mean, a seeded
    bootstrap 95% interval of the mean and n (images with a defined value)."""

    method: str
    test: str
    stage: str
    stage_index: int
    measure: str
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    n_undefined: int
    values: tuple[float | None, ...] = field(repr=False)


@dataclass(frozen=True)
class StageInfo:
    """One stage of a test: ``name`` is the unit randomized at this stage (a module name), and
    ``randomized`` every module whose weights are random at it."""

    index: int
    name: str
    randomized: tuple[str, ...] = ()


@dataclass
class TestResult:
    """What one test measured. ``status`` is ``ok``, or ``not_run`` with the ``reason``."""

    __test__: ClassVar[bool] = False  # a result, not a pytest test class

    test: str
    description: str
    reference: str
    status: Literal["ok", "not_run"] = "ok"
    reason: str | None = None
    granularity: str | None = None
    stages: list[StageInfo] = field(default_factory=list)
    scores: list[Score] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    # maps of a (method, stage) that cannot carry a verdict (the trained model's included)
    map_problems: list[MapProblem] = field(default_factory=list)
    # first images' maps per stage and method, for heatmap grids; not part of the JSON document
    example_maps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "test": self.test,
            "description": self.description,
            "reference": self.reference,
            "status": self.status,
            "reason": self.reason,
            "granularity": self.granularity,
            "stages": [asdict(s) for s in self.stages],
            "scores": [asdict(s) for s in self.scores],
            "details": self.details,
            "map_problems": [asdict(p) for p in self.map_problems],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TestResult:
        return cls(
            **{
                **data,
                "stages": [
                    StageInfo(**{**s, "randomized": tuple(s["randomized"])}) for s in data["stages"]
                ],
                "scores": [Score(**{**s, "values": tuple(s["values"])}) for s in data["scores"]],
                "map_problems": [MapProblem(**p) for p in data.get("map_problems", [])],
            }
        )


@dataclass(frozen=True)
class Verdict:
    """PASS / FAIL / INCONCLUSIVE for one (method, test), with the evidence and the rule."""

    method: str
    test: str
    verdict: VerdictValue
    reason: str
    measure: str | None = None
    stage: str | None = None
    threshold: float | None = None
    # the FAIL side's bound: equal to ``threshold`` unless the rule keeps an indifference zone
    fail_threshold: float | None = None
    pass_when: str | None = None
    mean: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int = 0
    is_control: bool = False
    policy_version: str | None = None


@dataclass(frozen=True)
class ImageRecord:
    name: str
    target: int
    target_name: str | None
    predicted: int
    probability: float  # softmax probability of the target class


@dataclass
class AuditResult:
    spec: dict[str, Any]
    model: dict[str, Any]
    images: list[ImageRecord]
    methods: dict[str, MethodResult]
    fidelity: dict[str, Any] | None = None
    environment: dict[str, str] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    tests: dict[str, TestResult] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)
    policy: dict[str, Any] | None = None
    schema_version: str = SCHEMA_VERSION
    # method name -> (N, H, W) float32 maps; not part of the JSON document
    maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "verdicts": [asdict(v) for v in self.verdicts],
            "spec": self.spec,
            "model": self.model,
            "fidelity": self.fidelity,
            "images": [asdict(i) for i in self.images],
            "methods": {k: asdict(v) for k, v in self.methods.items()},
            "environment": self.environment,
            "timings_s": self.timings_s,
            "policy": self.policy,
            "tests": {k: v.to_dict() for k, v in self.tests.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditResult:
        version = data.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise ValueError(f"unsupported report schema_version {version!r}")
        methods = {}
        for name, m in data["methods"].items():
            stats = m.get("statistics")
            conservation = m.get("conservation")
            methods[name] = MethodResult(
                **{
                    **m,
                    "shared_with": tuple(m.get("shared_with", ())),
                    "statistics": MapStatistics(**stats) if stats else None,
                    "similarity_to_sobel": {
                        k: ScoreSummary(**v) for k, v in m.get("similarity_to_sobel", {}).items()
                    },
                    "conservation": Conservation(**conservation) if conservation else None,
                    "problems": tuple(MapProblem(**p) for p in m.get("problems", ())),
                }
            )
        return cls(
            spec=data["spec"],
            model=data["model"],
            images=[ImageRecord(**i) for i in data["images"]],
            methods=methods,
            fidelity=data.get("fidelity"),
            environment=data.get("environment", {}),
            timings_s=data.get("timings_s", {}),
            tests={k: TestResult.from_dict(v) for k, v in data.get("tests", {}).items()},
            verdicts=[Verdict(**v) for v in data.get("verdicts", [])],
            policy=data.get("policy"),
            schema_version=version,
        )
