"""Score-CAM at every block of resnet18, 224 x 224, 16 images: the most expensive part of the
``layers`` analysis (one masked forward pass per image and channel: 64 + 64 + 128 + 256 + 512 =
1024 per image at conv1, layer1 .. layer4).

Runs the engine exactly as the analysis does (``compute_maps`` with ``scorecam`` at each layer
that :func:`saliency_audit.workers.engine.layers.block_output_layers` picks; masked passes batched
``scorecam_batch`` at a time, in ONNX Runtime on the CPU), ``--repeats`` times, and prints the
wall time per layer and in all with the median over runs.

    .venv/bin/python bench/layers_scorecam.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saliency_audit.workers.engine.layers import block_output_layers
from saliency_audit.workers.engine.maps import compute_maps
from saliency_audit.workers.engine.spec import AuditSpec
from tests.engine.nets import torchvision_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write raw numbers here")
    args = parser.parse_args()

    model = torchvision_model(args.arch, seed=0).eval()
    x = torch.randn(
        args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        targets = model(x).argmax(1)
    layers = block_output_layers(model, x[:1])
    spec = AuditSpec(methods=("scorecam",), batch_size=args.batch)
    runs: list[dict[str, float]] = []
    for run in range(args.repeats):
        times: dict[str, float] = {}
        for _block, layer in layers:
            t0 = time.perf_counter()
            maps = compute_maps(
                model, x, targets, ["scorecam"], spec, layer, device=torch.device("cpu")
            )
            times[layer] = time.perf_counter() - t0
            assert maps.maps["scorecam"].shape[0] == args.images, maps.not_applicable
        times["total"] = sum(times.values())
        runs.append(times)
        print(f"run {run + 1}: " + json.dumps({k: round(v, 1) for k, v in times.items()}))
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(
        f"{args.arch} {args.size}x{args.size}, {args.images} images, layers "
        f"{[layer for _, layer in layers]}, torch threads {torch.get_num_threads()}: median "
        f"total {median['total']:.1f} s over {args.repeats} runs; per layer "
        + ", ".join(f"{k} {v:.1f} s" for k, v in median.items() if k != "total")
    )
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs, "median": median}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
