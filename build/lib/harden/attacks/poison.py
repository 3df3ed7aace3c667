"""Attacks (trigger + target rule) and datasets poisoned at a rate.

all2one: every triggered sample should be classified as `target`; samples whose
true label already is the target are never poisoned nor counted in ASR.
all2all: a triggered sample of class y should become (y + 1) mod C.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harden.attacks.triggers import Trigger, make_trigger
from harden.data.pipeline import LabelledDataset
from harden.errors import HardenError

MODES = ("all2one", "all2all")


@dataclass
class Attack:
    trigger: Trigger
    target: int = 0
    mode: str = "all2one"
    num_classes: int = 10

    def __post_init__(self) -> None:
        self.trigger = make_trigger(self.trigger)
        if self.mode not in MODES:
            raise HardenError(f"attack mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.mode == "all2one" and not 0 <= self.target < self.num_classes:
            raise HardenError(f"--target {self.target} is outside the model's {self.num_classes} classes")

    def target_labels(self, labels: torch.Tensor | np.ndarray):
        """The label the attacker wants for each sample."""
        if self.mode == "all2all":
            return (labels + 1) % self.num_classes
        return labels * 0 + self.target

    def eligible(self, labels: torch.Tensor | np.ndarray):
        """Samples that count for poisoning and ASR (all2one excludes the target class)."""
        if self.mode == "all2all":
            return labels >= 0
        return labels != self.target


class PoisonedDataset(LabelledDataset):
    """`base` with `int(rate × #eligible)` eligible samples stamped and relabelled.

    `poisoned` holds the ground-truth indices, which tests and benchmarks use to
    score sample-separation defences.
    """

    def __init__(self, base: LabelledDataset, attack: Attack, rate: float, seed: int = 0):
        if not 0.0 <= rate <= 1.0:
            raise HardenError(f"poison rate {rate} must be within [0, 1]")
        self.base, self.attack = base, attack
        candidates = np.flatnonzero(attack.eligible(base.labels))
        count = int(rate * len(candidates))
        chosen = np.random.default_rng(seed).choice(candidates, size=count, replace=False) if count else np.array([], dtype=np.int64)
        self.poisoned = np.sort(chosen)
        self._is_poisoned = np.zeros(len(base), dtype=bool)
        self._is_poisoned[self.poisoned] = True
        self.labels = base.labels.copy()
        self.labels[self.poisoned] = attack.target_labels(base.labels[self.poisoned])
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, _ = self.base[index]
        if self._is_poisoned[index]:
            image = self.attack.trigger(image)
        return image, int(self.labels[index])
