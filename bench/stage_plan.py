"""Wall time of a cascade with the planned stages against every stage (issue 19, item 2).

A torchvision architecture with seeded random weights (BatchNorm statistics measured on inputs
of the audit's size), the bundled shapes images at ``--size`` px, the paper's four methods and
the two controls, the cascading test (the default) at each ``--granularity``, every measure.
Each repeat runs ``stages: "rule"`` (the default: the stages the policy's rule reads) and
``stages: "all"`` back to back in one process; the script prints the stages and map sets of
each, the median wall time of the whole audit and of the cascade, and whether the verdicts
agree. The machine is shared: CPU seconds of the process (``time.process_time``) are printed
beside the wall time, as the steadier of the two under other people's load.

    .venv/bin/python bench/stage_plan.py --arch resnet18 --size 64 --repeats 3
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

from saliency_audit.workers.engine.images import load_image_folder, preprocess  # noqa: E402
from saliency_audit.workers.engine.models.base import LoadedModel  # noqa: E402
from saliency_audit.workers.engine.runner import run_audit  # noqa: E402
from saliency_audit.workers.engine.spec import AuditSpec, InputSpec  # noqa: E402
from tests.engine.nets import torchvision_model  # noqa: E402

PAPER_METHODS = ("gradient", "gradcam", "guided_backprop", "guided_gradcam")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--granularity", nargs="+", default=["module", "block"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    input_spec = InputSpec(height=args.size, width=args.size)
    module = torchvision_model(args.arch, seed=0, num_classes=10, statistics_at=args.size)
    model = LoadedModel(module, input_spec, "torchvision", "0" * 64, architecture=args.arch)
    decoded = load_image_folder(ROOT / "examples" / "reference" / "shapes_images", 3)
    x = preprocess(decoded[: args.images], input_spec)
    print(
        f"{args.arch} (random weights), {len(x)} images of {args.size} px, methods "
        f"{', '.join(PAPER_METHODS)} + 2 controls, cascading, torch threads "
        f"{torch.get_num_threads()}, {args.repeats} repeats"
    )
    for granularity in args.granularity:
        times: dict[str, list[tuple[float, float, float]]] = {"rule": [], "all": []}
        verdicts: dict[str, dict[tuple[str, str], tuple[str, float | None]]] = {}
        plans = {}
        for _ in range(args.repeats):
            for mode in ("rule", "all"):
                spec = AuditSpec(
                    methods=PAPER_METHODS,
                    tests=("cascading",),
                    granularity=granularity,  # type: ignore[arg-type]
                    stages=mode,  # type: ignore[arg-type]
                    batch_size=16,
                )
                t0, c0 = time.perf_counter(), time.process_time()
                result = run_audit(model, x, spec)
                total, cpu = time.perf_counter() - t0, time.process_time() - c0
                times[mode].append((total, result.timings_s["test_cascading"], cpu))
                plans[mode] = result.tests["cascading"].stage_plan
                verdicts[mode] = {(v.method, v.test): (v.verdict, v.mean) for v in result.verdicts}
        print(f"\n{granularity} granularity")
        for mode in ("rule", "all"):
            plan = plans[mode]
            assert plan is not None
            audit_s = statistics.median(t for t, _, _ in times[mode])
            cascade_s = statistics.median(c for _, c, _ in times[mode])
            cpu_s = statistics.median(c for _, _, c in times[mode])
            print(
                f"  stages {mode:>4}: {len(plan.computed):>2} of {plan.total} stages with maps "
                f"({1 + len(plan.computed)} map sets), audit {audit_s:6.1f} s wall (runs "
                f"{', '.join(f'{t:.1f}' for t, _, _ in times[mode])}), cascade "
                f"{cascade_s:6.1f} s, CPU {cpu_s:6.1f} s"
            )
        for k, what in ((0, "wall time"), (2, "CPU time")):
            rule_s = statistics.median(t[k] for t in times["rule"])
            all_s = statistics.median(t[k] for t in times["all"])
            print(f"  all / rule {what}: {all_s / rule_s:.2f}x")
        for key, (verdict, mean) in verdicts["all"].items():
            planned, planned_mean = verdicts["rule"][key]
            diff = "-" if mean is None or planned_mean is None else f"{planned_mean - mean:+.4f}"
            print(f"  {key[0]:<16} all {verdict:<12} rule {planned:<12} mean rule - all {diff}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
