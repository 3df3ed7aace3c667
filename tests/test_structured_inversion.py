"""The structured inversions (harden/scan/structured.py): smooth warps and stripe patterns."""

from __future__ import annotations

import pytest
import torch

from harden.attacks import Attack, PoisonedDataset
from harden.data import load_data, split
from harden.models import InputSpec, create_model
from harden.data.pipeline import stratified_sample
from harden.scan.inversion import _loss_ratio
from harden.scan.structured import FamilyReach, additive_transform, reach_every_class, stripe_transforms, warp_transforms
from harden.training import TrainConfig, fit

SPEC = InputSpec(3, 16, 16)


def test_warp_is_the_identity_at_zero_and_moves_no_pixel_further_than_its_budget():
    ramp = torch.linspace(0, 1, 16).expand(1, 3, 16, 16).contiguous()  # brightness grows one step per column
    transform = warp_transforms(16, 16, budget_px=1.0)
    assert torch.allclose(transform(ramp[None], torch.zeros(1, 2, 4, 4))[0], ramp, atol=1e-5)
    pushed = transform(ramp[None], torch.full((1, 2, 4, 4), 10.0))[0]  # tanh saturates: one pixel right and down
    step = 1 / 15
    assert (pushed - ramp).abs().max() <= step + 1e-4 and (pushed - ramp)[..., 1:-1].abs().min() >= step - 1e-4


def test_stripe_pattern_varies_along_the_width_only_and_is_bounded():
    images = torch.rand(2, 3, 16, 16) * 0.5 + 0.25  # away from the clip at 0 and 1
    changed = stripe_transforms(0.1)(images[None], torch.randn(1, 16) * 5)[0] - images
    assert changed.abs().max() <= 0.1 + 1e-6
    assert torch.allclose(changed, changed[:1, :1, :1].expand_as(changed), atol=1e-6)  # one row, copied everywhere


def test_each_class_gets_its_own_trigger_in_a_shared_pass():
    """Classes share forward passes and one Adam; the triggers must still train as if alone."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4)).requires_grad_(False)
    images, labels = torch.rand(24, 3, 16, 16), torch.arange(24) % 4
    runs = [reach_every_class(model, images, labels, 4, stripe_transforms(0.1), (16,), steps=9, batch_size=4, lr=0.3,
                              classes_per_pass=per_pass, seed=0) for per_pass in (1, 3, 4)]
    for other in runs[1:]:
        for alone, shared in zip(runs[0], other):
            assert shared.success == alone.success and abs(shared.loss - alone.loss) < 1e-5


def test_a_free_pattern_for_unlearning_is_bounded_by_epsilon():
    images = torch.full((2, 3, 16, 16), 0.5)
    assert (additive_transform(0.1)(images, torch.randn(3, 16, 16) * 5) - images).abs().max() <= 0.1 + 1e-6


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


def _reach(model, images, labels, family: str, steps: int | None = None) -> list[FamilyReach | None]:
    """The scan's settings for each family (harden/scan/inversion.py)."""
    transform, raw_shape, default_steps, lr = {"warp": (warp_transforms(16, 16, 1.0), (2, 4, 4), 10, 0.1),
                                               "stripe": (stripe_transforms(0.1), (16,), 15, 0.3)}[family]
    return reach_every_class(model, images, labels, 10, transform, raw_shape, steps=default_steps if steps is None else steps,
                             batch_size=8, lr=lr, classes_per_pass=10)


def _success(reach: list[FamilyReach | None]) -> list[float]:
    return [r.success for r in reach]


def test_a_warp_backdoor_target_is_reached_by_a_sub_pixel_warp_and_no_clean_class_is(digits16):
    train, (images, labels) = digits16
    backdoored = _reach(_trained(train, "wanet:k=4,s=1.0"), images, labels, "warp")
    clean = _reach(_trained(train, None), images, labels, "warp")
    assert backdoored[3].success >= 0.9 and max(_success(backdoored[:3] + backdoored[4:])) < 0.5, backdoored
    assert max(_success(clean)) < 0.5, clean
    assert _loss_ratio([r.loss for r in backdoored]) > _loss_ratio([r.loss for r in clean]) + 1.0


def test_a_sig_backdoor_target_is_the_class_a_stripe_pattern_reaches_best_and_no_clean_class_is_reached(digits16):
    train, (images, labels) = digits16
    reached = _reach(_trained(train, "sig"), images, labels, "stripe")
    assert reached[3].success >= 0.9 and reached[3].loss == min(r.loss for r in reached), reached
    clean_model = _trained(train, None)
    clean = _reach(clean_model, images, labels, "stripe")
    assert max(_success(clean)) < 0.5, clean
    assert _loss_ratio([r.loss for r in reached]) > _loss_ratio([r.loss for r in clean]) + 1.0
    assert _reach(clean_model, images, labels, "stripe", steps=0) == [None] * 10
