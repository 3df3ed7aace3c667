"""Trigger inversion for classifiers (Neural Cleanse / MOTH style) plus max-margin statistics.

For each candidate target t, optimise a mask m (H×W, shared over channels) and a
pattern p (C×H×W) so that x' = (1−m)⊙x + m⊙p sends clean images of other classes to
t, while an adaptive cost keeps ‖m‖₁ small (NC schedule: ×2 after `patience`
successes, ÷2^1.5 after `patience` failures). A backdoor target needs a much smaller
mask than the other classes. Only forward passes and input gradients are used, so
any architecture works, including MLflow pt2 GraphModules.

What makes it fast is mostly algorithmic (see benchmarks/scan.py):
- a small, stratified probe set (10 images per class by default);
- per-class early stopping once the best norm stops improving;
- K-Arm-style scheduling: after a short warm-up only the most promising classes keep
  optimising (the others keep their warm-up norm, marked `converged: false`);
- several classes per forward pass: benchmarks/scan_speed.py measured all ten classes in one pass
  faster than one class at a time on 2 CPU cores and on an H100 alike; `batch_pixels` caps a
  pass's images, so that large images and many classes still fit in memory;
- and one kernel-level saving: the steps run through a copy of the model with its BatchNorm
  folded into the convolutions before it (harden/models/folding.py; same outputs to rounding).

MM-BD-style maximum margins (label-free, cheap) complement the mask norm: a backdoor
target class reaches an abnormally large logit margin from random starting images. Two
structured inversions (harden/scan/structured.py) cover what a mask cannot express:
a warp backdoor's target is reached by a sub-pixel smooth warp, a SIG backdoor's by a small
stripe pattern, far more easily than the model's typical class.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harden.models.folding import folded_for_inference
from harden.runtime import training_layout
from harden.scan.structured import reach_every_class, stripe_transforms, warp_transforms

_EPS = 1e-7
STRATEGIES = ("auto", "loop", "batched")  # how classes share forward passes (InversionConfig.strategy)
_TANH_SCALE = 2 - _EPS


@dataclass
class InversionConfig:
    probe_per_class: int = 10  # clean probe images per class (a fifth is held out to score triggers)
    batch_size: int = 16  # source images per class per step
    warmup_batch_size: int = 8  # per step of the warm-up that ranks the classes before pruning (a batch-8 step costs ~0.6 of a batch-16 one)
    lr: float = 0.2
    init_cost: float = 1e-2
    cost_up: float = 2.0
    cost_down: float = 2.0 ** 1.5
    patience: int = 3
    success_asr: float = 0.95
    init_mask: float = 0.02
    warmup_steps: int = 30
    max_steps: int = 200
    early_stop_patience: int = 20
    early_stop_tol: float = 0.01
    keep_fraction: float = 0.3  # classes kept after warm-up; 1.0 disables scheduling
    early_stop: bool = True
    strategy: str = "auto"  # auto: classes grouped up to batch_pixels per pass | loop: one class per pass | batched: all in one
    batch_pixels: int = 2**18  # pixels (H×W) per forward pass under "auto": 256 images of 32×32, so ten classes of 16 share one pass
    verify_on_pool: bool = True  # the kept trigger must also succeed on the class's whole probe pool
    margin_starts: int = 3  # MM-BD random starts per class; 0 skips the margins
    margin_steps: int = 30
    structured_batch_size: int = 8  # source images per class per warp or stripe step (8 finds the zoo's warps as 16 does, in 2/3 of the time)
    warp_steps: int = 10  # smooth-warp inversion toward every class; 0 skips it
    warp_budget: float = 1.0  # largest pixel displacement of the inverted warp
    warp_grid: int = 4  # control points per side of the warp field (WaNet's k)
    stripe_steps: int = 15  # stripe-pattern inversion (varying along the width) toward every class; 0 skips it
    stripe_epsilon: float = 0.1  # its largest per-pixel change
    stripe_lr: float = 0.3  # a SIG target needs the full amplitude: at 0.1, 15 steps barely get there
    fold_batchnorm: bool = True  # optimise through a copy with BatchNorm folded into the layer before (same outputs, faster)

    @classmethod
    def plain_neural_cleanse(cls, steps: int = 300) -> "InversionConfig":
        """The reference behaviour: every class, a fixed number of steps, no early stop, a new best
        trigger whenever a minibatch succeeds, and none of harden's additions (pool check, margins, structured inversions)."""
        return cls(max_steps=steps, keep_fraction=1.0, early_stop=False, warmup_steps=steps, strategy="loop",
                   verify_on_pool=False, margin_starts=0, warp_steps=0, stripe_steps=0, fold_batchnorm=False)


@dataclass
class ClassTrigger:
    target: int
    norm: float  # ‖m‖₁ of the best successful trigger (or of the last mask if none succeeded)
    asr: float  # attack success of that trigger on held-out probe images of other classes
    converged: bool
    succeeded: bool
    steps: int
    margin: float = 0.0  # MM-BD maximum margin reached for this class
    # Attack success and settled loss of the best sub-pixel smooth warp and small stripe pattern
    # (SIG-like) toward this class (structured.py); None when not measured (skipped, or no images
    # of other classes).
    warp_asr: float | None = None
    stripe_asr: float | None = None
    warp_loss: float | None = None
    stripe_loss: float | None = None
    anomaly_index: float = 0.0  # one-sided MAD index of the norm (below-median classes only)
    mask: torch.Tensor | None = field(default=None, repr=False)
    pattern: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("mask"), data.pop("pattern")
        return data


@dataclass
class InversionResult:
    classes: list[ClassTrigger]
    statistics: dict[str, float]
    total_steps: int  # class-steps of optimisation (the cost unit compared in benchmarks)
    strategy: str


def mad_anomaly(values: np.ndarray, low_side: bool = True) -> np.ndarray:
    """|v − median| / (1.4826·MAD), signed so that the suspicious side is positive."""
    median = float(np.median(values))
    mad = 1.4826 * float(np.median(np.abs(values - median)))
    mad = mad if mad > 1e-12 else 1e-12
    return (median - values) / mad if low_side else (values - median) / mad


class _ClassState:
    """Optimisation state of one target class: parameters, its own Adam, cost schedule."""

    def __init__(self, target: int, shape: tuple[int, int, int], config: InversionConfig, generator: torch.Generator, device):
        channels, height, width = shape
        init = math.atanh((config.init_mask - 0.5) * _TANH_SCALE)
        self.target = target
        theta_m = torch.full((1, height, width), init) + 0.1 * torch.randn(1, height, width, generator=generator)
        self.theta_m = theta_m.to(device).requires_grad_(True)
        self.theta_p = torch.randn(channels, height, width, generator=generator).to(device).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.theta_m, self.theta_p], lr=config.lr, betas=(0.5, 0.9))
        self.cost = config.init_cost
        self.ups = self.downs = 0
        self.cost_lowered = False  # NC's rule: stop only once the cost schedule has crossed the boundary after a success
        # Minibatch successes that shrank the mask, smallest last; the 32 smallest bound the
        # memory (a class keeps ~5–25).
        self.candidates: deque[tuple[float, torch.Tensor, torch.Tensor]] = deque(maxlen=32)
        self.last_norm = math.inf
        self.last_improvement = 0
        self.steps = 0
        self.active = True
        self.converged = False

    @property
    def best_norm(self) -> float:
        """Norm of the smallest minibatch success so far (not yet checked on the pool)."""
        return self.candidates[-1][0] if self.candidates else math.inf

    def settle(self, pool_asr: "Callable[[torch.Tensor, torch.Tensor], float] | None", success_asr: float
               ) -> tuple[float, torch.Tensor, torch.Tensor] | None:
        """The smallest kept trigger that also succeeds on the class's whole probe pool
        (`pool_asr`; None trusts the minibatch, as plain Neural Cleanse does).

        A minibatch success alone lets the mask shrink onto a few lucky images; the pool
        check keeps the reversed trigger one that generalises. It runs once, here, from
        the smallest trigger up, rather than at every success (the first usually passes)."""
        for norm, mask, pattern in reversed(self.candidates):
            if pool_asr is None or pool_asr(mask, pattern) >= success_asr:
                return norm, mask, pattern
        return None

    def mask(self) -> torch.Tensor:
        return torch.tanh(self.theta_m) / _TANH_SCALE + 0.5

    def pattern(self) -> torch.Tensor:
        return torch.tanh(self.theta_p) / _TANH_SCALE + 0.5

    def record(self, asr: float, norm: float, config: InversionConfig) -> None:
        """Update the cost schedule and keep every minibatch success that shrinks the mask."""
        self.steps += 1
        self.last_norm = norm
        if asr >= config.success_asr:
            self.ups, self.downs = self.ups + 1, 0
            if norm < self.best_norm:
                if norm < self.best_norm * (1 - config.early_stop_tol):
                    self.last_improvement = self.steps
                self.candidates.append((norm, self.mask().detach().clone(), self.pattern().detach().clone()))
        else:
            self.ups, self.downs = 0, self.downs + 1
        if self.ups >= config.patience:
            self.cost, self.ups = self.cost * config.cost_up, 0
        elif self.downs >= config.patience:
            self.cost, self.downs = self.cost / config.cost_down, 0
            self.cost_lowered = bool(self.candidates)
        stalled = self.cost_lowered and self.steps - self.last_improvement >= config.early_stop_patience
        if (config.early_stop and stalled) or self.steps >= config.max_steps:
            self.active, self.converged = False, True


def _stamp(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """images (g,B,C,H,W), mask (g,1,H,W), pattern (g,C,H,W) → stamped (g,B,C,H,W)."""
    return (1 - mask[:, None]) * images + (mask * pattern)[:, None]


def _split_probe(images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hold out a fifth of each class's probe images to score the reversed triggers."""
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for cls in labels.unique():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        held[idx[: max(1, len(idx) // 5)] if len(idx) > 1 else idx[:0]] = True
    return images[~held], labels[~held], images[held], labels[held]


def _passes_size(config: InversionConfig, images_per_class: int, pixels: int, classes: int) -> int:
    """How many classes share a forward pass under `config.strategy`."""
    if config.strategy == "loop":
        return 1
    if config.strategy == "batched":
        return classes
    return max(1, config.batch_pixels // (images_per_class * pixels))


def _passes(active: list, images_per_class: int, pixels: int, config: InversionConfig) -> list[list]:
    """The classes optimised together in each forward pass of one step."""
    size = _passes_size(config, images_per_class, pixels, len(active))
    return [active[i:i + size] for i in range(0, len(active), size)]


def invert_triggers(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: InversionConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress=None,
) -> InversionResult:
    """Reverse-engineer a minimal trigger toward every class from a small clean probe set."""
    config = config or InversionConfig()
    device = torch.device(device)
    if config.strategy not in STRATEGIES:
        raise ValueError(f"strategy {config.strategy!r}: expected {', '.join(STRATEGIES)}")
    model = model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if config.fold_batchnorm:
        model = folded_for_inference(model, images[:32].to(device))  # a copy of the frozen model is frozen too
    opt_x, opt_y, held_x, held_y = _split_probe(images, labels, seed)
    opt_x, opt_y = opt_x.to(device), opt_y.to(device)
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(images.shape[1:])
    states = [_ClassState(t, shape, config, generator, device) for t in range(num_classes)]
    pools = [torch.nonzero(opt_y != t).flatten() for t in range(num_classes)]
    for state, pool in zip(states, pools):
        state.active = len(pool) > 0
    total_steps = 0
    step = 0
    while any(s.active for s in states):
        if step == config.warmup_steps and config.keep_fraction < 1.0:
            _prune(states, config)
        active = [s for s in states if s.active]
        warming_up = step < config.warmup_steps and config.keep_fraction < 1.0
        batch_size = config.warmup_batch_size if warming_up else config.batch_size
        for group in _passes(active, batch_size, shape[1] * shape[2], config):
            batch = torch.stack([pools[s.target][torch.randint(len(pools[s.target]), (batch_size,), generator=generator).to(pools[s.target].device)] for s in group])
            masks = torch.stack([s.mask() for s in group])
            patterns = torch.stack([s.pattern() for s in group])
            stamped = _stamp(opt_x[batch], masks, patterns)
            logits = model(training_layout(model, stamped.flatten(0, 1))).view(len(group), batch_size, -1)
            targets = torch.tensor([s.target for s in group], device=device)
            ce = F.cross_entropy(logits.flatten(0, 1), targets.repeat_interleave(batch_size), reduction="none")
            ce = ce.view(len(group), -1).mean(1)
            norms = masks.flatten(1).sum(1)
            costs = torch.tensor([s.cost for s in group], device=device)
            for s in group:
                s.optimizer.zero_grad(set_to_none=True)
            (ce + costs * norms).sum().backward()
            asr = (logits.argmax(-1) == targets[:, None]).float().mean(1)
            for s, a, n in zip(group, asr.tolist(), norms.detach().tolist()):
                s.record(a, n, config)  # before the step: keeps the mask that was measured
                s.optimizer.step()
            total_steps += len(group)
        step += 1
        if progress is not None:
            progress(step, config.max_steps)
    held_x, held_y = held_x.to(device), held_y.to(device)
    classes = []
    for s in states:
        pool_asr = (lambda m, p, t=s.target: _stamped_asr(model, opt_x[pools[t]], t, m, p)) if config.verify_on_pool else None
        classes.append(_finish(s, s.settle(pool_asr, config.success_asr), model, held_x, held_y))
    margins = max_margins(model, shape, num_classes, config, device=device, seed=seed)
    images, labels = images.to(device), labels.to(device)
    height, width = shape[1:]
    per_pass = _passes_size(config, config.structured_batch_size, height * width, num_classes)
    structured = dict(batch_size=config.structured_batch_size, classes_per_pass=per_pass)
    warps = reach_every_class(model, images, labels, num_classes, warp_transforms(height, width, config.warp_budget),
                              (2, config.warp_grid, config.warp_grid), steps=config.warp_steps, lr=0.1, seed=seed + 2, **structured)
    stripes = reach_every_class(model, images, labels, num_classes, stripe_transforms(config.stripe_epsilon), (width,),
                                steps=config.stripe_steps, lr=config.stripe_lr, seed=seed + 3, **structured)
    for trigger, margin, warp, stripe in zip(classes, margins, warps, stripes):
        trigger.margin = float(margin)
        if warp is not None:
            trigger.warp_asr, trigger.warp_loss = warp.success, warp.loss
        if stripe is not None:
            trigger.stripe_asr, trigger.stripe_loss = stripe.success, stripe.loss
    norms = np.array([c.norm for c in classes])
    for trigger, index in zip(classes, mad_anomaly(norms)):
        trigger.anomaly_index = float(max(index, 0.0))
    return InversionResult(classes, statistics(classes, shape), total_steps, config.strategy)


@torch.no_grad()
def _stamped_asr(model: nn.Module, images: torch.Tensor, target: int, mask: torch.Tensor, pattern: torch.Tensor) -> float:
    stamped = training_layout(model, (1 - mask) * images + mask * pattern)
    return float((model(stamped).argmax(1) == target).float().mean())


def _prune(states: list[_ClassState], config: InversionConfig) -> None:
    """Keep optimising only the classes whose triggers are currently easiest (smallest norm)."""
    keep = max(2, math.ceil(config.keep_fraction * len(states)))
    score = lambda s: s.best_norm if s.candidates else s.last_norm + 1e6  # noqa: E731
    ranked = sorted((s for s in states if s.active), key=score)
    for state in ranked[keep:]:
        state.active = False


@torch.no_grad()
def _finish(state: _ClassState, best: tuple[float, torch.Tensor, torch.Tensor] | None, model: nn.Module,
            held_x: torch.Tensor, held_y: torch.Tensor) -> ClassTrigger:
    succeeded = best is not None
    norm, mask, pattern = best if succeeded else (float(state.mask().sum()), state.mask().detach(), state.pattern().detach())
    sources = held_x[held_y != state.target]
    asr = 0.0
    if len(sources):
        asr = _stamped_asr(model, sources, state.target, mask, pattern)
    return ClassTrigger(state.target, float(norm), asr, state.converged, succeeded, state.steps,
                        mask=mask.cpu(), pattern=pattern.cpu())


def max_margins(model: nn.Module, shape: tuple[int, ...], num_classes: int, config: InversionConfig, *, device, seed: int = 0) -> list[float]:
    """Per class, the largest logit margin f_c − max_{k≠c} f_k reachable from random images (MM-BD);
    all 0.0 when `config.margin_starts` is 0 (plain Neural Cleanse computes none)."""
    if config.margin_starts == 0:
        return [0.0] * num_classes
    generator = torch.Generator().manual_seed(seed + 1)
    theta = torch.randn(num_classes * config.margin_starts, *shape, generator=generator).to(device).requires_grad_(True)
    targets = torch.arange(num_classes, device=device).repeat_interleave(config.margin_starts)
    optimizer = torch.optim.Adam([theta], lr=config.lr)
    best = torch.full((len(targets),), -math.inf, device=device)
    for _ in range(config.margin_steps):
        logits = model(training_layout(model, torch.sigmoid(theta)))
        own = logits.gather(1, targets[:, None]).squeeze(1)
        others = logits.masked_fill(F.one_hot(targets, num_classes).bool(), -math.inf).amax(1)
        margin = own - others
        best = torch.maximum(best, margin.detach())
        optimizer.zero_grad(set_to_none=True)
        (-margin.sum()).backward()
        optimizer.step()
    return best.view(num_classes, config.margin_starts).amax(1).tolist()


def _best(successes) -> float:
    """The highest measured success (0.0 when none was measured)."""
    return float(max((v for v in successes if v is not None), default=0.0))


_LOSS_FLOOR = 1e-4  # a family's settled loss below this counts as this: the ratio stays finite


def _loss_ratio(losses: list[float | None]) -> float:
    """log(median class's settled loss / the lowest): how much more easily a trigger family
    reaches its easiest class than the model's typical class. A fragile clean model lets
    a small full-image pattern reach many classes, and the ratio stays small; a backdoor of the
    family makes its target far easier than the rest. 0.0 when the family was not measured."""
    measured = np.array([loss for loss in losses if loss is not None])
    if len(measured) < 2:
        return 0.0
    logs = np.log(np.maximum(measured, _LOSS_FLOOR))
    return float(np.median(logs) - logs.min())


def statistics(classes: list[ClassTrigger], shape: tuple[int, ...]) -> dict[str, float]:
    """Model-level statistics the calibrated verdict is fitted on (see harden/scan/verdict.py)."""
    area = float(shape[1] * shape[2])
    ranked = sorted(classes, key=lambda c: c.norm)
    first, second = ranked[0], ranked[1] if len(ranked) > 1 else ranked[0]
    converged = sorted((c for c in classes if c.converged and c.succeeded), key=lambda c: c.norm)
    if len(converged) >= 2:
        gap = math.log(max(converged[1].norm, 1e-6) / max(converged[0].norm, 1e-6))
    else:
        gap = math.log(max(second.norm, 1e-6) / max(first.norm, 1e-6))
    margin_index = mad_anomaly(np.array([c.margin for c in classes]), low_side=False)
    smallest = int(np.argmin([c.norm for c in classes]))
    return {
        "norm_gap": float(gap),
        "anomaly_index": float(max(c.anomaly_index for c in classes)),
        "min_norm_fraction": float(first.norm / area),
        "top_asr": float(first.asr),
        "margin_anomaly": float(margin_index.max()),
        # The two signals agree on a backdoor's target: the class with the smallest trigger
        # also reaches an abnormal margin. On a clean model the largest margin is elsewhere.
        "target_margin_anomaly": float(margin_index[smallest]),
        "warp_asr": _best(c.warp_asr for c in classes),
        "stripe_asr": _best(c.stripe_asr for c in classes),
        # At the family's easiest class, wherever it is: a warp or SIG target need not be the
        # smallest mask's class.
        "warp_loss_ratio": _loss_ratio([c.warp_loss for c in classes]),
        "stripe_loss_ratio": _loss_ratio([c.stripe_loss for c in classes]),
    }
