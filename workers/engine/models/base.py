"""The engine's view of a model, whatever file it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from ..spec import InputSpec


@dataclass
class LoadedModel:
    """A differentiable classifier ready for attribution.

    ``module`` takes a float32 NCHW batch already preprocessed by ``input_spec`` (resized,
    scaled, normalized) and returns logits of shape (N, num_classes). For NHWC graphs the
    adapter permutes inside ``module``, so the engine only ever sees NCHW.

    ``onnx_bytes`` keeps the original ONNX file so ONNX Runtime can check the converted graph
    (the model audited must be the model shipped).
    """

    module: nn.Module
    input_spec: InputSpec
    source: Literal["onnx", "torchvision"]
    sha256: str
    architecture: str | None = None
    onnx_bytes: bytes | None = None
    opset: int | None = None
    notes: list[str] = field(default_factory=list)
