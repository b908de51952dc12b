"""Wall time of a complete audit: every method and every test on a reference small CNN.

Issue 3's budget: every method and every test (cascading, cascading_bottom_up, independent,
data_randomization trained here, smprt with 50 noisy samples, emprt, random_logit) on the small
CNN and 16 images in under 5 minutes on the 2-core CPU machine. Each run is a fresh
``run_audit`` call with default parameters (the data randomization trains both copies on the
1438-image digits training split); the script prints the time of each part and the median
total over ``--repeats`` runs.

    .venv/bin/python bench/full_audit.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.reference.export_training_set import export_training_set  # noqa: E402
from saliency_audit.workers.engine.data_randomization import LabeledImages  # noqa: E402
from saliency_audit.workers.engine.images import load_image_folder, load_labeled_folder, preprocess  # noqa: E402
from saliency_audit.workers.engine.methods import METHODS  # noqa: E402
from saliency_audit.workers.engine.models.loader import load_model  # noqa: E402
from saliency_audit.workers.engine.runner import run_audit  # noqa: E402
from saliency_audit.workers.engine.spec import TESTS, AuditSpec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits_small_cnn")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    reference = ROOT / "examples" / "reference"
    model = load_model((reference / f"{args.model}.onnx").read_bytes())
    dataset = args.model.split("_")[0]
    decoded = load_image_folder(reference / f"{dataset}_images", model.input_spec.channels)
    images = preprocess(decoded[: args.images], model.input_spec)
    with tempfile.TemporaryDirectory() as tmp:
        export_training_set(dataset, Path(tmp))
        train_images, labels, _ = load_labeled_folder(
            Path(tmp), model.input_spec.channels, model.input_spec.class_names
        )
    train = LabeledImages(preprocess(train_images, model.input_spec), torch.tensor(labels))
    spec = AuditSpec(methods=tuple(n for n, i in METHODS.items() if not i.is_control), tests=TESTS)
    totals = []
    for run in range(args.repeats):
        t0 = time.perf_counter()
        result = run_audit(model, images, spec, train=train)
        totals.append(time.perf_counter() - t0)
        parts = {k: round(v, 1) for k, v in result.timings_s.items() if k.startswith("test_")}
        memorized = result.tests["data_randomization"].details["memorization"]
        print(f"run {run + 1}: {totals[-1]:.1f} s; {parts}; {memorized}", flush=True)
    print(
        f"{args.model}, {args.images} images, {len(spec.methods)} methods + 2 controls, "
        f"{len(TESTS)} tests, torch threads {torch.get_num_threads()}: median "
        f"{statistics.median(totals):.1f} s over {args.repeats} runs "
        f"(min {min(totals):.1f}, max {max(totals):.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
