"""Write a reference training set as image folders, one sub-folder per class.

    .venv/bin/python examples/reference/export_training_set.py --dataset digits --out train/

This is the layout ``saliency-audit run --train DIR`` reads for the data randomization test:
``DIR/<class name>/<index>.png``. The images are exactly the training split that
``train.py`` trained the reference models on (same generator, same seed), so nothing is
downloaded and nothing large is kept in the repository.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(HERE.parents[1]))

from examples.reference.train import load_data  # noqa: E402


def export_training_set(
    dataset: str, out: Path, seed: int = 0, per_class: int | None = None
) -> int:
    """Write the training split as PNGs under ``out/<class>/``; return how many were written.
    ``per_class`` keeps only the first that many images of each class."""
    data = load_data(dataset, seed)
    written = 0
    for label, name in enumerate(data.class_names):
        index = np.flatnonzero(data.y_train == label)
        if per_class is not None:
            index = index[:per_class]
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in index:
            pixels = data.x_train[i]
            image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
            image.save(folder / f"{int(i):05d}.png")
            written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("shapes", "digits"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="the split seed (train.py's --seed)")
    parser.add_argument("--per-class", type=int, default=None, help="cap per class")
    args = parser.parse_args(argv)
    n = export_training_set(args.dataset, args.out, args.seed, args.per_class)
    print(f"wrote {n} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
