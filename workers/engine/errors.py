"""One error type for the engine layer.

Every failure the engine reports to a user is an :class:`EngineError` with a stable ``code``
(a short slug) and a human-readable message. The API edge maps these to problem+json in one
place; the CLI prints them. Subclasses exist only where a caller needs to tell them apart.
"""

from __future__ import annotations


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


class FidelityError(EngineError):
    """The differentiable graph does not reproduce ONNX Runtime's logits within tolerance."""

    code = "fidelity_mismatch"


class ImageDecodeError(EngineError):
    """An input image is unreadable, of a disallowed format, or too large."""

    code = "image_decode_error"


class NotApplicableError(EngineError):
    """A method cannot run on this model (e.g. a CAM method on a model without conv layers)."""

    code = "not_applicable"


class MethodFailedError(EngineError):
    """A saliency method raised on this model; the audit goes on without it (status ``error``)."""

    code = "method_error"
