"""Trigger inversion in structured spaces: smooth warps, stripes and separable full-image patterns.

Neural Cleanse's mask and pattern express a pasted patch. Three trigger families escape it:
- warps (WaNet): nothing is pasted, every pixel moves by about a pixel along a smooth
  field. The inverted trigger is a k×k field of control displacements, bounded by tanh to
  `budget_px` pixels and upsampled bicubically, as WaNet builds its own;
- signals along the width (SIG's sinusoid and ramp, v(i, j) = Δ·s(j)): the inverted trigger is
  a stripe pattern δ(j) = ε·tanh(b_j), the same on every row and channel, W parameters;
- other full-image additive signals (blends): a separable pattern δ(i, j) = ε·tanh(a_i + b_j)
  shared by the channels, H + W parameters.
These spaces have few parameters, so a clean classifier resists them at a small budget while
a backdoor of that family lets nearly every image through to its target. The statistic is
the attack success of the optimised trigger on all probe images of the other classes.
Only input gradients are used, so any architecture works.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harden.attacks.triggers import apply_warp, warp_grid
from harden.runtime import training_layout

# (images, raw parameters) → transformed images, differentiable in the parameters.
Transform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def warp_transform(height: int, width: int, budget_px: float) -> Transform:
    """Raw 1×2×k×k control parameters → images resampled through a smooth warp of at most `budget_px` pixels."""
    per_pixel = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)])

    def transform(images: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        return apply_warp(images, warp_grid(torch.tanh(raw), height, width, budget_px * per_pixel.to(raw.device)))

    return transform


def additive_transform(epsilon: float) -> Transform:
    """Raw parameters → images plus ε·tanh(raw), clipped to [0, 1]. Shaped like one image, a free
    pattern; shaped (W,), it broadcasts to a stripe pattern that varies along the width only."""
    return lambda images, raw: (images + epsilon * torch.tanh(raw)).clamp(0.0, 1.0)


def separable_transform(height: int, epsilon: float) -> Transform:
    """Raw (H + W) parameters → images plus ε·tanh(a_i + b_j), the same on every channel, clipped to [0, 1]."""

    def transform(images: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        rows, columns = raw[:height], raw[height:]
        return (images + epsilon * torch.tanh(rows[:, None] + columns[None, :])).clamp(0.0, 1.0)

    return transform


def optimise(model: nn.Module, sources: torch.Tensor, target: int, transform: Transform, raw: torch.Tensor,
             optimizer: torch.optim.Optimizer, *, steps: int, batch_size: int | None = None,
             generator: torch.Generator | None = None) -> float:
    """`steps` optimiser steps on `raw` (in place) sending transformed `sources` to `target`, on
    random batches of `batch_size` (None: all sources every step); returns the mean loss over the
    steps (less noisy than the last minibatch's for ranking classes).
    Only `raw` gets gradients, so this can run between training steps of `model`."""
    goal = torch.full((batch_size or len(sources),), target, device=sources.device)
    total = 0.0
    for _ in range(steps):
        batch = sources if batch_size is None else \
            sources[torch.randint(len(sources), (batch_size,), generator=generator).to(sources.device)]
        loss = F.cross_entropy(model(training_layout(model, transform(batch, raw))), goal)
        (raw.grad,) = torch.autograd.grad(loss, raw)
        optimizer.step()
        total += float(loss.detach())
    return total / steps if steps else math.inf


@torch.no_grad()
def success(model: nn.Module, sources: torch.Tensor, target: int, transform: Transform, raw: torch.Tensor) -> float:
    """The share of transformed `sources` that the model assigns to `target`."""
    return float((model(training_layout(model, transform(sources, raw))).argmax(1) == target).float().mean())


def scheduled_success(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      transform: Transform, raw_shape: tuple[int, ...], *, steps: int, batch_size: int, lr: float = 0.1,
                      keep: int = 3, seed: int = 0) -> list[float | None]:
    """Per class, the attack success of the best trigger of one family found toward it. Each
    class optimises its own raw parameters of `raw_shape`.

    K-Arm-style scheduling: every class gets a third of the steps, then only the `keep`
    classes with the lowest mean loss get the rest (a backdoor's target is far ahead by then).
    Only those are scored on their probe pool; the others are None (not measured, as are all
    classes when `steps` is 0): scoring them cost a third of the inversion's time."""
    if steps == 0:
        return [None] * num_classes
    generator = torch.Generator().manual_seed(seed + 2)
    sources = [images[labels != target] for target in range(num_classes)]
    raws = [(0.1 * torch.randn(raw_shape, generator=generator)).to(images.device).requires_grad_(True) for _ in range(num_classes)]
    optimizers = [torch.optim.Adam([raw], lr=lr) for raw in raws]
    warmup = max(1, steps // 3)
    reachable = [t for t in range(num_classes) if len(sources[t])]
    losses = {t: optimise(model, sources[t], t, transform, raws[t], optimizers[t], steps=warmup, batch_size=batch_size,
                          generator=generator) for t in reachable}
    kept = sorted(reachable, key=losses.__getitem__)[:keep]
    for t in kept:
        optimise(model, sources[t], t, transform, raws[t], optimizers[t], steps=steps - warmup, batch_size=batch_size, generator=generator)
    return [success(model, sources[t], t, transform, raws[t]) if t in kept else None for t in range(num_classes)]


def warp_success(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, steps: int,
                 budget_px: float, grid: int, batch_size: int, seed: int = 0) -> list[float | None]:
    """Per class, the attack success of the best smooth warp of at most `budget_px` pixels found toward it."""
    transform = warp_transform(images.shape[-2], images.shape[-1], budget_px)
    return scheduled_success(model, images, labels, num_classes, transform, (1, 2, grid, grid), steps=steps,
                             batch_size=batch_size, seed=seed)


def stripe_success(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, steps: int,
                   epsilon: float, lr: float, batch_size: int, seed: int = 0) -> list[float | None]:
    """Per class, the attack success of the best stripe pattern (varying along the width only) found toward it."""
    return scheduled_success(model, images, labels, num_classes, additive_transform(epsilon), (images.shape[-1],),
                             steps=steps, batch_size=batch_size, lr=lr, seed=seed + 1)


def separable_success(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, target: int, *, steps: int,
                      epsilon: float, batch_size: int, seed: int = 0) -> float:
    """The attack success of the best separable full-image pattern toward `target` (0.0 when `steps` is 0)."""
    sources = images[labels != target]
    if steps == 0 or len(sources) == 0:
        return 0.0
    generator = torch.Generator().manual_seed(seed + 3)
    height, width = images.shape[-2:]
    raw = (0.1 * torch.randn(height + width, generator=generator)).to(images.device).requires_grad_(True)
    transform = separable_transform(height, epsilon)
    optimise(model, sources, target, transform, raw, torch.optim.Adam([raw], lr=0.1), steps=steps, batch_size=batch_size, generator=generator)
    return success(model, sources, target, transform, raw)
