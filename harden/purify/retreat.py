"""Step a purified classifier back toward its source while the backdoor stays gone.

Fine-tuning on a few dozen clean images costs a well-trained network accuracy, and most of
the backdoor is gone long before the end of the path from the source weights θ₀ to the
purified ones θ₁: on the zoo's resnet8_narrow models (draw 2 of the clean set, which cost
them 1.9–3.7 points) the weights θ₀ + 0.8·(θ₁ − θ₀) lost 1.1–1.9 points with the real
trigger's ASR at most 0.017. How far back is safe differs per model (a small-CNN SIG model
kept 0.149 ASR at 0.8 and 0.012 at 0.9), and the real trigger is unknown, so the walk is
judged by what an attacker could still do: the reversed triggers (the additive ones
re-optimised against each candidate from the source's δ, the patches as found) must not send
more than `margin` more of the clean training images to their target than they do against θ₁,
and validation accuracy must not fall below θ₁'s (the walk is there to win accuracy back; on
draw 3 the SIG model's first step that lost a validation image also let 0.062 of the real
trigger through). The walk stops at the first candidate that fails.

Why the patches are measured too: re-optimised additive triggers alone did not see a patch
backdoor come back. On the no-BatchNorm lenet5 BadNets models the walk then went far enough to
leave the real trigger 0.44–0.48 ASR. Why a margin over θ₁ and not a fixed ceiling: the
fine-tuning is adversarial training toward the target with additive triggers, so every step back
also gives back some ordinary adversarial weakness; a ceiling of 0.05 stopped resnet8_narrow
models whose θ₁ already gave way on 0.048 of the images, and met the target on 8 of draw 2's 12
models instead of 10.

Off by default (`retreat=0` in trigger-unlearn): on the CPU-trained ResNet-18 BadNets model it ended
at 0.996 accuracy (0.967 without it) and let the real trigger back to 0.083 ASR (0.021), and on a
foreign torchvision resnet18 to 0.069 (0.000). Accuracy lost is what the guardrail refuses; a
backdoor partly back is not, when the real trigger is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from harden import distributed
from harden.data.pipeline import stratified_sample
from harden.evaluation import evaluate
from harden.purify.base import PurifyContext, reversed_asr, snapshot
from harden.purify.triggers import AdditiveTrigger, TriggerChaser, refreshed

STEP = 0.1  # between candidates on the path θ₁ → θ₀
REFRESH_STEPS = 40  # per candidate, as many as a fresh additive trigger gets


@dataclass
class Retreat:
    """Where the walk stopped (`alpha` 1.0: the purified weights as trained) and what each candidate measured."""

    alpha: float = 1.0
    walk: list[dict[str, float]] = field(default_factory=list)  # alpha, validation accuracy, attack_asr

    def to_dict(self) -> dict:
        return {"retreat_alpha": self.alpha, "retreat_walk": self.walk}


def interpolated(source: dict[str, torch.Tensor], purified: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """θ₀ + α·(θ₁ − θ₀) for every floating-point state entry (BatchNorm statistics included);
    integer entries (batch counters) are the purified model's."""
    return {key: source[key].to(value).lerp(value, alpha) if value.is_floating_point() else value
            for key, value in purified.items()}


def retreat(model: nn.Module, source: dict[str, torch.Tensor], ctx: PurifyContext, *, limit: float,
            margin: float) -> Retreat:
    """Move `model` (the purified weights) back toward `source` as far as `limit` allows while the
    checks above hold. A no-op without additive reversed triggers (the walk is judged mainly by them)."""
    if limit <= 0 or not any(isinstance(t, AdditiveTrigger) for t in ctx.triggers):
        return Retreat()
    purified = snapshot(model)
    probe = stratified_sample(ctx.train, TriggerChaser.PROBE_PER_CLASS, ctx.seed)
    view = ctx.view(model)

    def measure(alpha: float) -> dict[str, float]:
        model.load_state_dict(interpolated(source, purified, alpha))
        model.eval()
        attacks = refreshed(ctx.triggers, model, *probe, steps=REFRESH_STEPS, device=ctx.device)
        return {"alpha": alpha, "accuracy": evaluate(view, ctx.validation, device=ctx.device).accuracy,
                "attack_asr": reversed_asr(view, ctx.train, attacks, ctx.device) or 0.0}

    walk = [measure(1.0)]
    kept = 1.0
    for index in range(1, round(limit / STEP) + 1):
        walk.append(measure(round(1.0 - index * STEP, 6)))
        if walk[-1]["attack_asr"] > walk[0]["attack_asr"] + margin or walk[-1]["accuracy"] < walk[0]["accuracy"]:
            break
        kept = walk[-1]["alpha"]
    model.load_state_dict(interpolated(source, purified, kept))
    if distributed.context().enabled:
        distributed.broadcast_parameters(model)
    model.eval()
    return Retreat(kept, walk)
