"""Write eight scikit-image sample photos (they ship inside the package) to a folder as PNG.

.venv/bin/python examples/sample_photos.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
)


def write_sample_photos(out: Path) -> list[Path]:
    import skimage.data

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        path = out / f"{name}.png"
        pixels = getattr(skimage.data, name)()
        if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
            pixels = pixels[0]
        Image.fromarray(pixels).convert("RGB").save(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for p in write_sample_photos(Path(sys.argv[1])):
        print(p)
