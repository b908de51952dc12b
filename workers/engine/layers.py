"""The ``layers`` analysis: CAM-family and LRP heatmaps at every depth, and how faithful each is.

Relevance-CAM's claim (Lee, Kim, Park, Eo, Hwang, CVPR 2021, sections 1 and 4): gradient CAMs
break down at shallow layers (shattered gradients, false confidence), while Relevance-CAM stays
class-specific down to early layers. This analysis puts numbers on that for the audited model:
for each requested layer (default: the output of every block, shallow to deep) it computes
``relevance_cam``, ``gradcam``, ``gradcam_pp``, ``scorecam`` and the LRP relevance at that
layer (``lrp``, :func:`~.methods.lrp.lrp_layer_relevance`), plus ``control_random``, and scores
each with the faithfulness metrics of :mod:`.faithfulness` (Average Drop and Increase,
deletion and insertion AUC) and, when the images carry masks, the localization IoU and the
pointing game. Every score is per image with a bootstrap interval, like the sanity checks;
each result says whether the method beat the random map at that layer. It decides no verdict:
it is an analysis beside the tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from . import faithfulness
from .errors import SpecError, stops_the_audit, unknown_analysis_layer
from .maps import MapInputs, conservation_ratios
from .methods._ort import ort_forward
from .methods.base import conv_layer_names
from .methods.lrp import lrp_layer_relevance
from .policy import MapChecks
from .progress import ProgressCallback, no_progress
from .randomization import units
from .result import Score, StageInfo, TestResult
from .sanity import make_score, problems_of, registered_check
from .spec import AuditSpec

TEST = "layers"
CAM_METHODS: tuple[str, ...] = ("relevance_cam", "gradcam", "gradcam_pp", "scorecam")
LRP = "lrp"
CONTROL = "control_random"
METHODS: tuple[str, ...] = (*CAM_METHODS, LRP, CONTROL)
FAITHFULNESS: tuple[str, ...] = (
    "average_drop",
    "average_increase",
    "deletion_auc",
    "insertion_auc",
)
LOCALIZATION: tuple[str, ...] = ("iou", "pointing_game")
LOWER_IS_BETTER = frozenset({"average_drop", "deletion_auc"})
# images whose maps at every layer are kept (the service draws them over their images)
KEEP_IMAGES = 16
# Score-CAM is one forward pass per (image, channel) of the layer, thousands per image at a deep
# layer and the bulk of the analysis: it runs in groups of images small enough that progress
# moves every this many masked passes or so. Its maps do not depend on the grouping (each
# image's channel scores are its own).
SCORECAM_PASSES_PER_STEP = 512


def _outputs_in_order(model: nn.Module, example: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(module name, output shape) of every module call in one forward pass, in call order."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    handles = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: calls.append(
                (name, tuple(out.shape) if isinstance(out, torch.Tensor) else ())
            )
        )
        for name, module in model.named_modules()
        if name
    ]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _spatial(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and shape[2] * shape[3] > 1


def spatial_modules(calls: Sequence[tuple[str, tuple[int, ...]]]) -> list[str]:
    """The modules whose output is a spatial map, sorted (what ``layers`` may name)."""
    return sorted({c for c, shape in calls if _spatial(shape)})


def layer_names(model: nn.Module, example: torch.Tensor) -> dict[str, list[str]]:
    """The names a spec may give this model, as the API checks them at submit: ``modules``
    (any module: ``layer``), ``conv`` (the conv layers, listed when ``layer`` is unknown) and
    ``spatial`` (modules with a spatial output: ``layers``). One forward pass of ``example``."""
    return {
        "modules": [name for name, _ in model.named_modules() if name],
        "conv": conv_layer_names(model),
        "spatial": spatial_modules(_outputs_in_order(model, example)),
    }


def block_output_layers(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(block, module) pairs: for every block of the model (the randomization units of block
    granularity) that holds a convolution, the module whose output is the block's output: the
    block itself when it runs as a module (a torchvision ``Sequential``), else the last module
    inside it that runs (a converted ONNX graph, whose scopes do not run). Blocks whose output
    is not a spatial (N, K, h, w) map with h * w > 1 are left out; shallow to deep."""
    calls = _outputs_in_order(model, example)
    modules = dict(model.named_modules())
    pairs: list[tuple[str, str]] = []
    for unit in units(model, "block"):
        if not any(isinstance(modules.get(m), nn.Conv2d) for m in unit.modules):
            continue
        inside = [
            (name, shape)
            for name, shape in calls
            if name == unit.name or name.startswith(unit.name + ".")
        ]
        own = [c for c in inside if c[0] == unit.name]
        chosen = own[-1] if own else (inside[-1] if inside else None)
        if (
            chosen is not None
            and _spatial(chosen[1])
            and sum(c[0] == chosen[0] for c in calls) == 1
        ):
            pairs.append((unit.name, chosen[0]))
    return pairs


def resolve_layers(
    model: nn.Module, requested: Sequence[str] | None, example: torch.Tensor
) -> list[tuple[str, str]]:
    """The analysed layers as (label, module) pairs; requested names must be modules that run
    once per forward pass with a spatial output."""
    if requested is None:
        pairs = block_output_layers(model, example)
        if not pairs:
            raise SpecError(
                "the layers analysis found no block with a spatial output (the model has no "
                "conv layer?); name the layers to analyse"
            )
        return pairs
    calls = _outputs_in_order(model, example)
    out: list[tuple[str, str]] = []
    for name in requested:
        shapes = [shape for called, shape in calls if called == name]
        if name not in dict(model.named_modules()):
            raise unknown_analysis_layer(name, spatial_modules(calls))
        if len(shapes) != 1:
            raise SpecError(
                f"layer {name!r} runs {len(shapes)} times per forward pass; the layers analysis "
                "needs a module that runs once"
            )
        if not _spatial(shapes[0]):
            raise SpecError(
                f"layer {name!r} outputs shape {shapes[0]}, not a spatial (N, K, h, w) map"
            )
        out.append((name, name))
    return out


def layer_analysis(
    module: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    spec: AuditSpec,
    *,
    device: torch.device,
    masks: torch.Tensor | None = None,
    checks: MapChecks | None = None,
    progress: ProgressCallback = no_progress,
) -> TestResult:
    """Heatmaps of :data:`METHODS` at each layer, scored per image (see the module docstring).

    ``masks`` are (N, H, W) boolean ground-truth object masks at the input size, or None.
    ``checks`` decide which maps are reported as degenerate (``map_problems``); a method that
    raises at a layer is reported in ``details["errors"]`` and the analysis goes on.
    """
    checks = checks or MapChecks()
    layers = resolve_layers(module, spec.layers, images[:1].to(device))
    output_shapes = dict(_outputs_in_order(module, images[:1].to(device)))
    if masks is not None and tuple(masks.shape) != (
        images.shape[0],
        images.shape[2],
        images.shape[3],
    ):
        raise SpecError(
            f"masks must have shape (N, H, W) = {tuple(images.shape[:1] + images.shape[2:])}"
        )

    params = spec.params
    x = images.cpu()
    t = targets.cpu()
    # The metrics are thousands of forward passes and nothing else (2 x (steps + 1) per image
    # and map for the deletion and insertion curves): on the CPU they run in ONNX Runtime when
    # its export reproduces the model's logits (see methods/_ort.py), else in PyTorch.
    forward: Callable[[torch.Tensor], torch.Tensor] = module
    if device.type == "cpu":
        probe = x[: spec.batch_size]
        with torch.no_grad():
            forward = ort_forward(module, probe, module(probe)) or module

    def probabilities(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(forward(batch.to(device)).float(), dim=1).cpu()

    y = faithfulness.target_probabilities(probabilities, x, t, spec.batch_size)
    info = registered_check(TEST)
    result = TestResult(
        test=TEST, description=info.description, reference=info.reference, granularity="block"
    )
    not_applicable: dict[str, dict[str, str]] = {}
    errors: dict[str, dict[str, str]] = {}
    shares: dict[str, dict[str, float | None]] = {}
    per_layer = 1.0 / len(layers)
    for index, (label, layer) in enumerate(layers, start=1):
        base = (index - 1) * per_layer

        def sub(f: float, step: str, base: float = base, label: str = label) -> None:
            progress(base + per_layer * f, f"layer {label}: {step}")

        at_layer = MapInputs(
            module,
            images,
            targets,
            [*(m for m in CAM_METHODS if m != "scorecam"), CONTROL],
            spec,
            layer,
            device,
        )
        mapset = at_layer.compute(progress=lambda f, step: sub(0.1 * f, step))
        channels = output_shapes[layer][1]
        group = max(1, min(spec.batch_size, SCORECAM_PASSES_PER_STEP // max(channels, 1)))
        scored = dataclasses.replace(
            at_layer, names=["scorecam"], spec=dataclasses.replace(spec, batch_size=group)
        ).compute(progress=lambda f, step: sub(0.1 + 0.5 * f, step))
        maps = {name: torch.from_numpy(m) for name, m in {**mapset.maps, **scored.maps}.items()}
        for name, reason in {**mapset.not_applicable, **scored.not_applicable}.items():
            not_applicable.setdefault(label, {})[name] = reason
        for part in (mapset, scored):
            for name, message in part.errors.items():
                errors.setdefault(label, {})[name] = message
            result.map_problems += problems_of(part, checks, label)
            for name, (distributed, start) in part.conservation.items():
                shares.setdefault(label, {})[name] = _mean_ratio(distributed, start)
        sub(0.6, "lrp relevance")
        log: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            maps[LRP] = torch.cat(
                [
                    lrp_layer_relevance(
                        module,
                        images[i : i + spec.batch_size].to(device),
                        targets[i : i + spec.batch_size].to(device),
                        layer,
                        params.lrp_composite,
                        conservation=log,
                    )[:, 0].cpu()
                    for i in range(0, images.shape[0], spec.batch_size)
                ]
            )
        except SpecError:
            raise
        except Exception as exc:  # a failing method never loses the analysis
            if stops_the_audit(exc):
                raise
            errors.setdefault(label, {})[LRP] = f"{type(exc).__name__}: {exc}"[:500]
        else:
            shares.setdefault(label, {})[LRP] = _mean_ratio(
                torch.cat([d for d, _ in log]).numpy(), torch.cat([s for _, s in log]).numpy()
            )
        result.stages.append(StageInfo(index=index, name=label, randomized=(layer,)))
        examples: dict[str, np.ndarray] = {}
        for position, name in enumerate(m for m in METHODS if m in maps):
            sub(0.65 + 0.35 * position / len(METHODS), f"faithfulness of {name}")
            values = _metric_values(probabilities, x, maps[name], t, y, spec, masks)
            result.scores += [
                make_score(
                    v,
                    method=name,
                    test=TEST,
                    stage=label,
                    stage_index=index,
                    measure=metric,
                    seed=spec.seed,
                )
                for metric, v in values.items()
            ]
            examples[name] = maps[name][:KEEP_IMAGES].numpy().astype(np.float32)
        result.example_maps[label] = examples
    result.details = {
        "layers": [{"label": label, "module": layer} for label, layer in layers],
        "methods": list(METHODS),
        "metrics": list(FAITHFULNESS) + (list(LOCALIZATION) if masks is not None else []),
        "lower_is_better": sorted(LOWER_IS_BETTER),
        "definitions": faithfulness.definitions(params.localization_threshold),
        "faithfulness_steps": params.faithfulness_steps,
        "localization_threshold": params.localization_threshold,
        "localization": "masks"
        if masks is not None
        else "no masks: IoU and pointing game not scored",
        "not_applicable": not_applicable,
        "errors": errors,
        "relevance_share": shares,
        "relevance_share_definition": "per layer and relevance method, the mean over images of "
        "the share of the target's relevance that reaches the layer (LRP: the target logit's; "
        "Relevance-CAM: its unit start); at most about 1, less where skip connections and "
        "biases take relevance past or away from the layer",
        "beats_random": beats_random(result.scores),
    }
    progress(1.0, "done")
    return result


def _mean_ratio(distributed: np.ndarray, start: np.ndarray) -> float | None:
    ratios = conservation_ratios(distributed, start)
    finite = ratios[np.isfinite(ratios)]
    return float(finite.mean()) if finite.size else None


def _metric_values(
    probabilities: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    y: torch.Tensor,
    spec: AuditSpec,
    masks: torch.Tensor | None,
) -> dict[str, np.ndarray]:
    _, o = faithfulness.masked_confidence(probabilities, x, maps, targets, spec.batch_size)
    deletion, insertion = faithfulness.deletion_insertion(
        probabilities, x, maps, targets, spec.params.faithfulness_steps, spec.batch_size
    )
    values = {
        "average_drop": faithfulness.average_drop(y, o),
        "average_increase": faithfulness.average_increase(y, o),
        "deletion_auc": deletion,
        "insertion_auc": insertion,
    }
    if masks is not None:
        values["iou"] = faithfulness.localization_iou(
            maps, masks, spec.params.localization_threshold
        )
        values["pointing_game"] = faithfulness.pointing_game(maps, masks)
    return {k: v.double().numpy() for k, v in values.items()}


def beats_random(scores: Sequence[Score]) -> dict[str, dict[str, dict[str, bool | None]]]:
    """layer -> method -> metric -> whether the method's mean beats ``control_random``'s at that
    layer (lower Average Drop / deletion AUC, higher otherwise); None where undefined."""
    random = {(s.stage, s.measure): s.mean for s in scores if s.method == CONTROL}
    out: dict[str, dict[str, dict[str, bool | None]]] = {}
    for s in scores:
        if s.method == CONTROL:
            continue
        reference = random.get((s.stage, s.measure))
        verdict: bool | None = None
        if s.mean is not None and reference is not None:
            verdict = s.mean < reference if s.measure in LOWER_IS_BETTER else s.mean > reference
        out.setdefault(s.stage, {}).setdefault(s.method, {})[s.measure] = verdict
    return out
