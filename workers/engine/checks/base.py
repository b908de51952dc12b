"""The check registry: every sanity check and analysis an audit can run, with one call shape.

A *check* is what a user names in ``tests`` (``cascading``, ``emprt``, ``layers``). Its
metadata are class attributes: ``name``, ``kind`` (a ``test`` gets a verdict per method from
the policy; an ``analysis`` measures without one), ``description`` and ``reference`` (the
paper, shown in every result), whether it needs training data, and its cost on the progress
bar. Its one step is ``run(ctx)``: everything it needs is in the :class:`AuditContext` the
audit builds once. The audit loop asks the registry for the requested names and never
special-cases any one of them; adding a check is one module that registers itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ..data_randomization import LabeledImages
from ..errors import SpecError
from ..maps import MapInputs, MapSet
from ..policy import MapChecks, Policy
from ..progress import ProgressCallback, no_progress
from ..result import TestResult
from ..sanity import RandomizedStates
from ..spec import AuditSpec

CheckKind = Literal["test", "analysis"]


@dataclass(frozen=True, eq=False)
class AuditContext:
    """Everything a check runs on, built once per audit by
    :func:`~saliency_audit.workers.engine.runner.run_audit`.

    ``inputs`` are the trained model, the images and targets explained, the methods, the
    spec, the CAM layer, the device and the IG baseline (a check derives changed inputs with
    ``dataclasses.replace``); ``states`` holds the trained model's maps (``reference``) and
    computes each randomized model state once per audit, whichever checks share it.
    ``num_classes`` is the model's; ``policy`` the verdict policy the audit is decided with
    (the model randomization tests compute the stages its rules read); ``train`` and
    ``random_label_model`` are what the
    data randomization test compares; ``masks`` are (N, H, W) boolean object masks or None.
    ``progress`` is the running check's own callback (0..1 over that check)."""

    inputs: MapInputs
    states: RandomizedStates
    num_classes: int
    policy: Policy
    train: LabeledImages | None = None
    random_label_model: nn.Module | None = None
    masks: torch.Tensor | None = None
    progress: ProgressCallback = no_progress

    @property
    def module(self) -> nn.Module:
        return self.inputs.module

    @property
    def images(self) -> torch.Tensor:
        return self.inputs.images

    @property
    def targets(self) -> torch.Tensor:
        return self.inputs.targets

    @property
    def spec(self) -> AuditSpec:
        return self.inputs.spec

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    @property
    def reference(self) -> MapSet:
        return self.states.reference

    @property
    def map_checks(self) -> MapChecks:
        return self.states.checks


class Check(ABC):
    """One sanity check or analysis: metadata as class attributes, one step, :meth:`run`."""

    name: ClassVar[str]
    kind: ClassVar[CheckKind]
    description: ClassVar[str]
    reference: ClassVar[str]
    # a check that compares models trained on the caller's labeled images (or a model the
    # caller trained on random labels) is refused up front when neither is given
    needs_training_data: ClassVar[bool] = False

    def cost(self, spec: AuditSpec, n_units: int) -> float:
        """Its share of the progress bar, in map-set computations (the trained model's map set
        costs 1), given the spec and the number of randomization units of the model at the
        spec's granularity."""
        return 1.0

    @abstractmethod
    def run(self, ctx: AuditContext) -> TestResult:
        """Measure; report progress through ``ctx.progress``. A check that changes the model's
        weights puts the trained ones back before returning."""


CHECKS: dict[str, Check] = {}


def register(check_cls: type[Check]) -> type[Check]:
    """Class decorator: add a check to the registry (order = order in listings)."""
    check = check_cls()
    if check.name in CHECKS:
        raise RuntimeError(f"check {check.name!r} registered twice")
    if check.kind not in ("test", "analysis"):
        raise RuntimeError(f"check {check.name!r} has kind {check.kind!r}")
    CHECKS[check.name] = check
    return check_cls


def check_info(name: str) -> Check:
    try:
        return CHECKS[name]
    except KeyError:
        raise SpecError(f"unknown test {name!r}; known tests: {', '.join(CHECKS)}") from None
