"""What an audit runs on and what it runs, with every bound the engine enforces.

The four shapes are pydantic dataclasses: they stay plain frozen dataclasses for the engine
(``dataclasses.asdict``, ``replace``, equality, tuples), they validate on construction, and
their bounds are ``Field`` metadata, so the engine, the API and the JSON Schema of the OpenAPI
document read the same declaration. Numbers are strict (``"3"`` and ``True`` are not
integers), as the engine always was. A :class:`pydantic.ValidationError` never leaves this
module: :func:`spec_error` turns it into the engine's
:class:`~saliency_audit.workers.engine.errors.SpecError`
in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from annotated_types import Ge, Gt, Le, Lt
from pydantic import ConfigDict, Field, Strict, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from ..errors import SpecError
from .stage_plan import StageMode

Layout = Literal["NCHW", "NHWC"]
ChannelOrder = Literal["RGB", "BGR"]
# Pillow's resampling filters, the two that timm's pretrained_cfg names (bicubic for most)
Interpolation = Literal["bilinear", "bicubic"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The grayscale version of the ImageNet statistics, for one-channel inputs.
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)

# Where a field of the input spec used came from: read from the model file (``graph``: the ONNX
# input's shape and layout, or a torchvision architecture's own head; ``metadata``: the ONNX
# metadata entry ``saliency_audit.input_spec``), from the preprocessing timm publishes for a
# ``timm:NAME`` architecture (``pretrained_cfg``: its input size, mean, std and
# interpolation), ``given`` by the caller (CLI ``--input-spec``, API ``metadata.input_spec``),
# or ``assumed`` (a default nobody stated, such as ImageNet's mean and std).
SpecSource = Literal["graph", "pretrained_cfg", "metadata", "given", "assumed"]
SPEC_SOURCES: tuple[SpecSource, ...] = get_args(SpecSource)

# The tests an audit can run: each is a registered check in workers/engine/checks/ (name,
# description, reference, cost); tests/engine/test_checks.py keeps this list equal to it.
ModelRandomizationTest = Literal["cascading", "cascading_bottom_up", "independent"]
MODEL_RANDOMIZATION_TESTS: tuple[str, ...] = get_args(ModelRandomizationTest)
# analyses measure without deciding a verdict: the per-layer heatmaps and their faithfulness
Analysis = Literal["layers"]
ANALYSES: tuple[str, ...] = get_args(Analysis)
TestName = Literal[
    ModelRandomizationTest, "data_randomization", "smprt", "emprt", "random_logit", Analysis
]
TESTS: tuple[str, ...] = (
    *MODEL_RANDOMIZATION_TESTS,
    "data_randomization",
    "smprt",
    "emprt",
    "random_logit",
    *ANALYSES,
)


def expand_tests(tests: Sequence[str], *, training: bool) -> list[str]:
    """``["all"]``: every test that decides a verdict (not the analyses), the data randomization
    test only when there is something to train on (``training``); ``["none"]``: maps only. The
    CLI, the API and the Python API read the shorthand with this one rule."""
    if list(tests) == ["none"]:
        return []
    if list(tests) == ["all"]:
        return [t for t in TESTS if t not in ANALYSES and (t != "data_randomization" or training)]
    return list(tests)


Measure = Literal["spearman_abs", "spearman", "ssim", "hog_pearson", "hog_spearman"]
MEASURES: tuple[str, ...] = get_args(Measure)
Granularity = Literal["module", "block"]
# the named Zennit composites of workers/engine/methods/lrp.py (a test checks they agree)
LrpComposite = Literal["epsilon_plus_flat", "epsilon_alpha2_beta1", "z_plus"]
LRP_COMPOSITES: tuple[str, ...] = get_args(LrpComposite)

if TYPE_CHECKING:
    # the engine's code reads these fields as plain ints and strings; validation and the
    # schema see the enums below
    Channels = int
    TestField = str
    MeasureField = str
else:
    Channels = Literal[1, 3]
    TestField = TestName
    MeasureField = Measure

AtLeastOne = Annotated[int, Strict(), Field(ge=1)]
NonNegative = Annotated[float, Strict(), Field(ge=0)]
Positive = Annotated[float, Strict(), Field(gt=0)]
Integer = Annotated[int, Strict()]

# --- upper bounds: every request is bounded before it is queued -------------------------------
# Each bound is the largest value a published default or the papers use, times a margin, so no
# real audit meets it while a request cannot ask for unbounded work (issue 18: noise_samples=10^7
# was accepted). The per-pass work they allow is then priced by the cost estimate
# (contract/cost.py) against the tenant's budget.
# Samples and steps: SmoothGrad uses 50 samples (Smilkov et al. 2017), Quantus' sMPRT 50,
# Captum's IG 50 steps (the IG paper 20-300): 1024 is 3x the largest, 20x the usual.
MAX_SAMPLES = 1024
# Rows per pass: 1024 images of 224 px is 600 MB of input alone; larger batches only add memory.
MAX_BATCH = 1024
# eMPRT histogram bins (Quantus: 100); deletion/insertion steps (Petsiuk et al. 2018 use one
# per 224-px row: 224).
MAX_BINS = 10_000
MAX_CURVE_STEPS = 1024
# Training of the data randomization test: the reference CNN needs ~100 epochs (TrainRecipe);
# 10x that; one day of wall time (the worker's hard time limit ends it earlier by default).
MAX_EPOCHS = 2000
MAX_TRAIN_SECONDS = 86_400.0
MAX_TRAIN_BATCH = 4096
# Seeds: torch.manual_seed takes [0, 2^64), numpy's SeedSequence any int >= 0; below 2^63 the seed
# is also a signed 64-bit integer everywhere it may be stored or serialized (SQL BIGINT, int64).
MAX_SEED = 2**63 - 1
# Input side: 4096 px covers whole-slide tiles and satellite crops (ImageNet models use 224-600).
MAX_SIDE = 4096
# Lists: every method (15 today) and test (9) fits with room to grow; a layers analysis of 256
# modules covers a ResNet-152 per block. Names: module paths and method names are short.
MAX_METHODS = 64
MAX_TESTS = 32
MAX_LAYERS = 256
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841 classes
MAX_NAME = 200  # characters of a method, module, device, output or class name
# Noise levels are fractions of the input range (Smilkov et al. use 0.1-0.2): 10 is 50x that.
MAX_NOISE_LEVEL = 10.0
# Score-CAM channels kept per image: the widest usual CAM layers have 1280-2560 channels
# (EfficientNet heads, ResNet-50's 2048); any k at or above a layer's width keeps them all.
MAX_SCORECAM_CHANNELS = 16_384
MAX_TOLERANCE = 1e6  # fidelity tolerances: anything looser than this is no check at all
MAX_LEARNING_RATE = 10.0
MAX_NORMALIZATION = 1e6  # |mean|, std and value_range of an input spec
# Adaptive audits: an image set holds at most 10,000 images (image_files.MAX_IMAGES; a test keeps
# them equal), so neither a round nor the cap can usefully exceed it.
MAX_AUDIT_IMAGES = 10_000
# The tests an adaptive audit runs: those whose per-image scores depend on that image alone and
# are bounded (a similarity in [-1, 1]). Not eMPRT (its entropy rise has no upper bound, which
# the confidence sequence needs), not data randomization (it trains two models per audit), not
# the layers analysis (no verdict to decide).
ADAPTIVE_TESTS: tuple[str, ...] = (
    *MODEL_RANDOMIZATION_TESTS,
    "smprt",
    "random_logit",
)

Name = Annotated[str, Field(max_length=MAX_NAME)]
Samples = Annotated[AtLeastOne, Field(le=MAX_SAMPLES)]
Finite = Annotated[float, Field(ge=-MAX_NORMALIZATION, le=MAX_NORMALIZATION)]

_CONFIG = ConfigDict(extra="forbid")


@dataclass(frozen=True, config=_CONFIG)
class InputSpec:
    """How raw images become the model's input tensor, and which output holds the scores.

    A decoded image (RGB, or L when ``channels == 1``) is resized to ``height`` x ``width``
    (the whole image, no crop, with Pillow's ``interpolation`` filter), put in
    ``channel_order`` (BGR reverses the decoded RGB channels), scaled linearly from [0, 255] to
    ``value_range``, then normalized per channel with ``(x - mean) / std``, where
    ``mean`` and ``std`` are in the model's channel order. ``layout`` is the layout the *file*
    expects; the engine always works in NCHW and the model adapter permutes for NHWC graphs.
    ``output`` names the graph output holding the class scores (its name, or its index among
    the graph's outputs); it is needed only when a graph has several float outputs.
    """

    height: Annotated[AtLeastOne, Field(le=MAX_SIDE)] = 224
    width: Annotated[AtLeastOne, Field(le=MAX_SIDE)] = 224
    channels: Channels = 3
    layout: Layout = "NCHW"
    mean: Annotated[tuple[Finite, ...], Field(min_length=1, max_length=3)] = IMAGENET_MEAN
    std: Annotated[
        tuple[Annotated[Positive, Field(le=MAX_NORMALIZATION)], ...],
        Field(min_length=1, max_length=3),
    ] = IMAGENET_STD
    value_range: Annotated[
        tuple[Finite, Finite], Field(description="[low, high] with high > low")
    ] = (0.0, 1.0)
    class_names: Annotated[tuple[Name, ...], Field(max_length=MAX_CLASSES)] | None = None
    channel_order: Annotated[
        ChannelOrder,
        Field(
            description="The channel order the model was trained on; BGR reverses the decoded "
            "image's channels before scaling. mean and std are in this order."
        ),
    ] = "RGB"
    interpolation: Annotated[
        Interpolation,
        Field(
            description="The resampling filter that resizes an image to height x width: "
            "bilinear, or bicubic (what most timm models were trained with)."
        ),
    ] = "bilinear"
    output: Annotated[
        Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
        | Annotated[int, Strict(), Field(ge=0, le=MAX_CLASSES)]
        | None,
        Field(
            description="The ONNX graph output holding the class scores, by name or index; "
            "required when the graph has several float outputs (422 output_required lists "
            "them). It must be [N, C] with C >= 2 (422 not_a_classifier). A Softmax or "
            "LogSoftmax at its end is left out: maps explain the pre-softmax scores."
        ),
    ] = None

    @model_validator(mode="wrap")
    @classmethod
    def _as_spec_error(cls, data: Any, handler: Callable[[Any], Any]) -> Any:
        return _validated(cls, data, handler)

    def __post_init__(self) -> None:
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.channels):
                raise SpecError(f"{name} needs 1 or {self.channels} values, got {len(values)}")
        lo, hi = self.value_range
        if not hi > lo:
            raise SpecError(f"value_range must be increasing, got {self.value_range}")
        if self.channel_order == "BGR" and self.channels != 3:
            raise SpecError("channel_order BGR needs 3 channels")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        return cls(**_known(cls, data, "input spec"))


@dataclass(frozen=True, config=_CONFIG)
class MethodParams:
    """Parameters shared by the saliency methods (names follow Captum where it has one)."""

    ig_steps: Samples = 32
    ig_baseline: Literal["zero", "black"] = "zero"  # zero = the data set's mean colour
    noise_samples: Samples = 16
    noise_level: Annotated[NonNegative, Field(le=MAX_NOISE_LEVEL)] = (
        0.15  # sigma / (max(x) - min(x)), as in Smilkov et al. 2017
    )
    scorecam_batch: Annotated[AtLeastOne, Field(le=MAX_BATCH)] = 64
    scorecam_channels: Annotated[
        Annotated[AtLeastOne, Field(le=MAX_SCORECAM_CHANNELS)] | None,
        Field(
            description="Score-CAM's channel selection: run only each image's k channels of "
            "the CAM layer with the largest spatial variance of their activation (Faster "
            "Score-CAM) and weight only those; null (the default) runs every channel. A k at "
            "or above the layer's width is every channel. Not the default: it changed "
            "cascading verdicts on the calibration models (bench/RESULTS.md)."
        ),
    ] = None
    lrp_composite: LrpComposite = "epsilon_plus_flat"
    map_reduction: Literal["sum", "max_abs"] = "sum"  # channels -> one map (the paper sums)
    # sMPRT (Hedstrom et al. 2023; Quantus SmoothMPRT defaults): maps averaged over this many
    # noisy copies of each image, noise sigma = level * (max(x) - min(x)) per image
    smprt_samples: Samples = 50
    smprt_noise_level: Annotated[NonNegative, Field(le=MAX_NOISE_LEVEL)] = 0.1
    # eMPRT: histogram bins of the discrete entropy of a map (Quantus discrete_entropy)
    emprt_bins: Annotated[int, Strict(), Field(ge=2, le=MAX_BINS)] = 100
    # layer analysis: steps of the deletion / insertion curves (Petsiuk et al. 2018) and the
    # threshold of the [0, 1]-normalized map for the localization IoU
    faithfulness_steps: Annotated[AtLeastOne, Field(le=MAX_CURVE_STEPS)] = 16
    localization_threshold: Annotated[float, Strict(), Field(gt=0, lt=1)] = 0.5

    @model_validator(mode="wrap")
    @classmethod
    def _as_spec_error(cls, data: Any, handler: Callable[[Any], Any]) -> Any:
        return _validated(cls, data, handler)


@dataclass(frozen=True, config=_CONFIG)
class TrainRecipe:
    """How the data randomization test trains its two copies of the architecture.

    Both copies (permuted labels and true labels) start from a fresh seeded initialization and
    use this recipe: Adam at ``learning_rate``, mini-batches of ``batch_size`` shuffled by a
    seeded generator, no augmentation, until the training accuracy reaches
    ``target_accuracy`` or ``max_epochs`` / ``max_seconds`` run out. With the defaults the
    reference small CNN (BatchNorm folded away by the ONNX export) memorizes the permuted
    labels of scikit-learn's digits (1438 images) in 89 and 98 epochs for seeds 0 and 1; a
    learning rate of 3e-3 was faster for one seed and left another stuck at chance.
    """

    target_accuracy: Annotated[float, Strict(), Field(gt=0, le=1)] = 0.99
    max_epochs: Annotated[AtLeastOne, Field(le=MAX_EPOCHS)] = 200
    max_seconds: Annotated[Positive, Field(le=MAX_TRAIN_SECONDS)] = 1800.0
    batch_size: Annotated[AtLeastOne, Field(le=MAX_TRAIN_BATCH)] = 32
    learning_rate: Annotated[Positive, Field(le=MAX_LEARNING_RATE)] = 1e-3

    @model_validator(mode="wrap")
    @classmethod
    def _as_spec_error(cls, data: Any, handler: Callable[[Any], Any]) -> Any:
        return _validated(cls, data, handler)


@dataclass(frozen=True, config=_CONFIG)
class AdaptiveRounds:
    """Add images in rounds and stop when every verdict is decided (docs/policy.md, "Adaptive
    audits").

    The images are taken in a seeded random order, ``round_images`` at a time, up to
    ``max_images`` (None: every image given). After each round every requested (method, test)
    verdict is decided on an anytime-valid 95% confidence sequence; the audit stops at the
    first round after which none is left undecided, or when the images run out. The report's
    ``adaptive`` block says how many images were used, the rounds and why it stopped.
    """

    round_images: Annotated[
        AtLeastOne,
        Field(
            le=MAX_AUDIT_IMAGES,
            description="Images added per round (a look at the verdicts after each round).",
        ),
    ] = 32
    max_images: Annotated[
        Annotated[AtLeastOne, Field(le=MAX_AUDIT_IMAGES)] | None,
        Field(description="Use at most this many images (null: every image given)."),
    ] = None

    @model_validator(mode="wrap")
    @classmethod
    def _as_spec_error(cls, data: Any, handler: Callable[[Any], Any]) -> Any:
        return _validated(cls, data, handler)


@dataclass(frozen=True, config=_CONFIG)
class AuditSpec:
    """What to run.

    ``layer`` is a module name for the CAM family (None: the deepest conv); ``layers`` are the
    module names the ``layers`` analysis explains (None: the output of every block, shallow to
    deep). ``tests`` are names
    from :data:`TESTS`; ``granularity`` decides the stages of the model randomization tests
    (one per parameterized module, or one per child of the model's root) and ``stages`` which
    of them get maps (:mod:`.stage_plan`); ``measures`` are the
    similarity measures scored; ``policy`` is a policy document (None: the shipped default).
    ``adaptive`` (None: every image at once) adds images in rounds and stops when every
    verdict is decided (:class:`AdaptiveRounds`).
    """

    methods: Annotated[tuple[Name, ...], Field(min_length=1, max_length=MAX_METHODS)]
    layer: Name | None = None
    seed: Annotated[Integer, Field(ge=0, le=MAX_SEED)] = 0
    batch_size: Annotated[AtLeastOne, Field(le=MAX_BATCH)] = 16
    device: Name = "cpu"
    params: MethodParams = dataclasses.field(default_factory=MethodParams)
    fidelity_atol: Annotated[NonNegative, Field(le=MAX_TOLERANCE)] = (
        1e-3  # max |logit difference| tolerated vs ONNX Runtime
    )
    # ... plus this fraction of the image's largest |logit|: float32 rounding grows with the
    # logits (faithful conversions measured at 4e-7 to 1.3e-6 of it, EfficientNet-Lite and a
    # random inception_v3 whose logits reach 2e12 included; docs/onnx.md)
    fidelity_rtol: Annotated[NonNegative, Field(le=MAX_TOLERANCE)] = 1e-5
    tests: Annotated[tuple[TestField, ...], Field(max_length=MAX_TESTS)] = ()
    granularity: Granularity = "block"
    measures: Annotated[tuple[MeasureField, ...], Field(min_length=1, max_length=len(MEASURES))] = (
        MEASURES
    )
    policy: dict[str, Any] | None = None
    training: TrainRecipe = dataclasses.field(default_factory=TrainRecipe)
    layers: Annotated[tuple[Name, ...], Field(min_length=1, max_length=MAX_LAYERS)] | None = None
    stages: Annotated[
        StageMode,
        Field(
            description="Which stages of the model randomization tests get maps: 'rule' (the "
            "stages the policy's rule for the test reads, at most 8 spread over an area's "
            "span, and the last stage) or 'all' (every stage: the full per-unit curve). "
            "Skipped stages are still randomized on the way; the report's stage_plan says "
            "which stages were computed and why."
        ),
    ] = "rule"
    adaptive: AdaptiveRounds | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _as_spec_error(cls, data: Any, handler: Callable[[Any], Any]) -> Any:
        return _validated(cls, data, handler)

    def __post_init__(self) -> None:
        refused = [t for t in self.tests if t not in ADAPTIVE_TESTS]
        if self.adaptive is not None and refused:
            raise SpecError(
                f"an adaptive audit runs only {', '.join(ADAPTIVE_TESTS)}; not "
                f"{', '.join(refused)} (eMPRT's entropy rise is unbounded, data randomization "
                "trains models once per audit, the layers analysis has no verdict): run those "
                "with a fixed image count",
                field="tests",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditSpec:
        """The inverse of :meth:`to_dict` (how the service stores a spec and hands it to a
        worker); unknown fields and parameters are a :class:`SpecError`."""
        return cls(**_known(cls, data, "audit spec"))


# --- errors: pydantic's findings as the engine's SpecError messages ---------------------------

_ALWAYS: dict[str, str] = {
    "methods": "at least one method is required",
    "layers": "layers must name at least one module (or be left out)",
    "fidelity_atol": "fidelity_atol and fidelity_rtol must be >= 0",
    "fidelity_rtol": "fidelity_atol and fidelity_rtol must be >= 0",
    "std": "std values must be positive",
    "measures": "measures must be a non-empty subset of " + ", ".join(MEASURES),
    "lrp_composite": "unknown LRP composite {input!r}; known composites: "
    + ", ".join(sorted(LRP_COMPOSITES)),
    "output": "output must be a graph output's name or its index (>= 0), got {input!r}",
}


def _known(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise SpecError(f"unknown {what} fields: {sorted(unknown)}")
    return dict(data)


def _validated(cls: type, data: Any, handler: Callable[[Any], Any]) -> Any:
    try:
        return handler(data)
    except ValidationError as exc:
        raise spec_error(cls, exc) from None


@cache
def _fields() -> dict[str, Any]:
    """Field name -> its pydantic FieldInfo, across the spec shapes."""
    found: dict[str, Any] = {}
    for shape in (InputSpec, MethodParams, TrainRecipe, AdaptiveRounds, AuditSpec):
        found.update(shape.__pydantic_fields__)  # type: ignore[union-attr]
    return found


def _bounds(name: str, owner: type | None = None) -> str | None:
    """``">= 1"``, ``"<= 10"`` or ``"in [1, 1024]"``: the numeric bounds declared on a field
    (of ``owner`` where two shapes have a field of that name, like ``batch_size``)."""
    declared = getattr(owner, "__pydantic_fields__", {})
    info = declared[name] if name in declared else _fields()[name]
    lower = upper = None
    for item in info.metadata:
        if isinstance(item, Ge | Gt):
            lower = item
        elif isinstance(item, Le | Lt):
            upper = item
    if lower and upper:
        low = f"({lower.gt}" if isinstance(lower, Gt) else f"[{lower.ge}"
        high = f"{upper.lt})" if isinstance(upper, Lt) else f"{upper.le}]"
        return f"in {low}, {high}"
    if lower:
        return f"> {lower.gt}" if isinstance(lower, Gt) else f">= {lower.ge}"
    if upper:
        return f"< {upper.lt}" if isinstance(upper, Lt) else f"<= {upper.le}"
    return None


_BOUND_KINDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
_UPPER_KINDS = {"less_than": "<", "less_than_equal": "<="}
_LENGTH_KINDS = {"too_long": "items", "string_too_long": "characters"}


def _limit_error(
    name: str, owner: type, kind: str, ctx: dict[str, Any], value: Any
) -> SpecError | None:
    """An upper bound or a length limit was passed: say which field, which bound, what came."""
    if kind in _LENGTH_KINDS:
        limit = ctx.get("max_length")
        return SpecError(
            f"{name} must have at most {limit} {_LENGTH_KINDS[kind]}",
            field=name,
            limit=limit,
        )
    if kind in _UPPER_KINDS:
        limit = ctx.get("le", ctx.get("lt"))
        declared = _bounds(name, owner) if name in _fields() else None
        bound = declared or f"{_UPPER_KINDS[kind]} {limit}"
        return SpecError(f"{name} must be {bound}, got {value!r}", field=name, limit=limit)
    return None


def spec_error(cls: type, exc: ValidationError) -> SpecError:
    """The first finding of a spec validation as a :class:`SpecError` with the engine's words
    (e.g. ``ig_steps must be >= 1``, ``unknown tests ['x'] (known: ...)``)."""
    errors = exc.errors(include_url=False)
    fields = _fields()
    first = errors[0]
    names = [part for part in first["loc"] if isinstance(part, str) and part in fields]
    name = names[-1] if names else ""
    kind = first["type"]
    value = first.get("input")
    if kind == "unexpected_keyword_argument":
        unknown = sorted(
            str(e["loc"][-1]) for e in errors if e["type"] == "unexpected_keyword_argument"
        )
        owner = {
            InputSpec: "input spec",
            MethodParams: "params",
            TrainRecipe: "training",
            AdaptiveRounds: "adaptive",
        }
        return SpecError(f"unknown {owner.get(cls, 'audit spec')} fields: {unknown}")
    if name == "tests":
        known = ", ".join(TESTS)
        unknown = [e.get("input") for e in errors if e["loc"][:1] == ("tests",)]
        return SpecError(f"unknown tests {unknown} (known: {known})")
    # a too-long string inside a list is named by its place (``methods.0``)
    named = where_of(first) if kind == "string_too_long" or not name else name
    shape: type = {
        "params": MethodParams,
        "training": TrainRecipe,
        "adaptive": AdaptiveRounds,
    }.get(str(first["loc"][0]), cls)
    limited = _limit_error(named, shape, kind, first.get("ctx", {}), value)
    if limited is not None:
        return limited
    if name in _ALWAYS:
        return SpecError(_ALWAYS[name].format(input=value))
    if kind == "literal_error":
        choices = first.get("ctx", {}).get("expected", "").replace("'", "")
        return SpecError(f"{name} must be {choices}, got {value!r}")
    bounds = _bounds(name, shape) if name else None
    if bounds and kind in _BOUND_KINDS:
        return SpecError(f"{name} must be {bounds}", field=name)
    return SpecError(f"invalid {name or where_of(first)}: {first['msg']} (got {value!r})")


def where_of(error: Any) -> str:
    """A pydantic error's location as a dotted path (``params.noise_samples``, ``std.0``)."""
    return ".".join(str(p) for p in error["loc"])


# --- the limits, as docs/service.md lists them ------------------------------------------------


def _schema_limits(prop: dict[str, Any]) -> list[str]:
    """The bounds a JSON Schema property states, in words (``in [1, 1024]``, ``<= 64 items``)."""
    found: list[str] = []
    for branch in [prop, *prop.get("anyOf", [])]:
        if branch.get("type") == "null":
            continue
        low = branch.get("minimum", branch.get("exclusiveMinimum"))
        high = branch.get("maximum", branch.get("exclusiveMaximum"))
        if low is not None or high is not None:
            left = "(" if "exclusiveMinimum" in branch else "["
            right = ")" if "exclusiveMaximum" in branch else "]"
            found.append(f"in {left}{low}, {high}{right}" if low is not None else f"<= {high}")
        if "maxItems" in branch:
            found.append(f"<= {branch['maxItems']} items")
        if "maxLength" in branch:
            found.append(f"<= {branch['maxLength']} characters")
        parts = [branch["items"]] if branch.get("items") else []
        for part in [*parts, *branch.get("prefixItems", [])]:
            inner = _schema_limits(part)
            if inner:
                found.append("each " + ", ".join(inner))
                break
    return list(dict.fromkeys(found))


def limits() -> list[tuple[str, str, str]]:
    """(shape, field, bounds) of every bounded field of the spec shapes, from the same
    JSON Schema the OpenAPI document shows."""
    from pydantic import TypeAdapter

    rows: list[tuple[str, str, str]] = []
    for shape in (AuditSpec, MethodParams, TrainRecipe, AdaptiveRounds, InputSpec):
        schema = TypeAdapter(shape).json_schema()
        for name, prop in schema["properties"].items():
            words = _schema_limits(prop)
            if words:
                rows.append((shape.__name__, name, "; ".join(words)))
    return rows


def limits_table() -> str:
    """The Markdown table of :func:`limits` that docs/service.md carries (a test compares)."""
    lines = ["| shape | field | bounds |", "| --- | --- | --- |"]
    lines += [f"| {shape} | `{name}` | {bounds} |" for shape, name, bounds in limits()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(limits_table())
