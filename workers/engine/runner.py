"""The one entry point of the engine: ``run_audit(model, images, spec, progress=...)``.

It checks an ONNX model's converted graph against ONNX Runtime, computes every requested
saliency method on every image with the trained model (each method family once per batch, so
methods that share passes share them), runs the requested sanity checks and analyses against
those maps (each a registered check, :mod:`.checks`, run on one :class:`~.checks.AuditContext`),
and decides a verdict per (method, test) with the policy (:mod:`.policy`).
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch

from . import sanity, similarity
from .adaptive import (
    adaptive_run,
    finish_tests,
    image_order,
    merge_map_sets,
    merge_tests,
)
from .checks import AuditContext, Check, check_info
from .data_randomization import LabeledImages
from .errors import SpecError
from .maps import (
    MapInputs,
    MapSet,
    compute_maps,
    map_problems,
    methods_to_run,
    summarize_conservation,
)
from .methods import METHODS, LayerChoice, cam_layer_choice
from .methods.integrated import baseline_for_input_spec
from .methods.lrp import lrp_composite
from .models.base import LoadedModel
from .policy import Policy, decide, load_policy, pending_verdicts
from .progress import ProgressCallback, no_progress
from .result import (
    TRAINED_STAGE,
    AuditResult,
    Fidelity,
    ImageRecord,
    MapStatistics,
    MethodResult,
    MethodStatus,
    ScoreSummary,
    TestResult,
    Verdict,
    finite_or_none,
)
from .sequential import round_looks
from .spec import AuditSpec

__all__ = ["MapSet", "compute_maps", "methods_to_run", "run_audit"]


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit ``cuda`` without a GPU is a spec error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecError("device 'cuda' requested but no CUDA device is available")
    return dev


# Inputs at least this large (pixels per image) run their convolutions channels-last.
CHANNELS_LAST_MIN_PIXELS = 128 * 128


def memory_format_for(images: torch.Tensor) -> torch.memory_format:
    """The layout an audit runs the model's convolutions in, decided by the input size alone
    (so an audit's numbers never depend on a timing). Channels-last lets oneDNN skip layout
    reorders: forward + backward of resnet18 at 224 px, 2-core CPU, ran 1.12-1.23x faster at
    8-32 rows; at 32 px (the reference small ResNet) the two layouts were within run-to-run
    noise (0.9-1.3x either way), so small inputs keep the default layout (bench/RESULTS.md).
    Only strides change, never a weight's value; a map differs from the contiguous run's by
    float rounding (tests/engine/test_fast_paths.py)."""
    if images.dim() == 4 and images.shape[-1] * images.shape[-2] >= CHANNELS_LAST_MIN_PIXELS:
        return torch.channels_last
    return torch.contiguous_format


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


def run_audit(
    model: LoadedModel,
    images: torch.Tensor,
    spec: AuditSpec,
    *,
    image_names: Sequence[str] | None = None,
    targets: torch.Tensor | None = None,
    train: LabeledImages | None = None,
    random_label_model: LoadedModel | None = None,
    masks: torch.Tensor | None = None,
    progress: ProgressCallback = no_progress,
) -> AuditResult:
    """Compute ``spec.methods`` (plus the controls) on ``images``, run ``spec.tests`` and decide
    the verdicts.

    ``images`` is the preprocessed NCHW batch (see ``images.preprocess``). ``targets`` defaults
    to the model's predicted class for each image. ``train`` (a labeled training set) or
    ``random_label_model`` (the same architecture trained on random labels) is what the
    ``data_randomization`` test needs. ``masks`` (N, H, W) booleans at the input size are the
    objects' ground truth; with them the ``layers`` analysis scores localization too.

    With ``spec.adaptive`` the images are taken in a seeded random order, a round at a time,
    and the audit stops when every verdict is decided (:mod:`.adaptive`); its report says how
    many images it used and why it stopped.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    names = methods_to_run(spec.methods)
    lrp_composite(spec.params.lrp_composite)  # an unknown composite fails now, not mid-run
    policy = load_policy(spec.policy)  # so does an invalid policy
    checks = [check_info(name) for name in spec.tests]
    for check in checks:
        if check.needs_training_data and train is None and random_label_model is None:
            raise SpecError(
                f"the {check.name} test needs a labeled training set (a folder per class) "
                "or a model trained on random labels"
            )
    n = int(images.shape[0])
    if n == 0:
        raise SpecError("no images to audit")
    image_names = list(image_names) if image_names is not None else [f"image_{i}" for i in range(n)]
    if len(image_names) != n:
        raise SpecError("image_names must have one name per image")
    available = n
    if spec.adaptive is not None:  # the images in the order the rounds take them
        if targets is not None and targets.shape != (n,):
            raise SpecError(f"targets must have shape ({n},)")
        order = image_order(n, spec)
        index = torch.from_numpy(order)
        images = images[index]
        image_names = [image_names[i] for i in order]
        targets = targets[index] if targets is not None else None
        masks = masks[index] if masks is not None else None
        n = int(order.size)
    device = resolve_device(spec.device)
    module = model.module.to(device).eval()
    module.to(memory_format=memory_format_for(images))
    torch.manual_seed(spec.seed)  # libraries that draw from the global RNG stay repeatable too

    looks = round_looks(n, spec.adaptive.round_images) if spec.adaptive is not None else [n]
    given_targets = targets
    if given_targets is not None and given_targets.shape != (n,):
        raise SpecError(f"targets must have shape ({n},)")
    fidelity_parts: list[Fidelity] = []
    prob_parts: list[torch.Tensor] = []

    def check_and_predict(start: int, end: int, say: ProgressCallback) -> None:
        """The fidelity check and the predictions of images ``start:end``: every image at once,
        or an adaptive audit's round (so it checks only the images it uses)."""
        if model.onnx_bytes is not None:
            from .models.fidelity import ensure_fidelity

            say(0.0, "fidelity check against ONNX Runtime")
            t0 = time.perf_counter()
            fidelity_parts.append(
                ensure_fidelity(
                    model,
                    images[start:end],
                    atol=spec.fidelity_atol,
                    rtol=spec.fidelity_rtol,
                    first_image=start,
                )
            )
            timings["fidelity"] = timings.get("fidelity", 0.0) + time.perf_counter() - t0
        say(0.02, "predictions")
        t0 = time.perf_counter()
        # The module returns scores, never probabilities (a graph's softmax head is left out of
        # it, model.output says so), so their softmax is the model's own probabilities: the
        # graph's output for a Softmax head, exp of it for LogSoftmax (checked against ONNX
        # Runtime above).
        with torch.inference_mode():
            prob_parts.append(
                torch.cat(
                    [
                        torch.softmax(
                            module(images[i : i + spec.batch_size].to(device)).float(), dim=1
                        )
                        for i in range(start, end, spec.batch_size)
                    ]
                ).cpu()
            )
        timings["predictions"] = timings.get("predictions", 0.0) + time.perf_counter() - t0

    check_and_predict(0, looks[0], progress)
    num_classes = int(prob_parts[0].shape[1])
    if given_targets is not None and (
        int(given_targets.max()) >= num_classes or int(given_targets.min()) < 0
    ):
        raise SpecError(f"targets must be class indices in [0, {num_classes})")

    def targets_of(start: int, end: int) -> torch.Tensor:
        """The class each map of images ``start:end`` explains: the given one, or the
        predicted one."""
        if given_targets is not None:
            return given_targets[start:end]
        return torch.cat(prob_parts)[start:end].argmax(dim=1)

    class_names = model.input_spec.class_names

    layer_choice = cam_layer_choice(module, spec.layer, images[:1].to(device))
    layer = layer_choice.name
    if (
        random_label_model is not None
        and layer is not None
        and layer not in dict(random_label_model.module.named_modules())
    ):
        raise SpecError(
            f"the random-label model has no module {layer!r}: it must have the audited "
            "model's architecture"
        )

    weights = _progress_weights(spec, module, checks)
    baseline = baseline_for_input_spec(model.input_spec, spec.params.ig_baseline)
    run_checks = _Measure(
        checks=checks,
        policy=policy,
        weights=weights,
        num_classes=num_classes,
        train=train,
        random_label_model=random_label_model.module if random_label_model is not None else None,
        timings=timings,
        intervals=spec.adaptive is None,
    )

    def inputs_of(start: int, end: int) -> MapInputs:
        return MapInputs(
            module, images[start:end], targets_of(start, end), names, spec, layer, device,
            baseline, first_image=start,
        )  # fmt: skip

    def verdicts_of(
        mapset: MapSet, tests: dict[str, TestResult], looks: Sequence[int] | None
    ) -> list[Verdict]:
        not_applicable = _not_applicable(mapset, names, layer_choice)
        return decide(
            policy,
            {name: test for name, test in tests.items() if check_info(name).kind == "test"},
            {name: (METHODS[name].is_control, not_applicable.get(name)) for name in names},
            spec.seed,
            looks=looks,
        )

    adaptive = None
    if spec.adaptive is None:
        mapset, tests = run_checks(
            inputs_of(0, n), masks, lambda f, step: progress(0.05 + 0.9 * f, step)
        )
        verdicts = verdicts_of(mapset, tests, None)
    else:
        rounds: list[tuple[int, list[Verdict], list[Verdict]]] = []
        for k, end in enumerate(looks):
            start = looks[k - 1] if k else 0

            def round_progress(f: float, step: str, k: int = k, start: int = start) -> None:
                where = f"round {k + 1} of at most {len(looks)} (images {start + 1}-{looks[k]})"
                progress(0.05 + 0.9 * (k + f) / len(looks), f"{where}: {step}")

            if k:
                check_and_predict(start, end, lambda f, step: round_progress(0.0, step))
            part_maps, part_tests = run_checks(inputs_of(start, end), None, round_progress)
            if k == 0:
                mapset, tests = part_maps, part_tests
            else:
                mapset = merge_map_sets(mapset, part_maps)
                tests = {t: merge_tests(tests[t], part_tests[t], end) for t in tests}
            verdicts = verdicts_of(mapset, tests, looks[: k + 1])
            pending = pending_verdicts(policy, verdicts)
            rounds.append((end, verdicts, pending))
            if not pending:
                break
        used = rounds[-1][0]
        tests = finish_tests(tests, spec.seed)
        verdicts = verdicts_of(mapset, tests, looks[: len(rounds)])
        adaptive = adaptive_run(spec, available=available, rounds=rounds)
        n, images, image_names = used, images[:used], image_names[:used]
    probs = torch.cat(prob_parts)
    predicted = probs.argmax(dim=1)
    targets = targets_of(0, n)
    fidelity = None
    if fidelity_parts:
        from .models.fidelity import merge_fidelity

        fidelity = functools.reduce(merge_fidelity, fidelity_parts).to_dict()
    family_time = mapset.family_time
    native_channels = mapset.native_channels
    not_applicable = _not_applicable(mapset, names, layer_choice)
    by_family = mapset.by_family
    reference_problems = map_problems(mapset, policy.checks, TRAINED_STAGE, trained=True)
    timings["methods"] = sum(family_time.values())

    progress(0.96, "summaries and verdicts")
    maps = mapset.maps
    sobel = torch.from_numpy(maps["control_sobel"])
    sobel_prepared = {  # prepared once: every method is compared with the same Sobel maps
        measure: similarity.prepare(measure, sobel)
        for measure in similarity.MEASURES
        if min(sobel.shape[-2:]) >= similarity.MIN_MAP_SIDE_PX[measure]
    }
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
        if name in not_applicable or name in mapset.errors:
            failed = name in mapset.errors
            method_results[name] = MethodResult(
                status="error" if failed else "not_applicable",
                reason=mapset.errors[name] if failed else not_applicable[name],
                **common,  # type: ignore[arg-type]
            )
            continue
        current = torch.from_numpy(maps[name])
        problems = tuple(reference_problems.get(name, ()))
        conservation = None
        if name in mapset.conservation:
            conservation = summarize_conservation(name, *mapset.conservation[name], policy.checks)
        status: MethodStatus = "ok"
        if any(p.kind != "not_conserved" for p in problems):
            status = "degenerate"
        elif problems:
            status = "not_conserved"
        method_results[name] = MethodResult(
            status=status,
            reason="; ".join(p.describe() for p in problems) or None,
            statistics=map_statistics(maps[name], native_channels[name]),
            similarity_to_sobel={
                measure: ScoreSummary.of(
                    similarity.compare(similarity.prepare(measure, current), prepared).numpy()
                )
                for measure, prepared in sobel_prepared.items()
            },
            conservation=conservation,
            problems=problems,
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
        spec={
            **spec.to_dict(),
            "methods": names,
            "resolved_layer": layer,
            "layer_reason": layer_choice.reason,
        },
        model={
            "source": model.source,
            "sha256": model.sha256,
            "architecture": model.architecture,
            "opset": model.opset,
            "input_spec": asdict(model.input_spec),
            "input_spec_sources": dict(model.input_spec_sources),
            "output": model.output.to_dict() if model.output is not None else None,
            "num_classes": int(probs.shape[1]),
            "notes": list(model.notes),
        },
        images=records,
        methods=method_results,
        fidelity=fidelity,
        environment=environment(device),
        timings_s={k: round(v, 4) for k, v in timings.items()},
        tests=tests,
        verdicts=verdicts,
        policy=policy.document,
        adaptive=adaptive,
        maps=maps,
    )


def _not_applicable(
    mapset: MapSet, names: Sequence[str], layer_choice: LayerChoice
) -> dict[str, str]:
    """Method -> why it does not apply to this model (with no CAM layer, why there is none)."""
    not_applicable = dict(mapset.not_applicable)
    if layer_choice.name is None:  # say why there is no CAM layer, not only that there is none
        for name in names:
            if name in not_applicable and METHODS[name].needs_conv_layer:
                not_applicable[name] = layer_choice.reason
    return not_applicable


@dataclass(frozen=True, eq=False)
class _Measure:
    """The measuring part of an audit on one set of images: the trained model's maps, then each
    check, with progress over 0..1 of it and the wall times added to ``timings``."""

    checks: Sequence[Check]
    policy: Policy
    weights: dict[str, float]
    num_classes: int
    train: LabeledImages | None
    random_label_model: torch.nn.Module | None
    timings: dict[str, float]
    # False for an adaptive audit's rounds: their scores get their intervals once merged
    intervals: bool = True

    def __call__(
        self, inputs: MapInputs, masks: torch.Tensor | None, progress: ProgressCallback
    ) -> tuple[MapSet, dict[str, TestResult]]:
        total = sum(self.weights.values())
        share = self.weights["maps"] / total
        t0 = time.perf_counter()
        mapset = inputs.compute(progress=lambda f, step: progress(share * f, step))
        self._add("maps", time.perf_counter() - t0)
        position = share
        tests: dict[str, TestResult] = {}
        ctx = AuditContext(
            inputs=inputs,
            states=sanity.RandomizedStates(
                inputs, mapset, checks=self.policy.checks, intervals=self.intervals
            ),
            num_classes=self.num_classes,
            policy=self.policy,
            train=self.train,
            random_label_model=self.random_label_model,
            masks=masks,
        )
        for check in self.checks:
            span = self.weights[check.name] / total

            def check_progress(
                f: float, step: str, start: float = position, span: float = span
            ) -> None:
                progress(start + span * f, step)

            t0 = time.perf_counter()
            tests[check.name] = check.run(dataclasses.replace(ctx, progress=check_progress))
            ctx.states.restore()  # every check leaves the trained weights (a no-op after the tests)
            self._add(f"test_{check.name}", time.perf_counter() - t0)
            position += span
        return mapset, tests

    def _add(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds


def _progress_weights(
    spec: AuditSpec, module: torch.nn.Module, checks: Sequence[Check]
) -> dict[str, float]:
    """Rough cost of each part of an audit in map-set computations, for the progress bar."""
    from .randomization import units

    n_units = len(units(module, spec.granularity))
    return {"maps": 1.0} | {check.name: check.cost(spec, n_units) for check in checks}


def environment(device: torch.device) -> dict[str, str]:
    """Versions that decide the numbers: part of every result, for reproduction."""
    env = {"python": platform.python_version(), "device": str(device)}
    for dist in (
        "saliency-audit",
        "torch",
        "torchvision",
        "timm",
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
        # TF32 changes float32 matmuls and convolutions on Ampere and later (about 1e-3 relative)
        env["tf32_matmul"] = str(torch.backends.cuda.matmul.allow_tf32)
        env["tf32_cudnn"] = str(torch.backends.cudnn.allow_tf32)
    return env
