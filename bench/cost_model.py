"""Predicted against actual wall time of whole audits (issue 19 item 4: within 25%).

For each bench model: measure its pass prices on this machine (``workers/engine/timing.py``,
what a worker's inspection and ``saliency-audit run`` do), predict the audit's wall time from
its spec (``contract/cost.py``: :func:`predict`), run the audit with the engine call ``run``
makes, and compare. The audit is the CLI's default (every built-in method, the ``cascading``
test at block granularity with the policy's stage plan, batch 16) unless ``--methods`` says
otherwise; each model is run ``--repeats`` times and the median actual time is compared.

    .venv/bin/python bench/cost_model.py --models small_resnet,small_cnn,resnet18@112 --repeats 3
    .venv/bin/python bench/cost_model.py --models resnet50@224 --images 16 --predict-only

A model is ``small_resnet``, ``small_cnn`` (the bundled 32-px ONNX files, their 16 images),
``digits_cnn`` or ``NAME@SIZE`` (a torchvision architecture with seeded random weights on
crops of scikit-image's sample photos, as bench/efficiency.py builds them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saliency_audit.workers.engine.api import DEFAULT_TESTS, audit, read_images  # noqa: E402
from saliency_audit.workers.engine.catalogue import catalogue  # noqa: E402
from saliency_audit.workers.engine.contract.cost import families_of, predict  # noqa: E402
from saliency_audit.workers.engine.contract.spec import AuditSpec  # noqa: E402
from saliency_audit.workers.engine.methods.base import METHODS  # noqa: E402
from saliency_audit.workers.engine.models.loader import LoadedModel, load_model  # noqa: E402
from saliency_audit.workers.engine.policy import rule_stages  # noqa: E402
from saliency_audit.workers.engine.timing import measure_pass_prices  # noqa: E402

REFERENCE = ROOT / "examples" / "reference"


def build(name: str, images: int) -> tuple[LoadedModel, torch.Tensor, bool]:
    if name in ("small_resnet", "small_cnn", "digits_cnn"):
        file, folder = {
            "small_resnet": ("shapes_small_resnet.onnx", "shapes_images"),
            "small_cnn": ("shapes_small_cnn.onnx", "shapes_images"),
            "digits_cnn": ("digits_small_cnn.onnx", "digits_images"),
        }[name]
        model = load_model((REFERENCE / file).read_bytes())
        read = read_images(REFERENCE / folder, model.input_spec)
        return model, read.tensor[:images], True
    import argparse as _argparse

    sys.path.insert(0, str(ROOT / "bench"))
    from efficiency import build as efficiency_build  # the same photos and weights

    arch, size = name.split("@")
    model, x = efficiency_build(_argparse.Namespace(model=arch, size=int(size), images=images))
    return model, x, False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small_resnet,small_cnn,digits_cnn")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--methods", default=None, help="comma-separated (default: every one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--predict-only", action="store_true")
    args = parser.parse_args(argv)
    families = families_of(catalogue()["methods"])
    methods = (
        tuple(args.methods.split(","))
        if args.methods
        else tuple(n for n, m in METHODS.items() if not m.is_control)
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images\n")
    print("| model | methods | probe s | predicted s | actual s (runs) | actual / predicted |")
    print("| --- | --- | ---: | ---: | --- | ---: |")
    for name in args.models.split(","):
        model, x, onnx = build(name, args.images)
        spec = AuditSpec(methods=methods, tests=DEFAULT_TESTS, device="cpu")
        prices = measure_pass_prices(model, "cpu")
        rules = rule_stages(spec.policy)
        found = predict(
            spec, families, prices, images=int(x.shape[0]), onnx=onnx, rule_stages=rules
        )
        parts = ", ".join(f"{k} {v:.1f}" for k, v in found.parts.items() if v >= 0.05)
        print(f"<!-- {name}: parts {parts} -->", file=sys.stderr)
        actual: list[float] = []
        if not args.predict_only:
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                audit(model, x, spec=spec)
                actual.append(time.perf_counter() - t0)
        median = statistics.median(actual) if actual else None
        label = "every method" if not args.methods else args.methods
        runs = ", ".join(f"{a:.1f}" for a in actual) or "not run"
        ratio = f"{median / found.seconds:.2f}" if median else "-"
        print(
            f"| {name} | {label} | {prices.measured_s:.1f} | {found.seconds:.1f} | "
            f"{median if median is None else round(median, 1)} ({runs}) | {ratio} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
