"""What an audit produced, and the ``report.json`` document that carries it.

The result shapes the engine builds by the thousand (scores, summaries, map statistics, method
and test results, images) are plain frozen dataclasses: no validation cost at construction,
``dataclasses.asdict`` writes them, and pydantic derives their JSON Schema from the same
declaration (``__pydantic_config__``: closed objects, every key required as written). The
blocks that only exist as JSON (the report's spec summary, model, fidelity check, and what the
service adds) are pydantic models. :class:`ReportDocument` is the whole document;
``workers/reports/schema.py`` publishes its schema.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, computed_field, create_model
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic.json_schema import SkipJsonSchema

from .spec import InputSpec, SpecSource
from .stage_plan import StagePlan
from .verdicts import Count, Verdict, VerdictValue

__all__ = ["Verdict", "VerdictValue"]

# 3: the layers analysis; the service adds dataset, links, artifacts
# 4: method statuses error / degenerate / not_conserved, relevance conservation per method,
#    map problems per test (a report of version 3 still reads)
# 5: a stage plan per model randomization test (which stages got maps, and why); stages that
#    were randomized on the way but not measured have no scores (versions 3 and 4 still read)
# 6: the input spec's interpolation, and its source pretrained_cfg (timm architectures);
#    a report of version 5 still reads
# 7: ``adaptive``, the account of an audit that added images in rounds (reports of versions
#    3 to 6 still read)
SchemaVersion = Literal["7"]
SCHEMA_VERSION: str = get_args(SchemaVersion)[0]
READABLE_SCHEMA_VERSIONS = ("3", "4", "5", "6", SCHEMA_VERSION)

# ok; not_applicable (the method has no rule for this model, with the reason); error (it raised,
# with the message; the rest of the audit stands); degenerate (its maps on the trained model are
# constant, all zero or not finite); not_conserved (a relevance method lost or created relevance
# beyond the policy's tolerance). The last two are still scored, never decided on.
MethodStatus = Literal["ok", "not_applicable", "error", "degenerate", "not_conserved"]
ProblemKind = Literal["error", "non_finite", "all_zero", "constant", "not_conserved"]
# the pictures of an audit's maps the service stores and links
PictureKind = Literal["heatmap_png", "overlay_png"]
PICTURE_KINDS: tuple[PictureKind, ...] = get_args(PictureKind)

Sha256 = Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
Probability = Annotated[float, Field(ge=0, le=1)]


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def optional(**extra: Any) -> Any:
    """A key a document may leave out (default None), documented by its type alone."""
    return Field(default=None, json_schema_extra=_no_default, **extra)


# the result dataclasses: closed, and every key present in the document
_WRITTEN = ConfigDict(
    extra="forbid", json_schema_serialization_defaults_required=True, arbitrary_types_allowed=True
)
TRAINED_STAGE = "trained"


def finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class ScoreSummary:
    """A per-image score reduced over images: mean, sample std and n (NaNs excluded, counted)."""

    __pydantic_config__ = _WRITTEN

    mean: float | None
    std: float | None
    n: Count
    n_undefined: Count = 0

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

    __pydantic_config__ = _WRITTEN

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

    __pydantic_config__ = _WRITTEN

    method: str
    stage: str
    kind: ProblemKind
    n_images: Count
    n_total: Count
    detail: str

    def describe(self) -> str:
        where = "the trained model" if self.stage == TRAINED_STAGE else f"stage {self.stage}"
        if self.kind == "error":
            return f"{self.method} failed at {where}: {self.detail}"
        return f"{self.method} at {where}: {self.n_images} of {self.n_total} maps {self.detail}"


@dataclass(frozen=True)
class Conservation:
    """How much relevance a relevance method's maps distributed, relative to where it started,
    per image (``ratio``: 1 when conserved). For ``lrp`` the start is the target logit and the
    ratio is the input relevance's sum over it; for ``relevance_cam`` (and LRP stopped at a
    layer) the start is the target's unit relevance and the ratio is the share reaching the
    layer, at most about 1 (biases and skip connections take the rest)."""

    __pydantic_config__ = _WRITTEN

    definition: str
    mean: float | None
    min: float | None
    max: float | None
    n: Count
    tolerance: Annotated[float, Field(ge=0)]
    within_tolerance: bool


@dataclass(frozen=True)
class MethodResult:
    __pydantic_config__ = _WRITTEN

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

    __pydantic_config__ = _WRITTEN

    method: str
    test: str
    stage: str
    stage_index: Count
    measure: str
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    n: Count
    n_undefined: Count
    values: tuple[float | None, ...] = field(repr=False)


@dataclass(frozen=True)
class StageInfo:
    """One stage of a test: ``name`` is the unit randomized at this stage (a module name), and
    ``randomized`` every module whose weights are random at it."""

    __pydantic_config__ = _WRITTEN

    index: int
    name: str
    randomized: tuple[str, ...] = ()


@dataclass
class TestResult:
    """What one test measured. ``status`` is ``ok``, or ``not_run`` with the ``reason``.

    ``stages`` are every stage of the test; a model randomization test's ``stage_plan`` says
    which of them got maps (and scores), and why; the others were randomized on the way only.
    Without a plan every stage was measured."""

    __test__: ClassVar[bool] = False  # a result, not a pytest test class
    __pydantic_config__ = _WRITTEN

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
    stage_plan: StagePlan | None = None
    # first images' maps per stage and method, for heatmap grids; not part of the JSON document
    example_maps: SkipJsonSchema[dict[str, dict[str, np.ndarray]]] = field(
        default_factory=dict, repr=False
    )

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
            "stage_plan": asdict(self.stage_plan) if self.stage_plan is not None else None,
        }

    def measured(self) -> list[StageInfo]:
        """The stages that got maps, in order (every stage when there is no plan)."""
        if self.stage_plan is None:
            return list(self.stages)
        computed = set(self.stage_plan.computed)
        return [s for s in self.stages if s.index in computed]

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
                "stage_plan": StagePlan.from_dict(data["stage_plan"])
                if data.get("stage_plan") is not None
                else None,
            }
        )


@dataclass(frozen=True)
class ImageRecord:
    __pydantic_config__ = _WRITTEN

    name: str
    target: Count
    target_name: str | None
    predicted: Count
    probability: Probability  # softmax probability of the target class


@dataclass(frozen=True)
class AdaptiveRound:
    """One round of an adaptive audit: ``images`` used after it (all rounds so far), how many
    verdicts were then decided (PASS or FAIL) and how many were still pending (INCONCLUSIVE
    with an interval that more images could move)."""

    __pydantic_config__ = _WRITTEN

    round: Annotated[int, Field(ge=1)]
    images: Annotated[int, Field(ge=1)]
    decided: Count
    pending: Count


@dataclass(frozen=True)
class AdaptiveRun:
    """How an adaptive audit (spec ``adaptive``) went: images taken in ``order``,
    ``round_images`` at a time, up to ``max_images``; it used ``images_used`` of the
    ``images_available`` and ``stopped`` because every verdict was ``decided`` or the images
    were ``exhausted`` (``reason`` in words, naming what was left undecided). Its verdicts
    rest on the ``interval`` named here (``confidence``), not on the scores' bootstrap
    intervals, which describe the images used."""

    __pydantic_config__ = _WRITTEN

    round_images: Annotated[int, Field(ge=1)]
    max_images: Annotated[int, Field(ge=1)] | None
    images_available: Annotated[int, Field(ge=1)]
    images_used: Annotated[int, Field(ge=1)]
    stopped: Literal["decided", "exhausted"]
    reason: str
    interval: str
    confidence: Probability
    order: str
    rounds: tuple[AdaptiveRound, ...]


# --- the blocks of report.json that exist only as JSON ----------------------------------------

_OPEN = ConfigDict(extra="allow")
_CLOSED = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)


class ReportSpec(BaseModel):
    """The audit spec as run (``AuditSpec.to_dict()``) and the CAM layer it resolved to."""

    model_config = _OPEN

    methods: list[str]
    seed: int
    tests: list[str]
    measures: list[str]
    resolved_layer: str | None


# where each field of the input spec used came from (every field of InputSpec, closed)
InputSpecSources: type[BaseModel] = create_model(
    "InputSpecSources",
    __config__=_CLOSED,
    __doc__="Where each field of input_spec came from: graph (the model file's graph or "
    "architecture), pretrained_cfg (the preprocessing timm publishes for a timm:NAME "
    "architecture), metadata (the ONNX metadata entry saliency_audit.input_spec), given (the "
    "user's input spec) or assumed (a default nobody stated).",
    **{f.name: (SpecSource, ...) for f in fields(InputSpec)},  # type: ignore[call-overload]
)


SoftmaxHead = Literal["Softmax", "LogSoftmax"]
Explained = Literal["pre_softmax_scores", "output"]
ProbabilitiesFrom = Literal["graph_output", "exp_graph_output", "softmax_of_output"]

# How the reported probabilities relate to the file's output (they are always the softmax of
# what ``LoadedModel.module`` returns): the graph's own Softmax output, the exp of its
# LogSoftmax output, or the softmax of an output that holds unnormalized scores (logits).
PROBABILITIES: dict[SoftmaxHead | None, ProbabilitiesFrom] = {
    "Softmax": "graph_output",
    "LogSoftmax": "exp_graph_output",
    None: "softmax_of_output",
}


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ModelOutput:
    """Which output of the model an audit explains.

    ``name`` is the graph output (ONNX) or the classification head (torchvision); ``index`` its
    position among the graph's outputs; ``shape`` its shape ([N, C], None for dynamic dims).
    ``head_removed`` is ``Softmax`` or ``LogSoftmax`` when the graph ends in one (possibly
    followed by shape-only ops): the converted module then stops before it and returns the
    pre-softmax scores, so saliency targets a score and not a saturated probability, and
    softmax of those scores is the graph's own output (never softmax applied twice).
    ``scores`` is the graph tensor the module returns (the head's input, or the output
    itself): the fidelity check compares the module with ONNX Runtime's value of it.
    ``explained`` and ``probabilities`` are derived (report.json holds them too).
    """

    name: str
    index: Count
    shape: tuple[int | None, ...] | None
    num_classes: int | None
    head_removed: SoftmaxHead | None = None
    scores: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def explained(self) -> Explained:
        """What saliency maps are computed on."""
        return "pre_softmax_scores" if self.head_removed else "output"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def probabilities(self) -> ProbabilitiesFrom:
        """How the reported probabilities relate to the graph's output."""
        return PROBABILITIES[self.head_removed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "index": self.index,
            "shape": list(self.shape) if self.shape is not None else None,
            "num_classes": self.num_classes,
            "head_removed": self.head_removed,
            "scores": self.scores,
            "explained": self.explained,
            "probabilities": self.probabilities,
        }


class ReportModel(BaseModel):
    """The audited model: its file's fingerprint, the input spec used and the output."""

    model_config = _OPEN

    source: Any
    sha256: Sha256
    input_spec: InputSpec = Field(description="The input spec used.")
    num_classes: int
    input_spec_sources: InputSpecSources | SkipJsonSchema[None] = optional()  # type: ignore[valid-type]
    output: ModelOutput | None = None


NonNegative = Annotated[float, Field(ge=0)]
# a key older reports may leave out: documented by its type alone, no default in the schema
_NOT_WRITTEN_BEFORE_V4 = Field(json_schema_extra=_no_default)


@dataclass(frozen=True)
class Fidelity:
    """How closely the converted module follows ONNX Runtime on one batch.

    ``max_abs_diff`` is the largest absolute logit difference over all images and classes;
    ``max_rel_diff`` the largest over images of that image's largest difference divided by its
    largest absolute ONNX Runtime logit; ``argmax_agreement`` the fraction (0..1) of images
    whose top class is the same in both. ``passed``: every image's largest difference is at
    most ``atol + rtol`` x its largest absolute logit. The engine writes every field;
    ``max_rel_diff``, ``rtol``, ``provider`` and ``passed`` may be missing from version 3
    reports written before the relative tolerance.
    """

    # open, as before: a reader of older reports may meet keys this version does not write
    __pydantic_config__ = ConfigDict(extra="allow")

    max_abs_diff: float
    argmax_agreement: Probability
    n_images: Annotated[int, Field(ge=1)]
    atol: NonNegative
    max_rel_diff: Annotated[float | SkipJsonSchema[None], _NOT_WRITTEN_BEFORE_V4] = None
    rtol: Annotated[NonNegative | SkipJsonSchema[None], _NOT_WRITTEN_BEFORE_V4] = None
    provider: Annotated[str | SkipJsonSchema[None], _NOT_WRITTEN_BEFORE_V4] = None
    passed: Annotated[bool | SkipJsonSchema[None], _NOT_WRITTEN_BEFORE_V4] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Heatmap(BaseModel):
    """One stored picture of a map: a heatmap or an overlay of one image at one stage."""

    model_config = _CLOSED

    kind: PictureKind
    method: str
    test: str
    stage: str
    image: str
    sha256: Sha256
    url: str


class ReportArtifact(Heatmap):
    """A picture as report.json links it, with its media type."""

    media_type: str


class ReportDataset(BaseModel):
    model_config = _OPEN

    id: Any
    sha256: Sha256
    n_images: int


class ReportDocument(BaseModel):
    """What one audit measured and decided: verdicts per (method, test) with the policy, every
    score per (method, test, stage, measure) with its per-image values, mean, 95% bootstrap
    interval and n, the model and data fingerprints, the fidelity check of a converted ONNX
    graph, the environment, and (from the service) links to every artifact."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Annotated[SchemaVersion, WithJsonSchema({"const": SCHEMA_VERSION})]
    verdicts: list[Verdict]
    spec: ReportSpec
    model: ReportModel
    fidelity: Fidelity | None
    images: Annotated[list[ImageRecord], Field(min_length=1)]
    methods: dict[str, MethodResult]
    environment: dict[str, str]
    timings_s: dict[str, float]
    policy: dict[str, Any] | None
    tests: dict[str, TestResult]
    # an adaptive audit's rounds and why it stopped (absent from a fixed audit's report)
    adaptive: AdaptiveRun | SkipJsonSchema[None] = optional()
    # what the service adds to what ``saliency-audit run`` writes
    audit_id: str | SkipJsonSchema[None] = optional()
    created_at: datetime | None = Field(default=None, description="When the audit was submitted.")
    dataset: ReportDataset | SkipJsonSchema[None] = optional()
    links: dict[str, str] | SkipJsonSchema[None] = optional()
    artifacts: list[ReportArtifact] | SkipJsonSchema[None] = optional()
