"""Efficiency of a full audit: its wall time over the cost of the passes it cannot avoid.

    efficiency = audit wall time / sum over pass kinds of (passes needed x time of one pass)

The audit is every method (13 + 2 controls) and the cascading test at module granularity (one
stage per parameterized module, from the logits down), 16 images, default parameters. The
passes it needs are counted from the spec, per model state (the trained model and each stage),
with the batch sizes the engine runs them at:

* forward + backward at ``batch_size`` rows: 1 each for the gradient family (gradient,
  gradient x input, Grad-CAM, Grad-CAM++), the guided family (Guided Backprop, Guided
  Grad-CAM), LRP and Relevance-CAM;
* forward + backward at 32 rows: ``ig_steps`` path points and ``noise_samples`` noisy copies
  per image (Integrated Gradients; SmoothGrad, SmoothGrad^2 and VarGrad share theirs);
* forward at ``batch_size`` rows: Score-CAM's activation capture per state; the predictions
  (and, for an ONNX model, the PyTorch side of the fidelity check) once per audit;
* forward at ``scorecam_batch`` (64) rows: one per (image, channel) whose activation is not all
  zero, counted while the audit runs (an all-zero channel gives a zero mask, so its score is
  the score of a zero image: no pass needed).

"One pass" is timed right after the audit, in the same process and under the same thread
settings, on the same module and image rows: ``torch.autograd.grad`` of the summed target
logits w.r.t. the input for forward + backward, ``torch.inference_mode`` for forward. Two
denominators are reported: **eager** (plain PyTorch, default memory layout: the pass a user
would write) and **best** (the fastest of contiguous and channels-last PyTorch for forward +
backward, and of those and ONNX Runtime for forward: the strictest bound).

``--stages K`` keeps the first K stages of the cascade (for models whose full cascade takes
hours on this machine); the output says so and gives the measured time per model state.

    .venv/bin/python bench/efficiency.py --model small_resnet --repeats 3
    .venv/bin/python bench/efficiency.py --model resnet18 --stages 1 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.methods import median_time  # noqa: E402
from saliency_audit.workers.engine import sanity  # noqa: E402
from saliency_audit.workers.engine.contract.cost import (  # noqa: E402
    FB,
    PassCount,
    audit_passes,
    base_kind,
)
from saliency_audit.workers.engine.images import load_image_folder, preprocess  # noqa: E402
from saliency_audit.workers.engine.methods import METHODS, scorecam  # noqa: E402
from saliency_audit.workers.engine.methods._ort import ort_forward  # noqa: E402
from saliency_audit.workers.engine.models.base import LoadedModel  # noqa: E402
from saliency_audit.workers.engine.models.loader import load_model  # noqa: E402
from saliency_audit.workers.engine.randomization import stages, units  # noqa: E402
from saliency_audit.workers.engine.runner import run_audit  # noqa: E402
from saliency_audit.workers.engine.spec import AuditSpec, InputSpec  # noqa: E402
from tests.engine.nets import torchvision_model  # noqa: E402


class LiveRows:
    """Counts Score-CAM's masked passes (live (image, channel) rows) while an audit runs."""

    def __init__(self) -> None:
        self.rows = 0
        self._original = scorecam.scorecam_scores

    def __enter__(self) -> LiveRows:
        def counting(
            model: Any, x: torch.Tensor, target: torch.Tensor, activation: torch.Tensor, rows: int
        ) -> torch.Tensor:
            flat = activation.flatten(2)
            self.rows += int(((flat.amax(dim=2) != 0) | (flat.amin(dim=2) != 0)).sum())
            return self._original(model, x, target, activation, rows)

        scorecam.scorecam_scores = counting  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        scorecam.scorecam_scores = self._original


def needed_passes(spec: AuditSpec, n: int, states: int, live_rows: int, onnx: bool) -> PassCount:
    """The contract's count (workers/engine/contract/cost.py, which the API prices audits with),
    with Score-CAM's live rows as counted while the audit ran."""
    families = {name: info.family for name, info in METHODS.items()}
    return audit_passes(
        spec, families, images=n, stages=states - 1, onnx=onnx, scorecam_rows=live_rows
    )


def rows_of(x: torch.Tensor, r: int) -> torch.Tensor:
    reps = -(-r // x.shape[0])
    return x.repeat(reps, 1, 1, 1)[:r].contiguous()


def pass_times(
    module: nn.Module, x: torch.Tensor, target: torch.Tensor, keys: set[tuple[str, int]], reps: int
) -> tuple[dict[tuple[str, int], float], dict[tuple[str, int], dict[str, float]]]:
    """Eager time per pass kind, and every variant's time (for the 'best' denominator)."""
    # the audit leaves the module channels-last; "eager" is the plain, contiguous module
    plain = copy.deepcopy(module).to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    cl = copy.deepcopy(module).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    variants: dict[tuple[str, int], dict[str, float]] = {}
    for kind, r in sorted(keys):
        xr, tr = rows_of(x, r), target.repeat(-(-r // len(target)))[:r]

        def fb(mod: nn.Module, inp: torch.Tensor, tr: torch.Tensor = tr) -> Callable[[], object]:
            def run() -> object:
                leaf = inp.detach().clone().requires_grad_(True)
                score = mod(leaf).gather(1, tr.view(-1, 1)).sum()
                return torch.autograd.grad(score, [leaf])

            return run

        def fw(
            mod: Callable[[torch.Tensor], torch.Tensor], inp: torch.Tensor
        ) -> Callable[[], object]:
            def run() -> object:
                with torch.inference_mode():
                    return mod(inp)

            return run

        xcl = xr.contiguous(memory_format=torch.channels_last)
        if base_kind(kind) == FB:
            v = {"eager": median_time(fb(plain, xr), reps)}
            v["channels_last"] = median_time(fb(cl, xcl), reps)
        else:
            v = {"eager": median_time(fw(plain, xr), reps)}
            v["channels_last"] = median_time(fw(cl, xcl), reps)
            with torch.no_grad():
                logits = plain(xr[: min(4, r)])
            ort = ort_forward(plain, xr[: min(4, r)], logits)
            if ort is not None:
                v["onnxruntime"] = median_time(fw(ort, xr), reps)
        variants[(kind, r)] = v
    eager = {k: v["eager"] for k, v in variants.items()}
    return eager, variants


def build(args: argparse.Namespace) -> tuple[LoadedModel, torch.Tensor]:
    if args.model == "small_resnet":
        reference = ROOT / "examples" / "reference"
        model = load_model((reference / "shapes_small_resnet.onnx").read_bytes())
        decoded = load_image_folder(reference / "shapes_images", model.input_spec.channels)
        return model, preprocess(decoded[: args.images], model.input_spec)
    module = torchvision_model(args.model, seed=0).eval()
    spec = InputSpec(height=args.size, width=args.size)
    model = LoadedModel(module, spec, "torchvision", "bench", architecture=args.model)
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    decoded = []
    for i in range(args.images):  # deterministic crops of the sample photos
        photo = torch.from_numpy(photos[i % len(photos)]).permute(2, 0, 1)
        h, w = photo.shape[1:]
        side = min(h, w) * (4 + i // len(photos) % 4) // 8
        top, left = (h - side) * (i % 3) // 2, (w - side) * (i % 5) // 4
        decoded.append(photo[:, top : top + side, left : left + side].unsqueeze(0).float())
    resized = [
        nn.functional.interpolate(d, size=(args.size, args.size), mode="bilinear") for d in decoded
    ]
    x = torch.cat(resized) / 255.0
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return model, ((x - mean) / std).float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="small_resnet", help="small_resnet or a torchvision arch"
    )
    parser.add_argument("--size", type=int, default=224, help="input side for torchvision models")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pass-repeats", type=int, default=5)
    parser.add_argument("--stages", type=int, default=None, help="keep the first K stages only")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    model, images = build(args)
    module = model.module
    all_stages = stages(units(module, "module"), "cascading")
    kept = len(all_stages) if args.stages is None else min(args.stages, len(all_stages))
    if kept < len(all_stages):
        original = sanity.stages

        def truncated(unit_list: Any, test: Any) -> Any:
            return original(unit_list, test)[:kept]

        sanity.stages = truncated  # type: ignore[assignment]
        print(f"NOTE: the cascade is cut to its first {kept} of {len(all_stages)} stages")
    states = 1 + kept
    spec = AuditSpec(
        methods=tuple(n for n, i in METHODS.items() if not i.is_control),
        tests=("cascading",),
        granularity="module",
        stages="all",  # a full per-module cascade (audits default to the rule's stages)
        batch_size=16,
    )
    print(
        f"{args.model}, {len(images)} images of {tuple(images.shape[1:])}, "
        f"{len(spec.methods)} methods + 2 controls, cascading per module: {len(all_stages)} "
        f"stages ({states} model states measured), torch threads {torch.get_num_threads()}",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    for run in range(args.repeats):
        with LiveRows() as live:
            t0 = time.perf_counter()
            result = run_audit(model, images, spec)
            wall = time.perf_counter() - t0
        targets = torch.tensor([r.target for r in result.images])
        count = needed_passes(spec, len(images), states, live.rows, model.onnx_bytes is not None)
        eager, variants = pass_times(module, images, targets, set(count.rows), args.pass_repeats)
        best = {k: min(v.values()) for k, v in variants.items()}
        row = {
            "wall_s": wall,
            "per_state_s": wall / states,
            "needed_eager_s": count.cost(eager),
            "needed_best_s": count.cost(best),
            "efficiency_eager": wall / count.cost(eager),
            "efficiency_best": wall / count.cost(best),
            "passes": count.passes(),
            "pass_times_s": {f"{k} @{r}": v for (k, r), v in variants.items()},
            "timings_s": result.timings_s,
            "family_time_s": {m.family: m.family_time_s for m in result.methods.values()},
        }
        runs.append(row)
        print(
            f"run {run + 1}: wall {wall:.1f} s ({wall / states:.1f} s per state); passes "
            f"{count.cost(eager):.1f} s eager, {count.cost(best):.1f} s best; efficiency "
            f"{row['efficiency_eager']:.3f} (eager), {row['efficiency_best']:.3f} (best)",
            flush=True,
        )
        print("  passes:", {k: round(v, 1) for k, v in row["passes"].items()})
        print(
            "  one pass (s):",
            {k: {n: round(t, 4) for n, t in v.items()} for k, v in row["pass_times_s"].items()},
        )
        print("  family time (s):", {k: round(v, 2) for k, v in row["family_time_s"].items()})
        print("  audit timings (s):", {k: round(v, 2) for k, v in result.timings_s.items()})
    for key in ("wall_s", "efficiency_eager", "efficiency_best"):
        values = [r[key] for r in runs]
        listed = ", ".join(f"{v:.3f}" for v in values)
        print(f"median {key}: {statistics.median(values):.3f} (runs: {listed})")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
