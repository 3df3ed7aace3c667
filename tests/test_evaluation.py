"""ACC / ASR / RA / DER on models whose behaviour is known exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harden.attacks import make_trigger
from harden.data import TensorDataset
from harden.evaluation import der, evaluate


class CornerDetector(torch.nn.Module):
    """Predicts the class encoded in pixel (0,0), or `target` if the bottom-right pixel is white."""

    def __init__(self, target: int, classes: int = 4):
        super().__init__()
        self.target, self.classes = target, classes

    def forward(self, x):
        label = (x[:, 0, 0, 0] * 10).round().long()
        logits = torch.nn.functional.one_hot(label, self.classes).float()
        backdoored = x[:, :, -1, -1].mean(1) > 0.99
        logits[backdoored] = torch.nn.functional.one_hot(torch.tensor(self.target), self.classes).float()
        return logits


def _dataset():
    labels = np.array([0, 1, 2, 3, 1, 2, 0, 3])
    images = torch.full((8, 3, 8, 8), 0.05)
    images[:, 0, 0, 0] = torch.tensor(labels, dtype=torch.float32) / 10
    images[7, 0, 0, 0] = 0.0  # one honest mistake: a class-3 image that reads as class 0
    return TensorDataset(images, labels)


def test_metrics_on_a_known_backdoor():
    model = CornerDetector(target=1)
    model.num_classes = 4
    result = evaluate(model, _dataset(), trigger=make_trigger("grid_paste:size=3"), target=1, batch_size=3)
    assert result.n == 8 and result.accuracy == pytest.approx(7 / 8)
    assert result.n_triggered == 6  # two images of the target class are excluded
    assert result.asr == pytest.approx(1.0) and result.ra == pytest.approx(0.0)
    assert result.per_class_accuracy[3] == pytest.approx(0.5)


def test_asr_zero_when_the_trigger_misses():
    model = CornerDetector(target=1)
    result = evaluate(model, _dataset(), trigger="blend:alpha=0.05", target=1)
    assert result.asr == pytest.approx(0.0)
    assert result.ra == pytest.approx(5 / 6)  # the mislabeled class-3 image stays wrong


def test_a_target_beyond_the_datas_labels_is_measured_on_a_bare_network():
    """Clean data may lack the last classes (here 4 and 5 of 6); a network that does not say how many
    classes it has still gets its ASR toward them, as purify measures every reversed trigger."""
    model = CornerDetector(target=5, classes=6)
    result = evaluate(model, _dataset(), trigger=make_trigger("grid_paste:size=3"), target=5)
    assert result.asr == pytest.approx(1.0) and result.n_triggered == 8


def test_der_formula():
    assert der(1.0, 0.0, 0.9, 0.9) == pytest.approx(1.0)
    assert der(0.9, 0.9, 0.9, 0.9) == pytest.approx(0.5)
    assert der(1.0, 0.02, 0.95, 0.90) == pytest.approx((0.98 - 0.05 + 1) / 2)
    assert der(0.5, 0.6, 0.9, 0.95) == pytest.approx(0.5)  # regressions are clipped at zero
