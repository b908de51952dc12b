"""What an audit runs on and what it runs: plain, JSON-round-trippable dataclasses."""

from __future__ import annotations

from collections.abc import Sequence

# The shapes and their bounds are declared once, in the contract (torch-free, shared with the
# API); this module keeps the engine's helpers around them.
from .contract.spec import (
    ADAPTIVE_TESTS,
    ANALYSES,
    GRAY_MEAN,
    GRAY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LRP_COMPOSITES,
    MEASURES,
    MODEL_RANDOMIZATION_TESTS,
    SPEC_SOURCES,
    TESTS,
    AdaptiveRounds,
    AuditSpec,
    ChannelOrder,
    Granularity,
    InputSpec,
    Interpolation,
    Layout,
    MethodParams,
    SpecSource,
    TrainRecipe,
    expand_tests,
)
from .errors import ModelLoadError, OutputRequiredError, Shape, UnknownOutputError

__all__ = [
    "ADAPTIVE_TESTS",
    "ANALYSES",
    "GRAY_MEAN",
    "GRAY_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LRP_COMPOSITES",
    "MEASURES",
    "MODEL_RANDOMIZATION_TESTS",
    "SPEC_SOURCES",
    "TESTS",
    "AdaptiveRounds",
    "AuditSpec",
    "ChannelOrder",
    "Granularity",
    "InputSpec",
    "Interpolation",
    "Layout",
    "MethodParams",
    "SpecSource",
    "TrainRecipe",
    "default_normalization",
    "expand_tests",
    "resolve_output",
]


def default_normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std assumed when nobody states them: ImageNet's (gray for one channel)."""
    return (GRAY_MEAN, GRAY_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)


def resolve_output(
    choice: str | int | None, outputs: Sequence[tuple[str, Shape | None, str]]
) -> int:
    """The index of the graph output an audit explains; ``outputs`` are the graph's outputs as
    (name, shape, ONNX element type name such as ``FLOAT``).

    ``choice`` (the input spec's ``output``) picks one by name or index. Without it the graph
    must have exactly one float32 output (an integer label output beside it is no candidate:
    it has no gradient); several float outputs are refused with the list of them, because
    taking the first would be a guess.
    """
    if choice is not None:
        if isinstance(choice, int):
            if not 0 <= choice < len(outputs):
                raise UnknownOutputError(
                    choice, outputs, f"is not an index from 0 to {len(outputs) - 1}"
                )
            index = choice
        else:
            names = [name for name, _, _ in outputs]
            if choice not in names:
                raise UnknownOutputError(choice, outputs, "is not an output of the graph")
            index = names.index(choice)
        if outputs[index][2] != "FLOAT":
            raise UnknownOutputError(
                choice, outputs, f"is {outputs[index][2]}, not float32 class scores"
            )
        return index
    floats = [i for i, (_, _, dtype) in enumerate(outputs) if dtype == "FLOAT"]
    if not floats:
        raise ModelLoadError("the graph has no float32 output to explain")
    if len(floats) > 1:
        raise OutputRequiredError(outputs)
    return floats[0]
