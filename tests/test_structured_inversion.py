"""The structured inversions (harden/scan/structured.py): smooth warps, stripes and separable patterns."""

from __future__ import annotations

import pytest
import torch

from harden.attacks import Attack, PoisonedDataset
from harden.data import load_data, split
from harden.models import InputSpec, create_model
from harden.data.pipeline import stratified_sample
from harden.scan.structured import (additive_transform, separable_success, separable_transform, stripe_success, warp_success,
                                     warp_transform)
from harden.training import TrainConfig, fit

SPEC = InputSpec(3, 16, 16)


def test_warp_is_the_identity_at_zero_and_moves_no_pixel_further_than_its_budget():
    ramp = torch.linspace(0, 1, 16).expand(1, 3, 16, 16).contiguous()  # brightness grows one step per column
    transform = warp_transform(16, 16, budget_px=1.0)
    assert torch.allclose(transform(ramp, torch.zeros(1, 2, 4, 4)), ramp, atol=1e-5)
    pushed = transform(ramp, torch.full((1, 2, 4, 4), 10.0))  # tanh saturates: one pixel right and down
    step = 1 / 15
    assert (pushed - ramp).abs().max() <= step + 1e-4 and (pushed - ramp)[..., 1:-1].abs().min() >= step - 1e-4


def test_separable_pattern_is_bounded_and_shared_by_the_channels():
    images = torch.full((2, 3, 16, 16), 0.5)
    raw = torch.randn(32) * 5
    changed = separable_transform(16, epsilon=0.1)(images, raw) - images
    assert changed.abs().max() <= 0.1 + 1e-6
    assert torch.equal(changed[:, 0], changed[:, 1]) and torch.equal(changed[:, 0], changed[:, 2])


def test_stripe_pattern_varies_along_the_width_only_and_is_bounded():
    images = torch.rand(2, 3, 16, 16) * 0.5 + 0.25  # away from the clip at 0 and 1
    changed = additive_transform(0.1)(images, torch.randn(16) * 5) - images
    assert changed.abs().max() <= 0.1 + 1e-6
    assert torch.allclose(changed, changed[:1, :1, :1].expand_as(changed), atol=1e-6)  # one row, copied everywhere


@pytest.fixture(scope="module")
def digits16():
    train, clean, _ = split(load_data("digits", SPEC, num_classes=10), [0.8, 0.2, 0.0], seed=0)
    return train, stratified_sample(clean, 10, 0)


def _trained(train, attack: str | None, target: int = 3):
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=3)
    data = PoisonedDataset(train, Attack(attack, target=target, num_classes=10), rate=0.1, seed=0) if attack else train
    fit(model, data, TrainConfig(epochs=6, lr=2e-3, seed=0))
    return model.eval().requires_grad_(False)


def _measured(successes: list[float | None]) -> list[float]:
    return [v for v in successes if v is not None]


def test_a_warp_backdoor_target_is_reached_by_a_sub_pixel_warp_and_no_clean_class_is(digits16):
    train, (images, labels) = digits16
    backdoored = warp_success(_trained(train, "wanet:k=4,s=1.0"), images, labels, 10, steps=10, budget_px=1.0, grid=4, batch_size=8)
    clean = warp_success(_trained(train, None), images, labels, 10, steps=10, budget_px=1.0, grid=4, batch_size=8)
    assert backdoored[3] >= 0.9 and max(_measured(backdoored[:3] + backdoored[4:])) < 0.5, backdoored
    assert max(_measured(clean)) < 0.5, clean


def test_a_sig_backdoor_target_is_reached_by_a_separable_pattern(digits16):
    train, (images, labels) = digits16
    model = _trained(train, "sig")
    assert separable_success(model, images, labels, 3, steps=20, epsilon=0.1, batch_size=16) >= 0.9
    assert separable_success(model, images, labels, 3, steps=0, epsilon=0.1, batch_size=16) == 0.0


def test_a_sig_backdoor_target_is_the_class_a_stripe_pattern_reaches_best_and_no_clean_class_is_reached(digits16):
    train, (images, labels) = digits16
    reached = stripe_success(_trained(train, "sig"), images, labels, 10, steps=15, epsilon=0.1, lr=0.3, batch_size=8)
    assert reached[3] >= 0.9 and reached[3] == max(_measured(reached)), reached
    clean = stripe_success(_trained(train, None), images, labels, 10, steps=15, epsilon=0.1, lr=0.3, batch_size=8)
    assert max(_measured(clean)) < 0.5, clean
    assert sum(v is None for v in clean) == 7  # only the 3 classes kept after the warm-up are scored
