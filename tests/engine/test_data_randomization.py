"""Data randomization (Adebayo et al. 2018, section 3.2): two copies of the architecture trained
from the same fresh initialization, on permuted and on true labels, with the same recipe."""

from __future__ import annotations

import pytest
import torch

from saliency_audit.workers.engine.data_randomization import LabeledImages, data_randomization
from saliency_audit.workers.engine.errors import SpecError
from saliency_audit.workers.engine.maps import methods_to_run
from saliency_audit.workers.engine.methods import resolve_layer
from saliency_audit.workers.engine.randomization import parameterized_modules
from saliency_audit.workers.engine.spec import AuditSpec, TrainRecipe
from saliency_audit.workers.engine.training import (
    accuracy,
    fresh_copy,
    permuted_labels,
    train_classifier,
)
from tests.engine.nets import images, small_cnn

CPU = torch.device("cpu")


def _train_set(n: int = 40, seed: int = 3) -> LabeledImages:
    x = images(n, 16, seed=seed)
    labels = torch.arange(n) % 5
    return LabeledImages(x, labels)


def test_fresh_copy_reinitializes_every_parameterized_module_and_is_seeded() -> None:
    model = small_cnn()
    a, b, c = fresh_copy(model, 0, "p"), fresh_copy(model, 0, "p"), fresh_copy(model, 1, "p")
    trained = dict(model.named_parameters())
    for name, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[name])
        if name.endswith("weight") and p.ndim > 1:
            assert not torch.equal(p, trained[name])
            assert not torch.equal(p, dict(c.named_parameters())[name])
    assert parameterized_modules(a) == parameterized_modules(model)
    # BatchNorm statistics start over too.
    assert torch.equal(a.features[4].running_var, torch.ones(16))


def test_permuted_labels_keep_the_class_frequencies_and_are_seeded() -> None:
    labels = torch.arange(100) % 7
    p = permuted_labels(labels, 0)
    assert torch.equal(torch.bincount(p), torch.bincount(labels))
    assert not torch.equal(p, labels)
    assert torch.equal(p, permuted_labels(labels, 0)) and not torch.equal(
        p, permuted_labels(labels, 1)
    )


def test_training_memorizes_random_labels_and_reports_how() -> None:
    data = _train_set()
    random = permuted_labels(data.labels, 0)
    model = fresh_copy(small_cnn(), 0, "t")
    recipe = TrainRecipe(target_accuracy=1.0, max_epochs=400, batch_size=8, learning_rate=1e-2)
    run = train_classifier(model, data.images, random, recipe, seed=0, label_kind="permuted")
    assert run.reached_target and run.stopped_by == "target_accuracy"
    assert run.train_accuracy == 1.0 == accuracy(model, data.images, random, 8)
    assert run.epochs == len(run.accuracy_by_epoch) and run.n_train == 40
    assert not model.training  # left in eval mode for the maps
    again = fresh_copy(small_cnn(), 0, "t")
    rerun = train_classifier(again, data.images, random, recipe, seed=0, label_kind="permuted")
    assert rerun.accuracy_by_epoch == run.accuracy_by_epoch  # deterministic on CPU
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_epoch_cap_stops_training_and_says_so() -> None:
    data = _train_set()
    model = fresh_copy(small_cnn(), 0, "t")
    run = train_classifier(
        model,
        data.images,
        permuted_labels(data.labels, 0),
        TrainRecipe(max_epochs=2),
        seed=0,
        label_kind="permuted",
    )
    assert run.epochs == 2 and not run.reached_target and run.stopped_by == "max_epochs"


def _spec(recipe: TrainRecipe) -> AuditSpec:
    return AuditSpec(
        methods=tuple(methods_to_run(["gradient", "guided_backprop"])),
        seed=0,
        batch_size=8,
        training=recipe,
        measures=("spearman_abs", "ssim"),
    )


def test_data_randomization_trains_both_copies_and_scores_their_maps() -> None:
    model = small_cnn()
    x = images(6, 16, seed=9)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    recipe = TrainRecipe(target_accuracy=1.0, max_epochs=400, batch_size=8, learning_rate=1e-2)
    spec = _spec(recipe)
    result = data_randomization(
        model,
        x,
        targets,
        spec.methods,
        spec,
        resolve_layer(model, None),
        device=CPU,
        num_classes=5,
        train=_train_set(),
    )
    d = result.details
    assert d["memorized"] is True
    assert d["permuted_labels_run"]["train_accuracy"] == 1.0
    assert d["true_labels_run"]["train_accuracy"] == 1.0
    assert d["chance_accuracy"] == pytest.approx(0.2)
    assert d["recipe"]["learning_rate"] == 1e-2
    scores = {(s.method, s.measure): s for s in result.scores}
    assert len(scores) == 4 * 2
    assert scores[("control_sobel", "spearman_abs")].mean == pytest.approx(1.0)
    assert all(s.stage == "random_labels" and s.n == 6 for s in result.scores)
    assert set(result.example_maps) == {"true_labels", "random_labels"}
    # The audited model itself is not touched by training its copies.
    for p, q in zip(model.parameters(), small_cnn().parameters(), strict=True):
        assert torch.equal(p, q)


def test_an_uploaded_random_label_model_is_compared_with_the_audited_model() -> None:
    model = small_cnn(seed=0)
    other = small_cnn(seed=5)
    x = images(6, 16, seed=9)
    targets = torch.zeros(6, dtype=torch.int64)
    spec = _spec(TrainRecipe())
    result = data_randomization(
        model,
        x,
        targets,
        spec.methods,
        spec,
        resolve_layer(model, None),
        device=CPU,
        num_classes=5,
        random_label_model=other,
        train=_train_set(),
    )
    assert result.details["memorized"] is None and "not verified" in result.details["memorization"]
    assert 0.0 <= result.details["uploaded_model_accuracy_on_true_labels"] <= 1.0
    assert result.scores


def test_training_labels_beyond_the_model_classes_are_refused() -> None:
    model = small_cnn()
    data = LabeledImages(images(4, 16), torch.tensor([0, 1, 2, 7]))
    spec = _spec(TrainRecipe())
    with pytest.raises(SpecError, match="5 classes"):
        data_randomization(
            model,
            images(2, 16),
            torch.zeros(2, dtype=torch.int64),
            spec.methods,
            spec,
            None,
            device=CPU,
            num_classes=5,
            train=data,
        )
    with pytest.raises(SpecError):
        LabeledImages(images(4, 16), torch.tensor([0, 1]))
