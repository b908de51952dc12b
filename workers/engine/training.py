"""Training a copy of the audited architecture, for the data randomization test.

Adebayo et al. 2018 (section 3.2) train the *same architecture* twice on the same images: once
on the true labels and once on a random permutation of them, "until the model memorizes" the
permuted labels (high training accuracy). Both copies here start from a fresh initialization
(every parameterized module re-drawn from its default initializer with a seeded generator, as
in :mod:`.randomization`), follow the same recipe (:class:`~.spec.TrainRecipe`: Adam, fixed
learning rate, batch size, shuffling from a seeded generator, no augmentation) and stop at the
same criterion: training accuracy at or above ``target_accuracy``, or the epoch or time cap.
Whether the target was reached is recorded; an audit whose random-label copy did not memorize
cannot conclude anything from it.

Training is deterministic for a given seed, device and thread count (the shuffling generator
is seeded; CPU kernels are deterministic). Converted ONNX graphs train like any module: their
BatchNorm layers were usually folded into the convolutions at export, so such a copy trains
without BatchNorm, which only makes memorization slower.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from .errors import SpecError
from .progress import ProgressCallback, no_progress
from .randomization import module_seed, parameterized_modules, redraw, unit_modules
from .spec import TrainRecipe
from .stats import key_seed


@dataclass(frozen=True)
class TrainingRun:
    """What one training run did: the numbers that go into the result."""

    labels: str  # "true" or "permuted"
    epochs: int
    train_accuracy: float  # on the whole training set, eval mode, after the last epoch
    reached_target: bool
    stopped_by: str  # "target_accuracy", "max_epochs" or "max_seconds"
    final_loss: float
    seconds: float
    n_train: int
    batch_size: int
    accuracy_by_epoch: tuple[float, ...]


def fresh_copy(module: nn.Module, seed: int, purpose: str) -> nn.Module:
    """A deep copy of ``module`` with every parameterized module re-initialized (seeded)."""
    clone = copy.deepcopy(module)
    modules = unit_modules(clone)
    for name in parameterized_modules(clone):
        generator = torch.Generator().manual_seed(module_seed(seed, purpose, name))
        redraw(name, modules[name], generator)
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


def permuted_labels(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded random permutation of the labels (the paper's "random labels": same class
    frequencies, no relation to the images)."""
    g = torch.Generator().manual_seed(key_seed(seed, "permuted_labels") >> 1)
    return labels[torch.randperm(labels.numel(), generator=g)]


@torch.no_grad()
def accuracy(
    module: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> float:
    """Top-1 accuracy in eval mode, batch by batch on the module's device."""
    module.eval()
    device = next(module.parameters()).device
    fixed = getattr(module, "fixed_batch", None)
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size]
        short = len(x)
        if fixed and short < fixed:  # pad a fixed-batch graph's last batch, count real rows
            x = torch.cat([x, x[-1:].expand(fixed - short, *x.shape[1:])])
        predicted = module(x.to(device)).argmax(dim=1).cpu()[:short]
        correct += int((predicted == labels[i : i + short]).sum())
    return correct / max(1, images.shape[0])


def train_classifier(
    module: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: TrainRecipe,
    *,
    seed: int,
    label_kind: str,
    progress: ProgressCallback = no_progress,
) -> TrainingRun:
    """Train ``module`` in place on (images, labels) with ``recipe``; return what happened.

    ``images`` is the preprocessed NCHW training batch on the CPU; mini-batches move to the
    module's device. A converted graph with a fixed batch size trains at that batch size.
    """
    n = int(images.shape[0])
    if n == 0:
        raise SpecError("the training set is empty")
    if labels.shape != (n,):
        raise SpecError("the training set needs one label per image")
    fixed = getattr(module, "fixed_batch", None)
    batch_size = int(fixed or recipe.batch_size)
    device = next(module.parameters()).device
    optimizer = torch.optim.Adam(module.parameters(), lr=recipe.learning_rate)
    shuffle = torch.Generator().manual_seed(key_seed(seed, "shuffle", label_kind) >> 1)
    started = time.perf_counter()
    history: list[float] = []
    loss_value = float("nan")
    stopped_by = "max_epochs"
    for epoch in range(1, recipe.max_epochs + 1):
        module.train()
        order = torch.randperm(n, generator=shuffle)
        total, seen = 0.0, 0
        # A fixed-batch graph cannot take a short last batch: it is left out of that epoch.
        stop = n - n % batch_size if fixed and n > batch_size else n
        for i in range(0, stop, batch_size):
            index = order[i : i + batch_size]
            x, y = images[index].to(device), labels[index].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(module(x), y)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
            seen += len(index)
        loss_value = total / max(1, seen)
        acc = accuracy(module, images, labels, batch_size)
        history.append(acc)
        elapsed = time.perf_counter() - started
        progress(
            min(1.0, epoch / recipe.max_epochs),
            f"training on {label_kind} labels: epoch {epoch}, train accuracy {acc:.3f}",
        )
        if acc >= recipe.target_accuracy:
            stopped_by = "target_accuracy"
            break
        if elapsed >= recipe.max_seconds:
            stopped_by = "max_seconds"
            break
    module.eval()
    return TrainingRun(
        labels=label_kind,
        epochs=len(history),
        train_accuracy=history[-1],
        reached_target=history[-1] >= recipe.target_accuracy,
        stopped_by=stopped_by,
        final_loss=loss_value,
        seconds=time.perf_counter() - started,
        n_train=n,
        batch_size=batch_size,
        accuracy_by_epoch=tuple(round(a, 4) for a in history),
    )
