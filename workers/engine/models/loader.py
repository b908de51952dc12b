"""One way in for every model file: ONNX, or a torchvision architecture plus weights.

An input spec can come from three places, later ones overriding earlier ones field by field:
what the ONNX graph says (size, layout), the ONNX metadata entry ``saliency_audit.input_spec``
(JSON, written by our own export scripts), and the caller's overrides (CLI ``--input-spec``,
API ``metadata``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..errors import ModelLoadError, SpecError
from ..spec import InputSpec
from .base import LoadedModel

INPUT_SPEC_METADATA_KEY = "saliency_audit.input_spec"
GRAPH_FIELDS = ("height", "width", "channels", "layout")


def onnx_metadata_input_spec(data: bytes) -> dict[str, Any]:
    """The input spec our export scripts store in the ONNX file's metadata, if any."""
    import onnx

    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:  # onnx raises DecodeError/ValueError/... for garbage
        raise ModelLoadError(f"not a readable ONNX file: {exc}") from None
    for prop in proto.metadata_props:
        if prop.key == INPUT_SPEC_METADATA_KEY:
            try:
                value = json.loads(prop.value)
            except json.JSONDecodeError as exc:
                raise ModelLoadError(f"invalid {INPUT_SPEC_METADATA_KEY} metadata: {exc}") from None
            if not isinstance(value, dict):
                raise ModelLoadError(f"{INPUT_SPEC_METADATA_KEY} metadata must be a JSON object")
            return value
    return {}


def merge_input_spec(base: InputSpec, overrides: dict[str, Any]) -> InputSpec:
    if not overrides:
        return base
    merged = {**base.to_dict(), **overrides}
    return InputSpec.from_dict(merged)


def load_model(
    data: bytes,
    *,
    architecture: str | None = None,
    input_spec_overrides: dict[str, Any] | None = None,
    num_classes: int | None = None,
) -> LoadedModel:
    """Load a model from bytes: ONNX unless ``architecture`` names a torchvision model."""
    overrides = dict(input_spec_overrides or {})
    unknown = set(overrides) - set(InputSpec.__dataclass_fields__)
    if unknown:
        raise SpecError(f"unknown input spec fields: {sorted(unknown)}")
    if architecture is not None:
        from .torchvision_adapter import load_torchvision

        spec = merge_input_spec(InputSpec(), overrides)
        return load_torchvision(architecture, data, spec, num_classes)

    from .onnx_convert import graph_input_spec, load_onnx

    overrides = {**onnx_metadata_input_spec(data), **overrides}
    graph_overrides = {k: overrides[k] for k in GRAPH_FIELDS if k in overrides}
    if graph_overrides:
        # Size/layout given explicitly: the converter checks them against the graph.
        loaded = load_onnx(data, merge_input_spec(graph_input_spec(data), graph_overrides))
    else:
        loaded = load_onnx(data, None)
    return dataclasses.replace(loaded, input_spec=merge_input_spec(loaded.input_spec, overrides))
