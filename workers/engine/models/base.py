"""The engine's view of a model, whatever file it came from."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from ..contract.report import ModelOutput
from ..spec import InputSpec, SpecSource

SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(InputSpec))


@dataclass
class LoadedModel:
    """A differentiable classifier ready for attribution.

    ``module`` takes a float32 NCHW batch already preprocessed by ``input_spec`` (resized,
    scaled, normalized) and returns class scores of shape (N, num_classes): logits, or the
    pre-softmax scores of a graph that ends in a softmax (``output`` says which). For NHWC
    graphs the adapter permutes inside ``module``, so the engine only ever sees NCHW.

    ``input_spec_sources`` says where each field of ``input_spec`` came from (``graph``,
    ``pretrained_cfg``, ``metadata``, ``given`` or ``assumed``); a field a caller leaves out
    counts as ``given`` (a spec built in code was given by that code).

    ``onnx_bytes`` keeps the original ONNX file so ONNX Runtime can check the converted graph
    (the model audited must be the model shipped).
    """

    module: nn.Module
    input_spec: InputSpec
    source: Literal["onnx", "torchvision", "timm", "torch"]
    sha256: str
    architecture: str | None = None
    onnx_bytes: bytes | None = None
    opset: int | None = None
    notes: list[str] = field(default_factory=list)
    output: ModelOutput | None = None
    input_spec_sources: dict[str, SpecSource] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_spec_sources = {
            name: self.input_spec_sources.get(name, "given") for name in SPEC_FIELDS
        }


def input_spec_note(spec: InputSpec, sources: Mapping[str, SpecSource]) -> str | None:
    """One note naming what the input spec assumed (stated by neither the file nor the caller),
    or None when nothing that changes the input tensor was assumed."""
    assumed = []
    if sources.get("mean") == "assumed" or sources.get("std") == "assumed":
        assumed.append(f"normalization assumed mean={spec.mean} std={spec.std}")
    if sources.get("value_range") == "assumed":
        assumed.append(f"value_range {list(spec.value_range)} assumed")
    if sources.get("channel_order") == "assumed" and spec.channels == 3:
        assumed.append(f"channel order {spec.channel_order} assumed")
    for name in ("height", "width", "channels", "layout"):
        if sources.get(name) == "assumed":
            assumed.append(f"{name} {getattr(spec, name)} assumed")
    if not assumed:
        return None
    return (
        f"input spec: {'; '.join(assumed)} (pass an input spec, or store one in the ONNX "
        "metadata entry saliency_audit.input_spec, to state them)"
    )
