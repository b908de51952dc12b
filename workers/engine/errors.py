"""One error type for the engine layer.

Every failure the engine reports to a user is an :class:`EngineError` with a stable ``code``
(a short slug) and a human-readable message. The API edge maps these to problem+json in one
place; the CLI prints them. Subclasses exist only where a caller needs to tell them apart.
"""

from __future__ import annotations

from collections.abc import Sequence

# How to put an ONNX model's weights back into one file (the engine and the upload check say it)
EMBED_WEIGHTS_FIX = (
    "Embed the weights in one file: export with torch.onnx.export(..., external_data=False) "
    "(torch's default writes model.onnx.data beside model.onnx), or merge an existing pair "
    'with onnx.save(onnx.load("model.onnx"), "single.onnx", save_as_external_data=False) '
    "(files over 2 GB cannot be embedded)"
)


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""

    code = "engine_error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, **self.details}


class SpecError(EngineError):
    """The audit spec or input spec is invalid (unknown method, bad parameter, ...)."""

    code = "invalid_spec"


class ModelLoadError(EngineError):
    """The model file cannot be read or converted."""

    code = "model_load_error"


class UnsupportedOperatorError(ModelLoadError):
    """The ONNX graph uses an operator (at an opset) the converter does not support."""

    code = "unsupported_operator"

    def __init__(self, op_type: str, opset: int, node_name: str = "") -> None:
        where = f" (node {node_name!r})" if node_name else ""
        super().__init__(
            f"unsupported ONNX operator {op_type} at opset {opset}{where}",
            op_type=op_type,
            opset=opset,
            node=node_name,
        )


class WeightsMismatchError(ModelLoadError):
    """A state dict does not match the architecture's parameters exactly."""

    code = "weights_mismatch"

    def __init__(self, architecture: str, missing: list[str], unexpected: list[str]) -> None:
        super().__init__(
            f"weights do not match {architecture}: "
            f"{len(missing)} missing keys {missing[:20]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:20]}",
            architecture=architecture,
            missing_keys=missing,
            unexpected_keys=unexpected,
        )


class UnknownArchitectureError(ModelLoadError):
    """A weights file names an architecture its library does not have."""

    code = "unknown_architecture"


class ArchitectureUnavailableError(ModelLoadError):
    """The library an architecture comes from (timm) is not installed where the model loads."""

    code = "architecture_unavailable"


class FidelityError(EngineError):
    """The differentiable graph does not reproduce ONNX Runtime's logits within tolerance."""

    code = "fidelity_mismatch"


class ImageDecodeError(EngineError):
    """An input image is unreadable, of a disallowed format, or too large."""

    code = "image_decode_error"


class NotApplicableError(EngineError):
    """A method cannot run on this model (e.g. a CAM method on a model without conv layers)."""

    code = "not_applicable"


# A tensor shape as ONNX declares it: an int per static dim, a name or None per dynamic one.
Shape = Sequence[int | str | None]


def format_shape(shape: Shape | None) -> str:
    """``[N, C, ...]`` for messages: the batch dim as N, dynamic dims as ?, whatever the source
    (the engine's inferred shapes and the upload check's declared ones read the same)."""
    if shape is None:
        return "of unknown shape"
    dims = ["N" if i == 0 else str(d) if isinstance(d, int) else "?" for i, d in enumerate(shape)]
    return f"[{', '.join(dims)}]"


class NotAClassifierError(ModelLoadError):
    """The model's output is not one row of class scores per image ([N, C], C >= 2)."""

    code = "not_a_classifier"

    def __init__(self, output: str, shape: Shape | None) -> None:
        super().__init__(
            f"not an image classifier: the output {output!r} has shape {format_shape(shape)}; "
            "an audit explains class scores, one output of shape [N, C] with C >= 2 classes "
            "(a regression output [N, 1], a map [N, C, H, W] or a feature vector per image "
            "cannot be audited)",
            output=output,
            shape=[d if isinstance(d, int) else None for d in shape] if shape is not None else None,
        )

    @classmethod
    def check(cls, output: str, shape: Shape | None) -> int | None:
        """The class count C of an output of shape ``[N, C]``; raise unless ``shape`` can be
        that. None when it cannot be told from ``shape`` (rank unknown, or C dynamic)."""
        if shape is None:
            return None
        if len(shape) != 2:
            raise cls(output, shape)
        classes = shape[1]
        if isinstance(classes, int):
            if classes < 2:
                raise cls(output, shape)
            return classes
        return None


def _list_outputs(outputs: Sequence[tuple[str, Shape | None, str]]) -> str:
    return ", ".join(
        f"{i}: {name!r} {format_shape(shape)}" + ("" if dtype == "FLOAT" else f" {dtype}")
        for i, (name, shape, dtype) in enumerate(outputs)
    )


class OutputRequiredError(ModelLoadError):
    """The graph has several outputs that could hold class scores and none was named."""

    code = "output_required"

    def __init__(self, outputs: Sequence[tuple[str, Shape | None, str]]) -> None:
        super().__init__(
            f"the graph has {len(outputs)} outputs ({_list_outputs(outputs)}); name the one "
            'holding the class scores in the input spec\'s "output" (its name or index)',
            outputs=[name for name, _, _ in outputs],
        )


class UnknownOutputError(SpecError):
    """The input spec's ``output`` names no float output of the graph."""

    code = "unknown_output"

    def __init__(
        self, choice: str | int, outputs: Sequence[tuple[str, Shape | None, str]], why: str
    ) -> None:
        super().__init__(
            f"input spec output {choice!r} {why}; the graph's outputs: {_list_outputs(outputs)}",
            output=choice,
            outputs=[name for name, _, _ in outputs],
        )


class MethodFailedError(EngineError):
    """A saliency method raised on this model; the audit goes on without it (status ``error``)."""

    code = "method_error"


def unknown_cam_layer(layer: str, conv_layers: Sequence[str]) -> SpecError:
    """The spec's ``layer`` names no module of the model (the engine's and the API's words)."""
    shown = conv_layers[-10:] if conv_layers else ["(none)"]
    return SpecError(f"no module named {layer!r} in the model; conv layers are: {', '.join(shown)}")


def unknown_analysis_layer(name: str, spatial: Sequence[str]) -> SpecError:
    """A ``layers`` entry names no module of the model (the engine's and the API's words)."""
    return SpecError(
        f"unknown layer {name!r}; modules with a spatial output: {', '.join(spatial[:40])}"
    )


# Exceptions the caller's environment raises to stop an audit (a Celery task's soft time limit,
# :func:`stop_audit_on`): the engine's error isolation, which turns a failing method or layer
# into a reported error and goes on, re-raises these instead of swallowing them.
_STOP_AUDIT: list[type[BaseException]] = []


def stop_audit_on(*kinds: type[BaseException]) -> None:
    """Declare exception types that must end the audit wherever they are raised."""
    _STOP_AUDIT.extend(k for k in kinds if k not in _STOP_AUDIT)


def stops_the_audit(exc: BaseException) -> bool:
    return isinstance(exc, tuple(_STOP_AUDIT))
