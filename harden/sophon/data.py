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
                   train_per_class: int | None = None, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) for fine-tuning attacks: `held_out` or a stratified split, a per-class budget, in memory."""
    train, test = (dataset, held_out) if held_out is not None else split(dataset, [1 - test_fraction, test_fraction], seed=seed)
    if train_per_class is not None:
        train = take_per_class(train, train_per_class, seed)
    return in_memory(train), in_memory(test, TEST_LIMIT, seed)
