"""Small data helpers of the attack suite and the MAML loop: in-memory subsets, per-class budgets."""

from __future__ import annotations

import numpy as np
import torch

from harden.data.pipeline import LabelledDataset, TensorDataset, split
from harden.errors import HardenError

TEST_LIMIT = 2000  # fixed-size evaluation subset: evaluation must never dominate the cost


def in_memory(dataset: LabelledDataset, limit: int | None = None, seed: int = 0) -> TensorDataset:
    """A fixed random subset of at most `limit` items, decoded once and kept in memory."""
    indices = np.arange(len(dataset))
    if limit is not None and limit < len(dataset):
        indices = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:limit])
    if not len(indices):
        raise HardenError("no samples to train or evaluate on")
    images, labels = zip(*(dataset[int(i)] for i in indices))
    return TensorDataset(torch.stack(images), np.asarray(labels), getattr(dataset, "classes", None))


def take_per_class(dataset: LabelledDataset, per_class: int, seed: int = 0) -> LabelledDataset:
    """At most `per_class` random images of each class (the attacker's labelling budget)."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(dataset.labels == c))[:per_class] for c in np.unique(dataset.labels)]
    return dataset.subset(np.sort(np.concatenate(chosen)))


def attacker_split(dataset: LabelledDataset, held_out: LabelledDataset | None = None, *, test_fraction: float = 0.3,
                   train_per_class: int | None = None, seed: int = 0) -> tuple[LabelledDataset, TensorDataset]:
    """(train, test) for fine-tuning attacks: `held_out` or a stratified split, and a per-class budget."""
    train, test = (dataset, held_out) if held_out is not None else split(dataset, [1 - test_fraction, test_fraction], seed=seed)
    if train_per_class is not None:
        train = take_per_class(train, train_per_class, seed)
    return train, in_memory(test, TEST_LIMIT, seed)  # the test set is evaluated every epoch: decode it once


def check_labels(dataset: LabelledDataset, num_classes: int) -> None:
    """Restricted-domain labels must index the model's outputs (a smaller class count is fine)."""
    top = int(dataset.labels.max()) if len(dataset.labels) else -1
    if top >= num_classes:
        raise HardenError(f"labels go up to {top} but the model has {num_classes} outputs; relabel to 0..{num_classes - 1}")
