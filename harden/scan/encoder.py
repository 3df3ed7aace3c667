"""Label-free trigger inversion for encoders (RECEIVE-style, algorithms.md §3).

A backdoored self-supervised encoder maps every input carrying its trigger to (nearly)
the same embedding. Inversion looks for the smallest mask m and pattern p that make
triggered embeddings collapse: x' = clip((1−m)⊙x + m⊙p, 0, 1), with m = tanh(θm)/(2−ε)+0.5
(H×W, shared over channels) and p likewise (C×H×W); minimise L = −S + c·‖m‖₁ where
S = mean over i≠j of ẑ_iᵀẑ_j, ẑ = normalised encoder output (the intended formula, not
the reference's `diag_embed` variant whose maximum is 1 − 1/B). A step succeeds when
S ≥ τ (0.9, raised to `headroom` = 80% of the way from the clean images' own S to 1);
cost schedule as RECEIVE (patience 5, ×1.2 up, ÷1.5^1.5 down); on a new best (smallest
‖m‖₁ among successes) the parameters restart at the best + U(±0.01) (MOTH); batches
are drawn without replacement; early stop when the best has not improved for `stall`
steps after `min_steps`; hard cap `max_steps`.

Any encoder collapses when the mask covers enough of the image (small encoders even
under a few percent: universal adversarial patches), so the mask norm alone says little
without a null from the *same* encoder. harden's null is a *steered* inversion: the same
procedure, but maximising the mean similarity to one fixed target, the clean embedding
of a randomly chosen probe image. A clean encoder has no privileged point: collapsing
anywhere costs about as much as collapsing onto an arbitrary point. A backdoored one
has an attractor, the backdoor's target embedding, which the free inversion finds with
a far smaller mask than any steered one. With ratio r = ‖m_free‖₁ / ‖m_steered‖₁
(a steered inversion that never reaches τ counts with its final norm, at least the
free one)::

    p_backdoor = clip(1 − r, 0, 1) when the free inversion reached τ, else 0

and a finding is raised when p_backdoor ≥ `threshold` (0.5: a collapse at less than half
the cost of an arbitrary one). Measured on digits (test encoders, 32-d): backdoored
‖m‖₁ ≈ 5 vs clean ≈ 52. This mapping is a documented heuristic, not yet calibrated on an
encoder zoo; classifier calibration (MAD index 2) does not transfer to encoders.

Options: `ctx.options["encoder"]`, a dict of `EncoderConfig` fields.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage

from harden.data.pipeline import LabelledDataset, make_loader
from harden.report import Finding, Image, register_rule
from harden.scan.base import FAILED, PASSED, SKIPPED, Check, CheckResult, ScanContext, register_check

RULE = "harden.backdoor.encoder-inversion"

register_rule(
    RULE, "Encoder collapses inputs stamped with a small reversed trigger",
    "Label-free trigger inversion (RECEIVE) found a small mask and pattern that map different inputs to nearly the "
    "same embedding, and the effect depends on where the mask is: the signature of a backdoored encoder.",
    "Do not ship this encoder; inspect the reversed trigger in the HTML report and retrain or unlearn it.",
)


@dataclass(frozen=True)
class EncoderConfig:
    tau: float = 0.9
    # τ in use is at least this share of the way from the clean baseline similarity to 1: the pooled
    # features of a ReLU network are non-negative and start out similar (0.62–1.00 measured), and a
    # fixed τ below the baseline is reached with an empty mask by free and steered inversion alike.
    headroom: float = 0.8
    init_cost: float = 1e-3
    lr: float = 0.1
    batch_size: int = 32
    samples: int = 256  # probe images taken from --data (labels ignored)
    patience: int = 5
    cost_up: float = 1.2
    cost_down: float = 1.5 ** 1.5
    min_steps: int = 100
    max_steps: int = 400
    stall: int = 50
    threshold: float = 0.5
    epsilon: float = 1e-7

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "EncoderConfig":
        given = options.get("encoder") or {}
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown encoder options: {', '.join(sorted(unknown))}")
        return cls(**given)


@dataclass
class Inversion:
    mask: torch.Tensor  # H×W in [0, 1]
    pattern: torch.Tensor  # C×H×W in [0, 1]
    norm: float  # ‖m‖₁ of the best success, or of the final mask when none
    similarity: float  # S reached by the returned trigger
    succeeded: bool
    steps: int


def pairwise_similarity(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over pairs i ≠ j."""
    z = F.normalize(embeddings.flatten(1), dim=1)
    count = len(z)
    gram = z @ z.T
    return (gram.sum() - gram.diagonal().sum()) / (count * (count - 1))


def stamp(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return ((1 - mask) * images + mask * pattern).clamp(0.0, 1.0)


def collapse(embeddings: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """S: pairwise similarity (free inversion) or mean similarity to `target` (steered null)."""
    if target is None:
        return pairwise_similarity(embeddings)
    return F.cosine_similarity(embeddings.flatten(1), target.flatten()[None], dim=1).mean()


def invert(encoder: torch.nn.Module, images: torch.Tensor, config: EncoderConfig, seed: int = 0,
           target: torch.Tensor | None = None) -> Inversion:
    """Smallest-mask trigger that collapses the encoder's outputs, onto `target` when given (module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    _, channels, height, width = images.shape
    squash = lambda raw: torch.tanh(raw) / (2 - config.epsilon) + 0.5  # noqa: E731
    theta_m = ((torch.rand(height, width, generator=generator) - 0.5) * 4).to(images.device).requires_grad_()
    theta_p = ((torch.rand(channels, height, width, generator=generator) - 0.5) * 4).to(images.device).requires_grad_()
    optimizer = torch.optim.Adam([theta_m, theta_p], lr=config.lr, betas=(0.5, 0.9))
    cost, ups, downs = config.init_cost, 0, 0
    best: tuple[torch.Tensor, torch.Tensor, float, float] | None = None
    best_step, last_similarity, order, step = 0, 0.0, torch.empty(0, dtype=torch.long), 0
    batch = min(config.batch_size, len(images))
    for step in range(1, config.max_steps + 1):
        if len(order) < batch:  # without replacement: walk a fresh permutation
            order = torch.randperm(len(images), generator=generator)
        index, order = order[:batch], order[batch:]
        mask, pattern = squash(theta_m), squash(theta_p)
        similarity = collapse(encoder(stamp(images[index], mask, pattern)), target)
        norm = mask.sum()
        loss = -similarity + cost * norm
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last_similarity = float(similarity.detach())
        success = last_similarity >= config.tau
        if success and (best is None or float(norm.detach()) < best[2]):
            best, best_step = (theta_m.detach().clone(), theta_p.detach().clone(), float(norm.detach()), last_similarity), step
            with torch.no_grad():  # restart at the best, slightly shaken (MOTH)
                theta_m.copy_(best[0] + (torch.rand(best[0].shape, generator=generator) * 0.02 - 0.01).to(best[0].device))
                theta_p.copy_(best[1] + (torch.rand(best[1].shape, generator=generator) * 0.02 - 0.01).to(best[1].device))
        ups, downs = (ups + 1, 0) if success else (0, downs + 1)
        if ups >= config.patience:
            cost, ups = cost * config.cost_up, 0
        elif downs >= config.patience:
            cost, downs = cost / config.cost_down, 0
        if best is not None and step >= config.min_steps and step - best_step >= config.stall:
            break
    if best is None:
        with torch.no_grad():
            mask = squash(theta_m)
        return Inversion(mask, squash(theta_p).detach(), float(mask.sum()), last_similarity, False, step)
    return Inversion(squash(best[0]), squash(best[1]), best[2], best[3], True, step)


def trigger_png(inversion: Inversion, scale: int = 4) -> bytes:
    """The reversed trigger m⊙p as an upscaled PNG."""
    pixels = (inversion.mask * inversion.pattern).clamp(0, 1)
    array = (pixels.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    image = PILImage.fromarray(array[..., 0] if array.shape[2] == 1 else array[..., :3])
    buffer = io.BytesIO()
    image.resize((image.width * scale, image.height * scale), PILImage.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def probe_images(data: LabelledDataset, samples: int, seed: int) -> torch.Tensor:
    chosen = np.sort(np.random.default_rng(seed).permutation(len(data))[:samples])
    return torch.cat([images for images, _ in make_loader(data.subset(chosen), 256)])


@dataclass
class EncoderStatistics:
    inversion: Inversion
    steered: Inversion
    baseline: float
    mask_fraction: float
    p_backdoor: float
    tau: float  # the similarity a collapse must reach: the configured τ, or more above a high baseline


@torch.no_grad()
def clean_similarity(encoder: torch.nn.Module, images: torch.Tensor, batch_size: int) -> float:
    """S of the clean images themselves, batch by batch as the inversion sees them."""
    batches = [chunk for chunk in torch.split(images, batch_size) if len(chunk) > 1]
    return float(np.mean([float(pairwise_similarity(encoder(chunk))) for chunk in batches]))


def above_baseline(config: EncoderConfig, baseline: float) -> EncoderConfig:
    """`config` with τ at least `headroom` of the way from the clean similarity to 1: a collapse is
    only a collapse when the clean images do not already agree that much."""
    return replace(config, tau=max(config.tau, baseline + config.headroom * (1.0 - baseline)))


def encoder_statistics(encoder: torch.nn.Module, images: torch.Tensor, config: EncoderConfig, seed: int = 0) -> EncoderStatistics:
    """Free inversion, the steered null of the same encoder, and the clean baseline similarity."""
    with torch.no_grad():
        target = encoder(images[int(np.random.default_rng(seed).integers(len(images)))][None])[0]
    baseline = clean_similarity(encoder, images, config.batch_size)
    config = above_baseline(config, baseline)
    inversion = invert(encoder, images, config, seed)
    steered = invert(encoder, images, config, seed + 1, target)
    height, width = inversion.mask.shape
    reference = steered.norm if steered.succeeded else max(steered.norm, inversion.norm)
    ratio = inversion.norm / max(reference, 1e-9)
    p_backdoor = float(np.clip(1.0 - ratio, 0.0, 1.0)) if inversion.succeeded and reference > 1e-3 else 0.0
    return EncoderStatistics(inversion, steered, baseline, inversion.norm / (height * width), p_backdoor, config.tau)


@register_check
class EncoderInversionCheck(Check):
    name = "encoder"
    description = "label-free (RECEIVE-style) trigger inversion for encoders: does a small mask collapse embeddings?"
    tasks = ("encoder",)
    needs_data = True

    def run(self, ctx: ScanContext) -> CheckResult:
        start = time.perf_counter()
        config = EncoderConfig.from_options(ctx.options)
        images = probe_images(ctx.data, config.samples, ctx.seed).to(ctx.device)
        if len(images) < 2:
            return CheckResult(self.name, SKIPPED, "needs at least 2 images in --data", time.perf_counter() - start)
        encoder = ctx.model.module.eval().to(ctx.device)
        trainable = [p for p in encoder.parameters() if p.requires_grad]
        for parameter in trainable:  # input gradients only; the model is left as it was given
            parameter.requires_grad_(False)
        try:
            stats = encoder_statistics(encoder, images, config, ctx.seed)
        finally:
            for parameter in trainable:
                parameter.requires_grad_(True)
        inv = stats.inversion
        details = {
            "p_backdoor": stats.p_backdoor, "mask_norm": inv.norm, "mask_fraction": stats.mask_fraction,
            "similarity": inv.similarity, "succeeded": inv.succeeded, "steps": inv.steps, "tau": stats.tau,
            "baseline_similarity": stats.baseline, "steered_mask_norm": stats.steered.norm,
            "steered_succeeded": stats.steered.succeeded, "steered_steps": stats.steered.steps,
            "probe_samples": len(images), "embedding_dim": int(ctx.model.num_classes),
        }
        images_out = [Image(f"reversed encoder trigger (mask norm {inv.norm:.1f})", trigger_png(inv))]
        summary = (f"p_backdoor {stats.p_backdoor:.2f}: mask norm {inv.norm:.1f} ({stats.mask_fraction:.1%} of the image) "
                   f"{'reaches' if inv.succeeded else 'does not reach'} similarity {stats.tau:.3g} in {inv.steps} steps; "
                   f"(steered null: {stats.steered.norm:.1f})")
        findings = []
        if stats.p_backdoor >= config.threshold:
            findings.append(Finding(RULE, "error", f"encoder looks backdoored: {summary}", 8.8,
                                    {"p_backdoor": stats.p_backdoor, "mask_norm": inv.norm}))
        status = FAILED if findings else PASSED
        return CheckResult(self.name, status, summary, time.perf_counter() - start, findings, details, images_out)
