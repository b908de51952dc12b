"""One way in for every model file: ONNX, or a torchvision or timm architecture plus weights.

An input spec can come from five places, later ones overriding earlier ones field by field:
defaults (``assumed``: ImageNet's mean and std, values in [0, 1], RGB, bilinear resizing), what
the model itself says (``graph``: the ONNX input's size, channels and layout), the
preprocessing timm publishes for a ``timm:NAME`` architecture (``pretrained_cfg``: input size,
mean, std, interpolation), the ONNX metadata entry ``saliency_audit.input_spec``
(``metadata``: JSON, written by our own export scripts), and the caller's overrides
(``given``: CLI ``--input-spec``, API ``metadata.input_spec``). The source of every field used
is kept in ``LoadedModel.input_spec_sources``.

Only classifiers are admitted: the output explained must be one row of C >= 2 class scores
per image (:class:`~saliency_audit.workers.engine.errors.NotAClassifierError` otherwise).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..contract.architectures import timm_model_name
from ..errors import ModelLoadError, NotAClassifierError, SpecError
from ..onnx_rules import INPUT_SPEC_METADATA_KEY, metadata_input_spec, refuse_open_fields
from ..spec import InputSpec, SpecSource, default_normalization
from .base import SPEC_FIELDS, LoadedModel, input_spec_note

GRAPH_FIELDS = ("height", "width", "channels", "layout")


def onnx_metadata_input_spec(data: bytes) -> dict[str, Any]:
    """The input spec our export scripts store in the ONNX file's metadata, if any."""
    import onnx

    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:  # onnx raises DecodeError/ValueError/... for garbage
        raise ModelLoadError(f"not a readable ONNX file: {exc}") from None
    return metadata_input_spec({p.key: p.value for p in proto.metadata_props})


def merge_input_spec(base: InputSpec, overrides: dict[str, Any]) -> InputSpec:
    if not overrides:
        return base
    merged = {**base.to_dict(), **overrides}
    return InputSpec.from_dict(merged)


def resolve_input_spec(
    *,
    graph: dict[str, Any] | None = None,
    pretrained: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    given: dict[str, Any] | None = None,
    open_fields: dict[str, str] | None = None,
) -> tuple[InputSpec, dict[str, SpecSource]]:
    """The input spec from its sources (later ones win, field by field) and the source of each
    field. ``open_fields`` are fields the model leaves open, with the message to raise when
    neither the metadata nor the caller states them."""
    values: dict[str, Any] = {}
    sources: dict[str, SpecSource] = {}
    layers: tuple[tuple[SpecSource, dict[str, Any]], ...] = (
        ("graph", graph or {}),
        ("pretrained_cfg", pretrained or {}),
        ("metadata", metadata or {}),
        ("given", given or {}),
    )
    for source, fields in layers:
        unknown = set(fields) - set(SPEC_FIELDS)
        if unknown:
            where = f" in {INPUT_SPEC_METADATA_KEY}" if source == "metadata" else ""
            raise SpecError(f"unknown input spec fields{where}: {sorted(unknown)}")
        values.update(fields)
        sources.update(dict.fromkeys(fields, source))
    refuse_open_fields(open_fields or {}, values)
    defaults = InputSpec().to_dict()
    mean, std = default_normalization(int(values.get("channels", defaults["channels"])))
    defaults.update(mean=mean, std=std)
    for name in SPEC_FIELDS:
        if name not in values:
            values[name] = defaults[name]
            sources[name] = "assumed"
    return InputSpec.from_dict(values), sources


def load_model(
    data: bytes,
    *,
    architecture: str | None = None,
    input_spec_overrides: dict[str, Any] | None = None,
    num_classes: int | None = None,
) -> LoadedModel:
    """Load a classifier from bytes: ONNX unless ``architecture`` names a torchvision model or
    a timm one (``timm:NAME``), whose weights ``data`` then holds."""
    given = dict(input_spec_overrides or {})
    unknown = set(given) - set(SPEC_FIELDS)
    if unknown:
        raise SpecError(f"unknown input spec fields: {sorted(unknown)}")
    if architecture is not None:
        if given.get("output") is not None:
            raise SpecError(
                "input spec output names an ONNX graph output; a weights file's architecture "
                "has one output, its head"
            )
        timm_name = timm_model_name(architecture)
        if timm_name is not None:
            from .timm_adapter import load_timm, pretrained_cfg, pretrained_spec_fields

            cfg = pretrained_cfg(timm_name)
            spec, sources = resolve_input_spec(
                graph={"layout": "NCHW"}, pretrained=pretrained_spec_fields(cfg), given=given
            )
            loaded = load_timm(timm_name, data, cfg, spec, num_classes)
        else:
            from .torchvision_adapter import load_torchvision

            # the architecture itself takes 3-channel NCHW images; the size is anyone's guess
            spec, sources = resolve_input_spec(graph={"channels": 3, "layout": "NCHW"}, given=given)
            loaded = load_torchvision(architecture, data, spec, num_classes)
        sources["output"] = "graph"
        note = input_spec_note(spec, sources)
        notes = [note, *loaded.notes] if note else list(loaded.notes)
        return dataclasses.replace(loaded, input_spec_sources=sources, notes=notes)

    from .onnx_convert import graph_input_dims, graph_spec_fields, load_onnx

    dims, metadata_props = graph_input_dims(data)
    metadata = metadata_input_spec(metadata_props)
    layout = given.get("layout", metadata.get("layout"))
    graph, open_fields = graph_spec_fields(dims, layout)
    spec, sources = resolve_input_spec(
        graph=graph, metadata=metadata, given=given, open_fields=open_fields
    )
    loaded = load_onnx(data, spec, sources=sources)
    output = loaded.output
    assert output is not None
    NotAClassifierError.check(output.name, output.shape)
    return loaded
