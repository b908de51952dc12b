"""What an audit produced: plain dataclasses with a versioned JSON form.

``AuditResult.to_dict()`` is the document the CLI writes as ``report.json`` and the service
stores; ``AuditResult.from_dict`` reads it back (maps are kept out of JSON and travel as arrays).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

SCHEMA_VERSION = "1"

MethodStatus = Literal["ok", "not_applicable"]


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
    schema_version: str = SCHEMA_VERSION
    # method name -> (N, H, W) float32 maps; not part of the JSON document
    maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "spec": self.spec,
            "model": self.model,
            "fidelity": self.fidelity,
            "images": [asdict(i) for i in self.images],
            "methods": {k: asdict(v) for k, v in self.methods.items()},
            "environment": self.environment,
            "timings_s": self.timings_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditResult:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"unsupported report schema_version {version!r}")
        methods = {}
        for name, m in data["methods"].items():
            stats = m.get("statistics")
            methods[name] = MethodResult(
                **{
                    **m,
                    "shared_with": tuple(m.get("shared_with", ())),
                    "statistics": MapStatistics(**stats) if stats else None,
                    "similarity_to_sobel": {
                        k: ScoreSummary(**v) for k, v in m.get("similarity_to_sobel", {}).items()
                    },
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
            schema_version=version,
        )
