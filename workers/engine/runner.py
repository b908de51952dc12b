"""The one entry point of the engine: ``run_audit(model, images, spec, progress=...)``.

This part computes every requested saliency method on every image (each method family once per
batch, so methods that share passes share them), checks an ONNX model's converted graph against
ONNX Runtime first, and summarizes the maps. The randomization tests build on the same loop.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch

from . import similarity
from .errors import NotApplicableError, SpecError
from .methods import METHODS, MethodContext, compute_methods, method_info, resolve_layer
from .methods.integrated import baseline_for_input_spec
from .methods.lrp import lrp_composite
from .models.base import LoadedModel
from .result import (
    AuditResult,
    ImageRecord,
    MapStatistics,
    MethodResult,
    ScoreSummary,
    finite_or_none,
)
from .spec import AuditSpec
from .stats import key_seed

ProgressCallback = Callable[[float, str], None]

CONTROLS: tuple[str, ...] = ("control_sobel", "control_random")


def _no_progress(fraction: float, step: str) -> None:
    pass


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit ``cuda`` without a GPU is a spec error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecError("device 'cuda' requested but no CUDA device is available")
    return dev


def methods_to_run(requested: Sequence[str]) -> list[str]:
    """The requested methods (validated, de-duplicated) plus the two controls every run has."""
    names = [method_info(n).name for n in dict.fromkeys(requested)]
    return names + [c for c in CONTROLS if c not in names]


def batch_generator(seed: int, batch_start: int) -> torch.Generator:
    """One generator per batch, derived from the audit seed and the batch's first image index,
    so a run is reproducible for a given (seed, batch_size) whatever else runs in the process."""
    return torch.Generator().manual_seed(key_seed(seed, "batch", str(batch_start)) >> 1)


def map_statistics(maps: np.ndarray, native_channels: int) -> MapStatistics:
    flat = maps.reshape(maps.shape[0], -1).astype(np.float64)
    absolute = np.abs(flat)
    k = max(1, round(0.1 * flat.shape[1]))
    top = -np.sort(-absolute, axis=1)[:, :k].sum(axis=1)
    total = absolute.sum(axis=1)
    share = np.where(total > 0, top / np.where(total > 0, total, 1.0), np.nan)
    return MapStatistics(
        n_images=int(maps.shape[0]),
        height=int(maps.shape[1]),
        width=int(maps.shape[2]),
        native_channels=native_channels,
        mean=finite_or_none(float(flat.mean())),
        std=finite_or_none(float(flat.std())),
        min=finite_or_none(float(flat.min())),
        max=finite_or_none(float(flat.max())),
        mean_abs=finite_or_none(float(absolute.mean())),
        fraction_positive=float((flat > 0).mean()),
        fraction_zero=float((flat == 0).mean()),
        top10_mass=float(np.nanmean(share)) if np.isfinite(share).any() else None,
    )


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


def run_audit(
    model: LoadedModel,
    images: torch.Tensor,
    spec: AuditSpec,
    *,
    image_names: Sequence[str] | None = None,
    targets: torch.Tensor | None = None,
    progress: ProgressCallback = _no_progress,
) -> AuditResult:
    """Compute ``spec.methods`` (plus the controls) on ``images`` and summarize the maps.

    ``images`` is the preprocessed NCHW batch (see ``images.preprocess``). ``targets`` defaults
    to the model's predicted class for each image.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    names = methods_to_run(spec.methods)
    lrp_composite(spec.params.lrp_composite)  # an unknown composite fails now, not mid-run
    n = int(images.shape[0])
    if n == 0:
        raise SpecError("no images to audit")
    image_names = list(image_names) if image_names is not None else [f"image_{i}" for i in range(n)]
    if len(image_names) != n:
        raise SpecError("image_names must have one name per image")
    device = resolve_device(spec.device)
    module = model.module.to(device).eval()
    torch.manual_seed(spec.seed)  # libraries that draw from the global RNG stay repeatable too

    fidelity = None
    if model.onnx_bytes is not None:
        from .models.fidelity import ensure_fidelity

        progress(0.0, "fidelity check against ONNX Runtime")
        t0 = time.perf_counter()
        fidelity = ensure_fidelity(model, images, atol=spec.fidelity_atol).to_dict()
        timings["fidelity"] = time.perf_counter() - t0

    progress(0.02, "predictions")
    t0 = time.perf_counter()
    with torch.inference_mode():
        probs = torch.cat(
            [
                torch.softmax(module(images[i : i + spec.batch_size].to(device)).float(), dim=1)
                for i in range(0, n, spec.batch_size)
            ]
        ).cpu()
    timings["predictions"] = time.perf_counter() - t0
    predicted = probs.argmax(dim=1)
    if targets is None:
        targets = predicted
    elif targets.shape != (n,):
        raise SpecError(f"targets must have shape ({n},)")
    elif int(targets.max()) >= probs.shape[1] or int(targets.min()) < 0:
        raise SpecError(f"targets must be class indices in [0, {probs.shape[1]})")
    class_names = model.input_spec.class_names

    layer = resolve_layer(module, spec.layer, images[:1].to(device))

    mapset = compute_maps(
        module,
        images,
        targets,
        names,
        spec,
        layer,
        device=device,
        baseline=baseline_for_input_spec(model.input_spec, spec.params.ig_baseline),
        progress=lambda f, step: progress(0.05 + 0.9 * f, step),
    )
    family_time = mapset.family_time
    native_channels = mapset.native_channels
    not_applicable = mapset.not_applicable
    by_family = mapset.by_family
    timings["methods"] = sum(family_time.values())

    progress(0.96, "summaries")
    maps = mapset.maps
    sobel = torch.from_numpy(maps["control_sobel"])
    method_results: dict[str, MethodResult] = {}
    for name in names:
        info = METHODS[name]
        common = dict(
            name=name,
            family=info.family,
            reference=info.reference,
            is_control=info.is_control,
            layer=layer if info.needs_conv_layer else None,
            family_time_s=round(family_time[info.family], 6),
            shared_with=tuple(m for m in by_family[info.family] if m != name),
        )
        if name in not_applicable:
            method_results[name] = MethodResult(
                status="not_applicable",
                reason=not_applicable[name],
                **common,  # type: ignore[arg-type]
            )
            continue
        current = torch.from_numpy(maps[name])
        method_results[name] = MethodResult(
            status="ok",
            statistics=map_statistics(maps[name], native_channels[name]),
            similarity_to_sobel={
                measure: ScoreSummary.of(fn(current, sobel).numpy())
                for measure, fn in similarity.MEASURES.items()
                if min(current.shape[-2:]) >= similarity.MIN_MAP_SIDE_PX[measure]
            },
            **common,  # type: ignore[arg-type]
        )

    records = [
        ImageRecord(
            name=image_names[i],
            target=int(targets[i]),
            target_name=class_names[int(targets[i])]
            if class_names and int(targets[i]) < len(class_names)
            else None,
            predicted=int(predicted[i]),
            probability=float(probs[i, int(targets[i])]),
        )
        for i in range(n)
    ]
    timings["total"] = time.perf_counter() - started
    progress(1.0, "done")
    return AuditResult(
        spec={**spec.to_dict(), "methods": names, "resolved_layer": layer},
        model={
            "source": model.source,
            "sha256": model.sha256,
            "architecture": model.architecture,
            "opset": model.opset,
            "input_spec": asdict(model.input_spec),
            "num_classes": int(probs.shape[1]),
            "notes": list(model.notes),
        },
        images=records,
        methods=method_results,
        fidelity=fidelity,
        environment=environment(device),
        timings_s={k: round(v, 4) for k, v in timings.items()},
        maps=maps,
    )


def environment(device: torch.device) -> dict[str, str]:
    """Versions that decide the numbers: part of every result, for reproduction."""
    env = {"python": platform.python_version(), "device": str(device)}
    for dist in (
        "saliency-audit",
        "torch",
        "torchvision",
        "onnx",
        "onnxruntime-gpu",
        "captum",
        "zennit",
        "numpy",
    ):
        try:
            env[dist] = version(dist)
        except PackageNotFoundError:
            env[dist] = "not installed"
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env
