"""Triggers, target rules and poisoning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harden.attacks import Attack, PoisonedDataset, list_triggers, make_trigger
from harden.data import TensorDataset
from harden.errors import HardenError

ALL = sorted(list_triggers())


@pytest.mark.parametrize("name", ALL)
def test_every_trigger_is_deterministic_bounded_and_visible(name):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    first, second = make_trigger(name)(x), make_trigger(name)(x)
    assert first.shape == x.shape
    assert torch.equal(first, second)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    assert float((first - x).abs().max()) > 0.02
    gray = make_trigger(name)(torch.rand(2, 1, 28, 28))
    assert gray.shape == (2, 1, 28, 28)


def test_grid_paste_touches_only_its_corner():
    x = torch.full((1, 3, 32, 32), 0.5)
    out = make_trigger("badnets")(x)
    changed = (out != x).any(dim=1)[0]
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert rows.min() >= 29 and cols.min() >= 29
    assert out[0, :, 31, 31].tolist() == [1.0, 1.0, 1.0] and out[0, :, 29, 29].tolist() == [0.0, 0.0, 0.0]
    big = make_trigger("grid_paste:size=6,corner=tl")(x)
    assert (big != x).any(dim=1)[0, :6, :6].any() and not (big != x).any(dim=1)[0, 6:, 6:].any()


def test_single_image_and_spec_round_trip():
    trigger = make_trigger("blend:alpha=0.1,seed=3")
    assert trigger.spec == "blend:alpha=0.1,seed=3"
    image = torch.rand(3, 8, 8)
    assert torch.allclose(trigger(image), trigger(image[None])[0])
    assert not torch.equal(make_trigger("blend:seed=1")(image), make_trigger("blend:seed=2")(image))


@pytest.mark.parametrize("spec, message", [("nope", "unknown trigger"), ("blend:beta=1", "bad parameter"), ("blend:alpha", "bad parameter")])
def test_bad_trigger_specs(spec, message):
    with pytest.raises(HardenError, match=message):
        make_trigger(spec)


def test_all2one_poisoning_rate_labels_and_ground_truth():
    labels = np.repeat(np.arange(10), 20)
    base = TensorDataset(torch.full((200, 3, 16, 16), 0.3), labels)
    poisoned = PoisonedDataset(base, Attack("grid_paste", target=2, num_classes=10), rate=0.1, seed=1)
    assert len(poisoned.poisoned) == 18  # 10% of the 180 non-target samples
    assert (labels[poisoned.poisoned] != 2).all()
    assert (poisoned.labels[poisoned.poisoned] == 2).all()
    untouched = np.setdiff1d(np.arange(200), poisoned.poisoned)
    assert (poisoned.labels[untouched] == labels[untouched]).all()
    image, label = poisoned[int(poisoned.poisoned[0])]
    assert label == 2 and not torch.equal(image, base[int(poisoned.poisoned[0])][0])
    clean_image, _ = poisoned[int(untouched[0])]
    assert torch.equal(clean_image, base[int(untouched[0])][0])


def test_all2all_targets_next_class():
    attack = Attack("grid_paste", mode="all2all", num_classes=4)
    assert attack.target_labels(np.array([0, 1, 3])).tolist() == [1, 2, 0]
    assert attack.eligible(np.array([0, 3])).all()


def test_target_outside_classes_is_rejected():
    with pytest.raises(HardenError, match="outside the model's 3 classes"):
        Attack("grid_paste", target=5, num_classes=3)
