"""An exception the caller declares with ``stop_audit_on`` (the worker declares Celery's soft
time limit) ends the audit wherever it is raised; any other exception in a method is that
method's failure, reported, and the audit goes on. Before, a soft time limit raised inside a
method was taken for the method's failure and the audit ran on past its limit."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from saliency_audit.workers.engine import audit
from saliency_audit.workers.engine.errors import _STOP_AUDIT, stop_audit_on
from saliency_audit.workers.engine.methods import METHODS
from saliency_audit.workers.engine.methods.plugins import unregister_explainer
from tests.engine.nets import images, small_cnn


class TimeIsUp(Exception):
    """Like Celery's SoftTimeLimitExceeded: an ``Exception`` subclass."""


def raising(kind: type[Exception]) -> Any:
    def explainer(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Any:
        raise kind("stop here")

    return explainer


def test_a_declared_stop_ends_the_audit_and_anything_else_is_the_methods_failure() -> None:
    stop_audit_on(TimeIsUp)
    try:
        with pytest.raises(TimeIsUp):
            audit(
                small_cnn(),
                images(2),
                methods=["gradient", "late"],
                explainers={"late": raising(TimeIsUp)},
                device="cpu",
            )
        result = audit(
            small_cnn(),
            images(2),
            methods=["gradient", "broken"],
            explainers={"broken": raising(RuntimeError)},
            device="cpu",
        )
        method = result.to_dict()["methods"]["broken"]
        assert method["status"] == "error", method
        assert "RuntimeError: stop here" in str(method), method
        assert result.to_dict()["methods"]["gradient"]["status"] == "ok"
    finally:
        _STOP_AUDIT.remove(TimeIsUp)
        for name in ("late", "broken"):  # the registry is global: leave it as it was
            if name in METHODS:
                unregister_explainer(name)
