"""A torchvision classifier's head and class count, read from a weights file's tensor shapes.

Shared by the safetensors and torch.save checks: neither format says what its tensors are, but
torchvision's names do.
"""

from __future__ import annotations

import re

_HEAD_KEYS = ("heads.head.weight", "head.weight", "fc.weight", "classifier.weight")
_CLASSIFIER_N = re.compile(r"classifier\.(\d+)\.weight")


def num_classes_from_shapes(shapes: dict[str, tuple[int, ...]]) -> int | None:
    head = head_from_shapes(shapes)
    return head[1] if head else None


def head_name(shapes: dict[str, tuple[int, ...]]) -> str | None:
    head = head_from_shapes(shapes)
    return head[0] if head else None


def head_from_shapes(shapes: dict[str, tuple[int, ...]]) -> tuple[str, int] | None:
    """A torchvision classifier's last layer (its module name) and its output size, from its
    weight's first dim.

    torchvision names the head ``fc`` (ResNet family, RegNet, GoogLeNet, Inception,
    ShuffleNet), ``classifier`` (DenseNet), ``head`` (Swin), ``heads.head`` (ViT), or the last
    layer of a ``classifier`` Sequential (VGG, AlexNet, MobileNet, EfficientNet, ConvNeXt,
    MaxViT, SqueezeNet's 1x1 conv). Anything else: None rather than a guess.
    """
    for key in _HEAD_KEYS:
        if key in shapes and len(shapes[key]) in (2, 4):
            return key.removesuffix(".weight"), shapes[key][0]
    best: tuple[int, int] | None = None
    for key, shape in shapes.items():
        match = _CLASSIFIER_N.fullmatch(key)
        if match and len(shape) in (2, 4) and (best is None or int(match.group(1)) > best[0]):
            best = (int(match.group(1)), shape[0])
    return (f"classifier.{best[0]}", best[1]) if best else None
