"""Train one of the reference benchmark's models and export it to ONNX with its input spec.

    .venv/bin/python examples/reference/train.py --dataset shapes --arch small_cnn
    .venv/bin/python examples/reference/train.py --dataset digits --arch small_resnet

Writes ``<dataset>_<arch>.onnx`` into ``--out`` (default: this folder) with two metadata
entries: ``saliency_audit.input_spec`` (how an image becomes the input tensor; the audit reads
it) and ``saliency_audit.training`` (data, seed, sizes, epochs, accuracies, seconds), plus 64
test images as PNG in ``<dataset>_images/`` and, for shapes, their object masks in
``<dataset>_masks/`` (white = object) for localization metrics.

Deterministic on CPU: same seed, same torch build and thread count, same weights. Training
stops at the epoch cap or when the next epoch would overrun the time budget, whichever comes
first; the metadata records which (``stopped_by``), since a budget stop depends on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from PIL import Image
from torch import nn

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(HERE.parents[1]))

from saliency_audit.workers.engine.datasets import (  # noqa: E402
    load_digits_images,
    make_shapes,
    stratified_split,
)
from saliency_audit.workers.engine.reference_models import build_reference_model  # noqa: E402

SIZE = 32
MEAN, STD = 0.5, 0.5
SHAPES_TRAIN, SHAPES_TEST = 6000, 1000
DIGITS_TEST_FRACTION = 0.2
SAMPLE_IMAGES = 64  # enough for a bootstrap CI over images; first test images per class in turn


@dataclass(frozen=True)
class Recipe:
    """How long and how hard to train; chosen so each run is about a minute on 2 CPU cores."""

    epochs: int
    batch_size: int = 64
    max_lr: float = 1e-2  # OneCycle peak (AdamW)
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.15  # OneCycle: share of the steps spent raising the rate
    max_shift_px: int = 0  # random translation augmentation (digits are few: 1437 images)
    dihedral: bool = False  # random flips and quarter turns (shapes: the classes are invariant)


RECIPES: dict[tuple[str, str], Recipe] = {
    ("shapes", "small_cnn"): Recipe(epochs=8, batch_size=32, dihedral=True),
    ("shapes", "small_resnet"): Recipe(epochs=8, batch_size=32, dihedral=True),
    ("digits", "small_cnn"): Recipe(epochs=20, max_shift_px=2),
    ("digits", "small_resnet"): Recipe(epochs=20, max_shift_px=2),
}


@dataclass(frozen=True)
class Data:
    """uint8 images (N, H, W, C), labels, optional masks, split into train and test."""

    x_train: NDArray[np.uint8]
    y_train: NDArray[np.int64]
    x_test: NDArray[np.uint8]
    y_test: NDArray[np.int64]
    masks_test: NDArray[np.bool_] | None
    class_names: tuple[str, ...]


def load_data(dataset: str, seed: int) -> Data:
    if dataset == "shapes":
        shapes = make_shapes(SHAPES_TRAIN + SHAPES_TEST, seed=seed, size=SIZE)
        train_idx, test_idx = stratified_split(
            shapes.labels, SHAPES_TEST / (SHAPES_TRAIN + SHAPES_TEST), seed
        )
        train, test = shapes.subset(train_idx), shapes.subset(test_idx)
        return Data(
            train.images, train.labels, test.images, test.labels, test.masks, shapes.class_names
        )
    images, labels = load_digits_images(SIZE)
    train_idx, test_idx = stratified_split(labels, DIGITS_TEST_FRACTION, seed)
    return Data(
        images[train_idx, ..., None],
        labels[train_idx],
        images[test_idx, ..., None],
        labels[test_idx],
        None,
        tuple(str(d) for d in range(10)),
    )


def to_input(images: NDArray[np.uint8]) -> torch.Tensor:
    """uint8 (N, H, W, C) -> normalized float32 NCHW, as the input spec says."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN) / STD


def random_dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One of the 8 flips/quarter turns of the square, the same for the whole batch.

    Every shape class is closed under these (the generator already rotates shapes uniformly),
    so this is free extra data that cannot teach the model anything wrong.
    """
    k, flip = (int(v) for v in torch.randint(0, 4, (2,), generator=generator))
    x = torch.rot90(x, k, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if flip % 2 else x


def random_shift(x: torch.Tensor, max_px: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_px`` pixels (zero-padded in normalized units: -1)."""
    if max_px == 0:
        return x
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (max_px,) * 4, value=(0.0 - MEAN) / STD)
    dy = torch.randint(0, 2 * max_px + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_px + 1, (n,), generator=generator)
    c, wide = x.shape[1], w + 2 * max_px
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, wide)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    hits = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    return hits / max(len(x), 1)


def export(model: nn.Module, path: Path, channels: int, meta: dict[str, object]) -> None:
    model.eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, channels, SIZE, SIZE),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    proto = onnx.load(str(path))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = json.dumps(value)
    onnx.save(proto, str(path))


def write_samples(data: Data, dataset: str, out: Path) -> None:
    """The first test images of each class in turn, as PNG.

    Every class appears, and nothing is picked by how the model does on it: a misclassified
    image stays in the sample, as it would in a user's audit.
    """
    image_dir = out / f"{dataset}_images"
    mask_dir = out / f"{dataset}_masks"
    dirs = [image_dir] + ([mask_dir] if data.masks_test is not None else [])
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.png"):
            old.unlink()
    per_class = [np.flatnonzero(data.y_test == k) for k in range(len(data.class_names))]
    picked: list[tuple[int, int]] = []  # (test index, rank within its class)
    rank = 0
    while len(picked) < SAMPLE_IMAGES and rank < max(m.size for m in per_class):
        for members in per_class:
            if rank < members.size and len(picked) < SAMPLE_IMAGES:
                picked.append((int(members[rank]), rank))
        rank += 1
    for i, r in picked:
        name = f"{data.class_names[int(data.y_test[i])]}_{r}.png"
        pixels = data.x_test[i]
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(image_dir / name)
        if data.masks_test is not None:
            Image.fromarray(data.masks_test[i].astype(np.uint8) * 255).save(mask_dir / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("shapes", "digits"), required=True)
    parser.add_argument("--arch", choices=("small_cnn", "small_resnet"), required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's cap")
    parser.add_argument("--time-budget-s", type=float, default=150.0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine two threads wait on "
        "each other and run slower than one; the thread count also fixes the summation order)",
    )
    args = parser.parse_args(argv)

    recipe = RECIPES[(args.dataset, args.arch)]
    epochs = args.epochs or recipe.epochs
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()

    data = load_data(args.dataset, args.seed)
    channels = data.x_train.shape[-1]
    x_train, y_train = to_input(data.x_train), torch.from_numpy(data.y_train)
    x_test, y_test = to_input(data.x_test), torch.from_numpy(data.y_test)
    model = build_reference_model(args.arch, channels, len(data.class_names))
    # channels_last runs oneDNN's faster convolutions on CPU; the exported graph is the same.
    model = model.to(memory_format=torch.channels_last)
    x_train = x_train.contiguous(memory_format=torch.channels_last)
    steps_per_epoch = -(-len(x_train) // recipe.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.max_lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=recipe.max_lr,
        total_steps=epochs * steps_per_epoch,
        pct_start=recipe.warmup_fraction,
    )
    g = torch.Generator().manual_seed(args.seed)
    print(
        f"{args.dataset}/{args.arch}: {len(x_train)} train, {len(x_test)} test, "
        f"{sum(p.numel() for p in model.parameters())} parameters, "
        f"data ready in {time.perf_counter() - start:.1f} s",
        flush=True,
    )

    stopped_by, epoch, epoch_seconds = "epochs", 0, 0.0
    test_acc = 0.0
    for epoch in range(1, epochs + 1):
        elapsed = time.perf_counter() - start
        if epoch > 1 and elapsed + epoch_seconds > args.time_budget_s:
            stopped_by, epoch = "time_budget", epoch - 1
            break
        epoch_start = time.perf_counter()
        model.train()
        order = torch.randperm(len(x_train), generator=g)
        total_loss, hits = 0.0, 0
        for i in range(0, len(x_train), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            if len(idx) < 2:  # BatchNorm cannot normalize a batch of one
                continue
            xb = random_shift(x_train[idx], recipe.max_shift_px, g)
            if recipe.dihedral:
                xb = random_dihedral(xb, g)
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits, y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * len(idx)
            hits += int((logits.argmax(1) == y_train[idx]).sum())
        test_acc = accuracy(model, x_test, y_test)
        epoch_seconds = time.perf_counter() - epoch_start
        print(
            f"epoch {epoch:2d}  loss {total_loss / len(x_train):.4f}  "
            f"train accuracy {hits / len(x_train):.4f}  test accuracy {test_acc:.4f}  "
            f"elapsed {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    train_acc = accuracy(model, x_train, y_train)
    seconds = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.dataset}_{args.arch}.onnx"
    input_spec = {
        "height": SIZE,
        "width": SIZE,
        "channels": channels,
        "layout": "NCHW",
        "mean": [MEAN] * channels,
        "std": [STD] * channels,
        "value_range": [0.0, 1.0],
        "class_names": list(data.class_names),
    }
    training = {
        "dataset": args.dataset,
        "arch": args.arch,
        "seed": args.seed,
        "n_train": len(x_train),
        "n_test": len(x_test),
        "epochs": epoch,
        "stopped_by": stopped_by,
        "train_accuracy": round(train_acc, 4),
        "test_accuracy": round(test_acc, 4),
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    export(
        model,
        path,
        channels,
        {"saliency_audit.input_spec": input_spec, "saliency_audit.training": training},
    )
    write_samples(data, args.dataset, args.out)
    print(
        f"wrote {path} ({path.stat().st_size} bytes): train accuracy {train_acc:.4f}, "
        f"test accuracy {test_acc:.4f}, {epoch} epochs ({stopped_by}), {seconds:.1f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
