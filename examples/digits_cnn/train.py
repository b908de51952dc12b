"""Train the bundled sample model: a small CNN on scikit-learn's digits (ships with the package).

Writes ``model.onnx`` (with its input spec in the ONNX metadata) and ``images/`` (a few test-set
digits as PNG) next to this file. Deterministic: same seed, same machine, same files.

    .venv/bin/python examples/digits_cnn/train.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).parent
SIZE = 32
SEED = 0
INPUT_SPEC = {
    "height": SIZE,
    "width": SIZE,
    "channels": 1,
    "layout": "NCHW",
    "mean": [0.5],
    "std": [0.5],
    "value_range": [0.0, 1.0],
    "class_names": [str(d) for d in range(10)],
}


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.block3 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def digits_as_images() -> tuple[np.ndarray, np.ndarray]:
    """Digits (8x8, values 0..16) as uint8 32x32 images, bilinear upsampling."""
    digits = load_digits()
    small = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    big = np.stack(
        [
            np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
            for im in small
        ]
    )
    return big, digits.target.astype(np.int64)


def to_input(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    return (x - 0.5) / 0.5


def main() -> int:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    images, labels = digits_as_images()
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=0.2, random_state=SEED, stratify=labels
    )
    xt, yt = to_input(x_tr), torch.from_numpy(y_tr)
    model = DigitsCNN()
    epochs = 20
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    g = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(to_input(x_te)).argmax(1).numpy() == y_te).mean()
        print(f"epoch {epoch + 1:2d}  loss {loss.item():.3f}  test accuracy {acc:.4f}")
    model.eval()
    out = HERE / "model.onnx"
    torch.onnx.export(
        model,
        (to_input(x_te[:1]),),
        str(out),
        input_names=["image"],
        output_names=["logits"],
        opset_version=17,
        dynamo=False,
    )
    proto = onnx.load(str(out))
    entry = proto.metadata_props.add()
    entry.key = "saliency_audit.input_spec"
    entry.value = json.dumps(INPUT_SPEC)
    entry = proto.metadata_props.add()
    entry.key = "saliency_audit.test_accuracy"
    entry.value = f"{acc:.4f}"
    onnx.save(proto, str(out))
    image_dir = HERE / "images"
    image_dir.mkdir(exist_ok=True)
    for old in image_dir.glob("*.png"):
        old.unlink()
    for k in range(10):  # the first test image of each class
        i = int(np.flatnonzero(y_te == k)[0])
        Image.fromarray(x_te[i]).save(image_dir / f"digit_{k}.png")
    print(f"wrote {out} ({out.stat().st_size} bytes), test accuracy {acc:.4f}, 10 images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
