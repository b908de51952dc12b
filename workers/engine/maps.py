"""Maps of one model state: every requested method on every image, batch by batch.

Each method family runs once per batch (methods that share passes share them). Noise draws
depend only on (seed, batch), so two model states see the same noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import similarity
from .errors import NotApplicableError
from .methods import METHODS, MethodContext, compute_methods, method_info
from .spec import AuditSpec
from .stats import key_seed

ProgressCallback = Callable[[float, str], None]

CONTROLS: tuple[str, ...] = ("control_sobel", "control_random")


def _no_progress(fraction: float, step: str) -> None:
    pass


def methods_to_run(requested: Sequence[str]) -> list[str]:
    """The requested methods (validated, de-duplicated) plus the two controls every run has."""
    names = [method_info(n).name for n in dict.fromkeys(requested)]
    return names + [c for c in CONTROLS if c not in names]


def batch_generator(seed: int, batch_start: int) -> torch.Generator:
    """One generator per batch, derived from the audit seed and the batch's first image index,
    so a run is reproducible for a given (seed, batch_size) whatever else runs in the process."""
    return torch.Generator().manual_seed(key_seed(seed, "batch", str(batch_start)) >> 1)


@dataclass
class MapSet:
    """The maps of one model state: method -> (N, H, W) float32, channels reduced."""

    maps: dict[str, np.ndarray]
    native_channels: dict[str, int]
    not_applicable: dict[str, str]
    family_time: dict[str, float]
    by_family: dict[str, list[str]]


def compute_maps(
    module: torch.nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    names: Sequence[str],
    spec: AuditSpec,
    layer: str | None,
    *,
    device: torch.device,
    baseline: torch.Tensor | None = None,
    random_control_key: str = "",
    progress: ProgressCallback = _no_progress,
) -> MapSet:
    """Every method in ``names`` on every image, batch by batch, each family once per batch.

    Noise draws depend only on (seed, batch), so the maps of two model states (a randomization
    stage and the trained model) see the same noise; ``control_random`` also mixes in
    ``random_control_key``, because a random map that never changes would not be random.
    """
    n = int(images.shape[0])
    by_family: dict[str, list[str]] = {}
    for name in names:
        by_family.setdefault(METHODS[name].family, []).append(name)
    family_time = dict.fromkeys(by_family, 0.0)
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    native_channels: dict[str, int] = {}
    not_applicable: dict[str, str] = {}
    steps = len(by_family) * ((n + spec.batch_size - 1) // spec.batch_size)
    done = 0
    for start in range(0, n, spec.batch_size):
        x = images[start : start + spec.batch_size].to(device)
        t = targets[start : start + spec.batch_size].to(device)
        for family, members in by_family.items():
            progress(done / steps, f"{family}: images {start + 1}-{start + len(x)}")
            seed = spec.seed
            if family == METHODS["control_random"].family and random_control_key:
                seed = key_seed(spec.seed, random_control_key)
            ctx = MethodContext(
                params=spec.params,
                layer=layer,
                generator=batch_generator(seed, start),
                baseline=baseline,
            )
            t0 = time.perf_counter()
            results = compute_methods(module, x, t, members, ctx)
            family_time[family] += time.perf_counter() - t0
            for name, value in results.items():
                if isinstance(value, NotApplicableError):
                    not_applicable[name] = value.message
                    continue
                native_channels[name] = int(value.shape[1])
                reduced = similarity.reduce_channels(value.float(), spec.params.map_reduction)
                collected[name].append(reduced.detach().cpu().numpy().astype(np.float32))
            done += 1
    return MapSet(
        maps={name: np.concatenate(parts) for name, parts in collected.items() if parts},
        native_channels=native_channels,
        not_applicable=not_applicable,
        family_time=family_time,
        by_family=by_family,
    )
