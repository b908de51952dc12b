"""Wall time of one cascading-randomization audit, ours against Quantus 0.6's MPRT.

The protocol is the model parameter randomization test of Adebayo et al. 2018 (section 3.1):
cascading randomization from the logits down, one stage per module that owns parameters
(every Conv, BatchNorm and Linear), each stage's maps compared with the trained model's maps
on the same images and targets (the model's predicted classes) with four measures: Spearman
rank correlation of |map|, Spearman of the signed map, SSIM and the Pearson correlation of HOG
features (all as defined in workers/engine/similarity.py).

* Ours: one ``run_audit`` call (``tests=("cascading",)``, ``granularity="module"``, the four
  measures); it computes every method's maps once per stage (plus our two control methods,
  part of every audit and so part of our cost) and scores all four measures from them.
* Quantus: ``quantus.MPRT(layer_order="top_down")`` scores one similarity function with one
  ``abs`` setting per run, so it takes four runs per method: ``correlation_spearman`` with
  ``abs=True`` and with ``abs=False``, and two similarity functions written here (2-D SSIM and
  HOG + Pearson of each map reshaped to H x W and min-max normalized to [0, 1], as ours;
  Quantus's own ``ssim`` would run on the flattened rows it is handed, a 1-D SSIM). The
  explanations are the reference libraries of bench/methods.py (Captum, pytorch-grad-cam,
  Zennit) with our default parameters; relevance_cam, which no library implements, is our own
  implementation. The trained model's explanations are computed once per method and passed
  as ``a_batch`` to all four runs (favourable to Quantus: each run still recomputes them once).

Each repeat runs ours, then Quantus's runs, so both sides of a ratio see the same load; the
table reports medians over repeats.

    .venv/bin/python bench/quantus_mprt.py --methods gradient --repeats 3
    .venv/bin/python bench/quantus_mprt.py --methods all --repeats 1

``--stages K`` truncates both sides to the first K cascade stages, for development only.
Needs Quantus 0.6.0, installed without its ``opencv-python`` requirement (the venv's
``opencv-python-headless`` provides the same ``cv2``)::

    .venv/bin/pip install --no-deps quantus==0.6.0 && .venv/bin/pip install pandas cachetools

Nothing outside bench/ imports Quantus.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# pytorch-grad-cam's ScoreCAM draws a tqdm bar per call; tqdm reads this when it is imported
# (torch imports it), so it is set before torch.
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.methods import references  # noqa: E402
from saliency_audit.workers.engine import sanity, similarity  # noqa: E402
from saliency_audit.workers.engine.images import DecodedImage, load_image_folder, preprocess  # noqa: E402
from saliency_audit.workers.engine.methods import (  # noqa: E402
    METHODS,
    MethodContext,
    compute_methods,
    resolve_layer,
)
from saliency_audit.workers.engine.models.base import LoadedModel  # noqa: E402
from saliency_audit.workers.engine.models.loader import load_model  # noqa: E402
from saliency_audit.workers.engine.models.torchvision_adapter import prepare_for_attribution  # noqa: E402
from saliency_audit.workers.engine.randomization import Stage, Unit, stages, units  # noqa: E402
from saliency_audit.workers.engine.result import AuditResult  # noqa: E402
from saliency_audit.workers.engine.runner import run_audit  # noqa: E402
from saliency_audit.workers.engine.spec import AuditSpec, InputSpec, MethodParams  # noqa: E402
from tests.engine.nets import torchvision_model  # noqa: E402

MEASURES: tuple[str, ...] = ("spearman_abs", "spearman", "ssim", "hog_pearson")
NON_CONTROL: tuple[str, ...] = tuple(n for n, i in METHODS.items() if not i.is_control)
# skimage.data photos bundled with scikit-image (no download), RGB
SAMPLE_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "stereo_motorcycle",
)
SMALL_RESNET = ROOT / "examples" / "reference" / "shapes_small_resnet.onnx"
SHAPES_IMAGES = ROOT / "examples" / "reference" / "shapes_images"


# --------------------------------------------------------------------------- inputs


def sample_photos(n: int) -> list[DecodedImage]:
    from skimage import data

    if n > len(SAMPLE_PHOTOS):
        raise SystemExit(f"--images: at most {len(SAMPLE_PHOTOS)} sample photos for resnet18")
    out = []
    for name in SAMPLE_PHOTOS[:n]:
        pixels = getattr(data, name)()
        if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
            pixels = pixels[0]
        out.append(DecodedImage(name=name, pixels=np.ascontiguousarray(pixels[..., :3])))
    return out


def build(model_name: str, size: int, n_images: int) -> tuple[LoadedModel, torch.Tensor]:
    """The audited model and its preprocessed NCHW inputs."""
    if model_name == "small_resnet":
        loaded = load_model(SMALL_RESNET.read_bytes())
        spec = loaded.input_spec
        if size != spec.height:
            print(f"note: small_resnet takes {spec.height}x{spec.width} inputs; --size ignored")
        decoded = load_image_folder(SHAPES_IMAGES, spec.channels)
        return loaded, preprocess(decoded[:n_images], spec)
    module = prepare_for_attribution(torchvision_model(model_name, seed=0))
    spec = InputSpec(height=size, width=size)  # ImageNet mean and std
    loaded = LoadedModel(
        module=module,
        input_spec=spec,
        source="torchvision",
        sha256=hashlib.sha256(f"{model_name}/seed0".encode()).hexdigest(),
        architecture=model_name,
    )
    return loaded, preprocess(sample_photos(n_images), spec)


# --------------------------------------------------------------------------- Quantus side


def _maps_2d(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Quantus hands a similarity function (N, H*W) rows; back to [0, 1]-normalized maps."""
    maps = a.reshape(a.shape[0], *shape).astype(np.float64)
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1.0), 0.0)


def ssim_2d(shape: tuple[int, int]) -> Callable[..., np.ndarray]:
    """Our ``ssim``: skimage SSIM of the [0, 1]-normalized H x W maps, data_range 1."""
    from skimage.metrics import structural_similarity

    def similarity_func(a: np.ndarray, b: np.ndarray, batched: bool = True, **_: Any) -> Any:
        a2, b2 = _maps_2d(a, shape), _maps_2d(b, shape)
        return np.array(
            [
                structural_similarity(x, y, win_size=similarity.SSIM_WIN_SIZE, data_range=1.0)
                for x, y in zip(a2, b2, strict=True)
            ]
        )

    return similarity_func


def hog_pearson_2d(shape: tuple[int, int]) -> Callable[..., np.ndarray]:
    """Our ``hog_pearson``: skimage HOG (our parameters) of the [0, 1]-normalized maps, then
    Pearson; NaN for a constant map, as ours."""
    from scipy.stats import pearsonr
    from skimage.feature import hog

    def features(m: np.ndarray) -> np.ndarray:
        return np.asarray(
            hog(
                m,
                orientations=similarity.HOG_ORIENTATIONS,
                pixels_per_cell=similarity.HOG_PIXELS_PER_CELL,
                cells_per_block=similarity.HOG_CELLS_PER_BLOCK,
                block_norm="L2-Hys",
                feature_vector=True,
            )
        )

    def similarity_func(a: np.ndarray, b: np.ndarray, batched: bool = True, **_: Any) -> Any:
        out = []
        for x, y in zip(_maps_2d(a, shape), _maps_2d(b, shape), strict=True):
            fx, fy = features(x), features(y)
            if np.ptp(fx) == 0 or np.ptp(fy) == 0:
                out.append(np.nan)
            else:
                out.append(float(pearsonr(fx, fy)[0]))
        return np.array(out)

    return similarity_func


def quantus_similarity(measure: str, shape: tuple[int, int]) -> tuple[Callable[..., Any], bool]:
    """(similarity_func, abs) of the Quantus run that corresponds to one of our measures."""
    from quantus.functions.similarity_func import correlation_spearman

    if measure == "spearman_abs":
        return correlation_spearman, True
    if measure == "spearman":
        return correlation_spearman, False
    if measure == "ssim":
        return ssim_2d(shape), False
    if measure == "hog_pearson":
        return hog_pearson_2d(shape), False
    raise ValueError(measure)


def lrp_any_classes(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, n_classes: int
) -> torch.Tensor:
    """bench/methods.py's Zennit LRP reference (which assumes 1000 classes), for any number."""
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    composite = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
    with Gradient(model=model, composite=composite) as attributor:
        _, rel = attributor(x, torch.eye(n_classes)[target])
    return rel


@dataclass
class ReferenceExplainer:
    """Quantus's ``explain_func``: one reference method on a batch, channels summed to one map
    (our ``reduce_channels(..., "sum")``), returned as (N, 1, H, W) float32. Counts calls."""

    layer: str | None
    params: MethodParams
    num_classes: int
    calls: int = 0

    def __call__(self, model: nn.Module, inputs: Any, targets: Any, **kwargs: Any) -> np.ndarray:
        self.calls += 1
        method = kwargs["method"]
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
        t = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        model.eval()
        value: Any
        if method == "relevance_cam":
            ctx = MethodContext(
                params=self.params, layer=self.layer, generator=torch.Generator().manual_seed(0)
            )
            value = compute_methods(model, x, t, ["relevance_cam"], ctx)["relevance_cam"]
            if not isinstance(value, torch.Tensor):
                raise RuntimeError(f"relevance_cam not applicable: {value}")
        elif method == "lrp" and self.num_classes != 1000:
            value = lrp_any_classes(model, x, t, self.num_classes)
        else:
            if self.layer is None:
                raise SystemExit("the model has no conv layer for the CAM references")
            value = references(model, x, t, self.layer, self.params)[method]()
        maps = torch.as_tensor(np.asarray(value.detach() if torch.is_tensor(value) else value))
        if maps.ndim == 3:
            maps = maps.unsqueeze(1)
        reduced = similarity.reduce_channels(maps.float(), self.params.map_reduction)
        return reduced.unsqueeze(1).numpy().astype(np.float32)


@contextmanager
def truncated_cascade(k: int | None) -> Iterator[None]:
    """``--stages K``: both sides stop after the first K cascade stages (development only)."""
    if k is None:
        yield
        return
    from quantus.helpers.model.pytorch_model import PyTorchModel

    original_stages = sanity.stages
    original_layers = PyTorchModel.get_random_layer_generator

    def first_stages(unit_list: Sequence[Unit], test: Any) -> list[Stage]:
        return original_stages(unit_list, test)[:k]

    def first_layers(self: PyTorchModel, order: str = "top_down", seed: int = 42) -> Any:
        return itertools.islice(original_layers(self, order=order, seed=seed), k)

    sanity.stages = first_stages
    PyTorchModel.get_random_layer_generator = first_layers  # type: ignore[method-assign]
    try:
        yield
    finally:
        sanity.stages = original_stages
        PyTorchModel.get_random_layer_generator = original_layers  # type: ignore[method-assign]


@contextmanager
def tolerate_degenerate_maps(refused: list[str]) -> Iterator[None]:
    """Quantus 0.6 asserts (``asserts.assert_attributions``) that an explanation batch is not
    all zeros, all ones, constant or all negative, and aborts the whole run otherwise. A
    randomized model can legitimately give such maps (a ReLU'd CAM that is zero everywhere);
    our audit scores them NaN. So that the run completes with the same work, such batches are
    let through here (their similarities become NaN) and recorded in ``refused``; every other
    failed assertion (shapes) still raises."""
    from quantus.helpers import asserts

    original = asserts.assert_attributions

    def lenient(x_batch: np.ndarray, a_batch: np.ndarray) -> None:
        try:
            original(x_batch=x_batch, a_batch=a_batch)
        except AssertionError as exc:
            if np.ptp(a_batch) == 0 or np.all(a_batch < 0):
                refused.append(str(exc).split(",")[0])
                return
            raise

    asserts.assert_attributions = lenient
    try:
        yield
    finally:
        asserts.assert_attributions = original


@dataclass
class QuantusRuns:
    """One repeat of the Quantus side: seconds per part (summed over methods), the scores
    (method -> measure -> layer -> per-image values) and the explain_func calls made."""

    seconds: dict[str, float]
    scores: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    calls: int = 0
    refused: list[str] = field(default_factory=list)  # see tolerate_degenerate_maps

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def run_quantus(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    methods: Sequence[str],
    measures: Sequence[str],
    explainer: ReferenceExplainer,
    batch_size: int,
) -> QuantusRuns:
    import quantus

    shape = (int(x.shape[-2]), int(x.shape[-1]))
    runs = QuantusRuns(seconds={"a_batch": 0.0, **dict.fromkeys(measures, 0.0)})
    explainer.calls = 0
    with warnings.catch_warnings(), tolerate_degenerate_maps(runs.refused):
        warnings.simplefilter("ignore")  # constant-input and Quantus parameterisation warnings
        for method in methods:
            kwargs = {"method": method}
            t0 = time.perf_counter()
            a_batch = np.concatenate(
                [
                    explainer(module, x[i : i + batch_size], y[i : i + batch_size], **kwargs)
                    for i in range(0, len(x), batch_size)
                ]
            )
            runs.seconds["a_batch"] += time.perf_counter() - t0
            runs.scores[method] = {}
            for measure in measures:
                func, use_abs = quantus_similarity(measure, shape)
                t0 = time.perf_counter()
                metric = quantus.MPRT(
                    similarity_func=func,
                    layer_order="top_down",
                    abs=use_abs,
                    normalise=False,
                    disable_warnings=True,
                    display_progressbar=False,
                )
                out = metric(
                    model=module,
                    x_batch=x,
                    y_batch=y,
                    a_batch=a_batch,
                    channel_first=True,
                    explain_func=explainer,
                    explain_func_kwargs=kwargs,
                    batch_size=batch_size,
                )
                runs.seconds[measure] += time.perf_counter() - t0
                assert isinstance(out, dict)
                runs.scores[method][measure] = {k: list(v) for k, v in out.items()}
    runs.calls = explainer.calls
    return runs


# --------------------------------------------------------------------------- helpers


def quantus_layer_order(module: nn.Module) -> list[str]:
    """The modules Quantus's ``get_random_layer_generator(order="top_down")`` randomizes, in
    its order: every module with a ``reset_parameters``, registration order reversed."""
    return [n for n, m in module.named_modules() if hasattr(m, "reset_parameters")][::-1]


def our_mean(result: AuditResult, method: str, stage_index: int, measure: str) -> float:
    for score in result.tests["cascading"].scores:
        if (score.method, score.stage_index, score.measure) == (method, stage_index, measure):
            return float("nan") if score.mean is None else score.mean
    return float("nan")


def quantus_mean(runs: QuantusRuns, method: str, stage_name: str, measure: str) -> float:
    values = runs.scores.get(method, {}).get(measure, {}).get(stage_name)
    if not values:
        return float("nan")
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def warm_up(
    loaded: LoadedModel,
    x: torch.Tensor,
    layer: str | None,
    params: MethodParams,
    explainer: ReferenceExplainer,
    measures: Sequence[str],
) -> None:
    """Lazy imports, allocator and first-call costs out of the timed runs: one gradient pass
    per side on one image, the reference libraries imported, every similarity function once."""
    module = loaded.module
    x1 = x[:1]
    with torch.no_grad():
        t1 = module(x1).argmax(1)
    ctx = MethodContext(params=params, layer=layer, generator=torch.Generator().manual_seed(0))
    compute_methods(module, x1, t1, ["gradient", "control_sobel", "control_random"], ctx)
    if layer is not None:
        references(module, x1, t1, layer, params)  # imports Captum, pytorch-grad-cam, Zennit
    shape = (int(x.shape[-2]), int(x.shape[-1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import quantus  # noqa: F401

        maps = explainer(module, x1.numpy(), t1.numpy(), method="gradient")
        pair = np.concatenate([maps, maps[:, :, ::-1]])

        for measure in measures:
            func, _ = quantus_similarity(measure, shape)
            func(pair.reshape(2, -1), pair[::-1].reshape(2, -1), batched=True)
            ours = torch.from_numpy(pair[:, 0].copy())
            similarity.MEASURES[measure](ours, ours.flip(0))
    explainer.calls = 0


def fmt(seconds: float) -> str:
    return f"{seconds:.1f}" if seconds >= 10 else f"{seconds:.2f}"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision arch or small_resnet")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="batch size, both sides")
    parser.add_argument("--methods", choices=("gradient", "all"), default="gradient")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--stages", type=int, default=None, help="DEVELOPMENT ONLY: first K cascade stages"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: leave torch's default); only for development on a "
        "machine another job is loading, where 2 threads per process oversubscribe the cores",
    )
    args = parser.parse_args(argv)
    if args.stages is not None and args.stages < 1:
        parser.error("--stages must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.set_grad_enabled(True)
    loaded, x = build(args.model, args.size, args.images)
    module = loaded.module.eval()
    methods = NON_CONTROL if args.methods == "all" else ("gradient",)
    side = min(x.shape[-2:])
    measures = tuple(m for m in MEASURES if side >= similarity.MIN_MAP_SIDE_PX[m])
    if len(measures) < len(MEASURES):
        dropped = sorted(set(MEASURES) - set(measures))
        print(f"note: {side}px maps are too small for {dropped}; both sides leave them out")
    params = MethodParams()
    spec = AuditSpec(
        methods=methods,
        tests=("cascading",),
        granularity="module",
        stages="all",  # the paper's protocol, as Quantus runs it: maps at every stage
        measures=measures,
        batch_size=args.batch,
        device="cpu",
        params=params,
    )
    layer = resolve_layer(module, spec.layer, x[:1])
    with torch.no_grad():
        logits = torch.cat([module(x[i : i + args.batch]) for i in range(0, len(x), args.batch)])
    num_classes = int(logits.shape[1])
    y = logits.argmax(1).numpy()
    x_np = x.numpy()
    explainer = ReferenceExplainer(layer=layer, params=params, num_classes=num_classes)

    ours_order = [s.name for s in stages(units(module, "module"), "cascading")]
    theirs_order = quantus_layer_order(module)
    if ours_order != theirs_order:
        print("WARNING: the two sides randomize different modules or orders:")
        print("  ours:   ", ours_order)
        print("  Quantus:", theirs_order)
    n_full = len(ours_order)
    banner = ""
    if args.stages is not None:
        banner = (
            f"*** DEVELOPMENT RUN: --stages {args.stages}: both sides truncated to the first "
            f"{min(args.stages, n_full)} of {n_full} cascade stages; NOT the benchmark ***"
        )
        print(banner)
    print(
        f"{args.model} {x.shape[-2]}x{x.shape[-1]}, {len(x)} images, batch {args.batch}, "
        f"torch threads {torch.get_num_threads()}, methods {', '.join(methods)} "
        f"(+ our 2 controls), CAM layer {layer}, measures {', '.join(measures)}, "
        f"{n_full} parameterized modules (first stages: {', '.join(ours_order[:3])}, ...)",
        flush=True,
    )

    warm_up(loaded, x, layer, params, explainer, measures)
    ours_times: list[float] = []
    quantus_runs: list[QuantusRuns] = []
    result: AuditResult | None = None
    with truncated_cascade(args.stages):
        for r in range(args.repeats):
            t0 = time.perf_counter()
            result = run_audit(loaded, x, spec)
            ours_times.append(time.perf_counter() - t0)
            parts = {k: round(v, 2) for k, v in result.timings_s.items() if k != "total"}
            print(f"repeat {r + 1}: ours {fmt(ours_times[-1])} s {parts}", flush=True)
            runs = run_quantus(module, x_np, y, methods, measures, explainer, args.batch)
            quantus_runs.append(runs)
            per = ", ".join(f"{k} {fmt(v)}" for k, v in runs.seconds.items())
            print(
                f"repeat {r + 1}: Quantus {fmt(runs.total)} s ({per}); "
                f"{runs.calls} explain_func calls",
                flush=True,
            )
            if runs.refused:
                print(
                    f"  note: {len(runs.refused)} explanation batches Quantus 0.6 would have "
                    f"refused (AssertionError: {sorted(set(runs.refused))}) were let through "
                    "so its runs complete; their scores are NaN, as ours"
                )
    assert result is not None
    last = quantus_runs[-1]

    targets = [rec.target for rec in result.images]
    if targets != [int(t) for t in y]:
        print(f"WARNING: targets differ: ours {targets}, Quantus {list(y)}")
    our_stages = result.tests["cascading"].stages
    first = methods[0]
    their_stages = [k for k in last.scores[first][measures[0]] if k != "original"]
    if [s.name for s in our_stages] != their_stages:
        print(f"WARNING: stage names differ: ours {[s.name for s in our_stages]}")
        print(f"         Quantus {their_stages}")
    n_ours, n_theirs = len(our_stages), len(their_stages)
    n_batches = -(-len(x) // args.batch)
    names = len(methods) + 2
    t_ours = statistics.median(ours_times)
    t_theirs = statistics.median(r.total for r in quantus_runs)
    per_part = {k: statistics.median(r.seconds[k] for r in quantus_runs) for k in last.seconds}
    config = (
        f"{args.model} {x.shape[-2]}px, {len(x)} images, "
        + ("`gradient`" if args.methods == "gradient" else f"{len(methods)} methods")
        + (f" (**--stages {args.stages}, development only**)" if args.stages else "")
        + (f", {args.threads} thread(s) (--threads)" if args.threads else "")
    )
    print()
    if banner:
        print(banner + "\n")
    print(
        f"median of {args.repeats}; torch threads {torch.get_num_threads()}; Quantus "
        f"{_version('quantus')}, explanations by the reference libraries of bench/methods.py"
    )
    print()
    print(
        "| configuration | stages ours / Quantus | ours: map sets (x methods) | "
        "Quantus: explain_func calls | ours (s) | Quantus (s) | Quantus parts (s): "
        + " / ".join(per_part)
        + " | speed-up |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | --- | ---: |")
    print(
        f"| {config} | {n_ours} / {n_theirs} | {n_ours + 1} x {names} "
        f"({(n_ours + 1) * names * n_batches} method-batches) | {last.calls} | {fmt(t_ours)} | "
        f"{fmt(t_theirs)} | {' / '.join(fmt(v) for v in per_part.values())} | "
        f"**{t_theirs / t_ours:.1f}x** |"
    )
    print()
    near_top = min(2, n_ours)
    picks = sorted({near_top, n_ours})
    print(
        "Sanity check, mean Spearman |map| over images at a stage (both sides compare with the "
        "trained model's maps; the random weights differ, ours drawn per module from the audit "
        "seed, Quantus's reset_parameters after torch.manual_seed(43), so the numbers differ "
        "somewhat):"
    )
    print()
    print("| method | stage | ours | Quantus |")
    print("| --- | --- | ---: | ---: |")
    for method in methods:
        for i in picks:
            stage = our_stages[i - 1]
            ours_v = our_mean(result, method, i, "spearman_abs")
            theirs_v = quantus_mean(last, method, their_stages[i - 1], "spearman_abs")
            print(f"| `{method}` | {i} ({stage.name}) | {ours_v:.3f} | {theirs_v:.3f} |")
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    sys.exit(main())
