"""The Python API: audit a model from a notebook or a script, with built-in methods or your own.

    from saliency_audit.workers.engine import audit

    result = audit(model, "photos/", methods=["gradient", "my_occlusion"],
                   explainers={"my_occlusion": my_occlusion}, input_spec={"height": 32, ...})
    result.write("out")  # report.json and maps.npz, as ``saliency-audit run`` writes them

``audit`` is what ``saliency-audit run`` (:mod:`saliency_audit.workers.local`) and the service's
worker
(:mod:`saliency_audit.workers.tasks`) call too, so a report is the same document whichever way it
was made.
Public, stable names: :func:`audit`, :func:`read_images`, :class:`AuditImages`,
:func:`load_model_input`, :data:`DEFAULT_TESTS`, and from :mod:`.methods.plugins`
:class:`Explainer` and :func:`register_explainer`. The result is the engine's
:class:`~.result.AuditResult` (``to_dict()``, ``write(folder)``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data_randomization import LabeledImages
from .errors import SpecError
from .image_files import ImageListing, list_images
from .images import DecodedImage, decode_image, preprocess
from .methods import METHODS
from .methods.plugins import Explainer, is_plugin, register_explainer
from .models.base import LoadedModel
from .models.loader import load_model, resolve_input_spec
from .progress import ProgressCallback, no_progress
from .result import AuditResult
from .runner import run_audit
from .spec import AdaptiveRounds, AuditSpec, InputSpec, MethodParams, expand_tests

__all__ = [
    "DEFAULT_TESTS",
    "AuditImages",
    "AuditResult",
    "Explainer",
    "audit",
    "load_model_input",
    "read_images",
    "register_explainer",
]

DEFAULT_TESTS: tuple[str, ...] = ("cascading",)  # as ``saliency-audit run``

ModelInput = nn.Module | LoadedModel | str | Path | bytes
ImagesInput = torch.Tensor | str | Path | Sequence[str | Path]


@dataclass(frozen=True)
class AuditImages:
    """Images read from files: the model's preprocessed input and where it came from.

    ``tensor`` is float32 (N, C, H, W) preprocessed by the input spec; ``names`` the image
    names (file names, or paths inside an archive); ``skipped`` the files that were not images
    (``"notes.txt (not an image)"``) and ``note`` the one line that lists them."""

    tensor: torch.Tensor
    names: list[str]
    decoded: list[DecodedImage]
    skipped: list[str]
    note: str | None


def read_images(
    source: str | Path | Sequence[str | Path] | ImageListing, input_spec: InputSpec
) -> AuditImages:
    """Decode and preprocess the images of a folder, a zip or tar archive, image files or a
    glob pattern (:func:`~.image_files.list_images`: the rule ``saliency-audit run``, the
    release gate and image-set uploads share), or of a listing already made."""
    listing = source if isinstance(source, ImageListing) else list_images(source)
    decoded = [
        decode_image(image.read(), image.name, input_spec.channels) for image in listing.images
    ]
    return AuditImages(
        tensor=preprocess(decoded, input_spec),
        names=[d.name for d in decoded],
        decoded=decoded,
        skipped=listing.skipped,
        note=listing.note,
    )


def load_model_input(
    model: ModelInput,
    *,
    input_spec: Mapping[str, Any] | None = None,
    architecture: str | None = None,
    example: torch.Tensor | None = None,
) -> LoadedModel:
    """A :class:`LoadedModel` from an in-memory ``nn.Module``, an ONNX file (path or bytes),
    weights (path or bytes) with ``architecture`` (a torchvision name, or ``timm:NAME`` for a
    timm model) or a ``LoadedModel``.

    For a module, ``input_spec`` fields are "given" and the rest "assumed" (ImageNet
    normalization, 224 x 224), except height, width and channels taken from ``example`` (a
    preprocessed image tensor) when there is one. Its sha256 is that of its parameters and
    buffers, so a report names which weights were audited.
    """
    if isinstance(model, LoadedModel):
        return model
    given = dict(input_spec or {})
    if isinstance(model, nn.Module):
        graph: dict[str, Any] = {"layout": "NCHW"}
        if example is not None and example.dim() == 4:
            graph.update(
                channels=int(example.shape[1]),
                height=int(example.shape[2]),
                width=int(example.shape[3]),
            )
        spec, sources = resolve_input_spec(graph=graph, given=given)
        return LoadedModel(
            module=model,
            input_spec=spec,
            source="torch",
            sha256=_module_sha256(model),
            architecture=type(model).__name__,
            notes=["an in-memory torch module (Python API)"],
            input_spec_sources=sources,
        )
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    return load_model(data, architecture=architecture, input_spec_overrides=given)


def _module_sha256(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().flatten().to(torch.float64).numpy().tobytes())
    return digest.hexdigest()


def adaptive_rounds(
    adaptive: AdaptiveRounds | Mapping[str, Any] | int | bool | None,
) -> AdaptiveRounds | None:
    """The spec's ``adaptive`` from the Python API's and the CLI's shorthands: ``None`` or
    ``False`` (every image at once), ``True`` (the default rounds), an int (images per round)
    or the fields of :class:`~.spec.AdaptiveRounds`."""
    if adaptive is None or adaptive is False:
        return None
    if adaptive is True:
        return AdaptiveRounds()
    if isinstance(adaptive, AdaptiveRounds):
        return adaptive
    if isinstance(adaptive, int):
        return AdaptiveRounds(round_images=adaptive)
    return AdaptiveRounds(**dict(adaptive))


def audit(
    model: ModelInput,
    images: ImagesInput,
    *,
    methods: Sequence[str] | None = None,
    tests: Sequence[str] = DEFAULT_TESTS,
    explainers: Mapping[str, Explainer] | None = None,
    input_spec: Mapping[str, Any] | None = None,
    architecture: str | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "auto",
    params: MethodParams | Mapping[str, Any] | None = None,
    policy: dict[str, Any] | None = None,
    adaptive: AdaptiveRounds | Mapping[str, Any] | int | bool | None = None,
    spec: AuditSpec | None = None,
    image_names: Sequence[str] | None = None,
    targets: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    train: LabeledImages | None = None,
    random_label_model: LoadedModel | None = None,
    progress: ProgressCallback = no_progress,
) -> AuditResult:
    """Audit ``model``'s saliency maps on ``images`` and return the report.

    ``model``: an ``nn.Module`` returning class scores (N, classes), an ONNX file (path or
    bytes), weights with ``architecture`` (a torchvision name, or ``timm:NAME``) or a
    ``LoadedModel``.
    ``images``: a preprocessed float32 tensor (N, C, H, W), or files to read with the input
    spec (a folder, a zip or tar, image paths, a glob pattern: :func:`read_images`).
    ``methods``: method names (default: every built-in method that is not a control, plus
    every explainer given); ``explainers``: ``{name: callable(model, inputs, targets) ->
    maps}``, audited like built-in methods under their names (:class:`Explainer`).
    ``tests``: sanity checks (default: cascading randomization; ``()`` for maps only).
    ``adaptive``: add images in rounds and stop when every verdict is decided
    (:class:`~.spec.AdaptiveRounds`; docs/policy.md): ``True`` for rounds of 32, an int for
    that many images per round, or ``{"round_images": 32, "max_images": 512}``; the result's
    ``adaptive`` says how many images were used and why it stopped.
    ``spec`` replaces methods, tests, seed, batch_size, device, params, policy and adaptive
    at once.
    The other arguments are :func:`~.runner.run_audit`'s.
    """
    for name, explainer in (explainers or {}).items():
        register_explainer(name, explainer, replace=True)
    example = images if isinstance(images, torch.Tensor) else None
    loaded = load_model_input(
        model, input_spec=input_spec, architecture=architecture, example=example
    )
    if isinstance(images, torch.Tensor):
        tensor = images
    else:
        read = read_images(images, loaded.input_spec)
        tensor = read.tensor
        image_names = read.names if image_names is None else image_names
        if read.note:
            loaded.notes.append(read.note)
    if spec is None:
        if methods is None:
            methods = [
                n for n, info in METHODS.items() if not info.is_control and not is_plugin(info)
            ] + [n for n in (explainers or {}) if n not in METHODS or is_plugin(METHODS[n])]
        spec = AuditSpec(
            methods=tuple(methods),
            # "all" / "none" as the CLI and the API read them; the rest validated by AuditSpec
            tests=tuple(
                expand_tests(tests, training=train is not None or random_label_model is not None)
            ),
            seed=seed,
            batch_size=batch_size,
            device=device,
            params=params
            if isinstance(params, MethodParams)
            else MethodParams(**dict(params or {})),
            policy=policy,
            adaptive=adaptive_rounds(adaptive),
        )
    elif methods is not None:
        raise SpecError("pass either spec or methods, not both")
    return run_audit(
        loaded,
        tensor,
        spec,
        image_names=image_names,
        targets=targets,
        train=train,
        random_label_model=random_label_model,
        masks=masks,
        progress=progress,
    )
