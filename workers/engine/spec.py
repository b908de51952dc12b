"""What an audit runs on and what it runs: plain, JSON-round-trippable dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .errors import SpecError

Layout = Literal["NCHW", "NHWC"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """How raw images become the model's input tensor.

    A decoded image (RGB, or L when ``channels == 1``) is resized to ``height`` x ``width``,
    scaled linearly from [0, 255] to ``value_range``, then normalized per channel with
    ``(x - mean) / std``. ``layout`` is the layout the *file* expects; the engine always works
    in NCHW and the model adapter permutes for NHWC graphs.
    """

    height: int = 224
    width: int = 224
    channels: int = 3
    layout: Layout = "NCHW"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    value_range: tuple[float, float] = (0.0, 1.0)
    class_names: tuple[str, ...] | None = None

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


@dataclass(frozen=True)
class AuditSpec:
    """What to run. ``layer`` is a module name for the CAM family; None means the last conv."""

    methods: tuple[str, ...]
    layer: str | None = None
    seed: int = 0
    batch_size: int = 16
    device: str = "cpu"
    params: MethodParams = field(default_factory=MethodParams)
    fidelity_atol: float = 1e-3  # max |logit difference| tolerated vs ONNX Runtime

    def __post_init__(self) -> None:
        if not self.methods:
            raise SpecError("at least one method is required")
        if self.batch_size < 1:
            raise SpecError("batch_size must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
