"""Images per second per saliency method, ours against the reference library, same everything.

Same model, same batch, same device, same work (IG steps, noise samples, Score-CAM channels);
each timing is the median of ``--repeats`` runs after one warm-up, ours and the reference
alternating run by run, so both sides of a ratio are measured in the same run of this script
under the same load. References: Captum 0.9 (gradient family, noise family,
IG, guided), pytorch-grad-cam 1.5 (Grad-CAM++, Score-CAM), Zennit (LRP), scikit-image (Sobel).

    .venv/bin/python bench/methods.py --arch resnet18 --size 224 --batch 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saliency_audit.workers.engine.methods import MethodContext, compute_methods
from saliency_audit.workers.engine.methods.base import get_module
from saliency_audit.workers.engine.spec import MethodParams
from tests.engine.nets import torchvision_model


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocator, hooks, lazy imports
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_median_times(
    ours: Callable[[], object], reference: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median times of both, measured alternately (ours first on even rounds, reference first
    on odd ones), so slow drift in machine load falls on both sides of the ratio alike."""
    ours()
    reference()
    t_ours, t_ref = [], []
    for r in range(repeats):
        order = [(ours, t_ours), (reference, t_ref)]
        for fn, sink in order if r % 2 == 0 else reversed(order):
            t0 = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - t0)
    return statistics.median(t_ours), statistics.median(t_ref)


def references(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, layer: str, params: MethodParams
) -> dict[str, Callable[[], object]]:
    import captum.attr as ca
    from pytorch_grad_cam import GradCAMPlusPlus, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from skimage.filters import sobel
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    layer_module = get_module(model, layer)
    sigma = params.noise_level * float(x.max() - x.min())
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    t = target.tolist()

    def noise(kind: str) -> Callable[[], object]:
        return lambda: ca.NoiseTunnel(ca.Saliency(model)).attribute(
            x, nt_type=kind, nt_samples=params.noise_samples, stdevs=sigma, target=t, abs=False
        )

    def gradcam() -> object:
        cam = ca.LayerGradCam(model, layer_module).attribute(x, target=t, relu_attributions=True)
        return ca.LayerAttribution.interpolate(cam, x.shape[-2:], "bilinear")

    def lrp() -> object:
        composite = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
        with Gradient(model=model, composite=composite) as attributor:
            _, rel = attributor(x, torch.eye(1000)[target])
        return rel

    def scorecam() -> object:
        with ScoreCAM(model=model, target_layers=[layer_module]) as cam:
            cam.batch_size = params.scorecam_batch
            return cam(input_tensor=x, targets=targets)

    def gradcam_pp() -> object:
        with GradCAMPlusPlus(model=model, target_layers=[layer_module]) as cam:
            return cam(input_tensor=x, targets=targets)

    return {
        "gradient": lambda: ca.Saliency(model).attribute(x, target=t, abs=False),
        "gradient_x_input": lambda: ca.InputXGradient(model).attribute(x, target=t),
        "integrated_gradients": lambda: ca.IntegratedGradients(model).attribute(
            x, target=t, n_steps=params.ig_steps, internal_batch_size=len(x) * params.ig_steps
        ),
        "smoothgrad": noise("smoothgrad"),
        "smoothgrad_sq": noise("smoothgrad_sq"),
        "vargrad": noise("vargrad"),
        "guided_backprop": lambda: ca.GuidedBackprop(model).attribute(x, target=t),
        "guided_gradcam": lambda: ca.GuidedGradCam(model, layer_module).attribute(x, target=t),
        "gradcam": gradcam,
        "gradcam_pp": gradcam_pp,
        "scorecam": scorecam,
        "lrp": lrp,
        "control_sobel": lambda: [sobel(im.sum(0).numpy()) for im in x],
    }


REFERENCE_NAMES = {
    "gradient": "Captum Saliency",
    "gradient_x_input": "Captum InputXGradient",
    "integrated_gradients": "Captum IntegratedGradients",
    "smoothgrad": "Captum NoiseTunnel",
    "smoothgrad_sq": "Captum NoiseTunnel",
    "vargrad": "Captum NoiseTunnel",
    "guided_backprop": "Captum GuidedBackprop",
    "guided_gradcam": "Captum GuidedGradCam",
    "gradcam": "Captum LayerGradCam",
    "gradcam_pp": "pytorch-grad-cam GradCAMPlusPlus",
    "scorecam": "pytorch-grad-cam ScoreCAM",
    "lrp": "Zennit Gradient + EpsilonPlusFlat",
    "relevance_cam": "(no library implementation)",
    "control_sobel": "scikit-image sobel",
    "control_random": "(none)",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--methods", default=",".join(REFERENCE_NAMES))
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--noise-samples", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="also write raw numbers here")
    args = parser.parse_args()

    torch.set_grad_enabled(True)
    model = torchvision_model(args.arch, seed=0)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = model(x).argmax(1)
    params = MethodParams(ig_steps=args.ig_steps, noise_samples=args.noise_samples)
    refs = references(model, x, target, args.layer, params)
    rows = []
    for name in args.methods.split(","):

        def ours(name: str = name) -> object:
            ctx = MethodContext(params=params, layer=args.layer, generator=torch.Generator())
            return compute_methods(model, x, target, [name], ctx)

        if name in refs:
            t_ours, t_ref = paired_median_times(ours, refs[name], args.repeats)
        else:
            t_ours, t_ref = median_time(ours, args.repeats), float("nan")
        rows.append(
            {
                "method": name,
                "ours_img_per_s": args.batch / t_ours,
                "reference": REFERENCE_NAMES[name],
                "reference_img_per_s": args.batch / t_ref,
                "speedup": t_ref / t_ours,
            }
        )
        print(
            f"{name:<22} ours {args.batch / t_ours:8.2f} img/s   "
            f"ref {args.batch / t_ref:8.2f} img/s   x{t_ref / t_ours:5.2f}",
            file=sys.stderr,
            flush=True,
        )

    shared = ["gradient", "gradient_x_input", "gradcam", "gradcam_pp"]
    shared_row = None
    if all(n in args.methods.split(",") for n in shared):

        def ours_shared() -> object:
            ctx = MethodContext(params=params, layer=args.layer, generator=torch.Generator())
            return compute_methods(model, x, target, shared, ctx)

        def refs_shared() -> object:
            return [refs[n]() for n in shared]

        t_s, t_r = paired_median_times(ours_shared, refs_shared, args.repeats)
        shared_row = (
            f"| gradient+gradient_x_input+gradcam+gradcam_pp together | {args.batch / t_s:.2f} | "
            f"the four references one after another | {args.batch / t_r:.2f} | {t_r / t_s:.2f}x |"
        )
    print(
        f"\n{args.arch} {args.size}x{args.size}, batch {args.batch}, CPU threads "
        f"{torch.get_num_threads()}, median of {args.repeats}, IG steps {args.ig_steps}, "
        f"noise samples {args.noise_samples}, CAM layer {args.layer}\n"
    )
    print("| method | ours (img/s) | reference | reference (img/s) | speed-up |")
    print("| --- | ---: | --- | ---: | ---: |")
    for r in rows:
        ref = r["reference_img_per_s"]
        print(
            f"| `{r['method']}` | {r['ours_img_per_s']:.2f} | {r['reference']} | "
            + ("n/a | n/a |" if np.isnan(ref) else f"{ref:.2f} | {r['speedup']:.2f}x |")
        )
    if shared_row:
        print(shared_row)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
