"""What an audit produced: plain dataclasses with a versioned JSON form.

``AuditResult.to_dict()`` is the document the CLI writes as ``report.json`` and the service
stores; ``AuditResult.from_dict`` reads it back (maps are kept out of JSON and travel as arrays).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The shapes are declared once, in the contract (torch-free, shared with the API and the
# report schema); the engine's in-memory result around them stays here.
from .contract.report import (
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    TRAINED_STAGE,
    AdaptiveRound,
    AdaptiveRun,
    Conservation,
    Fidelity,
    ImageRecord,
    MapProblem,
    MapStatistics,
    MethodResult,
    MethodStatus,
    ProblemKind,
    Score,
    ScoreSummary,
    StageInfo,
    TestResult,
    finite_or_none,
)
from .contract.verdicts import Verdict, VerdictValue

__all__ = [
    "READABLE_SCHEMA_VERSIONS",
    "SCHEMA_VERSION",
    "TRAINED_STAGE",
    "AdaptiveRound",
    "AdaptiveRun",
    "AuditResult",
    "Conservation",
    "Fidelity",
    "ImageRecord",
    "MapProblem",
    "MapStatistics",
    "MethodResult",
    "MethodStatus",
    "ProblemKind",
    "Score",
    "ScoreSummary",
    "StageInfo",
    "TestResult",
    "Verdict",
    "VerdictValue",
    "finite_or_none",
]


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
    # an adaptive audit's rounds and why it stopped; None for a fixed audit
    adaptive: AdaptiveRun | None = None
    schema_version: str = SCHEMA_VERSION
    # method name -> (N, H, W) float32 maps; not part of the JSON document
    maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        document = {
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
        if self.adaptive is not None:
            document["adaptive"] = asdict(self.adaptive)
        return document

    def write(self, folder: str | Path) -> Path:
        """Write ``report.json`` and ``maps.npz`` (method -> (N, H, W) maps) into ``folder``,
        as ``saliency-audit run`` does; returns the report's path."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        report = out / "report.json"
        report.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        np.savez_compressed(out / "maps.npz", **self.maps)  # type: ignore[arg-type]
        return report

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
            adaptive=_adaptive(data.get("adaptive")),
            schema_version=version,
        )


def _adaptive(data: dict[str, Any] | None) -> AdaptiveRun | None:
    if data is None:
        return None
    rounds = tuple(AdaptiveRound(**r) for r in data["rounds"])
    return AdaptiveRun(**{**data, "rounds": rounds})
