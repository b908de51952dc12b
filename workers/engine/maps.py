"""Maps of one model state: every requested method on every image, batch by batch.

Each method family runs once per batch (methods that share passes share them). Noise draws
depend only on (seed, batch), so two model states see the same noise.

A map set also says which of its maps cannot carry a verdict (:func:`map_problems`): a method
that raised, maps that are not finite, all zero or constant, and relevance methods whose
relevance is not conserved. The thresholds are the policy's (:class:`MapChecks`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import similarity
from .contract.verdicts import CONTROLS
from .errors import MethodFailedError, NotApplicableError
from .methods import METHODS, MethodContext, compute_methods, method_info
from .policy import MapChecks
from .progress import ProgressCallback, no_progress
from .result import Conservation, MapProblem
from .spec import AuditSpec
from .stats import key_seed


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
    """The maps of one model state: method -> (N, H, W) float32, channels reduced.

    ``errors``: methods that raised, with the message (they have no maps);
    ``conservation``: per relevance method, per image, the relevance its map distributed and
    the relevance it started from (float64 arrays of shape (N,))."""

    maps: dict[str, np.ndarray]
    native_channels: dict[str, int]
    not_applicable: dict[str, str]
    family_time: dict[str, float]
    by_family: dict[str, list[str]]
    errors: dict[str, str] = field(default_factory=dict)
    conservation: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def conservation_ratios(distributed: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Per image, distributed / start (NaN where the start is 0: nothing to conserve)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(start) > 0, distributed / np.where(start != 0, start, 1.0), np.nan)


def _violations(
    distributed: np.ndarray, start: np.ndarray, kind: str, checks: MapChecks
) -> np.ndarray:
    """Images whose relevance is not conserved (an image with nothing to distribute, start 0,
    is never one; a non-finite sum always is; see :class:`MapChecks` for the two kinds)."""
    ratios = conservation_ratios(distributed, start)
    with np.errstate(invalid="ignore"):
        if kind == "total":
            off = np.abs(ratios - 1.0) > checks.conservation_tolerance
        else:
            off = np.abs(ratios) > checks.share_bound
    return (start != 0) & (~np.isfinite(ratios) | off)


def summarize_conservation(
    method: str, distributed: np.ndarray, start: np.ndarray, checks: MapChecks
) -> Conservation:
    """The report's conservation figure for one relevance method on one model state."""
    kind = METHODS[method].relevance or "total"
    ratios = conservation_ratios(distributed, start)
    finite = ratios[np.isfinite(ratios)]
    definition = (
        "per image, the input relevance's sum over the target logit (1 when conserved); "
        f"not conserved beyond +-{checks.conservation_tolerance:g}"
        if kind == "total"
        else "per image, the share of the target's unit relevance reaching the layer (about "
        "1 at a layer every path crosses, less where biases and skip connections take some, "
        f"possibly above 1 or negative inside a residual branch); not conserved beyond "
        f"+-{checks.share_bound:g} or when not finite"
    )
    tolerance = checks.conservation_tolerance if kind == "total" else checks.share_bound
    return Conservation(
        definition=definition,
        mean=float(finite.mean()) if finite.size else None,
        min=float(finite.min()) if finite.size else None,
        max=float(finite.max()) if finite.size else None,
        n=int(finite.size),
        tolerance=tolerance,
        within_tolerance=not bool(_violations(distributed, start, kind, checks).any()),
    )


def degenerate_maps(maps: MapSet, checks: MapChecks) -> dict[str, dict[str, int]]:
    """Per method, how many maps are not finite, all zero or constant (kinds with none are
    left out): ``{"gradcam": {"all_zero": 10}}``."""
    out: dict[str, dict[str, int]] = {}
    for method, values in maps.maps.items():
        floor = checks.zero_floor ** METHODS[method].scale_power
        n = int(values.shape[0])
        flat = values.reshape(n, -1).astype(np.float64)
        finite = np.isfinite(flat).all(axis=1)
        safe = np.where(np.isfinite(flat), flat, 0.0)
        peak = np.abs(safe).max(axis=1)
        zero = finite & (peak <= floor)
        constant = (
            finite & ~zero & (safe.max(axis=1) - safe.min(axis=1) <= checks.constant_rtol * peak)
        )
        counts = {
            "non_finite": int((~finite).sum()),
            "all_zero": int(zero.sum()),
            "constant": int(constant.sum()),
        }
        counts = {k: v for k, v in counts.items() if v}
        if counts:
            out[method] = counts
    return out


def map_problems(
    maps: MapSet, checks: MapChecks, stage: str, *, trained: bool
) -> dict[str, list[MapProblem]]:
    """Why each method's maps in this state cannot carry a verdict (methods without a
    problem are absent; see :class:`MapChecks`): a method that raised, maps that are not
    finite or do not conserve relevance, and, for a ``trained`` model's maps, maps that are
    all zero or constant. Not-applicable methods are not problems: they have no maps."""
    out: dict[str, list[MapProblem]] = {}

    def add(method: str, kind: str, count: int, total: int, detail: str) -> None:
        out.setdefault(method, []).append(
            MapProblem(method, stage, kind, count, total, detail)  # type: ignore[arg-type]
        )

    for method, message in maps.errors.items():
        add(method, "error", 0, 0, message)
    for method, counts in degenerate_maps(maps, checks).items():
        total = int(maps.maps[method].shape[0])
        details = {
            "non_finite": "contain NaN or infinite values",
            "all_zero": "are all zero (max |m| <= "
            f"{checks.zero_floor ** METHODS[method].scale_power:g})",
            "constant": f"are constant (range <= {checks.constant_rtol:g} x max |m|)",
        }
        for kind, count in counts.items():
            if trained or kind == "non_finite":
                add(method, kind, count, total, details[kind])
    for method, (distributed, start) in maps.conservation.items():
        kind = METHODS[method].relevance or "total"
        ratios = conservation_ratios(distributed, start)
        bad = _violations(distributed, start, kind, checks)
        if bad.any():
            shown = ", ".join(f"{r:.3g}" for r in ratios[bad][:3])
            rule = (
                f"sum to the target logit within {checks.conservation_tolerance:.0%}"
                if kind == "total"
                else f"hand the layer a finite share of their start within +-{checks.share_bound:g}"
            )
            add(
                method,
                "not_conserved",
                int(bad.sum()),
                len(ratios),
                f"do not conserve relevance: they should {rule}, got {shown}",
            )
    return out


@dataclass(frozen=True, eq=False)  # tensors: identity, not value equality
class MapInputs:
    """What a map set is computed from: the model state (``module``, in whatever state its
    weights are when :meth:`compute` runs), the images and targets explained, the methods, the
    spec (seed, batch size, parameters), the CAM layer, the device and the Integrated Gradients
    baseline. An audit builds it once; a test that changes one part (another class, noisy
    images, a retrained copy) derives its own with ``dataclasses.replace``. ``first_image`` is
    the position of the first of ``images`` in the audit's image order (an adaptive audit's
    round starts past 0), so noise draws follow each image's position, not its round."""

    module: torch.nn.Module
    images: torch.Tensor
    targets: torch.Tensor
    names: Sequence[str]
    spec: AuditSpec
    layer: str | None
    device: torch.device
    baseline: torch.Tensor | None = None
    first_image: int = 0

    def compute(
        self, random_control_key: str = "", progress: ProgressCallback = no_progress
    ) -> MapSet:
        """The map set of these inputs (see :func:`compute_maps`)."""
        return compute_maps(
            self.module,
            self.images,
            self.targets,
            self.names,
            self.spec,
            self.layer,
            device=self.device,
            baseline=self.baseline,
            random_control_key=random_control_key,
            progress=progress,
            first_image=self.first_image,
        )


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
    progress: ProgressCallback = no_progress,
    first_image: int = 0,
) -> MapSet:
    """Every method in ``names`` on every image, batch by batch, each family once per batch.

    Noise draws depend only on (seed, batch), so the maps of two model states (a randomization
    stage and the trained model) see the same noise; ``control_random`` also mixes in
    ``random_control_key``, because a random map that never changes would not be random.
    A batch is named by the position of its first image in the audit, ``first_image + start``.
    """
    n = int(images.shape[0])
    by_family: dict[str, list[str]] = {}
    for name in names:
        by_family.setdefault(METHODS[name].family, []).append(name)
    family_time = dict.fromkeys(by_family, 0.0)
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    native_channels: dict[str, int] = {}
    not_applicable: dict[str, str] = {}
    errors: dict[str, str] = {}
    conserved: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
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
                generator=batch_generator(seed, first_image + start),
                baseline=baseline,
            )
            t0 = time.perf_counter()
            results = compute_methods(module, x, t, members, ctx)
            family_time[family] += time.perf_counter() - t0
            for name, calls in ctx.conservation.items():
                conserved.setdefault(name, []).extend(calls)
            for name, value in results.items():
                if isinstance(value, NotApplicableError):
                    not_applicable[name] = value.message
                    continue
                if isinstance(value, MethodFailedError):
                    errors.setdefault(name, value.message)
                    continue
                native_channels[name] = int(value.shape[1])
                reduced = similarity.reduce_channels(value.float(), spec.params.map_reduction)
                collected[name].append(reduced.detach().cpu().numpy().astype(np.float32))
            done += 1
    # a method that failed on one batch has no maps at all (a partial set would be misread)
    return MapSet(
        maps={
            name: np.concatenate(parts)
            for name, parts in collected.items()
            if parts and name not in errors and name not in not_applicable
        },
        native_channels=native_channels,
        not_applicable=not_applicable,
        family_time=family_time,
        by_family=by_family,
        errors=errors,
        conservation={
            name: (
                torch.cat([d for d, _ in calls]).numpy(),
                torch.cat([s for _, s in calls]).numpy(),
            )
            for name, calls in conserved.items()
            if calls and name not in errors and name not in not_applicable
        },
    )
