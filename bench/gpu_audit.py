"""Wall time of a GPU audit: resnet50, 100 images, every method but Score-CAM, per-block cascade.

The GPU issue's budget: torchvision resnet50 (seeded random weights, realistic BatchNorm
statistics: ``tests.engine.nets.torchvision_model``) at 224 x 224, 100 images, every non-control
method except Score-CAM (plus the two controls every audit has), the ``cascading`` test at
``block`` granularity (the trained model, then fc, layer4 .. layer1, bn1, conv1 randomized top
down: 8 map sets), default method parameters, in under 60 s on one H100. Record the figure and
the device.

The model goes through the engine's torchvision loader (``load_torchvision`` on a safetensors
state dict, as an upload would), the images are scikit-image's bundled sample photos (no
download), cycled with deterministic crops and mirror images to reach ``--images``, resized and
ImageNet-normalized by the engine's ``preprocess``. One 2-image audit warms up (CUDA context,
cuDNN and cuBLAS handles, the caching allocator), then ``--repeats`` fresh ``run_audit`` calls
are timed. TF32 is left as the process has it (PyTorch's defaults: off for matmuls, on for
cuDNN convolutions) and printed.

    .venv/bin/python bench/gpu_audit.py                      # the issue's figure, on CUDA
    .venv/bin/python bench/gpu_audit.py --device cpu --arch resnet18 --images 2 --size 64 \\
        --repeats 1                                          # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saliency_audit.workers.engine.images import DecodedImage, preprocess  # noqa: E402
from saliency_audit.workers.engine.methods import METHODS  # noqa: E402
from saliency_audit.workers.engine.models.base import LoadedModel  # noqa: E402
from saliency_audit.workers.engine.models.torchvision_adapter import load_torchvision  # noqa: E402
from saliency_audit.workers.engine.result import AuditResult  # noqa: E402
from saliency_audit.workers.engine.runner import run_audit  # noqa: E402
from saliency_audit.workers.engine.spec import AuditSpec, InputSpec  # noqa: E402
from tests.engine.nets import torchvision_model  # noqa: E402

TARGET_S = 60.0  # the budget for resnet50, 100 images, on one H100
WARMUP_IMAGES = 2
# scikit-image's bundled photos (files shipped in skimage/data, no download); grey ones are
# repeated into three channels
PHOTOS: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "stereo_motorcycle",
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
)
# variants of each photo, in order: (crop side as a fraction of the short side, anchor, mirror)
VARIANTS: tuple[tuple[float, str, bool], ...] = (
    (1.0, "center", False),
    (1.0, "center", True),
    (0.8, "top_left", False),
    (0.8, "bottom_right", True),
    (0.7, "center", False),
    (0.7, "top_right", True),
    (0.6, "bottom_left", False),
    (0.6, "center", True),
)


def sample_photo(name: str) -> np.ndarray:
    """One bundled photo as uint8 (H, W, 3)."""
    from skimage import data

    pixels = getattr(data, name)()
    if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
        pixels = pixels[0]
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name} is {pixels.dtype}, expected uint8")
    return np.ascontiguousarray(pixels[..., :3])


def crop(pixels: np.ndarray, fraction: float, anchor: str, mirror: bool) -> np.ndarray:
    """A square crop of ``fraction`` x the short side at ``anchor``, mirrored left-right."""
    height, width = pixels.shape[:2]
    side = max(1, round(min(height, width) * fraction))
    top = {"top": 0, "bottom": height - side}.get(anchor.split("_")[0], (height - side) // 2)
    left = {"left": 0, "right": width - side}.get(anchor.split("_")[-1], (width - side) // 2)
    out = pixels[top : top + side, left : left + side]
    return np.ascontiguousarray(out[:, ::-1] if mirror else out)


def audit_images(n: int, spec: InputSpec) -> tuple[torch.Tensor, list[str]]:
    """``n`` preprocessed NCHW images: every photo in turn, then the next variant of each."""
    if n > len(PHOTOS) * len(VARIANTS):
        raise SystemExit(f"--images: at most {len(PHOTOS) * len(VARIANTS)}")
    photos = {name: sample_photo(name) for name in PHOTOS[: min(n, len(PHOTOS))]}
    decoded = []
    for i in range(n):
        name = PHOTOS[i % len(PHOTOS)]
        fraction, anchor, mirror = VARIANTS[i // len(PHOTOS)]
        label = f"{name}_{round(fraction * 100)}_{anchor}{'_mirror' if mirror else ''}"
        decoded.append(DecodedImage(label, crop(photos[name], fraction, anchor, mirror)))
    return preprocess(decoded, spec), [d.name for d in decoded]


def load_model(arch: str, size: int) -> LoadedModel:
    """The architecture with seeded weights, through the loader an upload goes through."""
    from safetensors.torch import save

    weights = save(torchvision_model(arch, seed=0).state_dict())
    return load_torchvision(arch, weights, InputSpec(height=size, width=size))


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (
            f"{torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB, "
            f"compute capability {props.major}.{props.minor})"
        )
    return f"CPU, torch threads {torch.get_num_threads()}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument(
        "--batch", type=int, default=None, help="images per batch (default: 32 on a GPU, 16 on CPU)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write raw numbers here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: CUDA is not available here (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}); use --device cpu for a CPU run"
        )
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: expected cuda, cuda:N or cpu")
    if args.images < 1 or args.repeats < 1:
        parser.error("--images and --repeats must be >= 1")
    batch = args.batch or (32 if device.type == "cuda" else 16)

    model = load_model(args.arch, args.size)
    x, names = audit_images(args.images, model.input_spec)
    methods = tuple(n for n, i in METHODS.items() if not i.is_control and n != "scorecam")
    spec = AuditSpec(
        methods=methods,
        tests=("cascading",),
        granularity="block",
        stages="all",  # every stage, as the recorded figures (audits default to the rule's)
        device=str(device),
        batch_size=batch,
    )
    tf32 = {
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    print(
        f"device {device}: {describe_device(device)}; torch {torch.__version__}, CUDA "
        f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; TF32 allowed: "
        + ", ".join(f"{k}={v}" for k, v in tf32.items()),
        flush=True,
    )
    print(
        f"{args.arch} {args.size}x{args.size}, {args.images} images, batch {batch}, "
        f"{len(methods)} methods + 2 controls ({', '.join(methods)}), cascading by block",
        flush=True,
    )

    t0 = time.perf_counter()
    run_audit(model, x[:WARMUP_IMAGES], spec, image_names=names[:WARMUP_IMAGES])
    synchronize(device)
    print(f"warm-up ({min(WARMUP_IMAGES, len(x))} images): {time.perf_counter() - t0:.1f} s")

    totals: list[float] = []
    runs: list[dict[str, float]] = []
    result: AuditResult | None = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for run in range(args.repeats):
        synchronize(device)
        t0 = time.perf_counter()
        result = run_audit(model, x, spec, image_names=names)
        synchronize(device)
        totals.append(time.perf_counter() - t0)
        runs.append(dict(result.timings_s))
        print(f"run {run + 1}: {totals[-1]:.1f} s; timings_s {json.dumps(result.timings_s)}")
    assert result is not None
    stages = len(result.tests["cascading"].stages)
    verdicts = Counter(v.verdict for v in result.verdicts)
    not_ok = {n: m.reason for n, m in result.methods.items() if m.status != "ok"}
    median = statistics.median(totals)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    print(f"cascading stages: {stages}; verdicts: {dict(verdicts)}; not applicable: {not_ok}")
    print(
        f"{args.arch} {args.size}x{args.size}, {args.images} images, batch {batch}, on "
        f"{describe_device(device)}: median {median:.1f} s over {args.repeats} runs "
        f"(min {min(totals):.1f}, max {max(totals):.1f})"
        + (f", peak GPU memory {peak:.1f} GiB" if peak is not None else "")
    )
    if device.type == "cuda" and args.arch == "resnet50" and args.images == 100:
        verdict = "meets" if median < TARGET_S else "misses"
        print(f"target: under {TARGET_S:.0f} s on one H100: {verdict} it on this device")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "arch": args.arch,
                    "size": args.size,
                    "images": args.images,
                    "batch": batch,
                    "device": str(device),
                    "device_name": describe_device(device),
                    "torch": torch.__version__,
                    "cuda": torch.version.cuda,
                    "tf32": tf32,
                    "totals_s": totals,
                    "timings_s": runs,
                    "median_s": median,
                    "peak_gpu_memory_gib": peak,
                    "environment": result.environment,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
