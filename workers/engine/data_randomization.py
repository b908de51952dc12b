"""The data randomization test (Adebayo et al. 2018, section 3.2).

The audited architecture is trained twice from the same fresh initialization with the same
recipe (:mod:`.training`): once on a seeded permutation of the training labels until it
memorizes them, and once, as the control, on the true labels. Both copies explain the audit
images for the audit's targets, and their maps are compared with every similarity measure. A
method whose maps stay alike does not depend on the relation between images and labels that
the model learned.

Alternatively the user uploads a model already trained on random labels: it is compared with
the audited model itself, and memorization cannot be verified here (the result says so).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import SpecError
from .maps import MapInputs, MapSet
from .policy import MapChecks
from .progress import ProgressCallback, no_progress
from .result import StageInfo, TestResult
from .sanity import examples_of, problems_of, registered_check, scores_of, similarity_values
from .spec import AuditSpec
from .training import accuracy, fresh_copy, permuted_labels, train_classifier

STAGE = "random_labels"


@dataclass(frozen=True)
class LabeledImages:
    """A preprocessed training set: NCHW float32 images on the CPU and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.labels.shape != (self.images.shape[0],):
            raise SpecError("a training set needs NCHW images and one label per image")
        if self.images.shape[0] < 2:
            raise SpecError("a training set needs at least two images")


def data_randomization(
    module: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    names: Sequence[str],
    spec: AuditSpec,
    layer: str | None,
    *,
    device: torch.device,
    num_classes: int,
    baseline: torch.Tensor | None = None,
    train: LabeledImages | None = None,
    random_label_model: nn.Module | None = None,
    checks: MapChecks | None = None,
    progress: ProgressCallback = no_progress,
) -> TestResult:
    """Train (or take) a random-label model and a true-label control; score their maps."""
    info = registered_check("data_randomization")
    result = TestResult(
        test="data_randomization",
        description=info.description,
        reference=info.reference,
        stages=[StageInfo(1, STAGE)],
    )
    if train is None and random_label_model is None:
        result.status = "not_run"
        result.reason = (
            "needs a labeled training set (a folder per class) or a model trained on random labels"
        )
        return result
    if train is not None and int(train.labels.max()) >= num_classes:
        raise SpecError(
            f"training labels go up to {int(train.labels.max())} but the model has "
            f"{num_classes} classes"
        )

    if random_label_model is not None:
        control = module
        randomized_model = random_label_model.to(device).eval()
        details: dict[str, object] = {
            "source": "uploaded random-label model, compared with the audited model",
            "memorized": None,
            "memorization": "not verified: the model was trained elsewhere",
        }
        if train is not None:
            details["uploaded_model_accuracy_on_true_labels"] = accuracy(
                randomized_model, train.images, train.labels, spec.batch_size
            )
        share = 0.0
    else:
        assert train is not None
        recipe = spec.training
        permuted = permuted_labels(train.labels, spec.seed)
        randomized_model = fresh_copy(module, spec.seed, "data_randomization").to(device)
        control = fresh_copy(module, spec.seed, "data_randomization").to(device)
        random_run = train_classifier(
            randomized_model,
            train.images,
            permuted,
            recipe,
            seed=spec.seed,
            label_kind="permuted",
            progress=lambda f, s: progress(0.6 * f, s),
        )
        control_run = train_classifier(
            control,
            train.images,
            train.labels,
            recipe,
            seed=spec.seed,
            label_kind="true",
            progress=lambda f, s: progress(0.6 + 0.2 * f, s),
        )
        details = {
            "source": "trained here: permuted labels vs true labels, same initialization and "
            "recipe",
            "memorized": random_run.reached_target,
            "memorization": (
                f"train accuracy on permuted labels {random_run.train_accuracy:.4f} "
                f"{'reached' if random_run.reached_target else 'did not reach'} the target "
                f"{recipe.target_accuracy} ({random_run.stopped_by}, {random_run.epochs} epochs)"
            ),
            "recipe": asdict(recipe) | {"optimizer": "Adam", "augmentation": "none"},
            "permuted_labels_run": asdict(random_run),
            "true_labels_run": asdict(control_run),
            "chance_accuracy": float(torch.bincount(train.labels).max() / train.labels.numel()),
        }
        share = 0.8

    inputs = MapInputs(module, images, targets, names, spec, layer, device, baseline)

    def maps_of(model: nn.Module, key: str, lo: float, hi: float) -> MapSet:
        return dataclasses.replace(inputs, module=model).compute(
            random_control_key=key,
            progress=lambda f, s: progress(lo + (hi - lo) * f, f"{key} model maps: {s}"),
        )

    middle = share + (1 - share) / 2
    control_maps = maps_of(control, "true_labels", share, middle)
    random_maps = maps_of(randomized_model, "random_labels", middle, 1.0)
    result.details = details
    result.example_maps = {
        "true_labels": examples_of(control_maps),
        STAGE: examples_of(random_maps),
    }
    checks = checks or MapChecks()
    result.map_problems = [
        *problems_of(control_maps, checks, "true_labels"),
        *problems_of(random_maps, checks, STAGE),
    ]
    result.scores = scores_of(
        similarity_values(control_maps, random_maps, names, spec.measures),
        test="data_randomization",
        stage=STAGE,
        stage_index=1,
        seed=spec.seed,
    )
    return result
