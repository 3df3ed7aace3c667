"""Reversed triggers: what a purification method unlearns and what its guardrail measures.

Purification re-runs the scan's trigger inversion on the defender's clean split (the
model and data are the same ones the user hands to `harden purify`, so nothing has to
be trusted from an earlier run) and keeps the classes reachable with the smallest
triggers: with an unknown target, unlearning the few most suspicious candidates is
cheap and removes the real one whichever it is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from harden.data.pipeline import LabelledDataset, stratified_sample
from harden.scan.inversion import InversionConfig, invert_triggers
from harden.scan.structured import additive_transform, optimise, success


@dataclass
class ReversedTrigger:
    """A mask/pattern pair found by inversion, usable wherever a trigger is (it stamps batches)."""

    target: int
    mask: torch.Tensor  # 1×H×W in [0, 1]
    pattern: torch.Tensor  # C×H×W in [0, 1]
    norm: float
    asr: float

    @property
    def spec(self) -> str:
        return f"reversed:target={self.target},norm={self.norm:.1f}"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mask, pattern = self.mask.to(images.device), self.pattern.to(images.device)
        return ((1 - mask) * images + mask * pattern).clamp(0.0, 1.0)

    def to_dict(self) -> dict:
        return {"target": self.target, "kind": "patch", "norm": self.norm, "asr": self.asr}


@dataclass
class AdditiveTrigger:
    """A universal additive perturbation x + δ, ‖δ‖∞ ≤ ε, toward one class.

    Patch-shaped masks miss full-image triggers (blends, sinusoidal signals): the
    mask/pattern inversion still ranks their target first, but its patch is a different
    shortcut. A bounded full-image perturbation toward that target is what such
    backdoors make unusually easy, and stamping it with true labels unlearns them."""

    target: int
    delta: torch.Tensor  # C×H×W
    epsilon: float
    asr: float

    @property
    def spec(self) -> str:
        return f"additive:target={self.target},epsilon={self.epsilon:g}"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images + self.delta.to(images.device)).clamp(0.0, 1.0)

    def to_dict(self) -> dict:
        return {"target": self.target, "kind": "additive", "epsilon": self.epsilon, "asr": self.asr}


Stamp = ReversedTrigger | AdditiveTrigger


def additive_trigger(module: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, target: int, *, epsilon: float = 0.1,
                     steps: int = 40, lr: float = 0.1, device: torch.device = torch.device("cpu"), seed: int = 0,
                     start: torch.Tensor | None = None) -> AdditiveTrigger:
    """Optimise one δ (tanh-bounded to ±ε) that sends the probe images of other classes to `target`.

    40 steps: on the zoo's BadNets, Blend and SIG models the δ toward the true target
    reaches ASR 1.0 by step 30, and 100 steps cost 5–7 s per trigger on 2 CPU cores;
    purification keeps re-optimising it anyway (`refreshed`).

    `start` warm-starts from an earlier δ. Only δ gets gradients, so this can run between
    training steps of `module` without touching its parameters' gradients."""
    sources = images[labels != target].to(device)
    if start is None:
        raw = torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(seed)) * 0.01
    else:
        raw = torch.atanh((start / epsilon).clamp(-0.999, 0.999))
    raw = raw.to(device).requires_grad_(True)
    transform = additive_transform(epsilon)
    optimise(module, sources, target, transform, raw, torch.optim.Adam([raw], lr=lr), steps=steps)
    delta = (epsilon * torch.tanh(raw)).detach()
    asr = success(module, sources, target, transform, raw)
    return AdditiveTrigger(target, delta.cpu(), epsilon, asr)


def refreshed(triggers: list[Stamp], module: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, steps: int,
              device: torch.device, epsilon: float | None = None) -> list[Stamp]:
    """The additive triggers re-optimised against the model as it is now (warm-started, same
    target; same ε unless `epsilon` re-bounds them); mask/pattern triggers are kept as they are.

    Unlearning one fixed δ teaches the model to ignore that δ, and a full-image backdoor
    with a stronger signal (SIG's ±40/255 sinusoid against ε = 0.1) can survive it.
    Re-finding the easiest δ toward the same target every few steps, as adversarial
    unlearning does, chases what is left of the shortcut. Patches are not re-optimised:
    measured on the zoo, a moving patch drifts onto ordinary adversarial patches and left
    more of a BadNets backdoor behind. Only the triggers get gradients, and every layer's
    train/eval mode is as it was afterwards (this runs between training steps)."""
    modes = {layer: layer.training for layer in module.modules()}
    module.eval()
    out = [additive_trigger(module, images, labels, t.target, epsilon=t.epsilon if epsilon is None else epsilon, steps=steps,
                            device=device, start=t.delta)
           if isinstance(t, AdditiveTrigger) else t for t in triggers]
    for layer, training in modes.items():
        layer.training = training
    return out


class TriggerChaser:
    """The reversed triggers as re-optimised against a model in training (see `refreshed`).

    Call `step()` after every optimiser step on every rank: every `interval` steps it
    re-optimises the additive triggers against `module` on a small stratified probe of
    `data`. The refresh is deterministic given the weights, so all torchrun ranks stamp
    the same triggers.

    `epsilon`, when it differs from a trigger's own bound, re-bounds it once at the start
    (`REBOUND_STEPS`, warm-started): the method then unlearns stronger (or weaker) δs than the
    ones its guardrail and checkpoint selection measure, which keep the reversal's bound."""

    PROBE_PER_CLASS = 4
    REBOUND_STEPS = 40  # as many as a fresh additive trigger gets (`additive_trigger`)

    def __init__(self, triggers: list[Stamp], module: torch.nn.Module, data: LabelledDataset, *, seed: int,
                 interval: int, steps: int, device: torch.device, epsilon: float | None = None):
        self.module, self.interval, self.steps, self.device = module, interval, steps, device
        self.probe = stratified_sample(data, self.PROBE_PER_CLASS, seed)
        self.count = 0
        rebound = epsilon is not None and any(isinstance(t, AdditiveTrigger) and t.epsilon != epsilon for t in triggers)
        self.triggers = (refreshed(triggers, module, *self.probe, steps=self.REBOUND_STEPS, device=device, epsilon=epsilon)
                         if rebound else list(triggers))

    def step(self) -> None:
        self.count += 1
        if self.interval and self.count % self.interval == 0:
            self.triggers = refreshed(self.triggers, self.module, *self.probe, steps=self.steps, device=self.device)


def reverse_triggers(module: torch.nn.Module, data: LabelledDataset, num_classes: int, *, count: int,
                     config: InversionConfig | None = None, additive_epsilon: float = 0.1,
                     device: torch.device = torch.device("cpu"), seed: int = 0) -> list[Stamp]:
    """For the `count` classes reachable with the smallest reversed triggers: the mask/pattern
    trigger and (unless `additive_epsilon` is 0) a bounded additive one, easiest class first."""
    # The structured inversions only feed the scan's verdict; unlearning uses masks and additive δs.
    config = replace(config or InversionConfig(), warp_steps=0, stripe_steps=0)
    images, labels = stratified_sample(data, config.probe_per_class, seed)
    result = invert_triggers(module, images, labels, num_classes, config, device=device, seed=seed)
    ranked = sorted(result.classes, key=lambda c: (c.norm, -c.margin))[:count]
    found: list[Stamp] = []
    for c in ranked:
        found.append(ReversedTrigger(c.target, c.mask, c.pattern, c.norm, c.asr))
        if additive_epsilon > 0:
            found.append(additive_trigger(module, images, labels, c.target, epsilon=additive_epsilon, device=device, seed=seed))
    return found


def stamp_fraction(images: torch.Tensor, triggers: list[Stamp], fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stamp a random `fraction` of the batch, each row with one randomly chosen trigger.

    Returns the new batch and the boolean mask of stamped rows (labels stay the true ones:
    that is what makes the model forget the trigger → target shortcut)."""
    stamped = torch.rand(len(images), generator=generator) < fraction
    if not triggers or not stamped.any():
        return images, torch.zeros(len(images), dtype=torch.bool, device=images.device)
    out = images.clone()
    choice = torch.randint(len(triggers), (len(images),), generator=generator)
    for index, trigger in enumerate(triggers):
        rows = (stamped & (choice == index)).to(images.device)
        if rows.any():
            out[rows] = trigger(images[rows])
    return out, stamped.to(images.device)
