"""A timm architecture (``--arch timm:NAME``) plus uploaded weights.

timm is optional (the ``timm`` extra): it is imported here only, when a weights file names a
``timm:`` architecture, and its absence is one :class:`ArchitectureUnavailableError` with
:data:`TIMM_MISSING`. The model is ``timm.create_model(NAME, pretrained=False,
num_classes=...)``, so nothing is downloaded; the weights are read as data and loaded strictly
like torchvision weights (:mod:`.weights`).

What timm publishes about a model's preprocessing, its ``pretrained_cfg`` (the one of the tag
when ``NAME`` is ``arch.tag``), gives the input spec's defaults: ``input_size`` (channels,
height, width), ``mean``, ``std`` and ``interpolation``, each recorded with the source
``pretrained_cfg``. timm evaluates on a centre crop (``crop_pct``); an audit explains the whole
image, resized without a crop, and its notes say so.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..contract.architectures import TIMM_MISSING, TIMM_PREFIX, timm_name_problem
from ..errors import (
    ArchitectureUnavailableError,
    ModelLoadError,
    NotAClassifierError,
    UnknownArchitectureError,
)
from ..spec import InputSpec
from .base import LoadedModel, ModelOutput
from .weights import load_strictly, prepare_for_attribution, read_state_dict

# the pretrained_cfg interpolations the engine resizes with (timm 1.0.31 names only these two)
INTERPOLATIONS = ("bilinear", "bicubic")


def import_timm() -> ModuleType:
    """timm, or the one error everyone gets where it is missing."""
    try:
        import timm
    except ImportError:
        raise ArchitectureUnavailableError(TIMM_MISSING, library="timm") from None
    return timm


def pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of ``name`` (``arch`` or ``arch.tag``) as a dict, read without
    building the model; an empty dict for an architecture that has none. Raises
    :class:`UnknownArchitectureError` (with close timm names) for a name timm does not have."""
    problem = timm_name_problem(name)
    if problem is not None:
        raise UnknownArchitectureError(
            f"unknown architecture {TIMM_PREFIX}{name}: {problem}", architecture=name
        )
    timm = import_timm()
    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownArchitectureError(
            f"unknown architecture {TIMM_PREFIX}{name}: timm {timm.__version__} has no model "
            f"{arch!r}{hint}",
            architecture=name,
            suggestions=close,
        )
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:  # an unknown tag
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")]
        raise UnknownArchitectureError(
            f"unknown architecture {TIMM_PREFIX}{name}: timm has no pretrained tag {tag!r} for "
            f"{arch} (its tags: {', '.join(tags) or 'none'})",
            architecture=name,
            suggestions=tags,
        ) from None
    return cfg.to_dict() if cfg is not None else {}


def pretrained_spec_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The input spec fields a pretrained_cfg states: ``input_size`` as channels, height and
    width, then ``mean``, ``std`` (when they have a value per channel) and ``interpolation``
    (when it is one the engine resizes with)."""
    fields: dict[str, Any] = {}
    size = cfg.get("input_size")
    if isinstance(size, list | tuple) and len(size) == 3:
        fields.update(channels=int(size[0]), height=int(size[1]), width=int(size[2]))
    channels = fields.get("channels", 3)
    for key in ("mean", "std"):
        value = cfg.get(key)
        if isinstance(value, list | tuple) and len(value) == channels:
            fields[key] = tuple(float(v) for v in value)
    if cfg.get("interpolation") in INTERPOLATIONS:
        fields["interpolation"] = cfg["interpolation"]
    return fields


def _classifier(cfg: Mapping[str, Any]) -> str | None:
    """The classification head's module name (a distilled model names two heads of the same
    size: the first counts)."""
    head = cfg.get("classifier")
    if isinstance(head, list | tuple):
        head = head[0] if head else None
    return head if isinstance(head, str) else None


def build_timm(
    name: str,
    state_dict: Mapping[str, torch.Tensor],
    cfg: Mapping[str, Any],
    input_spec: InputSpec,
    num_classes: int | None = None,
) -> tuple[nn.Module, str, int]:
    """``timm.create_model(name, pretrained=False, num_classes=...)`` with ``state_dict``
    loaded strictly; returns the module, its head's name and its class count.

    The class count is the first dim of the head's weight in ``state_dict`` (the head named by
    the pretrained_cfg's ``classifier``) unless ``num_classes`` is given; fewer than two is not
    a classifier. A model whose input size is part of its weights (``fixed_input_size``: ViT's
    position embedding) is built for the spec's height and width."""
    timm = import_timm()
    head = _classifier(cfg)
    if num_classes is None:
        weight = state_dict.get(f"{head}.weight") if head else None
        num_classes = int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else None
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        if num_classes < 2:
            raise NotAClassifierError(head or "head", (None, num_classes))
        kwargs["num_classes"] = num_classes
    hint = ""
    if cfg.get("fixed_input_size"):
        kwargs["img_size"] = (input_spec.height, input_spec.width)
        hint = (
            f"; {name}'s weights depend on its input size, built here for "
            f"{input_spec.height}x{input_spec.width}: state the size the weights were trained "
            "at as height and width in the input spec"
        )
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise ModelLoadError(
            f"timm could not build {TIMM_PREFIX}{name} with {kwargs}: {type(exc).__name__}: {exc}"
        ) from None
    load_strictly(model, state_dict, f"{TIMM_PREFIX}{name}", hint)
    classes = int(num_classes if num_classes is not None else model.num_classes)
    if classes < 2:  # a model built without a head (num_classes=0 in its default config)
        raise NotAClassifierError(head or "head", (None, classes))
    return prepare_for_attribution(model), head or "head", classes


def load_timm(
    name: str,
    weights: bytes,
    cfg: Mapping[str, Any],
    input_spec: InputSpec,
    num_classes: int | None = None,
) -> LoadedModel:
    """A :class:`LoadedModel` of ``timm:name`` with ``weights``; ``cfg`` is its
    :func:`pretrained_cfg`, ``input_spec`` the spec resolved from it."""
    module, head, classes = build_timm(name, read_state_dict(weights), cfg, input_spec, num_classes)
    notes = []
    crop = cfg.get("crop_pct")
    if isinstance(crop, int | float) and crop < 1:
        notes.append(
            f"timm evaluates {name} on a centre crop (crop_pct {crop:g}); the audit resizes "
            f"the whole image to {input_spec.height}x{input_spec.width}, without a crop"
        )
    return LoadedModel(
        module=module,
        input_spec=input_spec,
        source="timm",
        sha256=hashlib.sha256(weights).hexdigest(),
        architecture=f"{TIMM_PREFIX}{name}",
        notes=notes,
        output=ModelOutput(name=head, index=0, shape=(None, classes), num_classes=classes),
    )
