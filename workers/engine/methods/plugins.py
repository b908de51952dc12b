"""Bring your own explainer: any ``(model, inputs, targets) -> maps`` callable as a method.

A user's explainer (a Captum ``attribute`` wrapped in a function, a Quantus ``explain_func``,
a hand-written method) is registered under a name and from then on is a method like the
built-in ones: :func:`~.base.compute_methods` runs it batch by batch on the trained model and
on every randomized model, and its maps are reduced to (N, H, W) the way every map is
(``MethodParams.map_reduction``). Each explainer is its own family (``plugin:<name>``), so its
time and failures are its own; its ``MethodInfo`` says ``kind="plugin"`` through that family
prefix (:func:`is_plugin`) and takes its description from the callable's docstring.

Three ways in, one registry: the Python API's ``explainers={name: callable}``, the local
CLI's ``--method-plugin module:callable[=name]`` and, in the service, entry points in the
group :data:`ENTRY_POINT_GROUP` that operators install in the worker image
(:func:`load_entry_point_explainers`). A request never names code: users pick a registered
method by name.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Protocol

import torch
from torch import nn

from ..catalogue import ENTRY_POINT_GROUP, PLUGIN_FAMILY_PREFIX
from ..contract.catalogue import MethodInfo
from ..errors import SpecError
from .base import FAMILIES, METHODS, MethodContext, MethodFamily

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGIN_FAMILY_PREFIX",
    "Explainer",
    "is_plugin",
    "load_entry_point_explainers",
    "load_explainer",
    "register_explainer",
    "unregister_explainer",
]


class Explainer(Protocol):
    """The call shape of an explainer, batched like Captum's ``attribute``.

    ``inputs``: float32 (N, C, H, W), the model's preprocessed input, on the model's device.
    ``targets``: int64 (N,), the class to explain per image. Returns maps of shape
    (N, C, H, W), (N, 1, H, W) or (N, H, W), at the input's height and width or smaller
    (smaller maps are upsampled bilinearly, like CAMs).
    """

    def __call__(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Any: ...


def is_plugin(info: MethodInfo) -> bool:
    """Whether a method is a registered explainer rather than a built-in method."""
    return info.family.startswith(PLUGIN_FAMILY_PREFIX)


def _description(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or inspect.getdoc(type(fn)) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
    return first or f"explainer {_qualified_name(fn)}"


def _qualified_name(fn: Callable[..., Any]) -> str:
    target = fn if inspect.isfunction(fn) or inspect.isclass(fn) else type(fn)
    return f"{target.__module__}:{target.__qualname__}"


class ExplainerFamily(MethodFamily):
    """One explainer as a family of one method: the callable's maps, checked and shaped."""

    def __init__(self, info: MethodInfo, explainer: Explainer) -> None:
        self.name = info.family  # type: ignore[misc]  # per instance: one family per plugin
        self.provides = (info,)  # type: ignore[misc]
        self.explainer = explainer

    def compute(
        self,
        model: nn.Module,
        x: torch.Tensor,
        target: torch.Tensor,
        wanted: frozenset[str],
        ctx: MethodContext,
    ) -> dict[str, torch.Tensor]:
        (info,) = self.provides
        with torch.enable_grad():
            raw = self.explainer(model, x, target)
        return {info.name: _as_maps(raw, x, info.name)}


def _as_maps(raw: Any, x: torch.Tensor, name: str) -> torch.Tensor:
    """The explainer's output as detached float32 (N, C', H, W) on ``x``'s device."""
    if isinstance(raw, tuple) and len(raw) == 1:  # Captum returns a tuple for tuple inputs
        raw = raw[0]
    maps = torch.as_tensor(raw).detach().to(device=x.device, dtype=torch.float32)
    n, _, height, width = x.shape
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    if maps.dim() != 4 or maps.shape[0] != n:
        raise ValueError(
            f"explainer {name!r} returned maps of shape {tuple(maps.shape)}; expected "
            f"({n}, C, H, W), ({n}, 1, H, W) or ({n}, H, W)"
        )
    if tuple(maps.shape[-2:]) != (height, width):
        maps = nn.functional.interpolate(
            maps, size=(height, width), mode="bilinear", align_corners=False
        )
    return maps


def register_explainer(
    name: str,
    explainer: Explainer,
    *,
    description: str | None = None,
    reference: str = "",
    replace: bool = False,
) -> MethodInfo:
    """Register ``explainer`` as the method ``name`` and return its ``MethodInfo``.

    A built-in method's name is refused; registering the same callable again under its name is
    a no-op, and another callable under a plugin's name needs ``replace=True``.
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise SpecError(f"explainer name {name!r}: use letters, digits, '_' or '-'")
    if not callable(explainer):
        raise SpecError(f"explainer {name!r} is not callable")
    existing = METHODS.get(name)
    if existing is not None:
        if not is_plugin(existing):
            raise SpecError(f"explainer name {name!r} is a built-in method's name")
        family = FAMILIES[existing.family]
        if isinstance(family, ExplainerFamily) and family.explainer is explainer:
            return existing
        if not replace:
            raise SpecError(f"an explainer named {name!r} is registered already")
    info = MethodInfo(
        name=name,
        family=PLUGIN_FAMILY_PREFIX + name,
        reference=reference or _qualified_name(explainer),
        description=description or _description(explainer),
    )
    FAMILIES[info.family] = ExplainerFamily(info, explainer)
    METHODS[name] = info
    return info


def unregister_explainer(name: str) -> None:
    """Remove a registered explainer (a built-in method cannot be removed)."""
    info = METHODS.get(name)
    if info is None or not is_plugin(info):
        raise SpecError(f"no explainer named {name!r} is registered")
    del METHODS[name]
    del FAMILIES[info.family]


def load_explainer(target: str) -> tuple[str, Explainer]:
    """``module:callable[=name]`` -> (name, callable); the name defaults to the callable's.

    Imports the module: only for code the person running the audit chose (the local CLI, an
    operator's entry points), never for anything a request names.
    """
    spec, _, name = target.partition("=")
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise SpecError(f"method plugin {target!r}: expected module:callable[=name]")
    try:
        value: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"method plugin {target!r}: cannot load it ({exc})") from None
    if not callable(value):
        raise SpecError(f"method plugin {target!r} is not callable")
    return name or attribute.split(".")[-1], value


def load_entry_point_explainers() -> list[MethodInfo]:
    """Register every explainer installed as an entry point in :data:`ENTRY_POINT_GROUP`
    (name = the entry point's name); what a worker does at start."""
    infos = []
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        try:
            explainer = point.load()
        except Exception as exc:
            raise SpecError(
                f"explainer entry point {point.name} = {point.value} cannot be loaded: {exc}"
            ) from None
        infos.append(register_explainer(point.name, explainer, reference=point.value))
    return infos
