"""Train torchvision architectures of other families on the procedural shapes at 64 px, for the
verdict policy's calibration set (docs/policy.md): weights that mean something, from a task whose
answer is certain, with nothing downloaded.

    .venv/bin/python examples/calibration/train_families.py --out /work/calib

Writes ``<family>.onnx`` per architecture (legacy exporter, opset 17, dynamic batch, the input
spec and the training record in the metadata, as ``examples/reference/train.py`` does) and
``<family>.json`` (the training record). Deterministic for a given torch build and thread count.
The files are large (up to 45 MB) and are not committed; the calibration scores they give are
(``examples/calibration/collect.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):
    sys.path.insert(0, str(HERE.parents[1]))

from examples.reference.train import (  # noqa: E402
    accuracy,
    random_dihedral,
)
from saliency_audit.workers.engine.datasets import (  # noqa: E402
    load_digits_images,
    make_shapes,
    stratified_split,
)

SIZE = 64
MEAN, STD = 0.5, 0.5
TRAIN, TEST = 6000, 1000
SEED = 0


def _vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=SIZE,
        patch_size=8,
        num_layers=4,
        num_heads=4,
        hidden_dim=128,
        mlp_dim=256,
        num_classes=10,
    )


def _convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    settings = [CNBlockConfig(48, 96, 2), CNBlockConfig(96, 192, 2), CNBlockConfig(192, None, 2)]
    return ConvNeXt(settings, stochastic_depth_prob=0.0, num_classes=10)


def _torchvision(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=6, **kwargs)

    return build


# family -> (builder, dataset, epochs, peak learning rate). ConvNeXt and ViT did not learn the
# shapes from scratch here (44% and 49% test accuracy after 12 and 20 epochs at the best rate
# tried; EfficientNet-B0 stayed at chance), so they learn scikit-learn's digits at 64 px, an
# easier task; the EfficientNet family is covered by the pretrained Lite models.
FAMILIES: dict[str, tuple[Callable[[], nn.Module], str, int, float]] = {
    "resnet18": (_torchvision("resnet18"), "shapes", 6, 2e-3),
    "mobilenet_v2": (_torchvision("mobilenet_v2"), "shapes", 8, 3e-3),
    "convnext": (_convnext, "digits", 30, 3e-4),
    "vit": (_vit, "digits", 40, 3e-4),
}


def digits_at_64(seed: int = SEED) -> dict[str, torch.Tensor]:
    """scikit-learn's digits upsampled to 64 px, grey copied to the three channels (a grey PNG
    decodes to the same RGB), split as the reference models' digits."""
    images, labels = load_digits_images(SIZE)
    train_idx, test_idx = stratified_split(labels, 0.2, seed)

    def tensor(idx: object) -> torch.Tensor:
        x = torch.from_numpy(images[idx]).float()[:, None].expand(-1, 3, -1, -1) / 255.0
        return ((x - MEAN) / STD).contiguous()

    return {
        "x_train": tensor(train_idx),
        "y_train": torch.from_numpy(labels[train_idx]),
        "x_test": tensor(test_idx),
        "y_test": torch.from_numpy(labels[test_idx]),
    }


def shapes_at_64(seed: int = SEED) -> dict[str, torch.Tensor]:
    shapes = make_shapes(TRAIN + TEST, seed=seed, size=SIZE)
    train_idx, test_idx = stratified_split(shapes.labels, TEST / (TRAIN + TEST), seed)

    def tensor(idx: object) -> torch.Tensor:
        x = torch.from_numpy(shapes.images[idx]).permute(0, 3, 1, 2).float() / 255.0
        return (x - MEAN) / STD

    return {
        "x_train": tensor(train_idx),
        "y_train": torch.from_numpy(shapes.labels[train_idx]),
        "x_test": tensor(test_idx),
        "y_test": torch.from_numpy(shapes.labels[test_idx]),
    }


def train(
    family: str, data: dict[str, torch.Tensor], batch_size: int = 64
) -> tuple[nn.Module, dict]:
    build, dataset, epochs, lr = FAMILIES[family]
    torch.manual_seed(SEED)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * -(-len(data["x_train"]) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(data["x_train"]), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = data["x_train"][idx]
            if dataset == "shapes":  # every shape class is closed under flips and turns
                x = random_dihedral(x, g)
            loss = nn.functional.cross_entropy(model(x), data["y_train"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        test = accuracy(model, data["x_test"], data["y_test"], batch=250)
        print(
            f"{family} epoch {epoch + 1}/{epochs}: test {test:.4f} "
            f"({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    record = {
        "family": family,
        "dataset": f"{dataset} {SIZE}px, seed {SEED}, {len(data['x_train'])} train / "
        f"{len(data['x_test'])} test",
        "epochs": epochs,
        "peak_lr": lr,
        "train_accuracy": accuracy(model, data["x_train"], data["y_train"], batch=250),
        "test_accuracy": accuracy(model, data["x_test"], data["y_test"], batch=250),
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return model.eval(), record


def export(model: nn.Module, path: Path, record: dict[str, object], dataset: str) -> None:
    import onnx

    torch.onnx.export(
        model,
        (torch.zeros(1, 3, SIZE, SIZE),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    proto = onnx.load(str(path))
    from saliency_audit.workers.engine.datasets import SHAPE_CLASSES

    classes = list(SHAPE_CLASSES) if dataset == "shapes" else [str(d) for d in range(10)]
    spec = {
        "height": SIZE,
        "width": SIZE,
        "channels": 3,
        "layout": "NCHW",
        "mean": [MEAN] * 3,
        "std": [STD] * 3,
        "class_names": classes,
    }
    for key, value in (("saliency_audit.input_spec", spec), ("saliency_audit.training", record)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    datasets = {"shapes": shapes_at_64, "digits": digits_at_64}
    for family in args.families.split(","):
        data = datasets[FAMILIES[family][1]]()
        path = args.out / f"{family}.onnx"
        if path.exists():
            print(f"{family}: {path} exists", file=sys.stderr)
            continue
        model, record = train(family, data)
        (args.out / f"{family}.json").write_text(json.dumps(record, indent=1) + "\n")
        export(model, path, record, FAMILIES[family][1])
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
