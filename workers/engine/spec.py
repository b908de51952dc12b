"""What an audit runs on and what it runs: plain, JSON-round-trippable dataclasses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .errors import ModelLoadError, OutputRequiredError, Shape, SpecError, UnknownOutputError

Layout = Literal["NCHW", "NHWC"]
ChannelOrder = Literal["RGB", "BGR"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The grayscale version of the ImageNet statistics, for one-channel inputs.
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)

# Where a field of the input spec used came from: read from the model file (``graph``: the ONNX
# input's shape and layout, or a torchvision architecture's own head; ``metadata``: the ONNX
# metadata entry ``saliency_audit.input_spec``), ``given`` by the caller (CLI ``--input-spec``,
# API ``metadata.input_spec``), or ``assumed`` (a default nobody stated, such as ImageNet's
# mean and std).
SpecSource = Literal["graph", "metadata", "given", "assumed"]
SPEC_SOURCES: tuple[SpecSource, ...] = ("graph", "metadata", "given", "assumed")


@dataclass(frozen=True)
class InputSpec:
    """How raw images become the model's input tensor, and which output holds the scores.

    A decoded image (RGB, or L when ``channels == 1``) is resized to ``height`` x ``width``,
    put in ``channel_order`` (BGR reverses the decoded RGB channels), scaled linearly from
    [0, 255] to ``value_range``, then normalized per channel with ``(x - mean) / std``, where
    ``mean`` and ``std`` are in the model's channel order. ``layout`` is the layout the *file*
    expects; the engine always works in NCHW and the model adapter permutes for NHWC graphs.
    ``output`` names the graph output holding the class scores (its name, or its index among
    the graph's outputs); it is needed only when a graph has several float outputs.
    """

    height: int = 224
    width: int = 224
    channels: int = 3
    layout: Layout = "NCHW"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    value_range: tuple[float, float] = (0.0, 1.0)
    class_names: tuple[str, ...] | None = None
    channel_order: ChannelOrder = "RGB"
    output: str | int | None = None

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise SpecError(f"input size must be positive, got {self.height}x{self.width}")
        if self.channels not in (1, 3):
            raise SpecError(f"channels must be 1 or 3, got {self.channels}")
        if self.layout not in ("NCHW", "NHWC"):
            raise SpecError(f"layout must be NCHW or NHWC, got {self.layout!r}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.channels):
                raise SpecError(f"{name} needs 1 or {self.channels} values, got {len(values)}")
        if any(s <= 0 for s in self.std):
            raise SpecError("std values must be positive")
        lo, hi = self.value_range
        if not hi > lo:
            raise SpecError(f"value_range must be increasing, got {self.value_range}")
        if self.channel_order not in ("RGB", "BGR"):
            raise SpecError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")
        if self.channel_order == "BGR" and self.channels != 3:
            raise SpecError("channel_order BGR needs 3 channels")
        if isinstance(self.output, bool) or not (
            self.output is None
            or (isinstance(self.output, str) and self.output)
            or (isinstance(self.output, int) and self.output >= 0)
        ):
            raise SpecError(
                f"output must be a graph output's name or its index (>= 0), got {self.output!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise SpecError(f"unknown input spec fields: {sorted(unknown)}")
        kwargs = dict(data)
        for key in ("mean", "std", "value_range"):
            if key in kwargs and kwargs[key] is not None:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        if kwargs.get("class_names") is not None:
            kwargs["class_names"] = tuple(str(c) for c in kwargs["class_names"])
        return cls(**kwargs)


def default_normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std assumed when nobody states them: ImageNet's (gray for one channel)."""
    return (GRAY_MEAN, GRAY_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)


def resolve_output(
    choice: str | int | None, outputs: Sequence[tuple[str, Shape | None, str]]
) -> int:
    """The index of the graph output an audit explains; ``outputs`` are the graph's outputs as
    (name, shape, ONNX element type name such as ``FLOAT``).

    ``choice`` (the input spec's ``output``) picks one by name or index. Without it the graph
    must have exactly one float32 output (an integer label output beside it is no candidate:
    it has no gradient); several float outputs are refused with the list of them, because
    taking the first would be a guess.
    """
    if choice is not None:
        if isinstance(choice, int):
            if not 0 <= choice < len(outputs):
                raise UnknownOutputError(
                    choice, outputs, f"is not an index from 0 to {len(outputs) - 1}"
                )
            index = choice
        else:
            names = [name for name, _, _ in outputs]
            if choice not in names:
                raise UnknownOutputError(choice, outputs, "is not an output of the graph")
            index = names.index(choice)
        if outputs[index][2] != "FLOAT":
            raise UnknownOutputError(
                choice, outputs, f"is {outputs[index][2]}, not float32 class scores"
            )
        return index
    floats = [i for i, (_, _, dtype) in enumerate(outputs) if dtype == "FLOAT"]
    if not floats:
        raise ModelLoadError("the graph has no float32 output to explain")
    if len(floats) > 1:
        raise OutputRequiredError(outputs)
    return floats[0]


@dataclass(frozen=True)
class MethodParams:
    """Parameters shared by the saliency methods (names follow Captum where it has one)."""

    ig_steps: int = 32
    ig_baseline: Literal["zero", "black"] = "zero"  # zero = the data set's mean colour
    noise_samples: int = 16
    noise_level: float = 0.15  # sigma / (max(x) - min(x)), as in Smilkov et al. 2017
    scorecam_batch: int = 64
    lrp_composite: str = "epsilon_plus_flat"
    map_reduction: Literal["sum", "max_abs"] = "sum"  # channels -> one map (the paper sums)
    # sMPRT (Hedstrom et al. 2023; Quantus SmoothMPRT defaults): maps averaged over this many
    # noisy copies of each image, noise sigma = level * (max(x) - min(x)) per image
    smprt_samples: int = 50
    smprt_noise_level: float = 0.1
    # eMPRT: histogram bins of the discrete entropy of a map (Quantus discrete_entropy)
    emprt_bins: int = 100
    # layer analysis: steps of the deletion / insertion curves (Petsiuk et al. 2018) and the
    # threshold of the [0, 1]-normalized map for the localization IoU
    faithfulness_steps: int = 16
    localization_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.ig_steps < 1:
            raise SpecError("ig_steps must be >= 1")
        if self.ig_baseline not in ("zero", "black"):
            raise SpecError(f"ig_baseline must be 'zero' or 'black', not {self.ig_baseline!r}")
        if self.noise_samples < 1:
            raise SpecError("noise_samples must be >= 1")
        if self.noise_level < 0:
            raise SpecError("noise_level must be >= 0")
        if self.scorecam_batch < 1:
            raise SpecError("scorecam_batch must be >= 1")
        if self.map_reduction not in ("sum", "max_abs"):
            raise SpecError(f"map_reduction must be 'sum' or 'max_abs', not {self.map_reduction!r}")
        if self.smprt_samples < 1:
            raise SpecError("smprt_samples must be >= 1")
        if self.smprt_noise_level < 0:
            raise SpecError("smprt_noise_level must be >= 0")
        if self.emprt_bins < 2:
            raise SpecError("emprt_bins must be >= 2")
        if self.faithfulness_steps < 1:
            raise SpecError("faithfulness_steps must be >= 1")
        if not 0 < self.localization_threshold < 1:
            raise SpecError("localization_threshold must be in (0, 1)")


# The tests an audit can run (descriptions and references: workers/engine/sanity.py TEST_INFO).
MODEL_RANDOMIZATION_TESTS = ("cascading", "cascading_bottom_up", "independent")
# analyses measure without deciding a verdict: the per-layer heatmaps and their faithfulness
ANALYSES: tuple[str, ...] = ("layers",)
TESTS: tuple[str, ...] = (
    *MODEL_RANDOMIZATION_TESTS,
    "data_randomization",
    "smprt",
    "emprt",
    "random_logit",
    *ANALYSES,
)
MEASURES: tuple[str, ...] = ("spearman_abs", "spearman", "ssim", "hog_pearson", "hog_spearman")
Granularity = Literal["module", "block"]


@dataclass(frozen=True)
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

    target_accuracy: float = 0.99
    max_epochs: int = 200
    max_seconds: float = 1800.0
    batch_size: int = 32
    learning_rate: float = 1e-3

    def __post_init__(self) -> None:
        if not 0 < self.target_accuracy <= 1:
            raise SpecError("target_accuracy must be in (0, 1]")
        if self.max_epochs < 1:
            raise SpecError("max_epochs must be >= 1")
        if self.max_seconds <= 0:
            raise SpecError("max_seconds must be > 0")
        if self.batch_size < 1:
            raise SpecError("batch_size must be >= 1")
        if not self.learning_rate > 0:
            raise SpecError("learning_rate must be > 0")


@dataclass(frozen=True)
class AuditSpec:
    """What to run.

    ``layer`` is a module name for the CAM family (None: the deepest conv); ``layers`` are the
    module names the ``layers`` analysis explains (None: the output of every block, shallow to
    deep). ``tests`` are names
    from :data:`TESTS`; ``granularity`` decides the stages of the model randomization tests
    (one per parameterized module, or one per child of the model's root); ``measures`` are the
    similarity measures scored; ``policy`` is a policy document (None: the shipped default).
    """

    methods: tuple[str, ...]
    layer: str | None = None
    seed: int = 0
    batch_size: int = 16
    device: str = "cpu"
    params: MethodParams = field(default_factory=MethodParams)
    fidelity_atol: float = 1e-3  # max |logit difference| tolerated vs ONNX Runtime
    # ... plus this fraction of the image's largest |logit|: float32 rounding grows with the
    # logits (faithful conversions measured at 4e-7 to 1.3e-6 of it, EfficientNet-Lite and a
    # random inception_v3 whose logits reach 2e12 included; docs/onnx.md)
    fidelity_rtol: float = 1e-5
    tests: tuple[str, ...] = ()
    granularity: Granularity = "block"
    measures: tuple[str, ...] = MEASURES
    policy: dict[str, Any] | None = None
    training: TrainRecipe = field(default_factory=TrainRecipe)
    layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.layers is not None and not self.layers:
            raise SpecError("layers must name at least one module (or be left out)")
        if not self.methods:
            raise SpecError("at least one method is required")
        if self.batch_size < 1:
            raise SpecError("batch_size must be >= 1")
        unknown = [t for t in self.tests if t not in TESTS]
        if unknown:
            raise SpecError(f"unknown tests {unknown} (known: {', '.join(TESTS)})")
        if self.granularity not in ("module", "block"):
            raise SpecError(f"granularity must be 'module' or 'block', not {self.granularity!r}")
        bad = [m for m in self.measures if m not in MEASURES]
        if bad or not self.measures:
            raise SpecError(f"measures must be a non-empty subset of {', '.join(MEASURES)}")
        if not (self.fidelity_atol >= 0 and self.fidelity_rtol >= 0):
            raise SpecError("fidelity_atol and fidelity_rtol must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditSpec:
        """The inverse of :meth:`to_dict` (how the service stores a spec and hands it to a
        worker); unknown fields and parameters are a :class:`SpecError`."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SpecError(f"unknown audit spec fields: {sorted(unknown)}")
        kwargs = dict(data)
        for key in ("methods", "tests", "measures", "layers"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        for key, kind in (("params", MethodParams), ("training", TrainRecipe)):
            value = kwargs.get(key)
            if isinstance(value, dict):
                try:
                    kwargs[key] = kind(**value)
                except TypeError as exc:
                    raise SpecError(f"invalid {key}: {exc}") from None
        return cls(**kwargs)
