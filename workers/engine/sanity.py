"""Model parameter randomization tests (Adebayo et al. 2018, section 3.1), scored per image.

For every stage of a test, the maps of the partly randomized model are compared with the maps
of the trained model on the same images, targets and noise draws, with every similarity measure.
Each (method, test, stage, measure) keeps its per-image scores and is reduced to a mean with a
seeded bootstrap 95% interval and n (DOMAIN.md section 5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import similarity
from .randomization import Granularity, ModelTest, Stage, randomized, stages, units
from .runner import MapSet, compute_maps
from .spec import AuditSpec
from .stats import bootstrap_mean, key_seed

ProgressCallback = Callable[[float, str], None]


@dataclass(frozen=True)
class Score:
    """One (method, test, stage, measure) similarity: per-image values and their summary."""

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


def score_pair(
    reference: np.ndarray,
    other: np.ndarray,
    *,
    method: str,
    test: str,
    stage: str,
    stage_index: int,
    measures: Sequence[str],
    seed: int,
) -> list[Score]:
    """Similarity of two map sets (N, H, W) with each measure the map size allows."""
    a, b = torch.from_numpy(reference), torch.from_numpy(other)
    out = []
    for measure in measures:
        if min(a.shape[-2:]) < similarity.MIN_MAP_SIDE_PX[measure]:
            continue
        values = similarity.MEASURES[measure](a, b).numpy()
        est = bootstrap_mean(values, key_seed(seed, method, test, stage, measure))
        out.append(
            Score(
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
        )
    return out


@dataclass
class ModelRandomizationOutcome:
    test: str
    granularity: str
    stages: list[Stage]
    scores: list[Score]
    # first few images' maps per stage, for heatmap grids: stage name -> method -> (k, H, W)
    example_maps: dict[str, dict[str, np.ndarray]]


def model_randomization(
    module: torch.nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    names: Sequence[str],
    spec: AuditSpec,
    layer: str | None,
    reference: MapSet,
    *,
    test: ModelTest,
    granularity: Granularity,
    measures: Sequence[str],
    device: torch.device,
    keep_examples: int = 4,
    progress: ProgressCallback = lambda f, s: None,
) -> ModelRandomizationOutcome:
    """Run one model randomization test; ``reference`` holds the trained model's maps."""
    stage_list = stages(units(module, granularity), test)
    scores: list[Score] = []
    examples: dict[str, dict[str, np.ndarray]] = {}
    for i, stage in enumerate(stage_list):
        label = f"{test} stage {stage.index}/{len(stage_list)} ({stage.name})"

        def stage_progress(f: float, step: str, i: int = i, label: str = label) -> None:
            progress((i + f) / len(stage_list), f"{label}: {step}")

        with randomized(module, stage.randomized, seed=spec.seed, test=test):
            current = compute_maps(
                module,
                images,
                targets,
                names,
                spec,
                layer,
                device=device,
                random_control_key=f"{test}/{stage.index}",
                progress=stage_progress,
            )
        examples[stage.name] = {m: v[:keep_examples] for m, v in current.maps.items()}
        for method in names:
            if method not in reference.maps or method not in current.maps:
                continue
            scores += score_pair(
                reference.maps[method],
                current.maps[method],
                method=method,
                test=test,
                stage=stage.name,
                stage_index=stage.index,
                measures=measures,
                seed=spec.seed,
            )
    return ModelRandomizationOutcome(test, granularity, stage_list, scores, examples)
