"""Trigger inversion in structured spaces: smooth warps and stripe patterns.

Neural Cleanse's mask and pattern express a pasted patch. Two trigger families escape it:
- warps (WaNet): nothing is pasted, every pixel moves by about a pixel along a smooth
  field. The inverted trigger is a k×k field of control displacements, bounded by tanh to
  `budget_px` pixels and upsampled bicubically, as WaNet builds its own;
- signals along the width (SIG's sinusoid and ramp, v(i, j) = Δ·s(j)): the inverted trigger is
  a stripe pattern δ(j) = ε·tanh(b_j), the same on every row and channel, W parameters.
(A separable full-image pattern ε·tanh(a_i + b_j) for blends was dropped: the stripes reach a
blend's target as well, and its loss ratio misread fragile foreign models; benchmarks/scan.py.)
These spaces have few parameters, so a clean classifier resists them at a small budget while
a backdoor of that family lets nearly every image through to its target. A trigger is optimised
toward every class; per class the result is its attack success on the probe images of the other
classes and its settled loss, which the verdict compares with the model's typical class.
Only input gradients are used, so any architecture works.

`additive_transform`, `optimise` and `success` serve one trigger at a time (harden/purify/triggers.py
re-optimises its full-image triggers with them); the `*_transforms` serve one trigger per class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harden.attacks.triggers import apply_warp, warp_grid
from harden.runtime import training_layout

# (images, raw parameters) → transformed images, differentiable in the parameters (one trigger).
Transform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def additive_transform(epsilon: float) -> Transform:
    """Raw parameters shaped like one image → images plus ε·tanh(raw), clipped to [0, 1]."""
    return lambda images, raw: (images + epsilon * torch.tanh(raw)).clamp(0.0, 1.0)


def optimise(model: nn.Module, sources: torch.Tensor, target: int, transform: Transform, raw: torch.Tensor,
             optimizer: torch.optim.Optimizer, *, steps: int) -> None:
    """`steps` optimiser steps on `raw` (in place) sending all transformed `sources` to `target`.
    Only `raw` gets gradients, so this can run between training steps of `model`."""
    goal = torch.full((len(sources),), target, device=sources.device)
    for _ in range(steps):
        loss = F.cross_entropy(model(training_layout(model, transform(sources, raw))), goal)
        (raw.grad,) = torch.autograd.grad(loss, raw)
        optimizer.step()


@torch.no_grad()
def success(model: nn.Module, sources: torch.Tensor, target: int, transform: Transform, raw: torch.Tensor) -> float:
    """The share of transformed `sources` that the model assigns to `target`."""
    return float((model(training_layout(model, transform(sources, raw))).argmax(1) == target).float().mean())


@dataclass
class FamilyReach:
    """How one trigger family reaches one class: the share of the class's probe pool its best trigger
    sends there, and the mean cross-entropy toward the class over the steps after the first third
    (once the trigger has settled). The loss keeps ranking classes where the share saturates at 1."""
    success: float
    loss: float


# (images K×B×C×H×W, raw parameters K×…) → transformed images, one trigger per class.
ClassTransform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def stripe_transforms(epsilon: float) -> ClassTransform:
    """Raw K×W parameters → each class's images plus ε·tanh(b_j), the same on every row and channel."""
    add = additive_transform(epsilon)
    return lambda images, raw: add(images, raw[:, None, None, None, :])


def warp_transforms(height: int, width: int, budget_px: float) -> ClassTransform:
    """Raw K×2×k×k control parameters → each class's images resampled through its own smooth warp."""
    per_pixel = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)])

    def transform(images: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        grids = warp_grid(torch.tanh(raw), height, width, budget_px * per_pixel.to(raw.device))
        per_image = grids.repeat_interleave(images.shape[1], dim=0)
        return apply_warp(images.flatten(0, 1), per_image).view_as(images)

    return transform


def reach_every_class(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      transform: ClassTransform, raw_shape: tuple[int, ...], *, steps: int, batch_size: int,
                      lr: float, classes_per_pass: int, seed: int = 0) -> list[FamilyReach | None]:
    """Per class, how the best trigger of one family found toward it reaches it (None for a class
    with no images of other classes, and for every class when `steps` is 0).

    Every class is optimised for all `steps`: the verdict compares the class a backdoor sends images
    to with the model's typical class (the median loss), which a fragile clean model reaches about
    as easily as its easiest one. K-Arm-style pruning after a warm-up saved steps but measured the
    typical class only over the warm-up, too noisy to separate them (benchmarks/scan.py). The
    classes share forward passes, `classes_per_pass` at a time; one Adam over all their parameters
    is elementwise, so each class's trigger trains as it would alone."""
    reachable = [t for t in range(num_classes) if bool((labels != t).any())]
    if steps == 0 or not reachable:
        return [None] * num_classes
    generator = torch.Generator().manual_seed(seed)
    pools = [images[labels != t] for t in reachable]
    targets = torch.tensor(reachable, device=images.device)
    raw = (0.1 * torch.randn((len(reachable), *raw_shape), generator=generator)).to(images.device).requires_grad_(True)
    optimizer = torch.optim.Adam([raw], lr=lr)
    settled_from = steps // 3
    settled_loss = torch.zeros(len(reachable), device=images.device)
    for step in range(steps):
        batch = torch.stack([pool[torch.randint(len(pool), (batch_size,), generator=generator).to(pool.device)] for pool in pools])
        gradient = torch.zeros_like(raw)
        for first in range(0, len(reachable), classes_per_pass):
            chunk = slice(first, first + classes_per_pass)
            stamped = transform(batch[chunk], raw[chunk])
            logits = model(training_layout(model, stamped.flatten(0, 1)))
            loss = F.cross_entropy(logits, targets[chunk].repeat_interleave(batch_size), reduction="none").view(-1, batch_size).mean(1)
            gradient += torch.autograd.grad(loss.sum(), raw)[0]
            if step >= settled_from:
                settled_loss[chunk] += loss.detach()
        raw.grad = gradient
        optimizer.step()
    reach: list[FamilyReach | None] = [None] * num_classes
    with torch.no_grad():
        for k, (target, pool) in enumerate(zip(reachable, pools)):
            predicted = model(training_layout(model, transform(pool[None], raw[k:k + 1]).flatten(0, 1))).argmax(1)
            reach[target] = FamilyReach(float((predicted == target).float().mean()), float(settled_loss[k]) / (steps - settled_from))
    return reach
